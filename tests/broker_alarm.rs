//! A broker resource alarm, for real: RabbitMQ's memory watermark set to a
//! tiny fraction blocks every publishing connection. The BFF hears it
//! (`connection.blocked`), refuses new calls at once with `MeshUnavailable`
//! saying why, answers `/readyz` 503 with the reason, shows it in
//! `bff_mesh_blocked`, and serves again as soon as the broker unblocks.
//! The lifecycle events of sockets that come meanwhile wait for it, and a
//! real nuropb service receives them once it does.
//! Alone in its test binary: the alarm stops every publisher on the broker.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::DefaultHandler;
use serde_json::json;

/// The memory alarm, raised for as long as it lives: the watermark it
/// found is put back when it is dropped, whatever the test did.
struct MemoryAlarm {
    was: String,
}

impl MemoryAlarm {
    fn raise() -> Self {
        let was = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        let was = was.trim().to_owned();
        let was = if was.parse::<f64>().is_ok_and(|f| f > 0.01) {
            was
        } else {
            "0.4".to_owned()
        };
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]);
        Self { was }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_vm_memory_high_watermark", &self.was]);
    }
}

async fn call(c: &mut TestClient, svc: &str, n: u64) -> serde_json::Value {
    c.request_traced(svc, "wait", json!({"ms": 0}), &format!("c{n}"))
        .await
        .expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_refuses_calls_at_once_and_they_flow_again_when_it_clears() {
    let svc = unique("alarm-svc");
    let service = slow_service(&svc).await;
    let bff = unique("alarm-bff");
    let mut listener = start_python_listener(
        &unique("alarm-listener"),
        &[&format!("bff.{bff}.connected")],
    );
    let gw = start(
        &format!("[[route]]\ncall = \"{svc}.*\"\ntimeout_ms = 3000\n"),
        hs256(),
        Arc::new(DefaultHandler),
        {
            let bff = bff.clone();
            move |s| {
                s.mesh_service_name = bff;
                s.lifecycle_events = true;
            }
        },
        MeshSetup::Broker,
    )
    .await;
    readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
    let (mut c, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    assert_eq!(call(&mut c, &svc, 0).await["result"], 0);

    let alarm = MemoryAlarm::raise();
    let raised = Instant::now();
    // Calls under load, one every 20 ms without waiting for answers, until
    // one is refused for the alarm. (The calls already on their way when
    // the broker stopped reading wait for it, as calls in flight do.)
    let mut n = 0;
    let refused = loop {
        n += 1;
        c.send(json!({"type":"request","payload":{"service":svc,"method":"wait","params":{"ms":0},"trace_id":format!("c{n}")}}))
            .await
            .unwrap();
        if let Ok(frame) = tokio::time::timeout(Duration::from_millis(20), c.recv()).await {
            let frame = frame.unwrap();
            if frame["payload"]["error"]["error"] == "MeshUnavailable" {
                break frame["payload"].clone();
            }
        }
        assert!(raised.elapsed() < Duration::from_secs(10), "never refused");
    };
    let refused_after = raised.elapsed();
    println!("refused {refused_after:?} after the alarm");
    assert!(refused_after < Duration::from_secs(1), "{refused_after:?}");
    let description = refused["error"]["description"].as_str().unwrap_or("");
    assert!(description.contains("blocking publishes"), "{refused}");
    println!("refused {:?} after the alarm", raised.elapsed());
    // From now on at once, not after a route's timeout (answers to the
    // calls sent before may still come in between: matched by trace id).
    for _ in 0..5 {
        n += 1;
        let trace = format!("c{n}");
        let started = Instant::now();
        c.send(json!({"type":"request","payload":{"service":svc,"method":"wait","params":{"ms":0},"trace_id":trace}}))
            .await
            .unwrap();
        let r = loop {
            let frame = c.recv().await.unwrap();
            if frame["payload"]["trace_id"] == trace.as_str() {
                break frame["payload"].clone();
            }
        };
        assert_eq!(r["error"]["error"], "MeshUnavailable", "{r}");
        assert!(started.elapsed() < Duration::from_millis(500), "{r}");
    }
    let (status, body) = http_get(gw.addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("blocking publishes"), "{body}");
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(metric(&metrics, "bff_mesh_blocked"), 1, "{metrics}");
    // A socket opens under the alarm: its `connected` event waits.
    let (carol, _) = connect(&gw.url(), &token("carol", &[], 300)).await;

    drop(alarm);
    let cleared = Instant::now();
    let back = readyz_becomes(gw.addr, 200, Duration::from_secs(10)).await;
    println!("ready {back:?} after the alarm cleared");
    // A fresh socket is served (the old one may still get the answers of
    // the calls that waited out the alarm).
    let (mut fresh, _) = connect(&gw.url(), &token("bob", &[], 300)).await;
    let r = call(&mut fresh, &svc, n + 1).await;
    assert_eq!(r["result"], 0, "{r}");
    assert!(cleared.elapsed() < Duration::from_secs(5));
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(metric(&metrics, "bff_mesh_blocked"), 0, "{metrics}");
    assert_eq!(
        metric(&metrics, "bff_mesh_reconnects_total"),
        0,
        "the link stayed up"
    );
    let seen = listener.until(Duration::from_secs(10), |seen| {
        ["ann", "carol", "bob"]
            .iter()
            .all(|who| seen.iter().any(|e| e["event"]["user_id"] == *who))
    });
    let order: Vec<&str> = seen
        .iter()
        .filter_map(|e| e["event"]["user_id"].as_str())
        .collect();
    assert_eq!(order, ["ann", "carol", "bob"], "in order, each once");
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "bff_lifecycle_events_dropped_total"),
        0,
        "{metrics}"
    );
    drop(carol);
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}
