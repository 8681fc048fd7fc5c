//! Spans out, in process: sampling is parent-based (a client's flag
//! decides, a fresh trace its id against `otlp_sample_ratio`), what a
//! service sees carries the decision, a refused call still has its span,
//! and without `otlp_endpoint` nothing is exported. The whole path, from a
//! generated BFF process through RabbitMQ to a Python service, is
//! `tests/template.rs`'s OTLP test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::otlp::OtlpReceiver;
use common::*;
use nuropb_bff::{DefaultHandler, IncomingRequest, MemoryMesh, StubService};
use serde_json::{Value, json};

const ROUTES: &str = r#"
[[route]]
call = "orders.whoami"

[[route]]
call = "orders.limited"
rate_per_sec = 1
"#;

fn mesh() -> MeshSetup {
    let mesh = MemoryMesh::new();
    let context = |r: IncomingRequest| async move { Ok(Value::Object(r.context)) };
    mesh.add_service(
        "orders",
        Arc::new(
            StubService::new("orders")
                .method("whoami", context)
                .method("limited", context),
        ),
        vec![],
    );
    MeshSetup::Memory(mesh)
}

async fn call(
    c: &mut nuropb_bff::testing::TestClient,
    method: &str,
    traceparent: Option<&str>,
) -> Value {
    let mut payload = json!({"service":"orders","method":method,"params":{},"trace_id":"t"});
    if let Some(tp) = traceparent {
        payload["traceparent"] = json!(tp);
    }
    c.send(json!({"type":"request","payload":payload}))
        .await
        .unwrap();
    c.recv().await.unwrap()["payload"].clone()
}

/// A collector, and a gateway exporting its spans there at `ratio`.
async fn exporting(ratio: f64) -> (OtlpReceiver, Running) {
    let collector = OtlpReceiver::start();
    let endpoint = collector.endpoint();
    let gw = start(
        ROUTES,
        hs256(),
        Arc::new(DefaultHandler),
        |s| {
            s.otlp_endpoint = Some(endpoint);
            s.otlp_sample_ratio = ratio;
        },
        mesh(),
    )
    .await;
    (collector, gw)
}

/// The flags byte of the `traceparent` a service was given.
fn flags(answer: &Value) -> String {
    let tp = answer["result"]["traceparent"].as_str().unwrap_or_default();
    tp.rsplit('-').next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn sampling_follows_the_client_and_the_ratio_and_the_service_is_told() {
    let (collector, gw) = exporting(0.0).await;
    let (mut c, _) = connect(&gw.url(), &token("ann", &[], 300)).await;

    // A fresh trace at ratio 0: not sampled, and the service is told so.
    let fresh = call(&mut c, "whoami", None).await;
    assert_eq!(flags(&fresh), "00", "{fresh}");
    // A client's sampled trace is exported whatever the ratio.
    let sampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let kept = call(&mut c, "whoami", Some(sampled)).await;
    assert_eq!(flags(&kept), "01", "{kept}");
    // A client's unsampled trace is not, and stays unsampled downstream.
    let unsampled = "00-1af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let dropped = call(&mut c, "whoami", Some(unsampled)).await;
    assert_eq!(flags(&dropped), "00", "{dropped}");
    // A refused call (over its rate) still gets its span, with the error.
    let refused_parent = "00-2af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    call(&mut c, "limited", Some(refused_parent)).await;
    let refused = call(&mut c, "limited", Some(refused_parent)).await;
    assert_eq!(refused["error"]["error"], "RateLimited", "{refused}");

    // A command carries its client's trace too.
    let command_parent = "00-3af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    c.send(
        json!({"type":"command","payload":{"service":"orders","method":"whoami",
        "params":{},"trace_id":"cmd","traceparent":command_parent}}),
    )
    .await
    .unwrap();
    let ack = c.recv().await.unwrap();
    assert_eq!(ack["type"], "ack", "{ack}");

    let spans = collector
        .until_async(Duration::from_secs(10), |s| {
            s.iter()
                .filter(|s| s.trace_id.starts_with("2af76519"))
                .count()
                == 2
                && s.iter().any(|s| s.trace_id.starts_with("3af76519"))
        })
        .await;
    let command = spans
        .iter()
        .find(|s| s.trace_id.starts_with("3af76519"))
        .unwrap();
    assert_eq!(command.parent, "b7ad6b7169203331");
    assert_eq!(command.attr("bff.kind"), "command");
    assert_eq!(command.attr("bff.call_id"), "cmd");
    let traces: Vec<&str> = spans.iter().map(|s| s.trace_id.as_str()).collect();
    assert!(traces.contains(&"0af7651916cd43dd8448eb211c80319c"));
    assert!(!traces.contains(&"1af7651916cd43dd8448eb211c80319c"));
    let fresh_trace = fresh["result"]["trace_id"].as_str().unwrap();
    assert!(
        !traces.contains(&fresh_trace),
        "ratio 0 exports no fresh trace"
    );
    let limited = spans
        .iter()
        .find(|s| s.trace_id.starts_with("2af76519") && s.attr("bff.outcome") == "RateLimited")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    assert_eq!(limited.attr("error.type"), "RateLimited");
    assert_eq!(limited.status.0, 2, "an error status");
    gw.stop().await;
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported_and_the_trace_still_flows() {
    let gw = start(ROUTES, hs256(), Arc::new(DefaultHandler), |_| {}, mesh()).await;
    let (mut c, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = call(&mut c, "whoami", Some(parent)).await;
    assert_eq!(r["result"]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    let (status, text) = nuropb_bff::testing::http_get(gw.addr, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "bff_spans_exported_total"), 0, "{text}");
    gw.stop().await;
}

#[tokio::test]
async fn a_shutdown_exports_the_spans_of_the_sockets_it_closes() {
    let (collector, gw) = exporting(1.0).await;
    let mut sockets = Vec::new();
    for user in ["ann", "bob", "cy"] {
        sockets.push(connect(&gw.url(), &token(user, &[], 300)).await.0);
    }
    gw.stop().await;
    let spans = collector
        .until_async(Duration::from_secs(10), |s| {
            s.iter()
                .filter(|s| s.attr("websocket.close_code") == "1001")
                .count()
                == 3
        })
        .await;
    let mut users: Vec<&str> = spans
        .iter()
        .filter(|s| s.attr("bff.close_reason") == "shutdown")
        .map(|s| s.attr("enduser.id"))
        .collect();
    users.sort();
    assert_eq!(users, ["ann", "bob", "cy"]);
    drop(sockets);
}
