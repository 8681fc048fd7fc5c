//! Memory per idle WebSocket: a gateway process (this binary with
//! `--server`, on the in-process mesh) holds N authenticated, idle sockets
//! opened by this process; the server's RSS growth divided by N is the cost
//! of one socket. Not a test: prints numbers.
//!
//!   cargo bench --bench idle_sockets                     # 10,000 sockets
//!   cargo bench --bench idle_sockets -- --sockets 5000
//!   cargo bench --bench idle_sockets -- --jwt          # HS256 tokens, as in production
//!   cargo bench --bench idle_sockets -- --read-buffer 2048
//!   cargo bench --bench idle_sockets -- --jwt --subscriptions 128   # each socket at its cap
//!
//! Under `cargo test` (no `--bench` argument) it makes a short smoke run of
//! 200 sockets. Each socket takes a file descriptor on both sides: the
//! process limit (`ulimit -n`) caps N.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nuropb_bff::testing::hs256_token;
use nuropb_bff::{AuthHook, Gateway, JwtVerifier, NoAuth, RouteTable, Settings};

const SECRET: &str = "idle-bench-secret";

/// The gateway side: serve until stdin closes, then report the sessions
/// still open.
async fn server(jwt: bool, read_buffer: usize) {
    let routes = RouteTable::parse(
        "bench",
        "[[route]]\ncall = \"echo.*\"\n\n[[event]]\ntopic = \"echo.#\"\ndeliver = \"subscribers\"\n",
    )
    .unwrap();
    let auth: Arc<dyn AuthHook> = if jwt {
        Arc::new(JwtVerifier::hs256(SECRET.as_bytes(), None, None))
    } else {
        Arc::new(NoAuth)
    };
    let mut settings = Settings::new("idle-bench");
    settings.limits.read_buffer_bytes = read_buffer;
    settings.shutdown_grace_ms = 5_000;
    // The clients never answer pings; keep them past the measurement.
    settings.limits.ping_interval = Duration::from_secs(600);
    let gw = Gateway::builder(settings)
        .routes(routes)
        .auth(auth)
        .start()
        .await
        .expect("the gateway starts");
    let listener = gw.bind().await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await;
    };
    gw.serve(listener, stdin_closed).await.unwrap();
}

#[tokio::main]
async fn main() {
    let jwt = std::env::args().any(|a| a == "--jwt");
    let read_buffer = common::arg(
        "--read-buffer",
        nuropb_bff::Limits::default().read_buffer_bytes,
    );
    if std::env::args().any(|a| a == "--server") {
        return server(jwt, read_buffer).await;
    }
    let benching = common::benching();
    let n = common::arg("--sockets", if benching { 10_000 } else { 200 });
    // Subscription patterns each socket holds (the cap is 128 by default).
    let subscriptions = common::arg("--subscriptions", 0);
    // `--server-wrapper valgrind,--tool=massif` runs the server under a tool.
    let args: Vec<String> = std::env::args().collect();
    let wrapper: Vec<String> = args
        .iter()
        .position(|a| a == "--server-wrapper")
        .and_then(|i| args.get(i + 1))
        .map(|w| w.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match wrapper.split_first() {
        Some((tool, tool_args)) => {
            let mut c = Command::new(tool);
            c.args(tool_args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = cmd
        .arg("--server")
        .args(jwt.then_some("--jwt"))
        .args(["--read-buffer", &read_buffer.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut addr = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut addr)
        .unwrap();
    let mut url = format!("ws://{}/ws", addr.trim());
    let pid = child.id();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = common::rss_kib(pid);
    let mut sockets = Vec::with_capacity(n);
    for i in 0..n {
        if jwt {
            // A token per user, as a frontend fleet would present them.
            let token = hs256_token(SECRET, &format!("user-{i}"), &["user"], 3600);
            url = format!("ws://{}/ws?access_token={token}", addr.trim());
        }
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("socket {i}: {e}"));
        // The hello event: the session is registered.
        let hello = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        assert!(matches!(hello, Ok(Some(Ok(_)))), "socket {i}: no hello");
        if subscriptions > 0 {
            use futures_util::SinkExt;
            let topics: Vec<String> = (0..subscriptions)
                .map(|j| format!("echo.user{i}.topic{j}.#"))
                .collect();
            let frame = serde_json::json!({"type":"subscribe","payload":{"topics":topics}});
            ws.send(tokio_tungstenite::tungstenite::Message::Text(
                frame.to_string().into(),
            ))
            .await
            .unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
            let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = reply else {
                panic!("socket {i}: no answer to subscribe");
            };
            assert!(t.as_str().contains("\"subscribed\""), "socket {i}: {t}");
        }
        sockets.push(ws);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = common::rss_kib(pid);
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "idle sockets={n} auth={} read_buffer={read_buffer} subscriptions={subscriptions} server_rss_before={before} KiB after={after} KiB per_socket={:.0} bytes ({:.2} KiB)",
        if jwt { "hs256" } else { "none" },
        per,
        per / 1024.0
    );
    drop(sockets);
    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success(), "server exited with {status}");
}
