//! What the gateway hop costs, beside the direct path: one command runs, in
//! one process tree and interleaved,
//!
//! - the direct AMQP path: a plain lapin client calling a Rust NuroPb echo
//!   service (plain lapin too, a process of its own, whose CPU per call is
//!   shown: the cost of one lapin peer);
//! - the same calls through the gateway (a process of its own, on
//!   RabbitMQ) at 1 and 64 in flight, on 1 and on 64 sockets;
//! - the same calls through a bare relay (`common/relay.rs`, a
//!   straightforward hand-written gateway, a yardstick and not a ceiling);
//! - a fan-out: one mesh event to N subscribed sockets.
//!
//! It prints req/s, p50, p99, the gateway's CPU per request (utime + stime
//! of its process, from /proc), the clients', RabbitMQ's and the whole
//! machine's CPU per call (/proc/stat) and the ratios to the direct path;
//! from those, the rate a gateway costing what the plain lapin client costs
//! would reach on these shared cores; and then
//! the machine's floors: what the kernel alone costs a process that
//! answers on one socket (a blocking echo: recv, send, sleep and wake), and
//! one that writes a small frame to each of many sockets (a blocking
//! loop), so the gateway's numbers can be read against what no program on
//! this machine could beat. Not a test: prints numbers.
//!
//!   cargo bench --bench hop                         # 2 rounds, 20,000 calls each, 10,000 sockets
//!   cargo bench --bench hop -- --requests 50000 --rounds 3 --fanout 5000
//!   cargo bench --bench hop -- --gateway-workers 1     # the gateway on one worker thread
//!   cargo bench --bench hop -- --gateways 2 --gateway-workers 1   # two instances, the sockets spread over them
//!   cargo bench --bench hop -- --payload-bytes 4096   # params (and so results) of about 4 KiB
//!   cargo bench --bench hop -- --token-bytes 900      # each socket authenticated with a 900-byte HS256 token
//!   cargo bench --bench hop -- --only "1 socket x 1"   # the scenarios whose name holds this
//!   cargo bench --bench hop -- --only none --fanout-events 50   # the fan-out alone, 50 events
//!   cargo bench --bench hop -- --otlp 1.0   # spans exported (ratio 1.0) to a test OTLP collector
//!
//! Under `cargo test` it makes a short smoke run.

mod common;
#[path = "common/relay.rs"]
mod relay;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, AuthHook, Gateway, JwtVerifier, Mesh, NoAuth, OutgoingEvent, RouteTable,
    Settings, StubService,
};
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;

fn amqp_url() -> String {
    std::env::var("BFF_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The NuroPb 0.1.1 headers of a message of `kind` (request, response).
fn nuropb_headers(kind: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    headers.insert("nuropb_protocol".into(), s("0.1.1"));
    headers.insert("nuropb_version".into(), s("bench"));
    headers.insert("nuropb_type".into(), s(kind));
    headers.insert("trace_id".into(), AMQPValue::Void);
    headers.insert("encrypted".into(), s(""));
    headers
}

/// Wait for stdin to close: how the orchestrator stops its children.
async fn until_stdin_closes() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    })
    .await;
}

/// A call's params: `{"n": n}`, plus with `--payload-bytes B` about B bytes
/// of records under `"items"` (the echo service answers with the params,
/// so the result is as large).
fn params(n: u64) -> Value {
    static ITEMS: std::sync::OnceLock<Option<Value>> = std::sync::OnceLock::new();
    let items = ITEMS.get_or_init(|| {
        let bytes = common::arg("--payload-bytes", 0usize);
        (bytes > 0).then(|| {
            let mut items = Vec::new();
            let mut size = 0;
            while size < bytes {
                let item = json!({"id": items.len(), "name": format!("item {}", items.len()),
                    "price": 12.5, "in_stock": true, "tags": ["red", "large"]});
                size += item.to_string().len() + 1;
                items.push(item);
            }
            Value::Array(items)
        })
    });
    match items {
        Some(items) => json!({"n": n, "items": items}),
        None => json!({"n": n}),
    }
}

/// Frame size of the floors: about a response frame's.
const FLOOR_FRAME: usize = 100;

/// `--floor-echo`: a blocking TCP echo of [`FLOOR_FRAME`]-byte messages on
/// one connection, the least a process can do to answer on a socket.
fn floor_echo() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap());
    let (mut s, _) = listener.accept().unwrap();
    s.set_nodelay(true).unwrap();
    let mut buf = [0u8; FLOOR_FRAME];
    while s.read_exact(&mut buf).is_ok() {
        if std::io::Write::write_all(&mut s, &buf).is_err() {
            break;
        }
    }
}

/// `--floor-echo-sockets`: an echo of [`FLOOR_FRAME`]-byte messages on
/// every connection it accepts, a task each on one tokio thread and nothing
/// else: the least a program can do to answer on many sockets at once.
fn floor_echo_sockets() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        let serve = async {
            while let Ok((mut s, _)) = listener.accept().await {
                s.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; FLOOR_FRAME];
                    while s.read_exact(&mut buf).await.is_ok() {
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        };
        tokio::select! {
            _ = serve => {}
            _ = until_stdin_closes() => {}
        }
    });
}

/// CPU per round trip of [`floor_echo_sockets`] with `sockets` clients
/// each keeping one message in flight, `total` round trips in all: what
/// answering one request on each of many sockets costs before any work.
/// With `rate`, the clients send no faster than that many round trips per
/// second in all, as the gateway's clients do, held back by the broker:
/// an echo that is not kept busy sleeps and wakes more often.
async fn run_floor_echo_sockets(sockets: usize, total: usize, rate: Option<f64>) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = Proc::spawn(&["--floor-echo-sockets"]);
    let mut clients = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let s = tokio::net::TcpStream::connect(&echo.first_line)
            .await
            .unwrap();
        s.set_nodelay(true).unwrap();
        clients.push(s);
    }
    let each = total.div_ceil(sockets.max(1));
    let before = echo.cpu();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut buf = [0u8; FLOOR_FRAME];
                let mut pace = rate.map(|r| {
                    let mut every =
                        tokio::time::interval(Duration::from_secs_f64(sockets as f64 / r));
                    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    every
                });
                for _ in 0..each {
                    if let Some(pace) = &mut pace {
                        pace.tick().await;
                    }
                    s.write_all(&buf).await.unwrap();
                    s.read_exact(&mut buf).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    echo.cpu().saturating_sub(before) / (each * sockets) as u32
}

/// Listen on a free port, print it (the first line the bench reads), and
/// accept `n` connections.
fn accept_floor_sockets(n: usize) -> Vec<std::net::TcpStream> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    println!("{}", listener.local_addr().unwrap());
    (0..n)
        .map(|_| {
            let (s, _) = listener.accept().unwrap();
            s.set_nodelay(true).unwrap();
            s
        })
        .collect()
}

/// `--floor-writer N --floor-rounds R`: accepts N connections, then
/// writes a [`FLOOR_FRAME`]-byte frame to each, R times (20 ms apart, so
/// the readers wait for each), and prints its CPU per write in ns.
fn floor_writer(n: usize, rounds: usize) {
    let mut sockets = accept_floor_sockets(n);
    std::thread::sleep(Duration::from_millis(300));
    let own = format!("/proc/{}/stat", std::process::id());
    let before = common::cpu_time(&own);
    let frame = [b'x'; FLOOR_FRAME];
    for _ in 0..rounds {
        for s in &mut sockets {
            std::io::Write::write_all(s, &frame).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu = common::cpu_time(&own).saturating_sub(before);
    println!("{}", cpu.as_nanos() / (n * rounds) as u128);
}

/// `--floor-fanout N --topic T`: the least a program can do to fan an
/// event out. It accepts N connections; then, for each line `k` on stdin,
/// it writes the frame the gateway would send for fan-out event `k` to
/// every socket, the sockets split over one blocking thread per core. Read
/// by the same readers as the gateway's fan-out, its deliveries/s are what
/// this machine allows any program.
fn floor_fanout(n: usize, topic: &str) {
    let mut sockets = accept_floor_sockets(n);
    let threads = std::thread::available_parallelism().map_or(1, |c| c.get());
    let share = n.div_ceil(threads).max(1);
    let mut writers = Vec::new();
    while !sockets.is_empty() {
        let rest = sockets.split_off(share.min(sockets.len()));
        let mut mine = std::mem::replace(&mut sockets, rest);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Arc<Vec<u8>>>(4);
        let thread = std::thread::spawn(move || {
            for frame in rx {
                for s in &mut mine {
                    let _ = std::io::Write::write_all(s, &frame);
                }
            }
        });
        writers.push((tx, thread));
    }
    for line in std::io::stdin().lines() {
        let Ok(k) = line.unwrap_or_default().trim().parse::<usize>() else {
            break;
        };
        let (topic, event) = fanout_event(topic, k);
        let payload =
            json!({"type": "event", "payload": {"topic": topic, "event": event}}).to_string();
        let frame = Arc::new(server_text_frame(payload.as_bytes()));
        for (tx, _) in &writers {
            tx.send(frame.clone()).unwrap();
        }
    }
    for (tx, thread) in writers {
        drop(tx);
        thread.join().unwrap();
    }
}

/// Fan-out event `k` on the bench's topic: its topic and body, as the
/// gateway's fan-out publishes them and the floor writes them
/// ([`fanout_k`] reads `k` back).
fn fanout_event(topic: &str, k: usize) -> (String, Value) {
    (format!("{topic}.fanout"), json!({"fanout": true, "k": k}))
}

/// An unmasked WebSocket text frame (as a server sends) holding `payload`.
fn server_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x81];
    match u16::try_from(payload.len()) {
        Ok(len) if len < 126 => frame.push(len as u8),
        Ok(len) => {
            frame.push(126);
            frame.extend_from_slice(&len.to_be_bytes());
        }
        Err(_) => {
            frame.push(127);
            frame.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// `--floor-readers N --floor-addr A --floor-events E`: connect N sockets
/// to the bare writer at A and read E events off each with the bench's
/// lean readers, in a process of its own (the bench holds the gateway's
/// sockets meanwhile: both sets in one process would pass the file limit).
/// Prints `ready` once connected, `done K` once event K reached every
/// socket, then every arrival as `at K NANOS` (Unix time) and `end`.
async fn floor_readers(n: usize, addr: &str, events: usize) {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    println!("ready");
    let arrived: Arc<Vec<AtomicUsize>> =
        Arc::new((0..events).map(|_| AtomicUsize::new(0)).collect());
    let (clock, wall) = (Instant::now(), std::time::SystemTime::now());
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|tcp| tokio::spawn(lean_reader(tcp, events, arrived.clone())))
        .collect();
    for (k, count) in arrived.iter().enumerate() {
        // Each event is sent once the last one is done: a minute is a hang.
        let deadline = Instant::now() + Duration::from_secs(60);
        // A coarse look: arrivals are timed by the readers themselves, and
        // this process must not busy the cores while the gateway's turn runs.
        while count.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < deadline, "floor event {k} not delivered");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!("done {k}");
    }
    let mut out = String::new();
    for r in readers {
        let (got, _tcp) = r.await.unwrap();
        for (k, at) in got {
            let unix = wall + (at - clock);
            let nanos = unix
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            out.push_str(&format!("at {k} {nanos}\n"));
        }
    }
    print!("{out}");
    println!("end");
}

/// The bare writer ([`floor_fanout`]) and its readers ([`floor_readers`]),
/// connected for the whole fan-out part of the bench, so its events can go
/// between the gateway's, one by one: the machine's speed drifts by a
/// fifth within a minute, and a ceiling measured in a run of its own,
/// seconds away, leaned the ratio with the drift.
struct Floor {
    writer: Proc,
    readers: Proc,
    stdin: std::process::ChildStdin,
    /// When each event was sent.
    sent: Vec<std::time::SystemTime>,
}

impl Floor {
    /// `n` sockets that will take `events` events in all.
    fn start(topic: &str, n: usize, events: usize) -> Self {
        tokio::task::block_in_place(|| {
            let mut writer = Proc::spawn(&["--floor-fanout", &n.to_string(), "--topic", topic]);
            let readers = Proc::spawn(&[
                "--floor-readers",
                &n.to_string(),
                "--floor-addr",
                &writer.first_line,
                "--floor-events",
                &events.to_string(),
            ]);
            assert_eq!(readers.first_line, "ready");
            let stdin = writer.child.stdin.take().unwrap();
            Self {
                writer,
                readers,
                stdin,
                sent: Vec::new(),
            }
        })
    }

    /// Send the next event and wait until every socket has it.
    fn event(&mut self) {
        let k = self.sent.len();
        self.sent.push(std::time::SystemTime::now());
        tokio::task::block_in_place(|| {
            std::io::Write::write_all(&mut self.stdin, format!("{k}\n").as_bytes()).unwrap();
            let mut line = String::new();
            self.readers.stdout.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), format!("done {k}"), "the floor's readers");
        });
    }

    fn cpu(&self) -> Duration {
        self.writer.cpu()
    }

    /// Every event's latencies from send to arrival, by event.
    fn finish(self) -> Vec<Vec<Duration>> {
        let Self {
            writer,
            mut readers,
            stdin,
            sent,
        } = self;
        drop(stdin);
        let mut latencies = vec![Vec::new(); sent.len()];
        tokio::task::block_in_place(|| {
            let mut line = String::new();
            loop {
                line.clear();
                if readers.stdout.read_line(&mut line).unwrap() == 0 || line.trim() == "end" {
                    break;
                }
                let mut words = line.split_whitespace().skip(1);
                let (Some(k), Some(nanos)) = (
                    words.next().and_then(|k| k.parse::<usize>().ok()),
                    words.next().and_then(|n| n.parse::<u64>().ok()),
                ) else {
                    continue;
                };
                let at = std::time::UNIX_EPOCH + Duration::from_nanos(nanos);
                if let Some(sent) = sent.get(k) {
                    latencies[k].push(at.duration_since(*sent).unwrap_or_default());
                }
            }
        });
        drop(writer);
        latencies
    }
}

/// Deliveries/s to `n` sockets by the median event's span (from its
/// publish to its last arrival).
fn median_rate(n: usize, spans: &[Duration]) -> f64 {
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    sorted
        .get(sorted.len() / 2)
        .map_or(0.0, |span| n as f64 / span.as_secs_f64())
}

/// Of events given as each one's latencies: each one's span (its last
/// arrival), and the p99 of all.
fn spans_and_p99(events: &[Vec<Duration>]) -> (Vec<Duration>, Duration) {
    let spans = events
        .iter()
        .map(|l| l.iter().max().copied().unwrap_or_default())
        .collect();
    let mut all: Vec<Duration> = events.iter().flatten().copied().collect();
    all.sort_unstable();
    (spans, percentile(&all, 0.99))
}

/// The floors: (CPU per round trip of the blocking echo, CPU per write of
/// the blocking writer to `fanout` waiting readers).
async fn run_floors(fanout: usize) -> (Duration, Duration) {
    let echo = Proc::spawn(&["--floor-echo"]);
    let addr = echo.first_line.clone();
    let round_trips = 20_000;
    let before = echo.cpu();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; FLOOR_FRAME];
        for _ in 0..round_trips {
            std::io::Write::write_all(&mut s, &buf).unwrap();
            s.read_exact(&mut buf).unwrap();
        }
    })
    .await
    .unwrap();
    let per_round_trip = echo.cpu().saturating_sub(before) / round_trips;
    drop(echo);

    let rounds = 20;
    let n = fanout.max(1);
    let mut writer = Proc::spawn(&[
        "--floor-writer",
        &n.to_string(),
        "--floor-rounds",
        &rounds.to_string(),
    ]);
    let addr = writer.first_line.clone();
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        readers.push(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 4096];
            let mut got = 0;
            while got < FLOOR_FRAME * rounds {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => got += k,
                }
            }
        }));
    }
    for r in readers {
        r.await.unwrap();
    }
    let nanos = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        writer.stdout.read_line(&mut line).unwrap();
        line.trim().parse::<u64>().unwrap_or(0)
    })
    .await
    .unwrap();
    (per_round_trip, Duration::from_nanos(nanos))
}

/// `--echo NAME`: a Rust NuroPb echo service on plain lapin, doing as
/// little as a peer can: take a request (acks in batches), publish the
/// response without waiting for it to be written. Its CPU per call is what
/// one lapin peer costs a hop on this machine.
async fn echo_service(name: String) {
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let queue = format!("nuropb-{name}-sq");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .exchange_declare(
            "nuropb-rpc-exchange".into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            "nuropb-rpc-exchange".into(),
            name.as_str().into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_qos(512, lapin::options::BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    println!("READY");
    let serve = async {
        let mut taken = 0u64;
        while let Some(Ok(delivery)) = consumer.next().await {
            taken += 1;
            if taken.is_multiple_of(64) {
                let _ = delivery
                    .acker
                    .ack(lapin::options::BasicAckOptions { multiple: true })
                    .await;
            }
            let Ok(request) = serde_json::from_slice::<Value>(&delivery.data) else {
                continue;
            };
            let reply_to = delivery
                .properties
                .reply_to()
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            let id = request["correlation_id"].clone();
            let response = json!({
                "tag": "response", "correlation_id": id, "context": {}, "trace_id": null,
                "result": request["params"], "error": null, "warning": null, "reply_to": "",
            });
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_correlation_id(id.as_str().unwrap_or_default().into())
                .with_headers(nuropb_headers("response"));
            let body = response.to_string();
            let publish = channel.basic_publish(
                "".into(),
                reply_to.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            );
            let _ = futures_util::FutureExt::now_or_never(publish);
        }
    };
    tokio::select! {
        _ = serve => {}
        _ = until_stdin_closes() => {}
    }
    let _ = connection.close(200, "bye".into()).await;
}

/// The HS256 secret of `--token-bytes`.
const SECRET: &str = "hop-bench-secret";

/// `--token-bytes N`: each socket authenticates with an HS256 token of
/// about N bytes (claims padded, as a production token with its scopes
/// and profile is), which the gateway verifies and forwards in every
/// call's context. 0 (the default when benching): no authentication, no
/// token; the smoke run under `cargo test` takes the token path. The
/// orchestrator passes its value to the gateway explicitly.
fn token_bytes() -> usize {
    common::arg(
        "--token-bytes",
        if common::benching() { 0usize } else { 300 },
    )
}

/// Socket `i`'s token, about `bytes` long.
fn token(i: usize, bytes: usize) -> String {
    let sub = format!("user-{i}");
    let bare = nuropb_bff::testing::hs256_token(SECRET, &sub, &["user"], 3600);
    // Base64 makes 4 characters of 3 bytes of claims.
    let pad = bytes.saturating_sub(bare.len()) * 3 / 4;
    let claims = serde_json::json!({
        "sub": sub,
        "name": sub,
        "roles": ["user"],
        "exp": nuropb_bff::testing::unix_time() + 3600,
        "scope": "s".repeat(pad),
    });
    nuropb_bff::testing::hs256_token_with(SECRET, &claims)
}

/// `--gateway NAME --service SVC --topic T`: the BFF, on RabbitMQ.
async fn gateway(name: String, svc: String, topic: String) {
    let routes = RouteTable::parse(
        "bench",
        &format!(
            "[[route]]\ncall = \"{svc}.*\"\n\n[[event]]\ntopic = \"{topic}.#\"\ndeliver = \"subscribers\"\n"
        ),
    )
    .unwrap();
    let auth: Arc<dyn AuthHook> = match token_bytes() {
        0 => Arc::new(NoAuth),
        _ => Arc::new(JwtVerifier::hs256(SECRET.as_bytes(), None, None)),
    };
    let mut settings = Settings::new(name);
    settings.amqp_url = amqp_url().into();
    settings.limits.max_in_flight = 256;
    settings.limits.ping_interval = Duration::from_secs(600);
    settings.limits.max_connections = 50_000;
    settings.shutdown_grace_ms = 3_000;
    if let Some(endpoint) = arg_str("--otlp-endpoint") {
        settings.otlp_endpoint = Some(endpoint);
        settings.otlp_sample_ratio = arg_str("--otlp").map_or(1.0, |r| r.parse().unwrap());
    }
    let gw = Gateway::builder(settings)
        .routes(routes)
        .auth(auth)
        .start()
        .await
        .expect("the gateway starts");
    let listener = gw.bind().await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    gw.serve(listener, until_stdin_closes()).await.unwrap();
}

/// A child process of this binary, stopped by closing its stdin.
struct Proc {
    child: Child,
    first_line: String,
    /// What it prints after its first line.
    stdout: BufReader<std::process::ChildStdout>,
}

impl Proc {
    /// A child running this binary with `args`; the gateway under
    /// `BFF_BENCH_GATEWAY_WRAPPER` when that is set (say `valgrind
    /// --tool=callgrind`, to count its instructions per request).
    fn spawn(args: &[&str]) -> Self {
        let exe = std::env::current_exe().unwrap();
        let wrapper = std::env::var("BFF_BENCH_GATEWAY_WRAPPER")
            .ok()
            .filter(|_| args.first() == Some(&"--gateway"));
        let mut command = match wrapper.as_deref().map(str::split_whitespace) {
            Some(mut words) => {
                let mut command = Command::new(words.next().expect("an empty wrapper"));
                command.args(words).arg(exe);
                command
            }
            None => Command::new(exe),
        };
        let mut child = command
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first_line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut first_line).unwrap();
        Self {
            child,
            first_line: first_line.trim().to_owned(),
            stdout,
        }
    }

    /// CPU time (user + system) of the process so far.
    fn cpu(&self) -> Duration {
        common::cpu_time(&format!("/proc/{}/stat", self.child.id()))
    }
}

/// A durable queue the bench made, deleted from the broker when this is
/// dropped, so runs do not pile queues up on the developer's broker.
struct DeleteOnDrop(String);

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if !common::rabbitmqctl(&["delete_queue", &self.0]) {
            eprintln!(
                "note: could not delete queue {} (rabbitmqctl delete_queue)",
                self.0
            );
        }
    }
}

/// The BFF instances under test: one, or `--gateways N`.
struct Gateways(Vec<Proc>);

impl Gateways {
    /// Where socket `i` connects: the instances in turn.
    fn url(&self, i: usize) -> String {
        let addr = &self.0[i % self.0.len()].first_line;
        match token_bytes() {
            0 => format!("ws://{addr}/ws"),
            bytes => format!("ws://{addr}/ws?access_token={}", token(i, bytes)),
        }
    }

    /// CPU time of all instances so far.
    fn cpu(&self) -> Duration {
        self.0.iter().map(Proc::cpu).sum()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

/// The direct path: a plain lapin client speaking NuroPb to the service.
struct Direct {
    channel: lapin::Channel,
    reply_to: String,
    waiters: Waiters,
    /// The context of every call: `{}`, or the token of `--token-bytes`.
    context: Value,
    _connection: Connection,
}

/// A client's own reply queue on `channel` (server-named, exclusive) and
/// its consumer (no acks): where a plain lapin caller takes its answers.
async fn reply_queue(channel: &lapin::Channel) -> (String, lapin::Consumer) {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (queue.name().as_str().to_owned(), consumer)
}

impl Direct {
    async fn connect() -> Self {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let (reply_to, mut consumer) = reply_queue(&channel).await;
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.as_str().to_owned());
                // Read as the socket clients read theirs (`read_answer`): the
                // error checked, nothing else kept.
                read_answer::<AnswerBody>(&delivery.data, |a| a);
                if let Some(tx) = id.and_then(|id| w.lock().unwrap().remove(&id)) {
                    let _ = tx.send(());
                }
            }
        });
        // The same token a socket's calls carry, when there is one.
        let context = match token_bytes() {
            0 => json!({}),
            bytes => json!({"Authorization": token(0, bytes)}),
        };
        Self {
            channel,
            reply_to,
            waiters,
            context,
            _connection: connection,
        }
    }

    async fn call(&self, svc: &str, n: u64) {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let body = json!({
            "tag": "request", "correlation_id": id, "context": self.context, "trace_id": null,
            "service": svc, "method": "echo", "params": params(n),
        });
        let (tx, rx) = oneshot::channel();
        self.waiters.lock().unwrap().insert(id.clone(), tx);
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_to.as_str().into())
            .with_expiration("30000".into())
            .with_headers(nuropb_headers("request"));
        self.channel
            .basic_publish(
                "nuropb-rpc-exchange".into(),
                svc.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body.to_string().as_bytes(),
                props,
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .expect("a direct call timed out")
            .unwrap();
    }
}

/// An answer's body (a NuroPb response, or a socket's `response` frame's
/// payload) as the bench's clients read it: whether it failed and the id it
/// answers, borrowed, the result skipped. Both paths' clients read their
/// answers alike, so the load they put on the shared cores differs only in
/// what the paths differ in (a socket client's framing).
#[derive(serde::Deserialize)]
struct AnswerBody<'a> {
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default, borrow)]
    trace_id: Option<std::borrow::Cow<'a, str>>,
}

/// A socket's answer frame: `{"type": ..., "payload": {...}}`.
#[derive(serde::Deserialize)]
struct AnswerFrame<'a> {
    #[serde(borrow)]
    payload: AnswerBody<'a>,
}

/// Read `body` as an answer (a `T` whose `payload` is its body) and
/// return the id it answers; a body that does not read, or that holds an
/// error, ends the bench with the body shown.
fn read_answer<'a, T: serde::Deserialize<'a>>(
    body: &'a [u8],
    payload: impl FnOnce(T) -> AnswerBody<'a>,
) -> Option<std::borrow::Cow<'a, str>> {
    match serde_json::from_slice::<T>(body).map(payload) {
        Ok(AnswerBody {
            error: None,
            trace_id,
        }) => trace_id,
        _ => panic!(
            "a failed or unreadable answer: {}",
            String::from_utf8_lossy(body)
        ),
    }
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    rate: f64,
    p50: Duration,
    p99: Duration,
    /// Of the gateway; on the direct path, of the echo service.
    cpu_per_request: Option<Duration>,
    /// The calling clients' (this process's) CPU per call: on the direct
    /// path what a plain lapin client costs for it, through the gateway
    /// what its socket clients cost, load on the cores the gateway shares.
    client_cpu: Option<Duration>,
    /// RabbitMQ's CPU per call (its `beam.smp` process), when found.
    broker_cpu: Option<Duration>,
    /// The whole machine's busy CPU per call (all cores, every process and
    /// the kernel): what the path costs the shared cores.
    machine_cpu: Option<Duration>,
}

/// The rate the shared cores allow a gateway that costs what the direct
/// path's plain lapin client costs per call, where `via` went through the
/// BFF: the machine's CPU per call on that path with the BFF's share
/// replaced by the lapin client's, against the direct path's. While the
/// two cores are the limit, rates go as the inverse of the machine's CPU
/// per call; the socket clients and their hops, which the direct path does
/// not have, stay in.
fn at_lapin_cost(direct: &Outcome, via: &Outcome) -> Option<f64> {
    let gateway = via.cpu_per_request?.as_secs_f64();
    let lapin = direct.client_cpu?.as_secs_f64();
    let path = via.machine_cpu?.as_secs_f64() - gateway + lapin;
    let direct_cost = direct.machine_cpu?.as_secs_f64();
    (path > 0.0).then(|| direct.rate * direct_cost / path)
}

/// RabbitMQ's CPU time so far: its Erlang VM's process (the bench's
/// broker is this machine's).
fn broker_cpu() -> Option<Duration> {
    static PID: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let pid = PID.get_or_init(|| {
        let out = Command::new("pgrep")
            .args(["-o", "beam.smp"])
            .output()
            .ok()?;
        let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (!pid.is_empty()).then_some(pid)
    });
    pid.as_ref()
        .map(|pid| common::cpu_time(&format!("/proc/{pid}/stat")))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn outcome(mut latencies: Vec<Duration>, wall: Duration, cpu: Option<Duration>) -> Outcome {
    latencies.sort_unstable();
    let n = latencies.len();
    Outcome {
        rate: n as f64 / wall.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
        cpu_per_request: cpu.map(|c| c / n as u32),
        client_cpu: None,
        broker_cpu: None,
        machine_cpu: None,
    }
}

/// The direct path; `peer` is the echo service, whose CPU per call is the
/// cost of one lapin peer answering (a floor for what lapin costs a hop).
async fn run_direct(
    direct: &Arc<Direct>,
    peer: &Proc,
    svc: &str,
    total: usize,
    in_flight: usize,
) -> Outcome {
    let per_lane = total / in_flight;
    let cpu_before = peer.cpu();
    let own = format!("/proc/{}/stat", std::process::id());
    let client_before = common::cpu_time(&own);
    let machine_before = common::machine_busy();
    let broker_before = broker_cpu();
    let started = Instant::now();
    let lanes: Vec<_> = (0..in_flight)
        .map(|lane| {
            let direct = direct.clone();
            let svc = svc.to_owned();
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_lane);
                for i in 0..per_lane {
                    let t = Instant::now();
                    direct.call(&svc, (lane * per_lane + i) as u64).await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for l in lanes {
        latencies.extend(l.await.unwrap());
    }
    let wall = started.elapsed();
    let client = common::cpu_time(&own).saturating_sub(client_before);
    let machine = common::machine_busy().saturating_sub(machine_before);
    let broker = broker_cpu()
        .zip(broker_before)
        .map(|(a, b)| a.saturating_sub(b));
    let n = latencies.len().max(1) as u32;
    let mut o = outcome(latencies, wall, Some(peer.cpu().saturating_sub(cpu_before)));
    o.client_cpu = Some(client / n);
    o.machine_cpu = Some(machine / n);
    o.broker_cpu = broker.map(|b| b / n);
    o
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(url: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    // The hello event.
    let _ = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
    ws
}

/// `sockets` sockets, each with `per_socket` requests in flight.
async fn run_gateway(
    gw: &Gateways,
    svc: &str,
    total: usize,
    sockets: usize,
    per_socket: usize,
) -> Outcome {
    let mut wss = Vec::with_capacity(sockets);
    for i in 0..sockets {
        wss.push(open(&gw.url(i)).await);
    }
    let per_ws = total / sockets;
    let cpu_before = gw.cpu();
    let own = format!("/proc/{}/stat", std::process::id());
    let client_before = common::cpu_time(&own);
    let machine_before = common::machine_busy();
    let broker_before = broker_cpu();
    let started = Instant::now();
    let tasks: Vec<_> = wss
        .into_iter()
        .enumerate()
        .map(|(s, mut ws)| {
            let svc = svc.to_owned();
            // One task sends and reads its socket in turn, unsplit (a split
            // socket's halves share a lock), and reads each answer as the
            // direct path's client does (`read_answer`).
            tokio::spawn(async move {
                let mut sent_at: HashMap<String, Instant> = HashMap::new();
                let mut lat = Vec::with_capacity(per_ws);
                let mut next = 0usize;
                let send = |i: usize| {
                    let id = format!("{s}-{i}");
                    let frame = json!({"type":"request","payload":{
                        "service": svc, "method": "echo", "params": params(i as u64), "trace_id": id}});
                    (id, Message::Text(frame.to_string().into()))
                };
                while next < per_ws.min(per_socket) {
                    let (id, m) = send(next);
                    sent_at.insert(id, Instant::now());
                    ws.feed(m).await.unwrap();
                    next += 1;
                }
                ws.flush().await.unwrap();
                while lat.len() < per_ws {
                    let t = match ws.next().await {
                        Some(Ok(Message::Text(t))) => t,
                        // A keepalive ping (answered by the stream).
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        other => panic!("socket {s} ended: {other:?}"),
                    };
                    let id = read_answer::<AnswerFrame>(t.as_bytes(), |f| f.payload);
                    if let Some(t0) = id.and_then(|id| sent_at.remove(&*id)) {
                        lat.push(t0.elapsed());
                    }
                    if next < per_ws {
                        let (id, m) = send(next);
                        sent_at.insert(id, Instant::now());
                        ws.send(m).await.unwrap();
                        next += 1;
                    }
                }
                let _ = ws.close(None).await;
                lat
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let wall = started.elapsed();
    let cpu = gw.cpu().saturating_sub(cpu_before);
    let client = common::cpu_time(&own).saturating_sub(client_before);
    let machine = common::machine_busy().saturating_sub(machine_before);
    let broker = broker_cpu()
        .zip(broker_before)
        .map(|(a, b)| a.saturating_sub(b));
    let n = latencies.len().max(1) as u32;
    let mut o = outcome(latencies, wall, Some(cpu));
    o.client_cpu = Some(client / n);
    o.machine_cpu = Some(machine / n);
    o.broker_cpu = broker.map(|b| b / n);
    o
}

/// One event to `n` subscribed sockets, `events` times: deliveries/s from
/// publish to the last arrival, p99 of publish-to-arrival, and the
/// gateway's CPU per delivery. The sockets subscribe through tungstenite,
/// then are read by [`lean_reader`]: the readers share the machine with the
/// gateway, and the less they cost, the more of the gateway the numbers show.
async fn run_fanout(
    gw: &Gateways,
    topic: &str,
    n: usize,
    events: usize,
    pace: Option<Duration>,
    floor: Option<&mut Floor>,
) -> (f64, Duration, Duration, Vec<Duration>) {
    let mut ready = Vec::with_capacity(n);
    for i in 0..n {
        let mut ws = open(&gw.url(i)).await;
        let frame = json!({"type":"subscribe","payload":{"topics":[format!("{topic}.#")]}});
        ws.send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        // Nothing else comes before the first event, so tungstenite holds
        // no bytes of the socket once this is read.
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            match next {
                Ok(Some(Ok(Message::Text(t)))) if t.contains("\"subscribed\"") => break,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no `subscribed` answer: {other:?}"),
            }
        }
        match ws.into_inner() {
            tokio_tungstenite::MaybeTlsStream::Plain(tcp) => ready.push(tcp),
            _ => panic!("the bench speaks plain ws://"),
        }
    }
    let mut cfg = AmqpConfig::new(amqp_url(), format!("fanout-pub-{}", std::process::id()));
    cfg.transient = true;
    let publisher = AmqpMesh::connect(cfg, Arc::new(StubService::new("fanout-pub")))
        .await
        .unwrap();
    let outcome = measure_fanout(
        ready,
        events,
        pace,
        floor,
        async |k| {
            publisher
                .publish_event({
                    let (topic, event) = fanout_event(topic, k);
                    OutgoingEvent {
                        topic,
                        event,
                        context: Map::new(),
                        target: None,
                        trace_id: None,
                    }
                })
                .await
                .unwrap();
        },
        || gw.cpu(),
    )
    .await;
    publisher.close(Duration::from_secs(2)).await;
    outcome
}

/// Read `sockets` with [`lean_reader`]s while `publish(k)` sends fan-out
/// event `k`, for each of `events`, each once the last was delivered to
/// every socket. Returns the deliveries/s (the median over the events of
/// one event's span from publish to its last arrival), the p99 from
/// publish to arrival, and `cpu`'s growth over the events per delivery.
async fn measure_fanout(
    sockets: Vec<tokio::net::TcpStream>,
    events: usize,
    pace: Option<Duration>,
    mut floor: Option<&mut Floor>,
    mut publish: impl AsyncFnMut(usize),
    cpu: impl Fn() -> Duration,
) -> (f64, Duration, Duration, Vec<Duration>) {
    let n = sockets.len();
    let arrived: Arc<Vec<AtomicUsize>> =
        Arc::new((0..events).map(|_| AtomicUsize::new(0)).collect());
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|tcp| tokio::spawn(lean_reader(tcp, events, arrived.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut published = Vec::with_capacity(events);
    let cpu_before = cpu();
    let start = Instant::now();
    for (k, count) in arrived.iter().enumerate() {
        if let Some(pace) = pace {
            // On a clock, whether the last one is delivered or not.
            tokio::time::sleep_until((start + pace * k as u32).into()).await;
            let t0 = Instant::now();
            publish(k).await;
            published.push(t0);
            continue;
        }
        // The bare writer's event first, when it runs beside. (A warm-up
        // event of each side before its counted one changed nothing.)
        if let Some(floor) = floor.as_deref_mut() {
            floor.event();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let t0 = Instant::now();
        publish(k).await;
        published.push(t0);
        let deadline = t0 + Duration::from_secs(30);
        while count.load(Ordering::Relaxed) < n {
            let got = count.load(Ordering::Relaxed);
            assert!(
                Instant::now() < deadline,
                "fan-out {k}: {got} of {n} deliveries"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if pace.is_some() {
        let deadline = Instant::now() + Duration::from_secs(30);
        for (k, count) in arrived.iter().enumerate() {
            while count.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "paced fan-out {k}: not all delivered"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    let cpu = cpu().saturating_sub(cpu_before);
    let mut latencies = Vec::with_capacity(n * events);
    let mut last = published.clone();
    let mut sockets = Vec::with_capacity(n);
    for r in readers {
        let (got, tcp) = tokio::time::timeout(Duration::from_secs(10), r)
            .await
            .expect("a reader did not finish")
            .unwrap();
        sockets.push(tcp);
        for (k, at) in got {
            latencies.push(at - published[k]);
            last[k] = last[k].max(at);
        }
    }
    drop(sockets);
    latencies.sort_unstable();
    let spans: Vec<Duration> = last.iter().zip(&published).map(|(l, p)| *l - *p).collect();
    (
        median_rate(n, &spans),
        percentile(&latencies, 0.99),
        cpu / (n * events) as u32,
        spans,
    )
}

/// The median over events of the bare writer's span over the gateway's
/// (`floor[k]` / `gateway[k]`, event by event, each pair a few hundred
/// milliseconds apart): the gateway's rate against the bare writer's with
/// the machine's drift left out.
fn paired_rate_ratio(floor: &[Duration], gateway: &[Duration]) -> f64 {
    let mut ratios: Vec<f64> = floor
        .iter()
        .zip(gateway)
        .filter(|(_, g)| !g.is_zero())
        .map(|(f, g)| f.as_secs_f64() / g.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Read server frames off a subscribed socket until `events` fan-out events
/// have arrived: WebSocket framing by hand (server frames are not masked)
/// and the event's `k` found by a scan, no JSON parse; each arrival is
/// counted in `arrived[k]` and returned with its time, and the socket,
/// still open: a reader that closed its socket as soon as it had its
/// events would have the gateway tearing sessions down while it still
/// delivers to the others.
async fn lean_reader(
    mut tcp: tokio::net::TcpStream,
    events: usize,
    arrived: Arc<Vec<AtomicUsize>>,
) -> (Vec<(usize, Instant)>, tokio::net::TcpStream) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::with_capacity(events);
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while got.len() < events {
        let read = tcp.read(&mut chunk).await.expect("read a fan-out socket");
        assert!(read > 0, "the gateway closed a fan-out socket");
        let at = Instant::now();
        buf.extend_from_slice(&chunk[..read]);
        let mut used = 0;
        while let Some((opcode, payload, len)) = server_frame(&buf[used..]) {
            if opcode == 1
                && let Some(k) = fanout_k(payload)
                && k < events
            {
                arrived[k].fetch_add(1, Ordering::Relaxed);
                got.push((k, at));
            }
            used += len;
        }
        buf.drain(..used);
    }
    (got, tcp)
}

/// The first whole unmasked frame of `b`: its opcode, payload and length.
fn server_frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    let (header, len): (usize, usize) = match *b.get(1)? & 0x7f {
        126 => (4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize),
        127 => (
            10,
            u64::from_be_bytes(b.get(2..10)?.try_into().ok()?) as usize,
        ),
        short => (2, short as usize),
    };
    let end = header.checked_add(len)?;
    let payload = b.get(header..end)?;
    Some((b[0] & 0x0f, payload, end))
}

/// `k` of a fan-out event frame (`..."fanout":true,"k":7...`).
fn fanout_k(payload: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(payload).ok()?;
    if !text.contains("\"fanout\"") {
        return None;
    }
    let after = &text[text.find("\"k\":")? + 4..];
    let digits = after.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

fn us(d: Duration) -> String {
    format!("{:.0} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn main() {
    if std::env::args().any(|a| a == "--floor-echo-sockets") {
        return floor_echo_sockets();
    }
    if let Some(name) = arg_str("--gateway") {
        let svc = arg_str("--service").unwrap();
        let topic = arg_str("--topic").unwrap();
        // The gateway's runtime: `--gateway-workers N` threads (default:
        // one per core, as a BFF binary runs).
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = arg_str("--gateway-workers").and_then(|n| n.parse().ok()) {
            rt.worker_threads(n);
        }
        let rt = rt.enable_all().build().unwrap();
        return rt.block_on(gateway(name, svc, topic));
    }
    if std::env::args().any(|a| a == "--bare-relay") {
        // On the gateway's runtime: as many workers as it has.
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = arg_str("--gateway-workers").and_then(|n| n.parse().ok()) {
            rt.worker_threads(n);
        }
        let rt = rt.enable_all().build().unwrap();
        return rt.block_on(relay::serve(&amqp_url(), nuropb_headers("request")));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(orchestrate());
}

async fn orchestrate() {
    if let Some(name) = arg_str("--echo") {
        return echo_service(name).await;
    }
    if std::env::args().any(|a| a == "--floor-echo") {
        return floor_echo();
    }
    if let Some(n) = arg_str("--floor-readers").and_then(|n| n.parse().ok()) {
        let addr = arg_str("--floor-addr").unwrap_or_default();
        return floor_readers(n, &addr, common::arg("--floor-events", 1)).await;
    }
    if let Some(n) = arg_str("--floor-fanout").and_then(|n| n.parse().ok()) {
        return floor_fanout(n, &arg_str("--topic").unwrap_or_default());
    }
    if let Some(n) = arg_str("--floor-writer").and_then(|n| n.parse().ok()) {
        return floor_writer(n, common::arg("--floor-rounds", 1));
    }
    let benching = common::benching();
    let total = common::arg("--requests", if benching { 20_000 } else { 640 });
    let rounds = common::arg("--rounds", if benching { 2 } else { 1 });
    let fanout = common::arg("--fanout", if benching { 10_000 } else { 50 });
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let svc = format!("hop-echo-{suffix}");
    let topic = format!("hop-{suffix}");
    let echo = Proc::spawn(&["--echo", &svc]);
    let workers = arg_str("--gateway-workers").unwrap_or_else(|| "0".into());
    let gw_name = format!("hop-bff-{suffix}");
    let mut gw_args = vec![
        "--gateway".to_owned(),
        gw_name.clone(),
        "--service".to_owned(),
        svc.clone(),
        "--topic".to_owned(),
        topic.clone(),
    ];
    if workers != "0" {
        gw_args.extend(["--gateway-workers".to_owned(), workers]);
    }
    gw_args.extend(["--token-bytes".to_owned(), token_bytes().to_string()]);
    // `--otlp RATIO`: the gateways export their spans to a collector (this
    // process's test receiver, decoding every request) at that ratio.
    let collector = arg_str("--otlp").map(|ratio| {
        let collector = common::otlp::OtlpReceiver::start();
        gw_args.extend([
            "--otlp".to_owned(),
            ratio,
            "--otlp-endpoint".to_owned(),
            collector.endpoint(),
        ]);
        collector
    });
    // Dropped after the gateways (declared before them): their service
    // queue, durable as a NuroPb service's is, is deleted once they stop.
    let _queue = DeleteOnDrop(AmqpConfig::new(amqp_url(), gw_name).service_queue());
    // `--gateways N`: N instances of the BFF, the sockets spread over them
    // (one process per core is a deployment shape of its own).
    let gw = Gateways(
        (0..common::arg("--gateways", 1usize).max(1))
            .map(|_| Proc::spawn(&gw_args.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect(),
    );
    // The bare relay (`relay`): a straightforward hand-written gateway
    // doing nothing but relay, on as many workers as the BFF. Not a
    // ceiling (it costs more per call than the BFF): the yardstick of what
    // the BFF's design buys over the obvious one.
    let mut relay_args = vec!["--bare-relay".to_owned()];
    if let Some(n) = arg_str("--gateway-workers").filter(|n| n != "0") {
        relay_args.extend(["--gateway-workers".to_owned(), n]);
    }
    let relay = Gateways(vec![Proc::spawn(
        &relay_args.iter().map(String::as_str).collect::<Vec<_>>(),
    )]);
    let direct = Arc::new(Direct::connect().await);
    // Warm up the three paths.
    run_direct(&direct, &echo, &svc, 640, 64).await;
    run_gateway(&gw, &svc, 640, 1, 64).await;
    run_gateway(&relay, &svc, 640, 1, 64).await;

    // (name, path: 0 direct, 1 the BFF, 2 the bare relay, sockets, in flight each)
    let scenarios: [(&str, usize, usize, usize); 7] = [
        ("direct AMQP, 1 in flight", 0, 1, 1),
        ("through the BFF, 1 socket x 1", 1, 1, 1),
        ("direct AMQP, 64 in flight", 0, 1, 64),
        ("through the BFF, 1 socket x 64", 1, 1, 64),
        ("through the BFF, 64 sockets x 1", 1, 64, 1),
        ("through the bare relay, 1 socket x 64", 2, 1, 64),
        ("through the bare relay, 64 sockets x 1", 2, 64, 1),
    ];
    // `--only TEXT`: the scenarios whose name holds TEXT, and the direct
    // path they are compared with (to profile one at a time).
    let only = arg_str("--only");
    let chosen = |name: &str, in_flight: usize| match &only {
        None => true,
        Some(text) => {
            name.contains(text.as_str())
                || (name.starts_with("direct")
                    && scenarios.iter().any(|(n, _, s, f)| {
                        n.contains(text.as_str()) && (s * f == 1) == (in_flight == 1)
                    }))
        }
    };
    let mut results: Vec<Vec<Outcome>> = vec![Vec::new(); scenarios.len()];
    for round in 0..rounds {
        for (i, (name, via_gateway, sockets, in_flight)) in scenarios.iter().enumerate() {
            if !chosen(name, *in_flight) {
                continue;
            }
            // Fewer calls at one in flight: each takes a round trip.
            let n = if *in_flight == 1 && *sockets == 1 {
                total / 4
            } else {
                total
            };
            let o = match via_gateway {
                0 => run_direct(&direct, &echo, &svc, n, *in_flight).await,
                1 => run_gateway(&gw, &svc, n, *sockets, *in_flight).await,
                _ => run_gateway(&relay, &svc, n, *sockets, *in_flight).await,
            };
            eprintln!("round {round}: {name}: {:.0} req/s", o.rate);
            results[i].push(o);
        }
    }
    let median = |v: &[Outcome]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        v.get(v.len() / 2).copied()
    };
    let direct1 = median(&results[0]);
    let direct64 = median(&results[2]);
    if token_bytes() > 0 {
        println!(
            "\neach call carries a token of about {} bytes (the sockets authenticate with HS256 tokens; the direct path sends the same token in its context)",
            token_bytes()
        );
    }
    println!(
        "\n| path | req/s | p50 | p99 | CPU per request (BFF; direct: the echo service) | the clients' CPU per call | RabbitMQ's CPU per call | the machine's CPU per call | vs direct (req/s) | p50 added |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (i, (name, via, sockets, in_flight)) in scenarios.iter().enumerate() {
        let Some(o) = median(&results[i]) else {
            continue;
        };
        let base = if sockets * in_flight == 1 {
            direct1
        } else {
            direct64
        };
        let (ratio, added) = if let (1.., Some(base)) = (*via, base) {
            (
                format!("{:.0}%", 100.0 * o.rate / base.rate),
                ms(o.p50.saturating_sub(base.p50)),
            )
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "| {name} | {:.0} | {} | {} | {} | {} | {} | {} | {ratio} | {added} |",
            o.rate,
            ms(o.p50),
            ms(o.p99),
            o.cpu_per_request.map_or("-".into(), us),
            o.client_cpu.map_or("-".into(), us),
            o.broker_cpu.map_or("-".into(), us),
            o.machine_cpu.map_or("-".into(), us),
        );
    }
    if let Some(collector) = &collector {
        // What is still queued goes out within a batch's delay.
        tokio::time::sleep(Duration::from_secs(1)).await;
        println!(
            "\nspans exported to the collector: {} in {} requests",
            collector.spans().len(),
            collector.requests()
        );
    }
    if let Some(o) = median(&results[4]) {
        let busy = run_floor_echo_sockets(64, total, None).await;
        let paced = run_floor_echo_sockets(64, total / 2, Some(o.rate)).await;
        println!(
            "\nfloor for 64 sockets x 1: an echo of one {FLOOR_FRAME}-byte message per socket on 64 sockets \
             (a tokio task each, one thread, nothing else) costs {} of CPU per round trip as fast as it goes, \
             {} at the gateway's {:.0} req/s",
            us(busy),
            us(paced),
            o.rate
        );
        if let (Some(base), Some(ceiling)) =
            (direct64, direct64.and_then(|d| at_lapin_cost(&d, &o)))
        {
            println!(
                "the shared cores at 64 sockets x 1: the direct path costs the machine {} per call, \
                 the path through the BFF {} (the BFF {}, its socket clients {}); a gateway costing \
                 no more than the plain lapin client ({}) would reach at most {:.2} of the direct \
                 path's rate while the cores are the limit; the BFF reached {:.2}",
                base.machine_cpu.map_or("-".into(), us),
                o.machine_cpu.map_or("-".into(), us),
                o.cpu_per_request.map_or("-".into(), us),
                o.client_cpu.map_or("-".into(), us),
                base.client_cpu.map_or("-".into(), us),
                ceiling / base.rate,
                o.rate / base.rate
            );
        }
    }
    // The targets, each against its ceiling in this run (issue 31).
    let mut targets = Targets::default();
    for (i, name) in [
        (3, "requests, 1 socket x 64"),
        (4, "requests, 64 sockets x 1"),
    ] {
        if let (Some(o), Some(base)) = (median(&results[i]), direct64) {
            targets.add(
                &format!("{name}: req/s vs the direct path's"),
                o.rate,
                base.rate,
                Goal::AtLeast(0.90),
                |v| format!("{v:.0}/s"),
            );
            if let Some(ceiling) = at_lapin_cost(&base, &o) {
                targets.add(
                    &format!(
                        "{name} (proposed): req/s vs what a gateway costing a plain lapin client's CPU allows"
                    ),
                    o.rate,
                    ceiling,
                    Goal::AtLeast(0.90),
                    |v| format!("{v:.0}/s"),
                );
            }
            if let (Some(cpu), Some(client)) = (o.cpu_per_request, base.client_cpu) {
                targets.add(
                    &format!("{name}: CPU per request vs a lapin client's per call"),
                    cpu.as_secs_f64(),
                    client.as_secs_f64(),
                    Goal::AtMost(1.5),
                    |v| us(Duration::from_secs_f64(v)),
                );
            }
        }
    }
    if fanout == 0 {
        targets.print();
        return;
    }
    let events = common::arg("--fanout-events", if common::benching() { 10 } else { 3 });
    let paced_events = common::arg(
        "--fanout-paced-events",
        if common::benching() { 25 } else { 3 },
    );
    // The floors first: the fan-out's 10,000 sockets are gone by then.
    let (round_trip, write) = run_floors(fanout).await;
    // The bare writer's events go between the gateway's, one by one, and
    // a few more after the paced run: the ceiling of the burst is the
    // bare writer's events beside it, that of the paced run all of them.
    let after = (events / 2).max(1);
    let mut floor = Floor::start(&topic, fanout, events + after);
    let floor_cpu_before = floor.cpu();
    let (rate, p99, cpu, spans) =
        run_fanout(&gw, &topic, fanout, events, None, Some(&mut floor)).await;
    let floor_cpu = floor.cpu().saturating_sub(floor_cpu_before) / (fanout * events).max(1) as u32;
    let pace = Duration::from_millis(200);
    let (_, paced_p99, _, _) =
        run_fanout(&gw, &topic, fanout, paced_events, Some(pace), None).await;
    for _ in 0..after {
        floor.event();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let latencies = floor.finish();
    let (floor_spans, floor_p99) = spans_and_p99(&latencies[..events]);
    let floor_rate = median_rate(fanout, &floor_spans);
    let paired = paired_rate_ratio(&floor_spans, &spans);
    let paced_floor_rate = median_rate(fanout, &spans_and_p99(&latencies).0);
    println!(
        "\nthe bare writer, its events between the gateway's: {floor_rate:.0} deliveries/s, p99 {}; \
         with {after} more after the paced run: {paced_floor_rate:.0}/s",
        ms(floor_p99),
    );
    println!(
        "fan-out: one event to {fanout} subscribed sockets: {rate:.0} deliveries/s, p99 delivery {}, BFF CPU {} per delivery",
        ms(p99),
        us(cpu)
    );
    println!(
        "one event every {} to the {fanout} sockets ({paced_events} events): p99 delivery {}",
        ms(pace),
        ms(paced_p99)
    );
    let write_all = Duration::from_secs_f64(fanout as f64 / paced_floor_rate);
    targets.add_ratio(
        &format!("fan-out to {fanout}: deliveries/s vs the bare writer's (the median of the event pairs' ratios)"),
        rate,
        floor_rate,
        paired,
        Goal::AtLeast(0.90),
        |v| format!("{v:.0}/s"),
    );
    targets.add(
        &format!("fan-out to {fanout}: p99 publish to arrival vs the bare writer's"),
        p99.as_secs_f64(),
        floor_p99.as_secs_f64(),
        Goal::AtMost(1.25),
        |v| ms(Duration::from_secs_f64(v)),
    );
    targets.add(
        &format!(
            "an event every {} to {fanout}: p99 delivery vs the bare writer's time to write {fanout} frames",
            ms(pace)
        ),
        paced_p99.as_secs_f64(),
        write_all.as_secs_f64(),
        Goal::AtMost(1.25),
        |v| ms(Duration::from_secs_f64(v)),
    );
    // Proposed: the bare writer's own p99 runs past its median time for
    // all its frames (its slower events), so against that time even it
    // would miss; against its p99, one event at a time, like for like.
    targets.add(
        &format!(
            "an event every {} to {fanout} (proposed): p99 delivery vs the bare writer's p99",
            ms(pace)
        ),
        paced_p99.as_secs_f64(),
        floor_p99.as_secs_f64(),
        Goal::AtMost(1.25),
        |v| ms(Duration::from_secs_f64(v)),
    );
    println!(
        "the same frames written by a bare program (a blocking thread per core, no broker), \
         read by the same readers (its events between the gateway's): {floor_rate:.0} deliveries/s, p99 delivery {}, its CPU {} per delivery; \
         the gateway does {:.0}% of that ({:.0}% event by event); the bare writer's p99 against its \
         median time for all its frames: {:.2}",
        ms(floor_p99),
        us(floor_cpu),
        100.0 * rate / floor_rate,
        100.0 * paired,
        floor_p99.as_secs_f64() * floor_rate / fanout as f64
    );
    println!(
        "\nfloors on this machine: a blocking echo costs {} of CPU per round trip \
         (a BFF request at 1 in flight takes two: the socket's and the broker's); \
         a blocking loop writing a {FLOOR_FRAME}-byte frame to each of {fanout} waiting sockets \
         costs {}",
        us(round_trip),
        match write.as_nanos() {
            // Fewer writes than the CPU clock's tick (10 ms) can resolve.
            0 => "less than the CPU clock resolves at this many sockets".to_owned(),
            nanos => format!(
                "{} per write ({:.0} writes/s on one core)",
                us(write),
                1e9 / nanos as f64
            ),
        }
    );
    targets.print();
}

/// What a target asks of the ratio of a number to its ceiling.
#[derive(Debug, Clone, Copy)]
enum Goal {
    AtLeast(f64),
    AtMost(f64),
}

/// The targets of a run, each with its ceiling measured in the same run.
#[derive(Default)]
struct Targets(Vec<(String, String, String, f64, Goal)>);

impl Targets {
    fn add(
        &mut self,
        what: &str,
        value: f64,
        ceiling: f64,
        goal: Goal,
        show: impl Fn(f64) -> String,
    ) {
        let ratio = if ceiling > 0.0 {
            value / ceiling
        } else {
            f64::NAN
        };
        self.add_ratio(what, value, ceiling, ratio, goal, show);
    }

    /// A target whose ratio is not `value / ceiling` (a median of paired
    /// ratios, say), shown beside both.
    fn add_ratio(
        &mut self,
        what: &str,
        value: f64,
        ceiling: f64,
        ratio: f64,
        goal: Goal,
        show: impl Fn(f64) -> String,
    ) {
        self.0
            .push((what.to_owned(), show(value), show(ceiling), ratio, goal));
    }

    fn print(&self) {
        if self.0.is_empty() {
            return;
        }
        println!("\n| target | this run | ceiling (same run) | ratio | goal | met |");
        println!("|---|---|---|---|---|---|");
        for (what, value, ceiling, ratio, goal) in &self.0 {
            let (text, met) = match goal {
                Goal::AtLeast(g) => (format!(">= {g:.2}"), *ratio >= *g),
                Goal::AtMost(g) => (format!("<= {g:.2}"), *ratio <= *g),
            };
            println!(
                "| {what} | {value} | {ceiling} | {ratio:.2} | {text} | {} |",
                if met { "yes" } else { "no" }
            );
        }
    }
}
