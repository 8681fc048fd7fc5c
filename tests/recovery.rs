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

/// After a deploy every client of an instance comes back at once: 2,000
/// sockets leave instance A and resume on B while events keep flowing;
/// each gets every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_resumes_every_socket_exactly() {
    const SOCKETS: usize = 2_000;
    const BEFORE: u64 = 20;
    const DURING: u64 = 100;
    let root = unique("rc");
    let (a, b, publisher) = two_instances(&root, |s| s.limits.max_connections = 10_000).await;
    let news = format!("{root}.news.#");
    let topic = format!("{root}.news.flash");
    // Each socket a user of its own (a user may hold 32 at most).
    let tokens: Vec<String> = (0..SOCKETS)
        .map(|i| token(&format!("user-{i}"), &[], 600))
        .collect();
    // Everyone on A, subscribed, up to date.
    let mut clients = Vec::with_capacity(SOCKETS);
    for chunk in 0..SOCKETS / 100 {
        let tokens = &tokens[chunk * 100..(chunk + 1) * 100];
        let joined = futures_util::future::join_all(tokens.iter().map(|t| async {
            let (mut c, _) = common::connect(&a.url(), t).await;
            c.send(json!({"type":"subscribe","payload":{"topics":[news]}}))
                .await
                .unwrap();
            assert_eq!(c.recv().await.unwrap()["type"], "subscribed");
            c
        }))
        .await;
        clients.extend(joined);
    }
    for n in 0..BEFORE {
        publisher
            .publish_event(event(&topic, n, None))
            .await
            .unwrap();
    }
    let lasts = futures_util::future::join_all(
        clients
            .iter_mut()
            .map(|c| async { events(c, BEFORE as usize).await.last().unwrap().1 }),
    )
    .await;
    assert!(
        lasts.windows(2).all(|w| w[0] == w[1]),
        "one position for one event"
    );
    let last = lasts[0];
    // A goes (its sockets close), events keep coming, everyone resumes on B.
    let publishing = {
        let publisher = publisher.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for n in BEFORE..BEFORE + DURING {
                publisher
                    .publish_event(event(&topic, n, None))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    a.stop().await;
    drop(clients);
    let started = Instant::now();
    let b_url = b.url();
    let resumed = futures_util::future::join_all(tokens.iter().map(|t| {
        let (url, t, news) = (b_url.clone(), t.clone(), news.clone());
        tokio::spawn(async move {
            let (mut c, _) = common::connect(&url, &t).await;
            let answer = resume(&mut c, &[&news], last).await;
            assert_eq!(answer["payload"]["recovered"], true, "{answer}");
            let got = events(&mut c, DURING as usize).await;
            let ns: Vec<u64> = got.iter().map(|e| e.0).collect();
            assert_eq!(ns, (BEFORE..BEFORE + DURING).collect::<Vec<_>>());
            c
        })
    }))
    .await;
    let caught_up = started.elapsed();
    publishing.await.unwrap();
    let mut clients: Vec<TestClient> = resumed.into_iter().map(|r| r.unwrap()).collect();
    // Nothing more, nothing twice.
    let extra = tokio::time::timeout(Duration::from_millis(300), clients[0].recv()).await;
    assert!(extra.is_err(), "{extra:?}");
    println!("{SOCKETS} sockets resumed and caught up on {DURING} events in {caught_up:?}");
    drop(clients);
    publisher.close(Duration::from_secs(5)).await;
    b.stop().await;
}

/// A position the log no longer keeps: nothing is replayed, the client
/// refetches (development mode's log keeps the last 10,000 events).
#[tokio::test]
async fn a_position_older_than_the_log_keeps_answers_refetch() {
    let root = unique("rc");
    let mesh = MemoryMesh::new();
    let a = common::start(
        &routes(&root),
        hs256(),
        Arc::new(DefaultHandler),
        |s| {
            s.events.window_events = 5;
            // Not too many: too old is the only reason to refuse.
            s.events.recover_max = 20_000;
        },
        MeshSetup::Memory(mesh.clone()),
    )
    .await;
    let topic = format!("{root}.news.a");
    for n in 0..10_050 {
        mesh.publish_event(event(&topic, n, None)).await.unwrap();
    }
    let news = format!("{root}.news.#");
    let (mut c, _) = common::connect(&a.url(), &token("alice", &[], 300)).await;
    // Position 10 went with the 50 oldest.
    let answer = resume(&mut c, &[&news], 10).await;
    assert_eq!(answer["payload"]["recovered"], false, "{answer}");
    // One still kept, but older than the window: read from the log.
    let answer = {
        let (mut c, _) = common::connect(&a.url(), &token("bob", &[], 300)).await;
        let answer = resume(&mut c, &[&news], 10_040).await;
        let replayed = events(&mut c, 9).await;
        assert_eq!(
            replayed.iter().map(|e| e.0).collect::<Vec<_>>(),
            (10_041..10_050).collect::<Vec<_>>()
        );
        answer
    };
    assert_eq!(answer["payload"]["recovered"], true, "{answer}");
    a.stop().await;
}
