//! Interop with the reference implementation: a real NuroPb Python service
//! (nuropb==0.1.8) behind the gateway, driven by a WebSocket client; and a
//! nuropb Python client calling the gateway's own mesh methods.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::DefaultHandler;
use serde_json::{Value, json};

/// Call `service.method` with `params` written as given (JSON text), and
/// return the text of the answer traced `trace_id`, as it came.
async fn answer_text(
    c: &mut nuropb_bff::testing::TestClient,
    service: &str,
    method: &str,
    params: &str,
    trace_id: &str,
) -> String {
    c.send_text(&format!(
        r#"{{"type":"request","payload":{{"service":"{service}","method":"{method}","params":{params},"trace_id":"{trace_id}"}}}}"#
    ))
    .await
    .unwrap();
    let traced = format!(r#""trace_id":"{trace_id}""#);
    loop {
        let t = c.next_text().await.unwrap().expect("the socket stays open");
        if t.contains(&traced) {
            return t;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_nuropb_service_through_the_gateway_and_back() {
    let py_name = unique("interop");
    let bff_name = unique("bff");
    let routes = format!(
        "[[route]]\ncall = \"{py_name}.*\"\ntimeout_ms = 20000\n\n[[route]]\ncall = \"{absent}.*\"\ntimeout_ms = 20000\n",
        absent = unique("absent")
    );
    let absent = routes
        .lines()
        .find(|l| l.contains("absent"))
        .unwrap()
        .split('"')
        .nth(1)
        .unwrap()
        .trim_end_matches(".*")
        .to_owned();

    // The gateway first: it declares the exchanges nuropb expects.
    let bff = bff_name.clone();
    let gw = start(
        &routes,
        hs256(),
        Arc::new(DefaultHandler),
        |c| c.mesh_service_name = bff,
        MeshSetup::Broker,
    )
    .await;
    let _service = start_python_service(&py_name);

    let t = token("alice", &[], 300);
    let (mut c, _) = connect(&gw.url(), &t).await;

    let r = c
        .request_traced(&py_name, "hello", json!({"name": "rust"}), "h")
        .await
        .unwrap();
    assert_eq!(r["result"], "hello rust", "{r}");
    assert_eq!(r["error"], Value::Null);

    let r = c
        .request_traced(&py_name, "add", json!({"a": 40, "b": 2}), "a")
        .await
        .unwrap();
    assert_eq!(r["result"], 42, "{r}");

    // A result reaches the client as the service wrote it: its key order,
    // an integer no f64 holds, its escapes (not parsed and written again).
    let text = answer_text(&mut c, &py_name, "exact", "{}", "x").await;
    assert!(
        text.contains(r#""result":{"b": 1, "a": 1000000000000000000000000000000, "s": "\u00e9"}"#),
        "{text}"
    );
    // And the client's params reach the service as the client wrote them.
    let params = r#"{"z": 1, "a": 2, "big": 1000000000000000000000000000000}"#;
    let text = answer_text(&mut c, &py_name, "params_seen", params, "p").await;
    assert!(
        text.contains(
            r#""result":{"keys": ["z", "a", "big"], "big": 1000000000000000000000000000000}"#
        ),
        "{text}"
    );

    let r = c
        .request_traced(&py_name, "boom", json!({}), "b")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "NuropbException", "{r}");
    assert!(
        r["error"]["description"]
            .as_str()
            .unwrap()
            .contains("boom from python"),
        "{r}"
    );

    // The client's W3C trace reaches the service: its trace id as the
    // NuroPb trace_id, the call's span as the context's traceparent.
    c.send(
        json!({"type":"request","payload":{"service":py_name,"method":"trace","params":{},
        "trace_id":"tr","traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}}),
    )
    .await
    .unwrap();
    let r = c.recv().await.unwrap();
    assert_eq!(
        r["payload"]["result"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{r}"
    );
    let parent = r["payload"]["result"]["traceparent"].as_str().unwrap_or("");
    assert!(
        parent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && parent.ends_with("-01"),
        "{r}"
    );

    // The token reaches the service's authorize_func as context["Authorization"].
    let r = c
        .request_traced(&py_name, "whoami", json!({}), "w")
        .await
        .unwrap();
    assert_eq!(
        r["result"],
        json!({"sub": "alice", "user_id": "alice"}),
        "{r}"
    );

    // Concurrent requests on one socket all come back, paired by trace id.
    for i in 0..20 {
        c.send(json!({"type":"request","payload":{"service":py_name,"method":"add","params":{"a":i,"b":1000},"trace_id":format!("c{i}")}})).await.unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        let r = c.recv().await.unwrap();
        seen.insert(
            r["payload"]["trace_id"].as_str().unwrap().to_owned(),
            r["payload"]["result"].clone(),
        );
    }
    for i in 0..20 {
        assert_eq!(seen[&format!("c{i}")], json!(i + 1000));
    }

    let started = Instant::now();
    let r = c
        .request_traced(&absent, "anything", json!({}), "n")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "NuropbNotDeliveredError", "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "NO_ROUTE took {:?}",
        started.elapsed()
    );

    let r = c
        .request_traced("billing", "charge", json!({}), "r")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");

    // The other way: a nuropb Python client calls the gateway's own methods.
    let py_name2 = bff_name.clone();
    let describe =
        tokio::task::spawn_blocking(move || python_client(&py_name2, "nuropb_describe", json!({})))
            .await
            .unwrap();
    assert_eq!(
        describe["result"]["service_name"],
        bff_name.as_str(),
        "{describe}"
    );
    assert!(
        describe["result"]["methods"]["send_to_users"].is_object(),
        "{describe}"
    );
    assert!(
        describe["result"]["authorization"]
            .as_str()
            .is_some_and(|a| a.contains("Authorization") && a.contains("bff:push")),
        "the description says what a push needs: {describe}"
    );
    let b2 = bff_name.clone();
    let pushed = tokio::task::spawn_blocking(move || {
        python_client_as(
            &b2,
            "send_to_users",
            json!({"user_ids": ["alice"], "message": {"hi": 1}, "topic": "note"}),
            &json!({"Authorization": push_token()}),
        )
    })
    .await
    .unwrap();
    assert_eq!(pushed["result"]["delivered"], 1, "{pushed}");
    assert_eq!(
        c.recv().await.unwrap(),
        json!({"type":"event","payload":{"topic":"note","event":{"hi":1}}})
    );

    gw.stop().await;
}
