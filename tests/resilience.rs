//! Deploys and broker incidents that lose nothing: a draining shutdown that
//! answers every call in flight, and a mesh link that heals itself after
//! the broker deletes its queues or drops its connection, with `/readyz`
//! telling the truth throughout. Against the local RabbitMQ.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::{AmqpConfig, AmqpMesh, Call, DefaultHandler, Mesh, Settings, StubService};
use serde_json::json;

async fn readyz(gw: &Running) -> u16 {
    http_get(gw.addr, "/readyz")
        .await
        .map(|(s, _)| s)
        .unwrap_or(0)
}

/// A gateway on the broker routing `svc.*` (with `extra` in its route).
async fn gateway_for(svc: &str, extra: &str, configure: impl FnOnce(&mut Settings)) -> Running {
    let routes = format!("[[route]]\ncall = \"{svc}.*\"\n{extra}");
    start(
        &routes,
        hs256(),
        Arc::new(DefaultHandler),
        configure,
        MeshSetup::Broker,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_every_call_in_flight_then_closes_with_1001() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let gw = gateway_for(&svc, "", |s| s.shutdown_grace_ms = 10_000).await;
    let (mut c, _) = connect(&gw.url(), &token("dee", &[], 300)).await;
    for i in 0..16 {
        c.send(json!({"type":"request","payload":{"service":svc,"method":"wait","params":{"ms":800},"trace_id":format!("w{i}")}}))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    gw.gateway.stop();
    // Not ready at once, and no new sockets.
    assert_eq!(readyz(&gw).await, 503);
    let refused = TestClient::connect(&gw.url(), Some(&token("late", &[], 300))).await;
    assert!(refused.unwrap_err().contains("503"));
    // A new call on the open socket is refused, naming the shutdown.
    drain_answers(&mut c, &svc, 16, 800).await;
    // Then the close, once the calls are answered.
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    assert!(started.elapsed() < Duration::from_secs(5));
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hurrying_cuts_the_drain_short() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let gw = gateway_for(&svc, "timeout_ms = 60000\n", |s| {
        s.shutdown_grace_ms = 30_000
    })
    .await;
    let (mut c, _) = connect(&gw.url(), &token("hal", &[], 300)).await;
    c.send(json!({"type":"request","payload":{"service":svc,"method":"wait","params":{"ms":20000},"trace_id":"long"}}))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    gw.gateway.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    gw.gateway.hurry();
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    assert!(started.elapsed() < Duration::from_secs(3));
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_heals_after_the_broker_deletes_its_queues_or_drops_it() {
    let svc = unique("echo");
    let service = slow_service(&svc).await;
    let bff = unique("heal-bff");
    let instance = unique("i");
    let gw = gateway_for(&svc, "", |s| {
        s.mesh_service_name = bff.clone();
        s.instance_id = Some(instance.clone());
    })
    .await;
    readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
    let caller = AmqpMesh::connect(
        AmqpConfig::new(amqp_url(), unique("caller")),
        Arc::new(StubService::new("caller")),
    )
    .await
    .unwrap();
    let (mut c, _) = connect(&gw.url(), &token("ray", &[], 300)).await;

    // The BFF has two broker connections: lapin's, and the request lane's
    // (its name ends in " requests").
    let close_connection = |lane: bool| {
        let listing = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]);
        let pid = listing
            .lines()
            .find(|l| l.contains(&instance) && l.contains(" requests") == lane)
            .and_then(|l| l.split('\t').next())
            .unwrap_or_else(|| panic!("the BFF's connection (lane: {lane}) is listed:\n{listing}"))
            .to_owned();
        rabbitmqctl(&["close_connection", &pid, "resilience test"]);
    };
    type Incident<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let incidents: [Incident; 4] = [
        (
            "service queue deleted",
            Box::new(|| {
                rabbitmqctl(&["delete_queue", &format!("nuropb-{bff}-sq")]);
            }),
        ),
        (
            "response queue deleted",
            Box::new(|| {
                rabbitmqctl(&["delete_queue", &format!("nuropb-{bff}-{instance}-rq")]);
            }),
        ),
        (
            "connection closed by the broker",
            Box::new(|| close_connection(false)),
        ),
        (
            "request lane's connection closed by the broker",
            Box::new(|| close_connection(true)),
        ),
    ];
    for (i, (what, incident)) in incidents.iter().enumerate() {
        tokio::task::block_in_place(incident);
        // Not ready while the link is down (if it was down long enough to
        // be seen), ready again within 5 s, and serving then.
        let back = readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
        let trace = format!("after-{i}");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = c
                .request_traced(&svc, "wait", json!({"ms": 0}), &trace)
                .await
                .unwrap();
            if r["result"] == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: still failing: {r}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The BFF's own service queue serves again too.
        let stats = caller
            .request(&Call {
                service: bff.clone(),
                method: "stats".into(),
                params: Default::default(),
                context: Default::default(),
                ttl: Duration::from_secs(5),
                trace_id: None,
            })
            .await
            .unwrap_or_else(|e| panic!("{what}: the BFF's service queue: {e}"));
        assert_eq!(stats["sessions"], 1, "{what}: {stats}");
        println!("{what}: ready again after {back:?}");
    }
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    let reconnects = metric(&metrics, "bff_mesh_reconnects_total");
    assert!(reconnects >= 4, "{metrics}");
    caller.close(Duration::from_secs(2)).await;
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_heals_after_the_broker_closes_its_publish_channel() {
    let svc = unique("echo");
    let service = slow_service(&svc).await;
    let bff = unique("heal-bff");
    // Keyed, as a BFF of several instances is: its heartbeats go out on
    // the control exchange.
    let gw = gateway_for(&svc, "", |s| {
        s.mesh_service_name = bff.clone();
        s.mesh_api.heartbeat = Duration::from_millis(200);
        s.cluster_key = Some("a-test-cluster-key-of-at-least-32-bytes".into());
    })
    .await;
    readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
    let reconnects = || async {
        let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
        metric(&metrics, "bff_mesh_reconnects_total")
    };
    let reconnects_before = reconnects().await;
    // Delete the exchange the BFF's heartbeats are published to: the broker
    // answers the next publish by closing the publish channel (404).
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete(
        format!("nuropb-bff-{bff}-control").as_str().into(),
        lapin::options::ExchangeDeleteOptions::default(),
    )
    .await
    .unwrap();
    let _ = conn.close(200, "done".into()).await;
    // Not ready once the channel is gone, then ready again. The link can
    // be rebuilt between two looks at /readyz, so the reconnect counter
    // counts as noticing too.
    eventually(
        "the BFF to notice the closed publish channel",
        Duration::from_secs(5),
        async || (readyz(&gw).await == 503 || reconnects().await > reconnects_before).then_some(()),
    )
    .await;
    let back = readyz_becomes(gw.addr, 200, Duration::from_secs(5)).await;
    let (mut c, _) = connect(&gw.url(), &token("pat", &[], 300)).await;
    let r = c
        .request_traced(&svc, "wait", json!({"ms": 0}), "after")
        .await
        .unwrap();
    assert_eq!(r["result"], 0, "{r}");
    println!("publish channel closed: ready again after {back:?}");
    gw.stop().await;
    service.close(Duration::from_secs(2)).await;
}
