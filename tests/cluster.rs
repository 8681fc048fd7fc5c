//! Several instances of one BFF on one broker, each in its own process (this
//! test binary started again as `instance_process`), driven by a real nuropb
//! 0.1.8 Python client calling the BFF's mesh methods
//! (bff-contract.md section 5).

mod common;

use std::io::Read;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::testing::{hs256_token_with, unix_time};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, AuthMode, Call, Gateway, Mesh, RouteTable, Settings, StubService,
};
use serde_json::{Value, json};

const INSTANCE_VAR: &str = "BFF_TEST_CLUSTER_INSTANCE";
/// The key every instance of the test BFF seals its control messages with.
const CLUSTER_KEY: &str = "the-test-cluster-key-of-at-least-32-bytes";

/// One gateway instance, when this binary is started by [`Instance::start`]:
/// prints `LISTEN <addr>`, serves until its stdin closes.
#[test]
fn instance_process() {
    let Ok(spec) = std::env::var(INSTANCE_VAR) else {
        return;
    };
    let spec: Value = serde_json::from_str(&spec).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut settings = Settings::new(spec["name"].as_str().unwrap());
        settings.amqp_url = amqp_url().into();
        settings.instance_id = Some(spec["instance"].as_str().unwrap().to_owned());
        settings.auth = AuthMode::JwtHs256;
        settings.jwt_secret = Some(SECRET.into());
        settings.mesh_api.heartbeat = Duration::from_millis(300);
        settings.cluster_key = Some(CLUSTER_KEY.into());
        settings.mesh_api.gather = Duration::from_secs(3);
        settings.limits.max_connections_per_user = 2_000;
        settings.shutdown_grace_ms = 3_000;
        let gw = Gateway::builder(settings)
            .routes(RouteTable::parse("routes.toml", "").unwrap())
            .start()
            .await
            .expect("instance starts");
        let listener = gw.bind().await.unwrap();
        println!("LISTEN {}", listener.local_addr().unwrap());
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(|| {
                let _ = std::io::stdin().read_to_end(&mut Vec::new());
            })
            .await;
        };
        gw.serve(listener, stdin_closed).await.unwrap();
    });
}

/// A gateway instance in a child process; stopped when dropped.
struct Instance {
    child: Child,
    url: String,
}

impl Instance {
    fn start(name: &str, instance: &str) -> Self {
        let spec = json!({"name": name, "instance": instance}).to_string();
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "instance_process",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(INSTANCE_VAR, spec);
        // The test harness may have written `test ... ` before the line.
        let (child, addr) = spawn_until_line(cmd, "an instance", |line| {
            line.split_once("LISTEN ")
                .map(|(_, addr)| addr.trim().to_owned())
        });
        Self {
            child,
            url: format!("ws://{addr}/ws"),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Call the BFF's method from a real nuropb Python client.
async fn py(name: &str, method: &str, params: Value, context: Value) -> Value {
    let name = name.to_owned();
    let method = method.to_owned();
    tokio::task::spawn_blocking(move || python_client_as(&name, &method, params, &context))
        .await
        .unwrap()
}

fn with_token(token: &str) -> Value {
    json!({"Authorization": token})
}

/// The next frame must be the event `topic` with `event`.
async fn expect_event(c: &mut TestClient, topic: &str, event: &Value) {
    let frame = c.recv().await.unwrap();
    assert_eq!(
        frame,
        json!({"type":"event","payload":{"topic":topic,"event":event}})
    );
}

/// Two instances of BFF `name` that see each other, and user ann on each.
async fn two_instances_with_ann(name: &str) -> (Instance, Instance, TestClient, TestClient) {
    let a = Instance::start(name, &unique("a"));
    let b = Instance::start(name, &unique("b"));
    until_instances_see_each_other(name, 2).await;
    let (ann_a, _) = connect(&a.url, &token("ann", &[], 300)).await;
    let (ann_b, _) = connect(&b.url, &token("ann", &[], 300)).await;
    (a, b, ann_a, ann_b)
}

/// `send_to_users` ann, with the push token: both her sockets get it.
async fn push_to_ann(name: &str, ann_a: &mut TestClient, ann_b: &mut TestClient) {
    let r = py(
        name,
        "send_to_users",
        json!({"user_ids": ["ann"], "message": {"n": 1}, "topic": "note"}),
        with_token(&push_token()),
    )
    .await;
    assert_eq!(r["result"], json!({"delivered": 2, "instances": 2}), "{r}");
    expect_event(ann_a, "note", &json!({"n": 1})).await;
    expect_event(ann_b, "note", &json!({"n": 1})).await;
}

/// Wait until every instance has heard every other's heartbeat.
async fn until_instances_see_each_other(name: &str, n: u64) {
    let what = format!("{n} instances to see each other");
    eventually(&what, Duration::from_secs(10), async || {
        let stats = py(name, "stats", json!({}), json!({})).await;
        (stats["result"]["cluster"]["instances"].as_u64() == Some(n)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_every_instance_and_need_a_service_token() {
    let name = unique("cluster-bff");
    let (a, b, mut ann_a, mut ann_b) = two_instances_with_ann(&name).await;
    let (mut bob_a, _) = connect(&a.url, &token("bob", &[], 300)).await;
    let push = push_token();
    push_to_ann(&name, &mut ann_a, &mut ann_b).await;

    // No token, a token without the role, an expired one, a forged one:
    // refused, and no socket on either instance sees anything.
    let now = unix_time();
    let expired = hs256_token_with(
        SECRET,
        &json!({"sub": "svc", "roles": ["bff:push"], "exp": now - 120}),
    );
    let forged = nuropb_bff::testing::hs256_token("wrong-secret", "svc", &["bff:push"], 300);
    for context in [
        json!({}),
        with_token(&token("svc", &["reader"], 300)),
        with_token(&expired),
        with_token(&forged),
    ] {
        for (method, params) in [
            ("broadcast", json!({"message": "leak"})),
            (
                "send_to_users",
                json!({"user_ids": ["ann"], "message": "leak"}),
            ),
            ("disconnect_users", json!({"user_ids": ["ann", "bob"]})),
        ] {
            let r = py(&name, method, params, context.clone()).await;
            assert_eq!(r["error"], "NuropbAuthorizationError", "{context} {r}");
        }
    }

    let r = py(
        &name,
        "broadcast",
        json!({"message": "all", "topic": "news"}),
        with_token(&push),
    )
    .await;
    assert_eq!(r["result"], json!({"delivered": 3, "instances": 2}), "{r}");
    // The broadcast is the next frame everywhere: nothing leaked before it.
    for c in [&mut ann_a, &mut ann_b, &mut bob_a] {
        expect_event(c, "news", &json!("all")).await;
    }

    // A third instance joins; the next push reaches it too.
    let c = Instance::start(&name, &unique("c"));
    let (mut carl_c, _) = connect(&c.url, &token("carl", &[], 300)).await;
    until_instances_see_each_other(&name, 3).await;
    let r = py(
        &name,
        "broadcast",
        json!({"message": 2, "topic": "news"}),
        with_token(&format!("Bearer {push}")),
    )
    .await;
    assert_eq!(r["result"], json!({"delivered": 4, "instances": 3}), "{r}");
    for c in [&mut ann_a, &mut ann_b, &mut bob_a, &mut carl_c] {
        expect_event(c, "news", &json!(2)).await;
    }

    let stats = py(&name, "stats", json!({}), json!({})).await;
    assert_eq!(stats["result"]["cluster"]["sessions"], 4, "{stats}");

    // The forced logout reaches ann's sockets on both instances.
    let r = py(
        &name,
        "disconnect_users",
        json!({"user_ids": ["ann"]}),
        with_token(&push),
    )
    .await;
    assert_eq!(r["result"]["disconnected"], 2, "{r}");
    assert_eq!(ann_a.closed().await.unwrap(), Some(4000));
    assert_eq!(ann_b.closed().await.unwrap(), Some(4000));

    // An instance that dies takes only its own sockets with it.
    drop(c);
    assert!(carl_c.closed().await.is_ok());
    let r = py(
        &name,
        "send_to_users",
        json!({"user_ids": ["bob"], "message": "still"}),
        with_token(&push),
    )
    .await;
    assert_eq!(r["result"]["delivered"], 1, "{r}");
    expect_event(&mut bob_a, "message", &json!("still")).await;
    drop((a, b));
}

/// A measurement, not a check of speed: a broadcast to 1,000 sockets spread
/// over two instances, from a Rust mesh client, until the last delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_to_a_thousand_sockets_over_two_instances() {
    let name = unique("cluster-bff");
    let a = Instance::start(&name, &unique("a"));
    let b = Instance::start(&name, &unique("b"));
    until_instances_see_each_other(&name, 2).await;
    let n = 1_000;
    let mut clients = Vec::with_capacity(n);
    for i in 0..n {
        let url = if i % 2 == 0 { &a.url } else { &b.url };
        clients.push(connect(url, &token(&format!("u{i}"), &[], 300)).await.0);
    }
    let caller = AmqpMesh::connect(
        AmqpConfig::new(amqp_url(), unique("caller")),
        Arc::new(StubService::new("caller")),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let answer = caller
        .request(&Call {
            service: name.clone(),
            method: "broadcast".into(),
            params: json!({"message": "hi"}).as_object().unwrap().clone().into(),
            context: push_context().into(),
            ttl: Duration::from_secs(10),
            trace_id: None,
        })
        .await
        .unwrap();
    let answered = started.elapsed();
    let mut waits = Vec::with_capacity(n);
    for c in &mut clients {
        let frame = c.recv().await.unwrap();
        assert_eq!(frame["payload"]["event"], "hi");
        waits.push(started.elapsed());
    }
    let last = waits.iter().max().copied().unwrap_or_default();
    println!(
        "broadcast to {n} sockets on 2 instances: answer {answer} after {answered:?}, last delivery seen after {last:?}"
    );
    assert_eq!(answer["delivered"], n);
    caller.close(Duration::from_secs(2)).await;
    drop((a, b));
}

/// What a peer on the broker can do with the control exchange: read the
/// pushes on it (they carry no token now), replay one as it is or with its
/// id changed, and announce made-up instances with absurd counts. None of it
/// pushes anything or changes what the instances count, and a push still
/// answers without waiting for instances that do not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_replay_forge_or_inflate_control_messages() {
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, QueueBindOptions, QueueDeclareOptions,
    };
    use lapin::types::FieldTable;

    let name = unique("sealed-bff");
    let (a, b, mut ann_a, mut ann_b) = two_instances_with_ann(&name).await;

    // The peer listens on the control exchange.
    let control = format!("nuropb-bff-{name}-control");
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let tap = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        tap.name().clone(),
        control.as_str().into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let push = push_token();
    push_to_ann(&name, &mut ann_a, &mut ann_b).await;

    // What the peer captured: the push, sealed, and no token in it.
    let mut captured = None;
    while let Some(m) = ch
        .basic_get(tap.name().clone(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let text = String::from_utf8_lossy(&m.delivery.data).into_owned();
        assert!(
            !text.contains(&push),
            "a caller token on the control exchange"
        );
        if text.contains(r#"\"op\":\"push\""#) {
            captured = Some((m.delivery.data.clone(), m.delivery.properties.clone()));
        }
    }
    let (data, properties) = captured.expect("the push crossed the control exchange");
    let text = String::from_utf8_lossy(&data).into_owned();
    let id_at = text.find(r#"\"id\":\""#).expect("an id") + r#"\"id\":\""#.len();
    let id = &text[id_at..id_at + 32];
    let changed = text.replacen(id, &"0".repeat(32), 1);

    // Replayed as it is, then with its id changed, then a made-up
    // instance with absurd counts, unsealed.
    let mut envelope: Value = serde_json::from_slice(&data).unwrap();
    envelope["event"] =
        json!({"op": "presence", "instance": "ghost", "sessions": u64::MAX, "users": u64::MAX});
    let forged_presence = envelope.to_string();
    // And an ack for a push that could be waiting, counting everything.
    envelope["event"] = json!({"op": "ack", "id": id, "instance": "ghost", "count": u64::MAX});
    let forged_ack = envelope.to_string();
    for body in [text.clone(), changed, forged_presence, forged_ack] {
        ch.basic_publish(
            control.as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            properties.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // Nothing reaches ann: the next frame either socket gets is the next
    // real push.
    let started = Instant::now();
    let r = py(
        &name,
        "broadcast",
        json!({"message": "real", "topic": "news"}),
        with_token(&push),
    )
    .await;
    assert_eq!(r["result"], json!({"delivered": 2, "instances": 2}), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the push waited for a made-up instance: {:?}",
        started.elapsed()
    );
    expect_event(&mut ann_a, "news", &json!("real")).await;
    expect_event(&mut ann_b, "news", &json!("real")).await;
    let stats = py(&name, "stats", json!({}), json!({})).await;
    assert_eq!(stats["result"]["cluster"]["instances"], 2, "{stats}");
    assert_eq!(stats["result"]["cluster"]["sessions"], 2, "{stats}");
    // Counted where they were refused.
    let addr: std::net::SocketAddr = a.url["ws://".len()..a.url.len() - "/ws".len()]
        .parse()
        .unwrap();
    let (_, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            r#"bff_mesh_messages_dropped_total{reason="bad_signature"}"#
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"bff_mesh_messages_dropped_total{reason="unsealed"}"#
        ),
        2,
        "{metrics}"
    );
    let _ = conn.close(200, "done".into()).await;
    drop((a, b));
}
