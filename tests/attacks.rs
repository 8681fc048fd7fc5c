//! The trust boundary, tried as an attacker would (bff-contract.md sections
//! 4 and 6): a gateway on real sockets over RabbitMQ, a Rust service peer
//! that records every call reaching it, and a peer that publishes events.
//! Every attack asserts the refusal, that nothing reached the service where
//! that matters, and that the gateway still answers a fresh client within a
//! second.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::testing::{hs256_token, hs256_token_with};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, AuthHook, BoxFuture, DefaultHandler, ErrorBody, IncomingRequest,
    JwtVerifier, Mesh, MeshHandler, OutgoingEvent, Settings,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every log line of this test binary, at debug level through the same
/// filter a BFF binary uses: the secret scan reads it.
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<&'static Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer: &'static Mutex<Vec<u8>> = Box::leak(Box::new(Mutex::new(Vec::new())));
        struct Sink(&'static Mutex<Vec<u8>>);
        impl Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(nuropb_bff::log_filter(
                "debug",
            )))
            .with_ansi(false)
            .with_writer(move || Sink(buffer))
            .try_init();
        buffer
    })
}

/// Records the method of every request that reaches the service.
#[derive(Debug, Default)]
struct Recorder(Mutex<Vec<String>>);

impl Recorder {
    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

impl MeshHandler for Recorder {
    fn handle_request(&self, r: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        self.0.lock().unwrap().push(r.method.clone());
        Box::pin(async move { Ok(json!({"method": r.method})) })
    }
}

/// A gateway over RabbitMQ routing `{svc}.*` (plus an admin-only method),
/// with the template's default event rule (`{svc}.#` to subscribers) and an
/// auditor-only rule, and a recording service peer.
struct Scene {
    gw: Running,
    svc: String,
    service: Arc<Recorder>,
    peer: AmqpMesh,
}

impl Scene {
    async fn start(auth: Arc<dyn AuthHook>, configure: impl FnOnce(&mut Settings)) -> Self {
        logs();
        let svc = unique("orders");
        let routes = format!(
            r#"
[[route]]
call = "{svc}.*"

[[route]]
call = "{svc}.purge"
roles = ["admin"]

[[event]]
topic = "{svc}.#"
deliver = "subscribers"

[[event]]
topic = "{svc}-audit.#"
deliver = "subscribers"
roles = ["auditor"]
"#
        );
        let service = Arc::new(Recorder::default());
        let peer = AmqpMesh::connect(AmqpConfig::new(amqp_url(), &svc), service.clone())
            .await
            .expect("RabbitMQ must be running on 127.0.0.1:5672");
        let gw = start(
            &routes,
            auth,
            Arc::new(DefaultHandler),
            |s| {
                s.mesh_service_name = unique("bff");
                configure(s);
            },
            MeshSetup::Broker,
        )
        .await;
        Self {
            gw,
            svc,
            service,
            peer,
        }
    }

    async fn default() -> Self {
        Self::start(hs256(), |_| {}).await
    }

    async fn publish(&self, topic: &str, target: Option<Vec<String>>) {
        self.peer
            .publish_event(OutgoingEvent {
                topic: topic.into(),
                event: json!({"topic": topic}),
                context: Default::default(),
                target,
                trace_id: None,
            })
            .await
            .expect("event published");
    }

    /// A fresh client gets an answer through the broker within a second.
    async fn still_serving(&self) {
        let started = Instant::now();
        let (mut c, _) = connect(&self.gw.url(), &token("fresh", &[], 300)).await;
        let r = c
            .request_traced(&self.svc, "ping", json!({}), "alive")
            .await
            .expect("a fresh client is answered");
        assert_eq!(r["result"]["method"], "ping", "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a fresh client waited {:?}",
            started.elapsed()
        );
    }

    async fn stop(self) {
        self.gw.stop().await;
        self.peer.close(Duration::from_secs(2)).await;
    }
}

/// The next frame, whatever it is: a test sees exactly what the gateway
/// sent next.
async fn next(c: &mut TestClient) -> Value {
    c.recv().await.expect("a frame")
}

async fn subscribe(c: &mut TestClient, topics: &[&str]) -> Value {
    c.send(json!({"type":"subscribe","payload":{"topics":topics}}))
        .await
        .unwrap();
    next(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_subscription_pattern_neither_crashes_nor_stalls_the_gateway() {
    let scene = Scene::default().await;
    let (mut mallory, _) = connect(&scene.gw.url(), &token("mallory", &[], 300)).await;
    let evil = format!("{}x", "#.".repeat(20_000));
    let refused = subscribe(&mut mallory, &[&evil]).await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["payload"]["error"], "InvalidMessage", "{refused}");
    assert!(
        refused.to_string().len() < 1_000,
        "the pattern is not echoed"
    );
    // A legitimate subscription next to it, then an event on the rule.
    let ok = subscribe(&mut mallory, &[&format!("{}.#", scene.svc)]).await;
    assert_eq!(ok["type"], "subscribed", "{ok}");
    scene.publish(&format!("{}.created", scene.svc), None).await;
    let event = next(&mut mallory).await;
    assert_eq!(
        event["payload"]["topic"],
        format!("{}.created", scene.svc),
        "{event}"
    );
    scene.still_serving().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_targeted_event_reaches_only_its_target_whatever_others_subscribed() {
    let scene = Scene::default().await;
    let pattern = format!("{}.#", scene.svc);
    let (mut ann, _) = connect(&scene.gw.url(), &token("ann", &[], 300)).await;
    let (mut bob, _) = connect(&scene.gw.url(), &token("bob", &[], 300)).await;
    assert_eq!(subscribe(&mut ann, &[&pattern]).await["type"], "subscribed");
    assert_eq!(subscribe(&mut bob, &[&pattern]).await["type"], "subscribed");
    let topic = format!("{}.shipped", scene.svc);
    scene.publish(&topic, Some(vec!["bob".into()])).await;
    assert_eq!(next(&mut bob).await["payload"]["topic"], topic);
    // Ann's next frame is her own response, not bob's event.
    let r = ann
        .request_traced(&scene.svc, "ping", json!({}), "ann-1")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "ping");
    // An untargeted event still reaches both subscribers.
    scene.publish(&topic, None).await;
    assert_eq!(next(&mut ann).await["payload"]["topic"], topic);
    assert_eq!(next(&mut bob).await["payload"]["topic"], topic);
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_outside_the_rules_are_refused_and_the_count_is_capped() {
    let scene = Scene::start(hs256(), |s| s.limits.max_subscriptions = 4).await;
    let svc = scene.svc.clone();
    let (mut c, _) = connect(&scene.gw.url(), &token("eve", &[], 300)).await;
    let audit = format!("{svc}-audit.#");
    for pattern in ["#", "*.*", "secret.stuff", "nuropb.#", "*", audit.as_str()] {
        let r = subscribe(&mut c, &[pattern]).await;
        assert_eq!(r["type"], "error", "{pattern}: {r}");
        assert_eq!(r["payload"]["error"], "Forbidden", "{pattern}: {r}");
    }
    // One bad pattern in a frame refuses the whole frame.
    let r = subscribe(&mut c, &[&format!("{svc}.a"), "#"]).await;
    assert_eq!(r["payload"]["error"], "Forbidden", "{r}");
    let four: Vec<String> = (0..4).map(|i| format!("{svc}.t{i}")).collect();
    let four: Vec<&str> = four.iter().map(String::as_str).collect();
    let r = subscribe(&mut c, &four).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    assert_eq!(r["payload"]["topics"].as_array().unwrap().len(), 4);
    let r = subscribe(&mut c, &[&format!("{svc}.t9")]).await;
    assert_eq!(r["payload"]["error"], "RateLimited", "{r}");
    // Nothing was stored: unsubscribing nothing echoes the same four.
    c.send(json!({"type":"unsubscribe","payload":{"topics":[]}}))
        .await
        .unwrap();
    let r = next(&mut c).await;
    assert_eq!(r["payload"]["topics"].as_array().unwrap().len(), 4, "{r}");
    // A flood of patterns in one frame is refused at once.
    let many: Vec<String> = (0..2_000).map(|i| format!("{svc}.m{i}")).collect();
    let r = subscribe(&mut c, &many.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(r["payload"]["error"], "RateLimited", "{r}");
    // An auditor may subscribe to the audit rule.
    let (mut auditor, _) = connect(&scene.gw.url(), &token("ada", &["auditor"], 300)).await;
    assert_eq!(
        subscribe(&mut auditor, &[&audit]).await["type"],
        "subscribed"
    );
    scene.still_serving().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_never_reach_internal_or_malformed_method_names() {
    let scene = Scene::default().await;
    let (mut c, _) = connect(&scene.gw.url(), &token("ivan", &[], 300)).await;
    for method in [
        "nuropb_describe",
        "_private",
        "__init__",
        "",
        "a.b",
        "add\n",
        "purge",
    ] {
        let r = c
            .request_traced(&scene.svc, method, json!({}), "w")
            .await
            .unwrap();
        let expected = if method == "purge" {
            "Forbidden"
        } else {
            "RouteNotFound"
        };
        assert_eq!(r["error"]["error"], expected, "{method:?}: {r}");
    }
    let r = c
        .request_traced(&scene.svc, "list", json!({}), "ok")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "list");
    assert_eq!(
        scene.service.calls(),
        vec!["list"],
        "only the public call reached the service"
    );
    scene.still_serving().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_nbf_fractional_exp_issuer_audience_and_reauthentication() {
    let scene = Scene::default().await;
    let now = nuropb_bff::testing::unix_time();
    let url = scene.gw.url();

    let early = hs256_token_with(
        SECRET,
        &json!({"sub":"nico","exp": now + 600, "nbf": now + 3600}),
    );
    let err = TestClient::connect(&url, Some(&early)).await.unwrap_err();
    assert!(err.contains("401"), "{err}");

    let fractional = hs256_token_with(SECRET, &json!({"sub":"fran","exp": now as f64 + 2.5}));
    let (mut c, _) = connect(&url, &fractional).await;
    let started = Instant::now();
    assert_eq!(c.closed().await.unwrap(), Some(4001));
    assert!(started.elapsed() < Duration::from_secs(5));

    let absurd = hs256_token_with(SECRET, &json!({"sub":"abe","exp": u64::MAX}));
    let (mut c, _) = connect(&url, &absurd).await;
    let r = c
        .request_traced(&scene.svc, "ping", json!({}), "a")
        .await
        .unwrap();
    assert_eq!(
        r["result"]["method"], "ping",
        "an absurd exp does not crash"
    );

    // Re-authentication replaces roles: purge is forbidden, then allowed.
    let (mut c, _) = connect(&url, &token("rita", &[], 300)).await;
    let r = c
        .request_traced(&scene.svc, "purge", json!({}), "p1")
        .await
        .unwrap();
    assert_eq!(r["error"]["error"], "Forbidden", "{r}");
    let admin = token("rita", &["admin"], 300);
    c.send(json!({"type":"authenticate","payload":{"token": admin}}))
        .await
        .unwrap();
    let r = c
        .request_traced(&scene.svc, "purge", json!({}), "p2")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "purge", "{r}");
    // ... and a token for someone else ends the connection.
    let other = token("mallory", &["admin"], 300);
    c.send(json!({"type":"authenticate","payload":{"token": other}}))
        .await
        .unwrap();
    assert_eq!(c.closed().await.unwrap(), Some(4003));
    scene.stop().await;

    // With an issuer and audience configured, both are required.
    let strict = Arc::new(JwtVerifier::hs256(
        SECRET.as_bytes(),
        Some("idp"),
        Some("bff"),
    ));
    let scene = Scene::start(strict, |_| {}).await;
    let bare = token("ivy", &[], 300);
    let err = TestClient::connect(&scene.gw.url(), Some(&bare))
        .await
        .unwrap_err();
    assert!(err.contains("401"), "{err}");
    let good = hs256_token_with(
        SECRET,
        &json!({"sub":"ivy","iss":"idp","aud":"bff","exp": now + 300}),
    );
    let (_c, hello) = connect(&scene.gw.url(), &good).await;
    assert_eq!(hello["payload"]["event"]["user_id"], "ivy");
    scene.stop().await;
}

/// A gateway on in-process echo services for `echo.*`.
async fn echo_gateway(configure: impl FnOnce(&mut Settings)) -> Running {
    let routes = "[[route]]\ncall = \"echo.*\"\n";
    let mesh = nuropb_bff::MemoryMesh::with_echo_stubs(
        &nuropb_bff::RouteTable::parse("routes.toml", routes).unwrap(),
    );
    start(
        routes,
        hs256(),
        Arc::new(DefaultHandler),
        configure,
        MeshSetup::Memory(mesh),
    )
    .await
}

/// A fresh client of an [`echo_gateway`] is answered within a second.
async fn echo_still_serving(gw: &Running) {
    let started = Instant::now();
    let (mut c, _) = connect(&gw.url(), &token("fresh", &[], 300)).await;
    let r = c
        .request_traced("echo", "ping", json!({}), "alive")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "ping", "{r}");
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_never_authenticates_is_closed_with_4003() {
    let gw = echo_gateway(|s| s.limits.auth_timeout = Duration::from_millis(300)).await;
    let mut idle = TestClient::connect(&gw.url(), None).await.unwrap();
    let refused = idle.recv().await.unwrap();
    assert_eq!(refused["payload"]["error"], "Unauthorized", "{refused}");
    assert_eq!(idle.closed().await.unwrap(), Some(4003));
    echo_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_authentication_a_socket_is_cheap_and_their_number_capped() {
    let gw = echo_gateway(|s| s.limits.auth_timeout = Duration::from_secs(60)).await;
    let url = gw.url();
    // A frame over the token limit before authenticating: closed, with
    // why (18 KiB: over the limit, within what may be read before).
    let token_frame = |n: usize| {
        format!(
            r#"{{"type":"authenticate","payload":{{"token":"{}"}}}}"#,
            "x".repeat(n)
        )
    };
    let mut big = TestClient::connect(&url, None).await.unwrap();
    big.send_text(&token_frame(18 * 1024)).await.unwrap();
    let refused = big.recv().await.unwrap();
    assert_eq!(refused["payload"]["error"], "MessageTooLarge", "{refused}");
    assert_eq!(big.closed().await.unwrap(), Some(1009));
    // 60 KiB: the socket ends as the bytes arrive, past 20 KiB.
    let mut bigger = TestClient::connect(&url, None).await.unwrap();
    let started = Instant::now();
    let _ = bigger.send_text(&token_frame(60 * 1024)).await;
    assert!(bigger.recv().await.is_err(), "answered as if taken");
    assert!(started.elapsed() < Duration::from_secs(5));

    // `limits.max_unauthenticated` (1,000) sockets may wait; the next
    // upgrade is refused before it happens.
    let mut waiting = Vec::with_capacity(1000);
    for _ in 0..1000 {
        waiting.push(TestClient::connect(&url, None).await.unwrap());
    }
    let err = TestClient::connect(&url, None).await.unwrap_err();
    assert!(err.contains("503"), "{err}");
    // One authenticates: its place is free for the next.
    let mut first = waiting.remove(0);
    first
        .send(json!({"type":"authenticate","payload":{"token": token("ann", &[], 300)}}))
        .await
        .unwrap();
    assert_eq!(first.recv().await.unwrap()["payload"]["topic"], "hello");
    let _next = TestClient::connect(&url, None).await.unwrap();
    // A client with its token on the upgrade never waits: served at once.
    echo_still_serving(&gw).await;
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            r#"bff_refused_connections_total{reason="unauthenticated"}"#
        ),
        1,
        "{metrics}"
    );
    drop(waiting);
    gw.stop().await;
}

/// The status a raw `GET path` with `host` as its `Host` header gets.
async fn status_for_host(addr: std::net::SocketAddr, path: &str, host: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let answer = raw_answer(addr, &request).await;
    answer.lines().next().unwrap_or("").to_owned()
}

/// The answer to a raw HTTP request: what the first read brings (a short
/// answer comes in one), within 5 s.
async fn raw_answer(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut answer))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_is_not_a_websocket_handshake_is_told_what_is_wrong() {
    let gw = echo_gateway(|_| {}).await;
    let token = hs256_token(SECRET, "ann", &["user"], 600);
    let handshake = |method: &str, version: &str, key: &str| {
        format!(
            "{method} /ws?access_token={token} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: {version}\r\n\
             Sec-WebSocket-Key: {key}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
    let answer = raw_answer(gw.addr, &handshake("GET", "8", KEY)).await;
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{answer}"
    );
    let answer = raw_answer(gw.addr, &handshake("POST", "13", KEY)).await;
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let answer = raw_answer(gw.addr, &handshake("GET", "13", "not-a-key")).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Sec-WebSocket-Key"), "{answer}");
    let plain = "GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let answer = raw_answer(gw.addr, plain).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("upgrade"), "{answer}");
    // The same request with a good key is accepted, with RFC 6455's answer.
    let answer = raw_answer(gw.addr, &handshake("GET", "13", KEY)).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    assert!(answer.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{answer}");
    echo_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_announced_before_authentication_and_held_back_costs_little() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = echo_gateway(|s| s.limits.auth_timeout = Duration::from_secs(60)).await;
    // A WebSocket upgrade by hand, without a token.
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let upgrade = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut answer = [0u8; 1024];
    let n = tcp.read(&mut answer).await.unwrap();
    assert!(
        String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&answer[..n])
    );
    // A text frame announcing 200 KiB (masked, as a client's must be);
    // 100 KiB of it sent, then nothing.
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(200u64 * 1024).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend(std::iter::repeat_n(b'x', 100 * 1024));
    let started = Instant::now();
    let _ = tcp.write_all(&frame).await;
    // The server does not hold it until the auth timeout: the socket ends.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "still held after 5 s");
    assert!(started.elapsed() < Duration::from_secs(5));
    echo_still_serving(&gw).await;
    gw.stop().await;
}

/// A client frame as a browser sends it: final, text, masked with `key`.
fn masked_text(payload: &str, key: [u8; 4]) -> Vec<u8> {
    let len = payload.len();
    let mut frame = vec![0x81];
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&key);
    frame.extend(payload.bytes().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_between_whole_frames_of_every_size() {
    // The gateway writes its frames itself and tungstenite its pongs:
    // pings sent between calls whose answers take each header form (7-bit,
    // 16-bit and 64-bit lengths) are answered in order, and every answer
    // arrives whole.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let gw = echo_gateway(|s| s.limits.max_frame_bytes = 300_000).await;
    let url = format!("{}?access_token={}", gw.url(), token("pinger", &[], 300));
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let sizes = [0usize, 100, 70_000, 5, 140_000, 65_000, 126];
    for (i, n) in sizes.iter().enumerate() {
        let call = json!({"type": "request", "payload": {"service": "echo", "method": "m",
            "params": {"pad": "p".repeat(*n)}, "trace_id": format!("t{i}")}});
        ws.send(Message::Text(call.to_string().into()))
            .await
            .unwrap();
        ws.send(Message::Ping(format!("ping{i}").into_bytes().into()))
            .await
            .unwrap();
    }
    let mut pongs = Vec::new();
    let mut answered = std::collections::BTreeMap::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while answered.len() < sizes.len() || pongs.len() < sizes.len() {
            match ws.next().await.expect("the socket ended").unwrap() {
                Message::Text(t) => {
                    let frame: Value = serde_json::from_str(t.as_str()).unwrap();
                    if frame["type"] == "response" {
                        let id = frame["payload"]["trace_id"].as_str().unwrap().to_owned();
                        let pad = frame["payload"]["result"]["params"]["pad"]
                            .as_str()
                            .unwrap()
                            .len();
                        answered.insert(id, pad);
                    }
                }
                Message::Pong(p) => pongs.push(String::from_utf8(p.to_vec()).unwrap()),
                _ => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("answered {answered:?}, pongs {pongs:?}"));
    let want_pongs: Vec<String> = (0..sizes.len()).map(|i| format!("ping{i}")).collect();
    assert_eq!(pongs, want_pongs);
    for (i, n) in sizes.iter().enumerate() {
        assert_eq!(answered.get(&format!("t{i}")), Some(n), "{answered:?}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_sent_with_the_upgrade_request_are_read_and_answered() {
    // A client that does not wait for the 101: its first frames arrive
    // with the upgrade request, read by the HTTP server before the socket
    // exists. They are the WebSocket's first bytes, not lost.
    let gw = echo_gateway(|_| {}).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut bytes = format!(
        "GET /ws?access_token={} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        token("early", &[], 300)
    )
    .into_bytes();
    for (i, key) in [[9, 8, 7, 6], [1, 2, 3, 4]].into_iter().enumerate() {
        let call = json!({"type": "request", "payload": {"service": "echo",
            "method": format!("early{i}"), "params": {"pad": "p".repeat(200 * i)},
            "trace_id": format!("t{i}")}});
        bytes.extend(masked_text(&call.to_string(), key));
    }
    tcp.write_all(&bytes).await.unwrap();
    let mut seen = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            if text.contains(r#""method":"early0""#) && text.contains(r#""method":"early1""#) {
                return text.into_owned();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not answered: {}", String::from_utf8_lossy(&seen)));
    assert!(answered.starts_with("HTTP/1.1 101"), "{answered}");
    assert!(answered.contains(r#""topic":"hello""#), "{answered}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_development_mode_the_console_answers_only_a_loopback_host() {
    // Development mode (the in-process mesh): the console holds a token.
    let gw = echo_gateway(|_| {}).await;
    for host in ["localhost", "127.0.0.1:8080", "[::1]:8080"] {
        let status = status_for_host(gw.addr, "/console", host).await;
        assert!(status.contains(" 200 "), "{host}: {status}");
    }
    // A page whose name was rebound to 127.0.0.1 sends its own name.
    for path in ["/console", "/client.ts"] {
        let status = status_for_host(gw.addr, path, "evil.example").await;
        assert!(status.contains(" 403 "), "{path}: {status}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_limit_are_refused() {
    let scene = Scene::start(hs256(), |s| s.limits.max_in_flight = 2).await;
    let (mut c, _) = connect(&scene.gw.url(), &token("fay", &[], 300)).await;
    // Far more requests than may be in flight, sent at once.
    for i in 0..50 {
        c.send(json!({"type":"request","payload":{"service":scene.svc,"method":"ping","params":{},"trace_id":format!("f{i}")}}))
            .await
            .unwrap();
    }
    let mut limited = 0;
    for _ in 0..50 {
        let r = next(&mut c).await;
        if r["payload"]["error"]["error"] == "RateLimited" {
            limited += 1;
        } else {
            assert_eq!(r["payload"]["result"]["method"], "ping", "{r}");
        }
    }
    assert!(limited > 0, "the in-flight limit never applied");
    assert_eq!(scene.service.calls().len(), 50 - limited);
    scene.still_serving().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_request_headers_are_dropped_after_the_handshake_timeout() {
    let gw = echo_gateway(|s| s.limits.handshake_timeout = Duration::from_millis(300)).await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: web")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    for mut s in slow {
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the gateway hung up on a half-sent request");
        // EOF, or an error status followed by EOF.
        if let Ok(n) = read
            && n > 0
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    let (code, _) = http_get(gw.addr, "/healthz").await.unwrap();
    assert_eq!(code, 200);
    echo_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_before_the_upgrade() {
    let gw = echo_gateway(|s| {
        s.limits.max_connections = 6;
        s.limits.max_connections_per_user = 2;
    })
    .await;
    let url = gw.url();
    let ann = token("ann", &[], 300);
    let (_a1, _) = connect(&url, &ann).await;
    let (_a2, _) = connect(&url, &ann).await;
    let err = TestClient::connect(&url, Some(&ann)).await.unwrap_err();
    assert!(err.contains("429"), "{err}");
    // A socket that names its user only in its first frame is closed.
    let mut late = TestClient::connect(&url, None).await.unwrap();
    late.send(json!({"type":"authenticate","payload":{"token": ann}}))
        .await
        .unwrap();
    let refused = late.recv().await.unwrap();
    assert_eq!(refused["payload"]["error"], "RateLimited", "{refused}");
    assert_eq!(late.closed().await.unwrap(), Some(1008));
    let (_b1, _) = connect(&url, &token("bob", &[], 300)).await;
    let (_c1, _) = connect(&url, &token("cy", &[], 300)).await;
    let (_d1, _) = connect(&url, &token("di", &[], 300)).await;
    let (e1, _) = connect(&url, &token("eli", &[], 300)).await;
    let err = TestClient::connect(&url, Some(&token("fox", &[], 300)))
        .await
        .unwrap_err();
    assert!(err.contains("503"), "{err}");
    // A place freed is a place for a fresh client.
    drop(e1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.gateway.sessions().counts().sessions > 5 {
        assert!(
            Instant::now() < deadline,
            "the closed socket kept its place"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_still_serving(&gw).await;
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            r#"bff_refused_connections_total{reason="max_connections"}"#
        ),
        1,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            r#"bff_refused_connections_total{reason="per_user"}"#
        ),
        2,
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_closed_after_two_missed_pings_and_a_live_one_stays() {
    let gw = echo_gateway(|s| s.limits.ping_interval = Duration::from_millis(200)).await;
    let (mut silent, _) = connect(&gw.url(), &token("sid", &[], 300)).await;
    let (mut live, _) = connect(&gw.url(), &token("liv", &[], 300)).await;
    // The live client keeps talking (and so answers pings); the silent one
    // does not read at all.
    let until = Instant::now() + Duration::from_millis(1_500);
    while Instant::now() < until {
        let r = live
            .request_traced("echo", "x", json!({}), "keep")
            .await
            .unwrap();
        assert_eq!(r["result"]["method"], "x");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Closed and unregistered on the server side; the client sees its
    // socket end (its queued pong replies may race the close frame).
    let (_, metrics) = http_get(gw.addr, "/metrics").await.unwrap();
    assert!(
        metrics.contains("bff_dead_socket_closes_total 1"),
        "{metrics}"
    );
    assert!(gw.gateway.sessions().sessions_of("sid").is_empty());
    assert!(gw.gateway.sessions().sessions_of("liv").len() == 1);
    let end = silent.closed().await.unwrap();
    assert!(matches!(end, None | Some(1011)), "{end:?}");
    let r = live
        .request_traced("echo", "y", json!({}), "still")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "y");
    echo_still_serving(&gw).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_and_the_socket_kept() {
    let scene = Scene::start(hs256(), |s| s.limits.max_frame_bytes = 1_000).await;
    let (mut c, _) = connect(&scene.gw.url(), &token("olga", &[], 300)).await;
    let big = json!({"type":"request","payload":{"service":scene.svc,"method":"ping","params":{"pad":"x".repeat(2_000)}}});
    c.send(big).await.unwrap();
    let r = next(&mut c).await;
    assert_eq!(r["payload"]["error"], "MessageTooLarge", "{r}");
    assert!(
        scene.service.calls().is_empty(),
        "nothing reached the service"
    );
    let r = c
        .request_traced(&scene.svc, "ping", json!({}), "small")
        .await
        .unwrap();
    assert_eq!(r["result"]["method"], "ping");
    scene.still_serving().await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_secret_and_no_line_per_refused_call() {
    let scene = Scene::default().await;
    let t = token("lou", &[], 300);
    let (mut c, _) = connect(&scene.gw.url(), &t).await;
    // A routed name no service is bound to: NO_ROUTE, whose returned
    // message carries the token.
    let ghost = format!("{}-ghost", scene.svc);
    let before = logs().lock().unwrap().len();
    for i in 0..200 {
        let r = c
            .request_traced(&scene.svc, &format!("m{i}"), json!({}), &format!("t{i}"))
            .await
            .unwrap();
        assert!(r["error"].is_null(), "{r}");
    }
    drop(c);
    scene.stop().await;

    let routes = format!("[[route]]\ncall = \"{ghost}.*\"\n");
    let gw = start(
        &routes,
        hs256(),
        Arc::new(DefaultHandler),
        |_| {},
        MeshSetup::Broker,
    )
    .await;
    let (mut c, _) = connect(&gw.url(), &t).await;
    let mid = logs().lock().unwrap().len();
    for i in 0..100 {
        let r = c
            .request_traced(&ghost, "call", json!({}), &format!("g{i}"))
            .await
            .unwrap();
        assert_eq!(r["error"]["error"], "NuropbNotDeliveredError", "{r}");
    }
    gw.stop().await;

    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    assert!(text.len() > before, "the scenario logged something");
    assert!(!text.contains(&t), "a token reached the logs");
    let password_in_url = amqp_url()
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(userinfo, _)| userinfo.to_owned())
        .unwrap_or_default();
    assert!(
        password_in_url.contains(':') && !text.contains(&format!("{password_in_url}@")),
        "the broker password reached the logs"
    );
    let refused_window = &text[mid.min(text.len())..];
    let loud = refused_window
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" INFO ") || l.contains(" ERROR "))
        .filter(|l| {
            ![
                "shutting down",
                "joined the mesh",
                "draining",
                "drain",
                "lost the broker link",
                "is back",
            ]
            .iter()
            .any(|ok| l.contains(ok))
        })
        .count();
    assert!(
        loud < 10,
        "{loud} info/warn lines for 100 refused calls:\n{refused_window}"
    );
    assert!(
        !refused_window.contains("Server returned us a message"),
        "lapin's returned-message line is silenced"
    );
}
