//! A reconnect storm: after a deploy every client of an instance comes
//! back at once. A gateway process (this binary with `--server`, on the
//! in-process mesh, default runtime) holds N sockets, each subscribed to
//! `storm.#`, each having seen one event; they all drop, five events are
//! published while they are away, and they all reconnect together, each
//! with its own token (HS256, ES256 or RS256), and resume with `since`.
//!
//! Printed per algorithm: the time until every socket is authenticated
//! (its `hello` read) and until every one has resumed (`subscribed` with
//! `recovered: true` and the five missed events read); handshakes per
//! second of wall time and per second of the gateway's CPU (utime + stime
//! of its process: what one core takes); and the ceiling, the same
//! algorithm's verifications per second alone on one thread of this
//! process, measured in the same run, with the ratio. The HS256 run,
//! whose verification costs a microsecond, is the floor: what a handshake
//! costs besides its signature. Each other algorithm's CPU per handshake
//! is also printed against its verification alone plus that floor. Not a
//! test: prints numbers.
//!
//!   cargo bench --bench storm                          # 10,000 sockets, HS256, ES256 and RS256
//!   cargo bench --bench storm -- --sockets 5000 --concurrency 256
//!   cargo bench --bench storm -- --algs ES256
//!
//! Under `cargo test` it makes a short smoke run of 50 sockets. Each
//! socket takes a file descriptor in both processes.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nuropb_bff::testing::TestKey;
use nuropb_bff::{
    Gateway, JwtAlgorithm as Alg, JwtVerifier, MemoryMesh, Mesh, OutgoingEvent, RouteTable,
    Settings,
};
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

const ROUTES: &str =
    "[[route]]\ncall = \"echo.*\"\n\n[[event]]\ntopic = \"storm.#\"\ndeliver = \"subscribers\"\n";

/// `--server KEY.pem`: the gateway, verifying with that public key;
/// `publish K` on stdin publishes K events on `storm.news`; closing stdin
/// stops it.
async fn server(key_path: String) {
    let pem = std::fs::read(&key_path).unwrap();
    // `hs256:SECRET` in the file: a shared secret, whose verification costs
    // next to nothing (the handshake's floor).
    let verifier = match pem.strip_prefix(b"hs256:") {
        Some(secret) => JwtVerifier::hs256(secret, None, None),
        None => JwtVerifier::public_key_pem(&pem, None, None).unwrap(),
    };
    let mut settings = Settings::new("storm-bench");
    settings.limits.max_connections = 100_000;
    settings.limits.max_connections_per_user = 100_000;
    settings.limits.ping_interval = Duration::from_secs(600);
    settings.shutdown_grace_ms = 5_000;
    let mesh = MemoryMesh::new();
    let gw = Gateway::builder(settings)
        .routes(RouteTable::parse("bench", ROUTES).unwrap())
        .auth(Arc::new(verifier))
        .memory_mesh(mesh.clone())
        .start()
        .await
        .expect("the gateway starts");
    let listener = gw.bind().await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let commands = async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
        std::thread::spawn(move || {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        let mut n = 0u64;
        while let Some(line) = rx.recv().await {
            let k: u64 = line
                .strip_prefix("publish ")
                .and_then(|k| k.trim().parse().ok())
                .unwrap_or(0);
            for _ in 0..k {
                n += 1;
                mesh.publish_event(OutgoingEvent {
                    topic: "storm.news".into(),
                    event: json!({"n": n}),
                    context: Map::new(),
                    target: None,
                    trace_id: None,
                })
                .await
                .unwrap();
            }
            println!("published {k}");
        }
    };
    gw.serve(listener, commands).await.unwrap();
}

/// The next text frame, parsed.
async fn next_json(ws: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a frame within a minute")
            .expect("the socket open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).unwrap();
        }
    }
}

/// Connect with `token`, read `hello`, subscribe to `storm.#` (after
/// `since`, when given) and read the answer and the `missed` events it
/// brings: the socket, when it was authenticated, the last position seen.
/// Each socket comes from an address of its own: the gateway keeps the
/// TIME_WAIT of the connections it closed, and a new connection reusing
/// one's address and port would wait a second for a SYN retransmit, which
/// clients coming back from many addresses never see.
async fn join(url: &str, token: &str, since: Option<u64>, missed: usize) -> (Socket, Instant, u64) {
    let target = format!("{url}?access_token={token}");
    let began = Instant::now();
    let server: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .parse()
        .unwrap();
    let tcp = tokio::net::TcpSocket::new_v4().unwrap();
    // Any address of 127/8, at random: clients come from many, and one
    // address left with thousands of ports in TIME_WAIT by an earlier run
    // made the kernel's port search for each bind the bottleneck.
    let from = [
        127,
        fastrand::u8(1..=254),
        fastrand::u8(1..=254),
        fastrand::u8(1..=254),
    ];
    tcp.bind((from, 0).into()).unwrap();
    let stream = tcp.connect(server).await.expect("connect");
    let connected = began.elapsed();
    let (mut ws, _) =
        tokio_tungstenite::client_async(target.as_str(), MaybeTlsStream::Plain(stream))
            .await
            .expect("handshake");
    let hello = next_json(&mut ws).await;
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    let authenticated = Instant::now();
    if std::env::var_os("STORM_TRACE").is_some() && since.is_some() {
        let took = began.elapsed();
        if took > Duration::from_millis(500) {
            eprintln!("slow: connect {connected:?}, hello after {took:?}");
        }
    }
    let mut sub = json!({"type":"subscribe","payload":{"topics":["storm.#"]}});
    if let Some(since) = since {
        sub["payload"]["since"] = json!(since);
    }
    ws.send(Message::Text(sub.to_string().into()))
        .await
        .unwrap();
    let answer = next_json(&mut ws).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    if since.is_some() {
        assert_eq!(answer["payload"]["recovered"], true, "{answer}");
    }
    let mut last = since.unwrap_or(0);
    for _ in 0..missed {
        let event = next_json(&mut ws).await;
        assert_eq!(event["type"], "event", "{event}");
        last = event["payload"]["position"].as_u64().expect("a position");
    }
    (ws, authenticated, last)
}

/// Run `join` for every token, `concurrency` at a time: the sockets in
/// token order, and the time from `started` until the last was
/// authenticated.
async fn join_all(
    url: &str,
    tokens: &Arc<Vec<String>>,
    concurrency: usize,
    since: Option<u64>,
    missed: usize,
) -> (Vec<Socket>, Duration, u64) {
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency.min(tokens.len()))
        .map(|_| {
            let (url, tokens, next) = (url.to_owned(), tokens.clone(), next.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(token) = tokens.get(i) else {
                        return mine;
                    };
                    mine.push((i, join(&url, token, since, missed).await));
                }
            })
        })
        .collect();
    let mut all = Vec::with_capacity(tokens.len());
    for w in workers {
        all.extend(w.await.unwrap());
    }
    all.sort_by_key(|(i, _)| *i);
    let last_auth = all.iter().map(|(_, (_, at, _))| *at).max().unwrap();
    let position = all.iter().map(|(_, (_, _, p))| *p).max().unwrap_or(0);
    (
        all.into_iter().map(|(_, (ws, _, _))| ws).collect(),
        last_auth.saturating_duration_since(started),
        position,
    )
}

/// TCP segments the kernel has sent again, so far (all of this machine's).
fn retransmits() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The secret of the HS256 run.
const SECRET: &str = "storm-floor-secret";

/// `n` tokens of `key` (or HS256 tokens when there is none), signed on
/// every core.
fn tokens(key: Option<&TestKey>, n: usize) -> Vec<String> {
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    let chunk = n.div_ceil(cores).max(1);
    std::thread::scope(|s| {
        let parts: Vec<_> = (0..n)
            .step_by(chunk)
            .map(|start| {
                s.spawn(move || {
                    (start..(start + chunk).min(n))
                        .map(|i| {
                            let user = format!("user-{i}");
                            match key {
                                Some(key) => key.token(&user, &["user"], 3600, None, None),
                                None => {
                                    nuropb_bff::testing::hs256_token(SECRET, &user, &["user"], 3600)
                                }
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts.into_iter().flat_map(|p| p.join().unwrap()).collect()
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--server") {
        let key = args[i + 1].clone();
        return tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(server(key));
    }
    let benching = common::benching();
    let n = common::arg("--sockets", if benching { 10_000 } else { 50 });
    let concurrency = common::arg("--concurrency", 1024);
    let algs = args
        .iter()
        .position(|a| a == "--algs")
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| "ES256,RS256,HS256".into());
    let missed = 5;
    let clients = tokio::runtime::Runtime::new().unwrap();
    println!(
        "{n} sockets reconnecting together ({concurrency} handshakes in flight), each resuming `storm.#` after {missed} missed events; the gateway on the default runtime\n"
    );
    println!(
        "| alg | all authenticated | all resumed | handshakes/s | gateway CPU per handshake | handshakes per CPU-second | verifications/s alone (one thread) | ratio | TCP retransmits |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // The CPU of a handshake whose verification costs next to nothing (the
    // HS256 run, net of its verification): what any token's handshake
    // costs besides checking the signature.
    let mut floor_us: Option<f64> = None;
    // (alg, CPU per handshake, verification alone), in microseconds.
    let mut costs: Vec<(Alg, f64, f64)> = Vec::new();
    for alg in algs.split(',') {
        let alg = match alg.trim() {
            "HS256" => Alg::HS256,
            "ES256" => Alg::ES256,
            "RS256" => Alg::RS256,
            "ES384" => Alg::ES384,
            "EdDSA" => Alg::EdDSA,
            other => panic!("--algs: {other} is not HS256, ES256, RS256, ES384 or EdDSA"),
        };
        let key = (alg != Alg::HS256).then(|| TestKey::generate(alg));
        let tokens = Arc::new(tokens(key.as_ref(), n));
        // The ceiling: verifications alone, one thread.
        let verifier = match &key {
            Some(key) => {
                JwtVerifier::public_key_pem(key.public_pem().as_bytes(), None, None).unwrap()
            }
            None => JwtVerifier::hs256(SECRET.as_bytes(), None, None),
        };
        let sample = &tokens[..tokens.len().min(1000)];
        let verify_rate = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let started = Instant::now();
                for t in sample {
                    verifier.verify(t).await.expect("a good token");
                }
                sample.len() as f64 / started.elapsed().as_secs_f64()
            });

        let key_file =
            std::env::temp_dir().join(format!("storm-{}-{alg:?}.pem", std::process::id()));
        match &key {
            Some(key) => std::fs::write(&key_file, key.public_pem()).unwrap(),
            None => std::fs::write(&key_file, format!("hs256:{SECRET}")).unwrap(),
        }
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--server", key_file.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let url = format!("ws://{}/ws", line.trim());
        let pid = child.id();
        let mut publish = |k: usize| {
            writeln!(stdin, "publish {k}").unwrap();
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            assert!(line.starts_with("published"), "{line}");
        };

        // Every client connected and subscribed, having seen one event.
        let (sockets, _, _) = clients.block_on(join_all(&url, &tokens, concurrency, None, 0));
        publish(1);
        let sockets = clients.block_on(async {
            let mut seen = Vec::with_capacity(sockets.len());
            for mut ws in sockets {
                let event = next_json(&mut ws).await;
                seen.push((ws, event["payload"]["position"].as_u64().unwrap()));
            }
            seen
        });
        let since = sockets[0].1;
        // The deploy: every socket drops; events go on meanwhile.
        clients.block_on(async {
            for (mut ws, _) in sockets {
                let _ = ws.close(None).await;
            }
        });
        std::thread::sleep(Duration::from_secs(1));
        publish(missed);
        let cpu_before = common::cpu_time(&format!("/proc/{pid}/stat"));
        let retransmitted = retransmits();
        let started = Instant::now();
        let (sockets, all_authenticated, last) =
            clients.block_on(join_all(&url, &tokens, concurrency, Some(since), missed));
        let all_resumed = started.elapsed();
        let cpu = common::cpu_time(&format!("/proc/{pid}/stat")).saturating_sub(cpu_before);
        let retransmitted = retransmits().saturating_sub(retransmitted);
        assert_eq!(last, since + missed as u64, "every missed event came back");
        let per_cpu_second = n as f64 / cpu.as_secs_f64().max(0.01);
        let cpu_us = cpu.as_secs_f64() * 1e6 / n as f64;
        let verify_us = 1e6 / verify_rate;
        if alg == Alg::HS256 {
            floor_us = Some((cpu_us - verify_us).max(0.0));
        } else {
            costs.push((alg, cpu_us, verify_us));
        }
        println!(
            "| {alg:?} | {:.2} s | {:.2} s | {:.0} | {:.0} us | {:.0} | {:.0} | {:.0}% | {retransmitted} |",
            all_authenticated.as_secs_f64(),
            all_resumed.as_secs_f64(),
            n as f64 / all_resumed.as_secs_f64(),
            cpu_us,
            per_cpu_second,
            verify_rate,
            100.0 * per_cpu_second / verify_rate,
        );
        drop(sockets);
        drop(stdin);
        let mut rest = String::new();
        let _ = out.read_to_string(&mut rest);
        let status = child.wait().unwrap();
        assert!(status.success(), "the gateway exited with {status}");
        let _ = std::fs::remove_file(key_file);
    }
    // Run last, after the others' sockets, as they ran after each other's.
    if let Some(floor) = floor_us {
        println!(
            "\nthe floor: a handshake besides its signature (the HS256 run, net of its verification) costs {floor:.0} us of CPU"
        );
        println!("\n| alg | CPU per handshake | verification alone + the floor | ratio | goal |");
        println!("|---|---|---|---|---|");
        for (alg, cpu_us, verify_us) in costs {
            println!(
                "| {alg:?} | {cpu_us:.0} us | {:.0} us | {:.2} | <= 1.25 |",
                verify_us + floor,
                cpu_us / (verify_us + floor)
            );
        }
    }
}
