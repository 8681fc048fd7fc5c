//! A burst of 50,000 mesh events while a client makes requests: responses
//! do not queue behind the events (they have a queue of their own) and the
//! gateway's memory stays bounded. Its own test binary, so no other test
//! competes for the two cores while it measures. Against the local
//! RabbitMQ.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::{AmqpConfig, AmqpMesh, DefaultHandler, Mesh, StubService};
use serde_json::json;

const PUBLISHER_VAR: &str = "BFF_TEST_BURST_PUBLISHER";

/// The burst's publisher, when this binary is started by the burst test
/// with [`PUBLISHER_VAR`]: 32 concurrent publishers with confirms. Run
/// normally it returns at once: it is a process entry point, not a check.
#[test]
fn publisher_process() {
    let Ok(spec) = std::env::var(PUBLISHER_VAR) else {
        return;
    };
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let topic = spec["topic"].as_str().unwrap().to_owned();
    let total = spec["total"].as_u64().unwrap() as usize;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let publisher = Arc::new(
            AmqpMesh::connect(
                AmqpConfig::new(amqp_url(), unique("publisher")),
                Arc::new(StubService::new("publisher")),
            )
            .await
            .unwrap(),
        );
        let lanes = 32;
        let mut publishing = Vec::new();
        for lane in 0..lanes {
            let p = publisher.clone();
            let topic = topic.clone();
            publishing.push(tokio::spawn(async move {
                for i in 0..total / lanes {
                    let _ = p
                        .publish_event(nuropb_bff::OutgoingEvent {
                            topic: format!("{topic}.e{lane}"),
                            event: json!({"i": i}),
                            context: Default::default(),
                            target: None,
                            trace_id: None,
                        })
                        .await;
                }
            }));
        }
        for p in publishing {
            p.await.unwrap();
        }
    });
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// p99 of sequential requests: `n` of them, or as many as run before
/// `until` resolves (at least `n`).
async fn p99(
    c: &mut TestClient,
    svc: &str,
    n: usize,
    tag: &str,
    until: impl Future<Output = ()>,
) -> (Duration, usize) {
    let mut until = std::pin::pin!(until);
    let mut over = false;
    let mut times = Vec::with_capacity(n);
    while times.len() < n || !over {
        let started = Instant::now();
        let i = times.len();
        let r = c
            .request_traced(svc, "wait", json!({"ms": 0}), &format!("{tag}{i}"))
            .await
            .unwrap();
        assert_eq!(r["result"], 0, "{r}");
        times.push(started.elapsed());
        over = over || futures_util::poll!(until.as_mut()).is_ready();
    }
    times.sort();
    let n = times.len();
    (times[(n * 99 / 100).min(n - 1)], n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_burst_neither_delays_responses_much_nor_grows_memory() {
    let svc = unique("busy");
    let topic = unique("burst");
    let service = slow_service(&svc).await;
    let gw = start(
        &format!(
            "[[route]]\ncall = \"{svc}.*\"\n\n[[event]]\ntopic = \"{topic}.#\"\ndeliver = \"subscribers\"\n"
        ),
        hs256(),
        Arc::new(DefaultHandler),
        |_| {},
        MeshSetup::Broker,
    )
    .await;
    let (mut c, _) = connect(&gw.url(), &token("req", &[], 300)).await;
    let (mut listener, _) = connect(&gw.url(), &token("sub", &[], 300)).await;
    listener
        .send(json!({"type":"subscribe","payload":{"topics":[format!("{topic}.#")]}}))
        .await
        .unwrap();
    assert_eq!(listener.recv().await.unwrap()["type"], "subscribed");
    // The subscriber shares this process's two workers with the gateway:
    // it counts frames without parsing them, so that what the burst costs
    // here is the gateway's work, not the test's.
    let received = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            match listener.next_text().await {
                Ok(Some(_)) => n += 1,
                // Quiet for 10 s (before the burst, in a debug build).
                Err(e) if e.starts_with("no frame") => continue,
                Ok(None) | Err(_) => break,
            }
        }
        n
    });
    // Warmed up first: the first calls pay for connections and caches.
    p99(&mut c, &svc, 100, "w", std::future::ready(())).await;
    let (base, base_n) = p99(&mut c, &svc, 1000, "b", std::future::ready(())).await;
    let rss_before = rss_kib();

    // The publisher is a process of its own, as a busy service would be.
    let total = 50_000;
    let burst = |topic: String| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "publisher_process",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                PUBLISHER_VAR,
                json!({"topic": topic, "total": total}).to_string(),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the publisher")
    };
    let finish = |mut publisher: std::process::Child| {
        let done = tokio::task::spawn_blocking(move || publisher.wait());
        async move {
            let status = done.await.unwrap().unwrap();
            assert!(status.success(), "the publisher failed");
        }
    };
    // Requests run for the whole burst (and at least 200 of them).
    // First the same burst on a topic this BFF does not take: what the
    // broker and the publisher alone cost the requests on these two cores.
    let elsewhere = finish(burst(format!("{topic}-elsewhere.created")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (unrelated, unrelated_n) = p99(&mut c, &svc, 200, "u", elsewhere).await;
    // Then the burst to this BFF's subscriber.
    let publisher = finish(burst(format!("{topic}.created")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (during, during_n) = p99(&mut c, &svc, 200, "d", publisher).await;
    let rss_after = rss_kib();
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    let dropped = metric(&metrics, "bff_mesh_events_dropped_total");
    println!(
        "request p99 without a burst {base:?} ({base_n} requests), during a burst of {total} \
         events elsewhere {unrelated:?} ({unrelated_n}), during a burst of {total} events to \
         this BFF {during:?} ({during_n}): {:.2}x the base, {:.2}x the burst elsewhere; \
         RSS {rss_before} -> {rss_after} KiB; events dropped {dropped}",
        during.as_secs_f64() / base.as_secs_f64(),
        during.as_secs_f64() / unrelated.as_secs_f64(),
    );
    // The broker, the publisher and the gateway share two cores here, so
    // any burst costs the requests CPU time whatever the gateway does (a
    // burst on a topic no one here takes: p99 1.2x to 3x). What the
    // gateway controls is that no response waits behind the events it
    // takes: on the response queue this was 250 ms and more; with 1024
    // events in flight on the connection, 75 ms; with events on lapin's
    // connection and responses on the lane, 2.3x to 4.7x the base; with
    // both on the lane, each with its own consumer, 1.2x to 3.0x (median
    // 2.07x over 8 runs of 200 requests; the burst elsewhere 1.1x to 2.8x
    // in the same runs); measured over the whole burst, after 1,000 base
    // requests, with one task per socket: 1.58x to 2.40x (median 1.79x, 7
    // of 8 runs within 2x; the burst elsewhere 1.21x to 1.77x). In a
    // release build (`cargo test --release --test burst -- --nocapture`)
    // see the numbers; a debug build's gateway does each event's work
    // several times slower (4.4x to 5.7x the base). The bounds below
    // leave room for debug builds and a busy machine, so they catch a
    // regression to queueing, not noise.
    assert!(
        during <= base * 2 + Duration::from_millis(100),
        "responses waited behind events: p99 {base:?} -> {during:?}"
    );
    assert!(
        during <= unrelated * 2 + Duration::from_millis(50),
        "the burst to this BFF cost requests more than twice what the same burst elsewhere did: \
         {unrelated:?} -> {during:?}"
    );
    assert!(
        rss_after < rss_before + 64 * 1024,
        "memory grew without a bound: {rss_before} -> {rss_after} KiB"
    );
    gw.stop().await;
    let delivered = tokio::time::timeout(Duration::from_secs(30), received)
        .await
        .expect("the subscriber's socket was not closed")
        .unwrap();
    assert!(delivered > 0, "the subscriber got none of the burst");
    service.close(Duration::from_secs(2)).await;
}
