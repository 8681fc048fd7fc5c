//! Events a client missed while away are recovered (`subscribe` with
//! `since`): on the in-process mesh (development mode's log), and on the
//! real broker with two instances of one BFF reading one stream.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MeshSetup, TestClient, hs256, token, unique};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, DefaultHandler, MemoryMesh, Mesh, OutgoingEvent, StubService,
};
use serde_json::{Map, Value, json};

fn routes(root: &str) -> String {
    format!(
        "[[event]]\ntopic = \"{root}.news.#\"\n\n[[event]]\ntopic = \"{root}.inbox.*\"\ndeliver = \"target\"\n"
    )
}

fn event(topic: &str, n: u64, target: Option<&str>) -> OutgoingEvent {
    OutgoingEvent {
        topic: topic.into(),
        event: json!({"n": n}),
        context: Map::new(),
        target: target.map(|t| vec![t.to_owned()]),
        trace_id: None,
    }
}

/// Read events until `n` have come; their `(n, position)`.
async fn events(c: &mut TestClient, n: usize) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = c.recv().await.unwrap();
        assert_eq!(f["type"], "event", "{f}");
        let p = &f["payload"];
        out.push((
            p["event"]["n"].as_u64().unwrap(),
            p["position"]
                .as_u64()
                .unwrap_or_else(|| panic!("no position: {f}")),
        ));
    }
    out
}

async fn resume(c: &mut TestClient, topics: &[&str], since: u64) -> Value {
    c.send(json!({"type":"subscribe","payload":{"topics":topics,"since":since}}))
        .await
        .unwrap();
    let f = c.recv().await.unwrap();
    assert_eq!(f["type"], "subscribed", "{f}");
    f
}

/// The scenario of the issue against any two gateways of one BFF: 10
/// events on A, away; 100 on its topic and 20 for another user; resume on
/// B after the last position seen.
async fn away_and_back(
    a: &common::Running,
    b: &common::Running,
    publisher: &dyn Mesh,
    root: &str,
    expect_recovered: bool,
) {
    let news = format!("{root}.news.#");
    let (mut c, _) = common::connect(&a.url(), &token("alice", &[], 300)).await;
    c.send(json!({"type":"subscribe","payload":{"topics":[news]}}))
        .await
        .unwrap();
    assert_eq!(c.recv().await.unwrap()["type"], "subscribed");
    for n in 0..10 {
        publisher
            .publish_event(event(&format!("{root}.news.a"), n, None))
            .await
            .unwrap();
    }
    let first = events(&mut c, 10).await;
    assert_eq!(
        first.iter().map(|e| e.0).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let last = first.last().unwrap().1;
    drop(c);
    for n in 10..110 {
        publisher
            .publish_event(event(&format!("{root}.news.b"), n, None))
            .await
            .unwrap();
    }
    for n in 0..20 {
        publisher
            .publish_event(event(&format!("{root}.inbox.new"), 1000 + n, Some("bob")))
            .await
            .unwrap();
    }
    // Let B's window take them in (or not: the log serves the rest).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut c, _) = common::connect(&b.url(), &token("alice", &[], 300)).await;
    let answer = resume(&mut c, &[&news], last).await;
    assert_eq!(answer["payload"]["recovered"], expect_recovered, "{answer}");
    if expect_recovered {
        let missed = events(&mut c, 100).await;
        assert_eq!(
            missed.iter().map(|e| e.0).collect::<Vec<_>>(),
            (10..110).collect::<Vec<_>>(),
            "exactly the 100, in order"
        );
        assert!(missed.windows(2).all(|w| w[0].1 < w[1].1));
        assert!(missed[0].1 > last);
    }
    // Then live, exactly once (and nothing of bob's before it).
    publisher
        .publish_event(event(&format!("{root}.news.c"), 5000, None))
        .await
        .unwrap();
    let live = events(&mut c, 1).await;
    assert_eq!(live[0].0, 5000, "{live:?}");
    let nothing = tokio::time::timeout(Duration::from_millis(300), c.recv()).await;
    assert!(nothing.is_err(), "one more frame: {nothing:?}");
}

#[tokio::test]
async fn in_development_mode_a_resume_replays_what_was_missed() {
    let root = unique("rc");
    let mesh = MemoryMesh::new();
    let a = common::start(
        &routes(&root),
        hs256(),
        Arc::new(DefaultHandler),
        |_| {},
        MeshSetup::Memory(mesh.clone()),
    )
    .await;
    away_and_back(&a, &a, &mesh, &root, true).await;
    a.stop().await;
}

#[tokio::test]
async fn too_many_missed_events_answer_refetch() {
    let root = unique("rc");
    let mesh = MemoryMesh::new();
    let a = common::start(
        &routes(&root),
        hs256(),
        Arc::new(DefaultHandler),
        |s| s.events.recover_max = 50,
        MeshSetup::Memory(mesh.clone()),
    )
    .await;
    away_and_back(&a, &a, &mesh, &root, false).await;
    a.stop().await;
}

async fn two_instances(
    root: &str,
    configure: impl Fn(&mut nuropb_bff::Settings) + Clone,
) -> (common::Running, common::Running, AmqpMesh) {
    let name = unique("rc-bff");
    let start = |instance: &'static str| {
        let name = name.clone();
        let configure = configure.clone();
        let routes = routes(root);
        async move {
            common::start(
                &routes,
                hs256(),
                Arc::new(DefaultHandler),
                move |s| {
                    s.mesh_service_name = name;
                    s.instance_id = Some(instance.into());
                    s.cluster_key = Some("a-cluster-key-of-thirty-two-bytes-or-more".into());
                    configure(s);
                },
                MeshSetup::Broker,
            )
            .await
        }
    };
    let a = start("a").await;
    let b = start("b").await;
    let publisher = AmqpMesh::connect(
        AmqpConfig::new(common::amqp_url(), unique("pub")),
        Arc::new(StubService::new("pub")),
    )
    .await
    .unwrap();
    (a, b, publisher)
}

#[tokio::test]
async fn on_the_broker_a_client_resumes_on_another_instance() {
    let root = unique("rc");
    let (a, b, publisher) = two_instances(&root, |_| {}).await;
    away_and_back(&a, &b, &publisher, &root, true).await;
    publisher.close(Duration::from_secs(5)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn on_the_broker_a_resume_past_recover_max_replays_nothing() {
    let root = unique("rc");
    let (a, b, publisher) = two_instances(&root, |s| s.events.recover_max = 50).await;
    away_and_back(&a, &b, &publisher, &root, false).await;
    publisher.close(Duration::from_secs(5)).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn on_the_broker_a_resume_older_than_the_window_reads_the_stream() {
    let root = unique("rc");
    // A window of 5 events: the 100 missed are read from the stream.
    let (a, b, publisher) = two_instances(&root, |s| s.events.window_events = 5).await;
    let started = Instant::now();
    away_and_back(&a, &b, &publisher, &root, true).await;
    println!("resumed from the stream in {:?}", started.elapsed());
    publisher.close(Duration::from_secs(5)).await;
    a.stop().await;
    b.stop().await;
}
