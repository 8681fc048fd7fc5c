//! A routing table reloaded under open sockets (`reload_routes`): on the
//! in-process mesh, and on the real broker for the event bindings. The
//! SIGHUP, file-watch and symlink-swap triggers are proven on a generated
//! BFF's process (tests/template.rs).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{MeshSetup, TestClient, hs256, http_get, metric, token, unique};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, DefaultHandler, EchoService, MemoryMesh, Mesh, OutgoingEvent,
    StubService, reload_routes,
};
use serde_json::{Map, Value, json};

/// A routing file of its own for one test.
fn routes_file(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique("bff-reload"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    path
}

const V1: &str = r#"
[[route]]
call = "orders.*"

[[route]]
call = "profile.get"

[[route]]
call = "slow.nap"

[[event]]
topic = "news.#"

[[event]]
topic = "audit.#"
"#;

/// `orders.*` and the `audit.#` rule gone, `billing.*` new.
const V2: &str = r#"
[[route]]
call = "billing.*"

[[route]]
call = "profile.get"

[[route]]
call = "slow.nap"

[[event]]
topic = "news.#"
"#;

fn event(topic: &str, n: u64) -> OutgoingEvent {
    OutgoingEvent {
        topic: topic.into(),
        event: json!({"n": n}),
        context: Map::new(),
        target: None,
        trace_id: None,
    }
}

async fn subscribe(c: &mut TestClient, topics: &[&str]) -> Value {
    c.send(json!({"type":"subscribe","payload":{"topics":topics}}))
        .await
        .unwrap();
    c.recv().await.unwrap()
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    http_get(addr, "/metrics").await.unwrap().1
}

#[tokio::test]
async fn a_reload_changes_routes_and_rules_under_open_sockets() {
    let path = routes_file(V1);
    let mesh = MemoryMesh::new();
    for name in ["orders", "billing", "profile"] {
        mesh.add_service(name, Arc::new(EchoService::new(name)), vec![]);
    }
    let slow = StubService::new("slow").method("nap", |_| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(json!("rested"))
    });
    mesh.add_service("slow", Arc::new(slow), vec![]);
    let bff = common::start(
        V1,
        hs256(),
        Arc::new(DefaultHandler),
        |s| {
            s.routes = path.clone();
            s.hello_call = Some("profile.get".into());
        },
        MeshSetup::Memory(mesh.clone()),
    )
    .await;
    let (mut c, _) = common::connect(&bff.url(), &token("alice", &[], 300)).await;
    let subscribed = subscribe(&mut c, &["news.#", "audit.#"]).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    let r = c.request("orders", "list", json!({})).await.unwrap();
    assert!(r["error"].is_null(), "{r}");
    let r = c.request("billing", "charge", json!({})).await.unwrap();
    assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");

    // A call in flight across the reload: planned under the old table, it
    // completes.
    c.send(json!({"type":"request","payload":{"service":"slow","method":"nap","params":{},"trace_id":"across"}}))
        .await
        .unwrap();
    std::fs::write(&path, V2).unwrap();
    let changes = reload_routes(&bff.gateway).await.unwrap();
    assert_eq!(changes.added, vec!["route billing.*"]);
    assert_eq!(changes.removed, vec!["event audit.#", "route orders.*"]);
    assert!(changes.changed.is_empty(), "{changes:?}");

    // The narrowed subscription is dropped, saying why; the nap answers.
    let (mut unsubscribed, mut answered) = (None, None);
    while unsubscribed.is_none() || answered.is_none() {
        let f = c.recv().await.unwrap();
        match f["type"].as_str() {
            Some("unsubscribed") => unsubscribed = Some(f),
            Some("response") => answered = Some(f),
            _ => panic!("unexpected {f}"),
        }
    }
    let unsubscribed = unsubscribed.unwrap();
    assert_eq!(unsubscribed["payload"]["topics"], json!(["audit.#"]));
    assert!(
        unsubscribed["payload"]["reason"]
            .as_str()
            .unwrap()
            .contains("reloaded"),
        "{unsubscribed}"
    );
    let answered = answered.unwrap();
    assert_eq!(answered["payload"]["trace_id"], "across");
    assert_eq!(answered["payload"]["result"], "rested", "{answered}");

    // The next call uses the new table, on the same socket.
    let r = c.request("billing", "charge", json!({})).await.unwrap();
    assert!(r["error"].is_null(), "{r}");
    let r = c.request("orders", "list", json!({})).await.unwrap();
    assert_eq!(r["error"]["error"], "RouteNotFound", "{r}");
    // The rule that went delivers nothing; the one that stayed does.
    mesh.publish_event(event("audit.login", 1)).await.unwrap();
    mesh.publish_event(event("news.today", 2)).await.unwrap();
    let f = c.recv().await.unwrap();
    assert_eq!(f["type"], "event", "{f}");
    assert_eq!(f["payload"]["topic"], "news.today", "{f}");
    assert_eq!(f["payload"]["event"], json!({"n": 2}), "{f}");
    // A subscription the new table refuses.
    let refused = subscribe(&mut c, &["audit.#"]).await;
    assert_eq!(refused["payload"]["error"], "Forbidden", "{refused}");

    // A file with a syntax error, then one whose routes leave hello_call
    // unrouted: each refused with the start-up message, the table in use
    // keeps serving.
    std::fs::write(&path, "[[route]\ncall = \"billing.*\"\n").unwrap();
    let e = reload_routes(&bff.gateway).await.unwrap_err().to_string();
    assert!(e.contains("routes.toml:1:"), "{e}");
    std::fs::write(&path, V2.replace("profile.get", "profile.other")).unwrap();
    let e = reload_routes(&bff.gateway).await.unwrap_err().to_string();
    assert!(e.contains("hello_call"), "{e}");
    let r = c.request("billing", "charge", json!({})).await.unwrap();
    assert!(r["error"].is_null(), "the old table serves: {r}");
    let text = metrics(bff.addr).await;
    assert_eq!(metric(&text, r#"bff_routes_reload_total{result="ok"}"#), 1);
    assert_eq!(
        metric(&text, r#"bff_routes_reload_total{result="error"}"#),
        2
    );
    // The socket never closed; /readyz stayed ready.
    assert_eq!(http_get(bff.addr, "/readyz").await.unwrap().0, 200);
    let r = c.request("profile", "get", json!({})).await.unwrap();
    assert!(r["error"].is_null(), "{r}");
    bff.stop().await;
}

#[tokio::test]
async fn a_rate_limit_starts_again_under_a_reloaded_table() {
    let v1 = "[[route]]\ncall = \"orders.*\"\nrate_per_sec = 1\n";
    let path = routes_file(v1);
    let mesh = MemoryMesh::new();
    mesh.add_service("orders", Arc::new(EchoService::new("orders")), vec![]);
    let bff = common::start(
        v1,
        hs256(),
        Arc::new(DefaultHandler),
        |s| s.routes = path.clone(),
        MeshSetup::Memory(mesh),
    )
    .await;
    let (mut c, _) = common::connect(&bff.url(), &token("alice", &[], 300)).await;
    let r = c.request("orders", "a", json!({})).await.unwrap();
    assert!(r["error"].is_null(), "{r}");
    let r = c.request("orders", "b", json!({})).await.unwrap();
    assert_eq!(r["error"]["error"], "RateLimited", "{r}");
    // The limit raised: the new table counts from zero at once.
    std::fs::write(&path, "[[route]]\ncall = \"orders.*\"\nrate_per_sec = 5\n").unwrap();
    let changes = reload_routes(&bff.gateway).await.unwrap();
    assert_eq!(changes.changed, vec!["route orders.*"]);
    for i in 0..5 {
        let r = c.request("orders", "c", json!({})).await.unwrap();
        assert!(r["error"].is_null(), "call {i}: {r}");
    }
    let r = c.request("orders", "d", json!({})).await.unwrap();
    assert_eq!(r["error"]["error"], "RateLimited", "{r}");
    bff.stop().await;
}

/// The event queue's bindings on the broker, by routing key.
fn bindings_of(queue: &str) -> Vec<String> {
    let out = common::rabbitmqctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "destination_name",
        "routing_key",
    ]);
    let mut keys: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let mut cols = l.split('\t');
            (cols.next()? == queue).then(|| cols.next().unwrap_or("").to_owned())
        })
        .filter(|k| k != queue)
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn on_the_broker_bindings_follow_the_table_and_rules_that_stay_lose_nothing() {
    let root = unique("rl");
    let v1 =
        format!("[[event]]\ntopic = \"{root}.news.#\"\n\n[[event]]\ntopic = \"{root}.audit.#\"\n");
    let v2 =
        format!("[[event]]\ntopic = \"{root}.news.#\"\n\n[[event]]\ntopic = \"{root}.sports.#\"\n");
    let path = routes_file(&v1);
    let name = unique("reload-bff");
    let instance = unique("i");
    let bff = common::start(
        &v1,
        hs256(),
        Arc::new(DefaultHandler),
        |s| {
            s.routes = path.clone();
            s.mesh_service_name = name.clone();
            s.instance_id = Some(instance.clone());
        },
        MeshSetup::Broker,
    )
    .await;
    // The BFF's event log: one stream its instances share.
    let queue = format!("nuropb-bff-{name}-events");
    assert_eq!(
        bindings_of(&queue),
        vec![format!("{root}.audit.#"), format!("{root}.news.#")]
    );
    let (mut c, _) = common::connect(&bff.url(), &token("alice", &[], 300)).await;
    let news = format!("{root}.news.#");
    let audit = format!("{root}.audit.#");
    let subscribed = subscribe(&mut c, &[&news, &audit]).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");

    // Another peer publishes news all through the reload.
    let publisher = AmqpMesh::connect(AmqpConfig::new(common::amqp_url(), unique("pub")), {
        Arc::new(StubService::new("pub"))
    })
    .await
    .unwrap();
    const N: u64 = 300;
    let topic = format!("{root}.news.flash");
    let publishing = {
        let publisher = publisher.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            for n in 0..N {
                publisher.publish_event(event(&topic, n)).await.unwrap();
                if n % 30 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    std::fs::write(&path, &v2).unwrap();
    let started = Instant::now();
    reload_routes(&bff.gateway).await.unwrap();
    let took = started.elapsed();
    publishing.await.unwrap();
    assert_eq!(
        bindings_of(&queue),
        vec![format!("{root}.news.#"), format!("{root}.sports.#")]
    );

    let mut seen = Vec::new();
    let mut unsubscribed = None;
    while seen.len() < N as usize || unsubscribed.is_none() {
        let f = c.recv().await.unwrap();
        match f["type"].as_str() {
            Some("unsubscribed") => unsubscribed = Some(f),
            Some("event") => {
                assert_eq!(f["payload"]["topic"], topic.as_str(), "{f}");
                seen.push(f["payload"]["event"]["n"].as_u64().unwrap());
            }
            _ => panic!("unexpected {f}"),
        }
    }
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "every news event, once, in order"
    );
    assert_eq!(unsubscribed.unwrap()["payload"]["topics"], json!([audit]));

    // The new rule's topic is bound: a subscriber gets its events; the
    // removed one's are not even delivered to the instance.
    let sports = format!("{root}.sports.#");
    let subscribed = subscribe(&mut c, &[&sports]).await;
    assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
    publisher
        .publish_event(event(&format!("{root}.audit.login"), 1))
        .await
        .unwrap();
    publisher
        .publish_event(event(&format!("{root}.sports.goal"), 2))
        .await
        .unwrap();
    let f = c.recv().await.unwrap();
    assert_eq!(f["payload"]["topic"], format!("{root}.sports.goal"), "{f}");
    println!("reload with rebinding took {took:?}");
    publisher.close(Duration::from_secs(5)).await;
    bff.stop().await;
}
