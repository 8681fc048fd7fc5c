//! The mesh door: what any peer on the broker can send a BFF, tried against
//! a real broker. A message over `limits.max_mesh_message_bytes` is let go
//! as it arrives (never buffered, the link stays up); a field the BFF would
//! echo into an AMQP property is checked first. Each attack ends with a
//! fresh client served in under a second and the link never rebuilt.
//! The peer is `tests/python/peer.py` (pika, no nuropb library).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::DefaultHandler;
use serde_json::{Value, json};

/// Run the hostile peer with `args`; what it printed last, as JSON.
fn peer(args: &[&str]) -> Value {
    let out = Command::new(nuropb_python())
        .arg(script("peer.py"))
        .arg(amqp_url())
        .args(args)
        .output()
        .expect("run the peer");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "peer {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or(Value::Null)
}

/// `bff_mesh_messages_dropped_total` for `reason`.
fn dropped(metrics: &str, reason: &str) -> u64 {
    metric(
        metrics,
        &format!("bff_mesh_messages_dropped_total{{reason=\"{reason}\"}}"),
    )
}

/// This process's resident memory and its peak, in KiB.
fn memory_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The gateway routing `svc.*` (a real service answers `wait`) and
/// delivering `svc.#` events to every socket.
async fn gateway(svc: &str, bff: &str) -> Running {
    gateway_taking(svc, bff, None).await
}

/// [`gateway`], taking messages up to `max_bytes` when given.
async fn gateway_taking(svc: &str, bff: &str, max_bytes: Option<usize>) -> Running {
    let routes = format!(
        "[[route]]\ncall = \"{svc}.*\"\n\n[[event]]\ntopic = \"{svc}.#\"\ndeliver = \"all\"\n"
    );
    let bff = bff.to_owned();
    let gw = start(
        &routes,
        hs256(),
        Arc::new(DefaultHandler),
        move |s| {
            s.mesh_service_name = bff;
            if let Some(max) = max_bytes {
                s.limits.max_mesh_message_bytes = max;
            }
        },
        MeshSetup::Broker,
    )
    .await;
    readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
    gw
}

/// After an attack: the link was never rebuilt, and a new client is
/// served within a second.
async fn still_serving(gw: &Running, svc: &str) {
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(&metrics, "bff_mesh_reconnects_total"),
        0,
        "{metrics}"
    );
    let started = Instant::now();
    let (mut c, _) = connect(&gw.url(), &token("fresh", &[], 300)).await;
    let r = c
        .request_traced(svc, "wait", json!({"ms": 0}), "after")
        .await
        .unwrap();
    assert_eq!(r["result"], 0, "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_over_the_limit_are_let_go_without_buffering_and_the_link_stays_up() {
    let svc = unique("hold");
    let service = slow_service(&svc).await;
    let gw = gateway(&svc, &unique("door-bff")).await;
    let (mut c, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    let before = memory_kib("VmRSS");
    // The peak from here on: resident memory is the kernel's count, so
    // this is what the process held at most, whoever allocated it.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    let big = format!("{svc}.big");
    let published = peer(&["event", &big, "string", "70"]);
    assert!(
        published["published"].as_u64() > Some(70 << 20),
        "{published}"
    );
    peer(&["event", &big, "numbers", "40"]);
    peer(&["event", &format!("{svc}.forged"), "badtopic", "0"]);
    peer(&["event", &format!("{svc}.small"), "small", "0"]);
    // The small one arrives, after the two large ones and the one whose
    // topic would forge a log line were let go.
    let frame = match c.recv().await {
        Ok(frame) => frame,
        Err(e) => {
            let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
            panic!("{e}\n{metrics}");
        }
    };
    assert_eq!(frame["payload"]["topic"], format!("{svc}.small"), "{frame}");
    assert_eq!(frame["payload"]["event"], json!({"n": 1}));
    let growth = memory_kib("VmHWM").saturating_sub(before);
    println!("peak RSS growth while 110 MiB of events passed: {growth} KiB");
    assert!(growth < 256 * 1024, "{growth} KiB");
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(dropped(&metrics, "too_large"), 2, "{metrics}");
    assert_eq!(
        dropped(&metrics, "bad_field"),
        1,
        "the forged topic: {metrics}"
    );
    still_serving(&gw, &svc).await;
    gw.stop().await;

    // With the limit raised to take it, the 40 MiB of small numbers goes to
    // the socket as the text it came in: never built into a tree (which
    // took about 17 times its size), so about twice its size at the peak.
    let gw = gateway_taking(&svc, &unique("door-bff"), Some(64 << 20)).await;
    let (mut c, _) = connect(&gw.url(), &token("ann", &[], 300)).await;
    let before = memory_kib("VmRSS");
    std::fs::write("/proc/self/clear_refs", "5").expect("reset the peak RSS");
    peer(&["event", &big, "numbers", "40"]);
    // The test client takes at most 16 MiB a frame: its refusal is the
    // event's arrival.
    let arrived = c.next_text().await;
    assert!(
        arrived.as_ref().is_err_and(|e| e.contains("41943")),
        "{:?}",
        arrived.map(|t| t.map(|t| t.len()))
    );
    let growth = memory_kib("VmHWM").saturating_sub(before);
    println!("peak RSS growth for an accepted 40 MiB event of small numbers: {growth} KiB");
    assert!(growth < 256 * 1024, "{growth} KiB");
    still_serving(&gw, &svc).await;
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_ids_cannot_be_echoed_is_refused_not_sent_malformed() {
    let svc = unique("hold");
    let service = slow_service(&svc).await;
    let bff = unique("door-bff");
    let gw = gateway(&svc, &bff).await;
    // A well-formed request from the same peer is answered.
    let ok = peer(&["request", &bff, "0", "0"]);
    assert!(ok["result"].is_object(), "{ok}");
    // A 300-byte correlation id: no answer could name it; dropped.
    let none = peer(&["request", &bff, "300", "0"]);
    assert_eq!(none, Value::Null, "answered: {none}");
    // A 300-byte trace id: answered, with an error, without it.
    let refused = peer(&["request", &bff, "0", "300"]);
    assert_eq!(refused["error"]["error"], "InvalidMessage", "{refused}");
    assert!(refused["trace_id"].is_null(), "{refused}");
    // A 70 MiB request to the BFF's own service: let go as it arrives, on
    // the service lane, unanswered; the next is served.
    let big = peer(&["request", &bff, "0", "0", "70"]);
    assert_eq!(big, Value::Null, "answered: {big}");
    let ok = peer(&["request", &bff, "0", "0"]);
    assert!(ok["result"].is_object(), "{ok}");
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(dropped(&metrics, "bad_field"), 2, "{metrics}");
    assert_eq!(dropped(&metrics, "too_large"), 1, "{metrics}");
    still_serving(&gw, &svc).await;
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}
