//! Handshakes per second on one core, by signing algorithm: a gateway on a
//! single-threaded runtime of its own (one OS thread: accept, HTTP upgrade,
//! token verification, session, hello) takes authenticated WebSocket
//! handshakes from clients on another thread. Printed per algorithm:
//! handshakes/s as measured, the gateway thread's CPU per handshake (from
//! /proc), the rate one core could take at that cost, and the token
//! verifications per second alone. Not a test: prints numbers.
//!
//!   cargo bench --bench handshakes                       # 3,000 handshakes each
//!   cargo bench --bench handshakes -- --handshakes 10000 --concurrency 64
//!   cargo bench --bench handshakes -- --broker --lifecycle   # on RabbitMQ, publishing connected/disconnected
//!
//! Under `cargo test` it makes a short smoke run.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use nuropb_bff::testing::TestKey;
use nuropb_bff::{AuthHook, Gateway, JwtAlgorithm as Alg, JwtVerifier, RouteTable, Settings};

struct Server {
    url: String,
    runtime: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(auth: Arc<dyn AuthHook>) -> Self {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let routes = RouteTable::parse("bench", "[[route]]\ncall = \"echo.*\"\n").unwrap();
                let mut settings = Settings::new(format!("handshake-bench-{}", std::process::id()));
                settings.limits.max_connections_per_user = 1_000_000;
                // `--lifecycle`: connected/disconnected published for every
                // handshake; `--broker`: on RabbitMQ rather than in process.
                settings.lifecycle_events = std::env::args().any(|a| a == "--lifecycle");
                if std::env::args().any(|a| a == "--broker") {
                    settings.amqp_url = std::env::var("BFF_TEST_AMQP_URL")
                        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
                        .into();
                }
                let gw = Gateway::builder(settings)
                    .routes(routes)
                    .auth(auth)
                    .start()
                    .await
                    .expect("the gateway starts");
                let listener = gw.bind().await.unwrap();
                let url = format!("ws://{}/ws", listener.local_addr().unwrap());
                ready_tx
                    .send((url, tokio::runtime::Handle::current()))
                    .unwrap();
                gw.serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        let (url, runtime) = ready_rx.recv().unwrap();
        Self {
            url,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The gateway thread's CPU time so far.
    async fn cpu(&self) -> Duration {
        self.runtime
            .spawn(async { common::cpu_time("/proc/thread-self/stat") })
            .await
            .unwrap_or_default()
    }

    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn handshakes(url: &str, tokens: Vec<String>, concurrency: usize) -> Duration {
    let tokens = Arc::new(std::sync::Mutex::new(tokens));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let tokens = tokens.clone();
            let url = url.to_owned();
            tokio::spawn(async move {
                loop {
                    let Some(token) = tokens.lock().unwrap().pop() else {
                        return;
                    };
                    let target = format!("{url}?access_token={token}");
                    let (mut ws, _) = tokio_tungstenite::connect_async(target.as_str())
                        .await
                        .expect("handshake");
                    let hello = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
                    assert!(matches!(hello, Ok(Some(Ok(_)))), "no hello");
                    let _ = ws.close(None).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    started.elapsed()
}

fn main() {
    let benching = common::benching();
    let n = common::arg("--handshakes", if benching { 3_000 } else { 20 });
    let concurrency = common::arg("--concurrency", 32);
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    println!("{n} handshakes per algorithm, {concurrency} at a time; the gateway on one thread\n");
    println!(
        "{:<7} {:>12} {:>16} {:>16} {:>16}",
        "alg", "handshakes/s", "gateway CPU/hs", "one core: hs/s", "verify/s alone"
    );
    let secret = "a-bench-secret-of-at-least-thirty-two-bytes";
    for alg in [Alg::ES256, Alg::RS256, Alg::EdDSA, Alg::HS256] {
        let (verifier, tokens): (JwtVerifier, Vec<String>) = if alg == Alg::HS256 {
            let v = JwtVerifier::hs256(secret.as_bytes(), None, None);
            let t = (0..n)
                .map(|i| nuropb_bff::testing::hs256_token(secret, &format!("u{i}"), &[], 3600))
                .collect();
            (v, t)
        } else {
            let key = TestKey::generate(alg);
            let v = JwtVerifier::public_key_pem(key.public_pem().as_bytes(), None, None).unwrap();
            let t = (0..n)
                .map(|i| key.token(&format!("u{i}"), &[], 3600, None, None))
                .collect();
            (v, t)
        };
        // Verification alone, on this thread.
        let sample: Vec<String> = tokens.iter().take(n.min(500)).cloned().collect();
        let verify_rate = clients.block_on(async {
            let started = Instant::now();
            for t in &sample {
                verifier.verify(t).await.expect("a good token");
            }
            sample.len() as f64 / started.elapsed().as_secs_f64()
        });
        let server = Server::start(Arc::new(verifier));
        let (wall, cpu) = clients.block_on(async {
            let before = server.cpu().await;
            let wall = handshakes(&server.url, tokens, concurrency).await;
            (wall, server.cpu().await.saturating_sub(before))
        });
        server.stop();
        let per = cpu.as_secs_f64() / n as f64;
        println!(
            "{:<7} {:>12.0} {:>13.0} us {:>16.0} {:>16.0}",
            format!("{alg:?}"),
            n as f64 / wall.as_secs_f64(),
            per * 1e6,
            if per > 0.0 { 1.0 / per } else { f64::NAN },
            verify_rate
        );
    }
}
