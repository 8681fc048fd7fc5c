//! The gateway over real sockets on 127.0.0.1:0 with the in-process mesh:
//! the WebSocket protocol of bff-contract.md section 3.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use nuropb_bff::{
    BoxFuture, DefaultHandler, ErrorBody, IncomingRequest, LocalCall, MemoryMesh, NoAuth,
    StubService, WsHandler,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const ROUTES: &str = r#"
[[route]]
call = "orders.*"

[[route]]
call = "admin.purge"
roles = ["admin"]

[[route]]
call = "orders.get"
expose_as = "shop.get"

[[route]]
call = "ghost.*"

[[route]]
call = "slow.wait"
timeout_ms = 300

[[event]]
topic = "orders.#"
deliver = "target"

[[event]]
topic = "news.*"
deliver = "subscribers"

[[event]]
topic = "system.*"
deliver = "all"
"#;

fn stubs() -> MeshSetup {
    let mesh = MemoryMesh::new();
    mesh.add_service(
        "orders",
        Arc::new(
            StubService::new("orders")
                .method("get", |r: IncomingRequest| async move {
                    Ok(json!({"id": r.params.get("id").cloned().unwrap_or(Value::Null)}))
                })
                .method("whoami", |r: IncomingRequest| async move {
                    Ok(Value::Object(r.context))
                })
                .method("sleep", |r: IncomingRequest| async move {
                    let ms = r.params["ms"].as_u64().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    Ok(json!(ms))
                })
                .method("fail", |_| async {
                    Err(ErrorBody::new(
                        "NuropbException",
                        "Runtime exception calling orders.fail:ValueError: no",
                    ))
                }),
        ),
        vec![],
    );
    mesh.add_service(
        "admin",
        Arc::new(StubService::new("admin").method("purge", |_| async { Ok(json!("purged")) })),
        vec![],
    );
    mesh.add_service(
        "slow",
        Arc::new(StubService::new("slow").method("wait", |_| async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Value::Null)
        })),
        vec![],
    );
    MeshSetup::Memory(mesh)
}

async fn gateway() -> Running {
    start(ROUTES, hs256(), Arc::new(DefaultHandler), |_| {}, stubs()).await
}

#[tokio::test]
async fn hello_then_a_request_round_trip_with_gateway_built_context() {
    let gw = gateway().await;
    let t = token("alice", &["user"], 300);
    let (mut c, hello) = connect(&gw.url(), &t).await;
    assert_eq!(hello["payload"]["event"]["user_id"], "alice");
    assert_eq!(hello["payload"]["event"]["username"], "alice");
    let sid = hello["payload"]["event"]["session_id"]
        .as_str()
        .unwrap()
        .to_owned();

    let r = c
        .request_traced("orders", "get", json!({"id": 7}), "t1")
        .await
        .unwrap();
    assert_eq!(r["result"], json!({"id": 7}));
    assert_eq!(r["error"], Value::Null);

    // The client's own context is ignored; the gateway's is sent.
    c.send(
        json!({"type":"request","payload":{"service":"orders","method":"whoami","params":{},
        "trace_id":"t2","context":{"user_id":"mallory","Authorization":"forged"}}}),
    )
    .await
    .unwrap();
    let r = c.recv().await.unwrap();
    assert_eq!(
        r["payload"]["trace_id"], "t2",
        "the socket's id pairs the answer"
    );
    let ctx = &r["payload"]["result"];
    assert_eq!(ctx["user_id"], "alice");
    assert_eq!(ctx["Authorization"], t.as_str());
    assert_eq!(ctx["session_id"], sid.as_str());
    // The mesh sees a W3C trace: a fresh one without a traceparent...
    let fresh = ctx["trace_id"].as_str().unwrap().to_owned();
    assert!(
        fresh.len() == 32
            && fresh
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{ctx}"
    );
    let parent = ctx["traceparent"].as_str().unwrap();
    assert!(parent.starts_with(&format!("00-{fresh}-")), "{ctx}");
    // ... the client's trace with one (the call a span under its span)...
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    c.send(
        json!({"type":"request","payload":{"service":"orders","method":"whoami","params":{},
        "trace_id":"t3","traceparent":client}}),
    )
    .await
    .unwrap();
    let r = c.recv().await.unwrap();
    let ctx = &r["payload"]["result"];
    assert_eq!(ctx["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736", "{ctx}");
    let parent = ctx["traceparent"].as_str().unwrap();
    assert!(
        parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{ctx}"
    );
    assert!(
        !parent.contains("00f067aa0ba902b7"),
        "a span of its own: {ctx}"
    );
    // ... and a malformed one is ignored: a fresh trace, a normal answer.
    c.send(
        json!({"type":"request","payload":{"service":"orders","method":"whoami","params":{},
        "trace_id":"t4","traceparent":"00-nonsense"}}),
    )
    .await
    .unwrap();
    let r = c.recv().await.unwrap();
    assert_eq!(r["payload"]["error"], Value::Null, "{r}");
    let ctx = &r["payload"]["result"];
    assert_eq!(ctx["trace_id"].as_str().unwrap().len(), 32, "{ctx}");
    assert_ne!(ctx["trace_id"], fresh.as_str());
    gw.stop().await;
}

#[tokio::test]
async fn requests_on_one_socket_run_concurrently() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("bob", &[], 300)).await;
    // A slow request first, then a fast one: the fast one must not wait.
    c.send(json!({"type":"request","payload":{"service":"orders","method":"sleep","params":{"ms":1500},"trace_id":"slow"}})).await.unwrap();
    c.send(json!({"type":"request","payload":{"service":"orders","method":"sleep","params":{"ms":1},"trace_id":"fast"}})).await.unwrap();
    let first = c.recv().await.unwrap();
    let second = c.recv().await.unwrap();
    assert_eq!(first["payload"]["trace_id"], "fast", "{first}");
    assert_eq!(second["payload"]["trace_id"], "slow", "{second}");
    gw.stop().await;
}

#[tokio::test]
async fn a_trace_id_is_made_up_when_missing() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("bob", &[], 300)).await;
    c.send(json!({"type":"request","payload":{"service":"orders","method":"get","params":{}}}))
        .await
        .unwrap();
    let r = c.recv().await.unwrap();
    assert!(
        r["payload"]["trace_id"]
            .as_str()
            .is_some_and(|t| t.len() >= 16),
        "{r}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn routing_errors_and_service_errors() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("carol", &["user"], 300)).await;

    let r = c
        .request_traced("users", "delete", json!({}), "a")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");
    let r = c
        .request_traced("admin", "purge", json!({}), "b")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "Forbidden", "{r}");
    let r = c
        .request_traced("shop", "get", json!({"id": 1}), "c")
        .await
        .unwrap();
    assert_eq!(r["result"], json!({"id": 1}), "expose_as renames");
    let r = c
        .request_traced("ghost", "boo", json!({}), "d")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "NuropbNotDeliveredError", "{r}");
    let r = c
        .request_traced("orders", "fail", json!({}), "e")
        .await
        .unwrap();
    assert_eq!(
        r["error"]["error"], "NuropbException",
        "service errors pass through: {r}"
    );
    assert_eq!(
        r["error"]["description"],
        "Runtime exception calling orders.fail:ValueError: no"
    );
    let r = c
        .request_traced("slow", "wait", json!({}), "f")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "Timeout", "{r}");

    let (mut admin, _) = connect(&gw.url(), &token("root", &["admin"], 300)).await;
    let r = admin
        .request_traced("admin", "purge", json!({}), "g")
        .await
        .unwrap();
    assert_eq!(r["result"], "purged");
    gw.stop().await;
}

#[tokio::test]
async fn every_malformed_frame_gets_an_error_and_the_socket_stays_usable() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("dave", &[], 300)).await;
    let bad = [
        "{not json",
        "42",
        r#"{"type":"fly","payload":{}}"#,
        r#"{"payload":{}}"#,
        r#"{"type":"request","payload":{"service":"orders"}}"#,
        r#"{"type":"request","payload":{"service":"orders","method":"get","params":"x","trace_id":"p"}}"#,
        r#"{"type":"subscribe","payload":{"topics":["bad..topic"]}}"#,
    ];
    for text in bad {
        c.send_text(text).await.unwrap();
        let e = c.recv().await.unwrap();
        assert_eq!(e["type"], "error", "{text}: {e}");
        assert_eq!(e["payload"]["error"], "InvalidMessage", "{text}: {e}");
        assert!(
            e["payload"]["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty())
        );
    }
    c.send_message(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(
        c.recv().await.unwrap()["payload"]["error"],
        "InvalidMessage"
    );
    let big = format!(
        r#"{{"type":"request","payload":{{"service":"orders","method":"get","params":{{"x":"{}"}}}}}}"#,
        "a".repeat(70_000)
    );
    c.send_text(&big).await.unwrap();
    assert_eq!(
        c.recv().await.unwrap()["payload"]["error"],
        "MessageTooLarge"
    );
    // Still usable.
    let r = c
        .request_traced("orders", "get", json!({"id": 2}), "ok")
        .await
        .unwrap();
    assert_eq!(r["result"]["id"], 2);
    gw.stop().await;
}

#[tokio::test]
async fn handshake_auth_sources_and_refusals() {
    let gw = gateway().await;
    // Bad token in the handshake: HTTP 401 before the upgrade.
    let err = TestClient::connect_with(&gw.url(), |r| {
        r.headers_mut()
            .insert("authorization", "Bearer nope".parse().unwrap());
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    // Cookie and query parameter.
    let t = token("erin", &[], 300);
    let cookie = format!("theme=dark; access_token={t}");
    let mut c = TestClient::connect_with(&gw.url(), |r| {
        r.headers_mut().insert("cookie", cookie.parse().unwrap());
    })
    .await
    .unwrap();
    assert_eq!(
        c.recv().await.unwrap()["payload"]["event"]["user_id"],
        "erin"
    );
    let mut c = TestClient::connect_with(&format!("{}?access_token={t}", gw.url()), |_| {})
        .await
        .unwrap();
    assert_eq!(
        c.recv().await.unwrap()["payload"]["event"]["user_id"],
        "erin"
    );
    // A disallowed browser origin.
    let err = TestClient::connect_with(&gw.url(), |r| {
        r.headers_mut()
            .insert("origin", "https://evil.example".parse().unwrap());
    })
    .await
    .unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    gw.stop().await;
}

#[tokio::test]
async fn first_frame_authentication() {
    let gw = gateway().await;
    let mut c = TestClient::connect_with(&gw.url(), |_| {}).await.unwrap();
    c.send(json!({"type":"authenticate","payload":{"token": token("fay", &[], 300)}}))
        .await
        .unwrap();
    let hello = c.recv().await.unwrap();
    assert_eq!(hello["payload"]["event"]["user_id"], "fay");

    // Anything else first is refused and closed.
    let mut c = TestClient::connect_with(&gw.url(), |_| {}).await.unwrap();
    c.send(json!({"type":"request","payload":{"service":"orders","method":"get"}}))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap()["payload"]["error"], "Unauthorized");
    assert_eq!(c.closed().await.unwrap(), Some(4003));
    gw.stop().await;
}

#[tokio::test]
async fn an_expiring_token_closes_with_4001_unless_renewed() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("gus", &[], 1)).await;
    assert_eq!(c.closed().await.unwrap(), Some(4001));

    let (mut c, _) = connect(&gw.url(), &token("gus", &[], 1)).await;
    c.send(json!({"type":"authenticate","payload":{"token": token("gus", &[], 300)}}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let r = c
        .request_traced("orders", "get", json!({"id": 3}), "after")
        .await
        .unwrap();
    assert_eq!(r["result"]["id"], 3, "renewed session still open");
    // A token for someone else does not renew.
    c.send(json!({"type":"authenticate","payload":{"token": token("other", &[], 300)}}))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap()["payload"]["error"], "Unauthorized");
    gw.stop().await;
}

#[tokio::test]
async fn commands_are_acked() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("hal", &[], 300)).await;
    c.send(json!({"type":"command","payload":{"service":"orders","method":"get","params":{},"trace_id":"c1"}})).await.unwrap();
    assert_eq!(
        c.recv().await.unwrap(),
        json!({"type":"ack","payload":{"trace_id":"c1"}})
    );
    c.send(json!({"type":"command","payload":{"service":"nope","method":"x","params":{},"trace_id":"c2"}})).await.unwrap();
    let e = c.recv().await.unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["payload"]["error"], "RouteNotFound");
    assert_eq!(e["payload"]["trace_id"], "c2");
    gw.stop().await;
}

#[tokio::test]
async fn in_flight_limit_answers_rate_limited() {
    let gw = start(
        ROUTES,
        hs256(),
        Arc::new(DefaultHandler),
        |c| c.limits.max_in_flight = 2,
        stubs(),
    )
    .await;
    let (mut c, _) = connect(&gw.url(), &token("ivy", &[], 300)).await;
    for i in 0..3 {
        c.send(json!({"type":"request","payload":{"service":"orders","method":"sleep","params":{"ms":500},"trace_id":format!("r{i}")}})).await.unwrap();
    }
    let first = c.recv().await.unwrap();
    assert_eq!(first["payload"]["trace_id"], "r2");
    assert_eq!(first["payload"]["error"]["error"], "RateLimited");
    gw.stop().await;
}

#[tokio::test]
async fn push_to_session_user_and_all_through_the_mesh_methods_and_events() {
    let gw = gateway().await;
    let (mut a1, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    let (mut a2, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    let (mut b, _) = connect(&gw.url(), &token("ben", &[], 300)).await;
    let mesh = gw.gateway.mesh().clone();
    let call = |method: &str, params: Value| nuropb_bff::Call {
        service: "test-bff".into(),
        method: method.into(),
        params: params.as_object().unwrap().clone().into(),
        context: push_context().into(),
        ttl: Duration::from_secs(5),
        trace_id: None,
    };
    // Without a caller token, or with one lacking the push role: refused,
    // and no socket is touched (the next frames below are the pushes).
    for context in [
        serde_json::Map::new(),
        [(
            "Authorization".to_owned(),
            json!(token("svc", &["other"], 300)),
        )]
        .into_iter()
        .collect(),
        [("Authorization".to_owned(), json!("Bearer not-a-token"))]
            .into_iter()
            .collect(),
    ] {
        let mut refused = call("broadcast", json!({"message":"no"}));
        refused.context = context.into();
        let e = mesh.request(&refused).await.unwrap_err();
        assert!(
            matches!(&e, nuropb_bff::MeshError::Remote(b) if b.error == "NuropbAuthorizationError"),
            "{e:?}"
        );
    }
    let r = mesh
        .request(&call(
            "send_to_users",
            json!({"user_ids":["ann"],"message":{"n":1},"topic":"note"}),
        ))
        .await
        .unwrap();
    assert_eq!(r["delivered"], 2, "{r}");
    for c in [&mut a1, &mut a2] {
        assert_eq!(
            c.recv().await.unwrap(),
            json!({"type":"event","payload":{"topic":"note","event":{"n":1}}})
        );
    }
    let r = mesh
        .request(&call("broadcast", json!({"message":"hi"})))
        .await
        .unwrap();
    assert_eq!(r["delivered"], 3, "{r}");
    for c in [&mut a1, &mut a2, &mut b] {
        assert_eq!(c.recv().await.unwrap()["payload"]["event"], "hi");
    }
    let stats = mesh.request(&call("stats", json!({}))).await.unwrap();
    assert_eq!(
        (stats["sessions"].clone(), stats["users"].clone()),
        (json!(3), json!(2)),
        "{stats}"
    );
    assert_eq!(stats["cluster"]["instances"], 1, "{stats}");
    let d = mesh
        .request(&call("describe_me", json!({})))
        .await
        .unwrap_err();
    assert!(matches!(d, nuropb_bff::MeshError::Remote(_)));
    let desc = mesh
        .request(&call("nuropb_describe", json!({})))
        .await
        .unwrap();
    assert_eq!(desc["service_name"], "test-bff");
    assert!(desc["methods"]["send_to_users"].is_object());

    // Events: targeted, subscribed, to all.
    let publish = |topic: &str, target: Option<Vec<String>>| nuropb_bff::OutgoingEvent {
        topic: topic.into(),
        event: json!({"t": topic}),
        context: Default::default(),
        target,
        trace_id: None,
    };
    mesh.publish_event(publish("orders.shipped", Some(vec!["ben".into()])))
        .await
        .unwrap();
    assert_eq!(
        b.recv().await.unwrap()["payload"]["topic"],
        "orders.shipped"
    );
    b.send(json!({"type":"subscribe","payload":{"topics":["news.*"]}}))
        .await
        .unwrap();
    assert_eq!(
        b.recv().await.unwrap(),
        json!({"type":"subscribed","payload":{"topics":["news.*"]}})
    );
    mesh.publish_event(publish("news.today", None))
        .await
        .unwrap();
    assert_eq!(b.recv().await.unwrap()["payload"]["topic"], "news.today");
    mesh.publish_event(publish("system.restart", None))
        .await
        .unwrap();
    for c in [&mut a1, &mut a2, &mut b] {
        assert_eq!(
            c.recv().await.unwrap()["payload"]["topic"],
            "system.restart"
        );
    }
    // ann got neither the targeted nor the subscribed event: the next frame
    // she sees is her own response.
    let r = a1
        .request_traced("orders", "get", json!({"id": 9}), "z")
        .await
        .unwrap();
    assert_eq!(r["result"]["id"], 9);

    let r = mesh
        .request(&call("disconnect_users", json!({"user_ids":["ann"]})))
        .await
        .unwrap();
    assert_eq!(r["disconnected"], 2, "{r}");
    assert_eq!(a1.closed().await.unwrap(), Some(4000));
    assert_eq!(a2.closed().await.unwrap(), Some(4000));
    gw.stop().await;
}

#[tokio::test]
async fn shutdown_closes_sessions_with_1001() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("jo", &[], 300)).await;
    let stopping = tokio::spawn(gw.stop());
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    stopping.await.unwrap();
}

#[tokio::test]
async fn health_ready_and_metrics() {
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("kim", &[], 300)).await;
    c.request_traced("orders", "get", json!({}), "m")
        .await
        .unwrap();
    c.request_traced("shop", "get", json!({}), "s")
        .await
        .unwrap();
    c.request_traced("admin", "purge", json!({}), "f")
        .await
        .unwrap();
    c.request_traced("nowhere", "x", json!({}), "n")
        .await
        .unwrap();
    let get = |path: &'static str| async move { http_get(gw.addr, path).await.unwrap() };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(get("/readyz").await.0, 200);
    let (status, body) = get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains(r#"bff_requests_total{outcome="ok"} 2"#),
        "{body}"
    );
    assert!(body.contains("bff_ws_sessions 1"), "{body}");
    // Latency by route, under the name the client calls, and by outcome;
    // a call outside the routing file under `-`, never its own name.
    for series in [
        r#"bff_route_duration_seconds_count{route="orders.*",outcome="ok"} 1"#,
        r#"bff_route_duration_seconds_count{route="shop.get",outcome="ok"} 1"#,
        r#"bff_route_duration_seconds_count{route="-",outcome="Forbidden"} 1"#,
        r#"bff_route_duration_seconds_count{route="-",outcome="RouteNotFound"} 1"#,
    ] {
        assert!(body.contains(series), "{series} in {body}");
    }
    assert!(!body.contains("nowhere"), "{body}");
    gw.stop().await;
}

#[derive(Debug)]
struct Composer;
impl WsHandler for Composer {
    fn local_request(
        &self,
        call: LocalCall,
    ) -> Option<BoxFuture<'static, Result<Value, ErrorBody>>> {
        if call.call.service != "bff" {
            return None;
        }
        Some(Box::pin(async move {
            let a = call
                .mesh
                .request(
                    "orders",
                    "get",
                    json!({"id": 1}).as_object().unwrap().clone(),
                )
                .await
                .map_err(|e| e.to_client())?;
            let b = call
                .mesh
                .request(
                    "orders",
                    "get",
                    json!({"id": 2}).as_object().unwrap().clone(),
                )
                .await
                .map_err(|e| e.to_client())?;
            Ok(json!([a, b]))
        }))
    }
    fn on_response(
        &self,
        _s: &nuropb_bff::SessionInfo,
        call: &nuropb_bff::Call,
        result: nuropb_bff::RawJson,
    ) -> nuropb_bff::RawJson {
        let result = result.to_value().expect("a stub's result is a Value");
        json!({"via": format!("{}.{}", call.service, call.method), "result": result}).into()
    }
}

#[tokio::test]
async fn handler_hooks_compose_and_transform() {
    let gw = start(ROUTES, hs256(), Arc::new(Composer), |_| {}, stubs()).await;
    let (mut c, _) = connect(&gw.url(), &token("lee", &[], 300)).await;
    let r = c
        .request_traced("bff", "both", json!({}), "l")
        .await
        .unwrap();
    assert_eq!(r["result"], json!([{"id":1},{"id":2}]));
    let r = c
        .request_traced("shop", "get", json!({"id": 5}), "s")
        .await
        .unwrap();
    assert_eq!(r["result"], json!({"via":"orders.get","result":{"id":5}}));
    gw.stop().await;
}

/// Local routes for `bff.*` only, said up front: other calls are never
/// offered to `local_request`, which would answer anything it is offered.
#[derive(Debug)]
struct OnlyBff;
impl WsHandler for OnlyBff {
    fn is_local(&self, call: &nuropb_bff::ClientCall) -> bool {
        call.service == "bff"
    }
    fn local_request(
        &self,
        call: LocalCall,
    ) -> Option<BoxFuture<'static, Result<Value, ErrorBody>>> {
        Some(Box::pin(async move {
            Ok(json!({"local": format!("{}.{}", call.call.service, call.call.method)}))
        }))
    }
}

#[tokio::test]
async fn only_the_calls_a_handler_calls_local_are_offered_to_it() {
    let gw = start(ROUTES, hs256(), Arc::new(OnlyBff), |_| {}, stubs()).await;
    let (mut c, _) = connect(&gw.url(), &token("lee", &[], 300)).await;
    let r = c.request_traced("bff", "x", json!({}), "l").await.unwrap();
    assert_eq!(r["result"], json!({"local": "bff.x"}));
    // Not offered: routed to the mesh as any call.
    let r = c
        .request_traced("shop", "get", json!({"id": 5}), "s")
        .await
        .unwrap();
    assert_eq!(r["result"], json!({"id": 5}), "{r}");
    let r = c
        .request_traced("nowhere", "x", json!({}), "n")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");
    gw.stop().await;
}

#[tokio::test]
async fn no_auth_mode_gives_each_socket_its_own_anonymous_user() {
    let gw = start(
        ROUTES,
        Arc::new(NoAuth),
        Arc::new(DefaultHandler),
        |_| {},
        stubs(),
    )
    .await;
    let mut a = TestClient::connect_with(&gw.url(), |_| {}).await.unwrap();
    let mut b = TestClient::connect_with(&gw.url(), |_| {}).await.unwrap();
    let ha = a.recv().await.unwrap();
    let hb = b.recv().await.unwrap();
    assert_ne!(
        ha["payload"]["event"]["user_id"],
        hb["payload"]["event"]["user_id"]
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_slow_and_unregistered() {
    let gw = start(
        ROUTES,
        hs256(),
        Arc::new(DefaultHandler),
        |c| {
            c.limits.outbound_queue = 4;
            c.limits.write_timeout = Duration::from_secs(10);
        },
        stubs(),
    )
    .await;
    let (mut sleeper, _) = connect(&gw.url(), &token("sleepy", &[], 300)).await;
    let (mut awake, _) = connect(&gw.url(), &token("awake", &[], 300)).await;
    let sessions = gw.gateway.sessions();
    // Big frames until the sleeper's socket buffers and then its queue are
    // full; it does not read.
    let frame = format!("\"{}\"", "x".repeat(60_000));
    let mut pushes = 0;
    while sessions.send_to_users(&["sleepy"], frame.clone().into()) == 1 {
        assert!(pushes < 5_000, "the sleeper was never closed");
        pushes += 1;
        if pushes % 16 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // Closed as slow, and counted.
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("bff_slow_consumer_closes_total 1"),
        "{metrics}"
    );
    // Reading again within the write timeout, it gets every frame the
    // registry took before the close, whole, then the close code.
    assert_eq!(
        sleeper.texts_then_close().await.unwrap(),
        (pushes, Some(4008))
    );
    // And it is gone from the registry.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sessions.sessions_of("sleepy").is_empty() {
        assert!(std::time::Instant::now() < deadline, "still registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The other client is unaffected.
    let r = awake
        .request_traced("orders", "get", json!({"id": 9}), "still-here")
        .await
        .unwrap();
    assert_eq!(r["result"]["id"], 9);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_calls_is_answered_in_order_without_loss() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gw = start(
        ROUTES,
        hs256(),
        Arc::new(DefaultHandler),
        |c| c.limits.outbound_queue = 4,
        stubs(),
    )
    .await;
    let url = format!("{}?access_token={}", gw.url(), token("flood", &[], 300));
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = ws.split();
    // Each refusal names the 8 KB method: 5,000 of them (40 MB) are far more than
    // the socket buffers and the 4-frame queue hold while nobody reads. The
    // gateway must stop reading rather than drop answers, close the client
    // or pile up tasks.
    let n = 5_000;
    let method = "m".repeat(8_000);
    let sender = tokio::spawn(async move {
        for i in 0..n {
            let frame = json!({"type":"request","payload":{"service":"unrouted","method":method,"trace_id":format!("f{i}")}});
            tx.send(Message::Text(frame.to_string().into()))
                .await
                .unwrap();
        }
        tx
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !sender.is_finished(),
        "the gateway kept reading a client that does not read"
    );
    let mut seen = 0;
    while seen < n {
        let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
            .await
            .expect("stalled")
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        if v["payload"]["topic"] == "hello" {
            continue;
        }
        assert_eq!(v["payload"]["trace_id"], format!("f{seen}"));
        assert_eq!(v["payload"]["error"]["error"], "RouteNotFound");
        seen += 1;
    }
    let mut tx = sender.await.unwrap();
    tx.send(Message::Text(
        json!({"type":"request","payload":{"service":"orders","method":"get","params":{"id":1},"trace_id":"after"}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(v["payload"]["result"]["id"], 1, "{v}");
    gw.stop().await;
}

#[tokio::test]
async fn a_client_that_closes_with_requests_in_flight_gets_a_clean_close() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let gw = gateway().await;
    let (mut c, _) = connect(&gw.url(), &token("leaving", &[], 300)).await;
    c.send(json!({"type":"request","payload":{"service":"orders","method":"sleep","params":{"ms":300},"trace_id":"last"}}))
        .await
        .unwrap();
    c.send_message(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    // The closing handshake completes (the answer to the request may or may
    // not come first: a WebSocket sends nothing after its close reply).
    assert_eq!(c.closed().await.unwrap(), Some(1000));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while gw.gateway.sessions().counts().sessions > 0 {
        assert!(std::time::Instant::now() < deadline, "session not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

/// Every client of an instance reconnecting at once after a deploy: the
/// kernel holds the connections the gateway has not accepted yet, far past
/// std's 128 (past it, each waits a second for a SYN retransmit).
#[tokio::test]
async fn a_reconnect_storm_fits_in_the_listen_backlog() {
    let gateway = nuropb_bff::Gateway::builder(nuropb_bff::Settings::new("backlog-bff"))
        .routes(nuropb_bff::RouteTable::parse("r", "").unwrap())
        .start()
        .await
        .unwrap();
    // Bound, never accepting: every connection waits in the backlog.
    let listener = gateway.bind().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connects = (0..1000).map(|_| async move {
        tokio::time::timeout(
            Duration::from_millis(700),
            tokio::net::TcpStream::connect(addr),
        )
        .await
    });
    let results = futures_util::future::join_all(connects).await;
    let held = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(
        held, 1000,
        "the kernel held only {held} of 1000 connections"
    );
    drop(listener);
}
