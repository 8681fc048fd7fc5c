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

use std::io::{BufRead, BufReader, Write};
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
    // Each line on stdin asks for a census of the live heap, answered with
    // one line on stdout; the end of stdin stops the server.
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            for line in std::io::stdin().lines() {
                if line.is_err() {
                    break;
                }
                let census: Vec<String> = common::heap::snapshot()
                    .iter()
                    .map(|(blocks, bytes)| format!("{blocks}:{bytes}"))
                    .collect();
                println!("{}", census.join(" "));
            }
        })
        .await;
    };
    gw.serve(listener, stdin_closed).await.unwrap();
}

fn main() {
    let server_side = std::env::args().any(|a| a == "--server");
    if server_side {
        // Before the runtime: every block freed later was counted.
        common::heap::count();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(run(server_side));
}

async fn run(server_side: bool) {
    let jwt = std::env::args().any(|a| a == "--jwt");
    let read_buffer = common::arg(
        "--read-buffer",
        nuropb_bff::Limits::default().read_buffer_bytes,
    );
    if server_side {
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
    let mut server_out = BufReader::new(child.stdout.take().unwrap());
    let mut server_in = child.stdin.take().unwrap();
    // A wrapper (heaptrack) may print lines of its own first.
    let mut next_line = move || {
        let mut line = String::new();
        let read = server_out.read_line(&mut line).unwrap();
        assert!(read > 0, "the server closed its stdout");
        line
    };
    let addr = loop {
        let line = next_line();
        if line.trim().parse::<std::net::SocketAddr>().is_ok() {
            break line;
        }
    };
    let mut census = move || {
        writeln!(server_in, "census").unwrap();
        loop {
            if let Some(census) = Census::parse(&next_line()) {
                return census;
            }
        }
    };
    let mut url = format!("ws://{}/ws", addr.trim());
    let pid = child.id();

    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = common::rss_kib(pid);
    let heap_before = census();
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
    let settle = common::arg("--settle-ms", 1000);
    tokio::time::sleep(Duration::from_millis(settle as u64)).await;
    let after = common::rss_kib(pid);
    let heap_after = census();
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "idle sockets={n} auth={} read_buffer={read_buffer} subscriptions={subscriptions} server_rss_before={before} KiB after={after} KiB per_socket={:.0} bytes ({:.2} KiB)",
        if jwt { "hs256" } else { "none" },
        per,
        per / 1024.0
    );
    heap_after.print_growth(&heap_before, n);
    drop(sockets);
    drop(census);
    let status = child.wait().unwrap();
    assert!(status.success(), "server exited with {status}");
}

/// The server's live heap by size class, as `blocks:bytes` per class.
struct Census(Vec<(i64, i64)>);

impl Census {
    /// A census line, or None for any other line.
    fn parse(line: &str) -> Option<Census> {
        let classes: Option<Vec<(i64, i64)>> = line
            .split_whitespace()
            .map(|c| {
                let (blocks, bytes) = c.split_once(':')?;
                Some((blocks.parse().ok()?, bytes.parse().ok()?))
            })
            .collect();
        classes
            .filter(|c| c.len() == common::heap::CLASSES)
            .map(Census)
    }

    /// Where each socket's heap went: blocks and bytes per socket by size
    /// class, the classes that grew by at least a tenth of a block per
    /// socket.
    fn print_growth(&self, before: &Census, n: usize) {
        let n = n as f64;
        let mut total = 0.0;
        println!(
            "heap per socket by block size (live blocks and bytes allocated, before the allocator's own rounding):"
        );
        for (c, (now, then)) in self.0.iter().zip(&before.0).enumerate() {
            let blocks = (now.0 - then.0) as f64 / n;
            let bytes = (now.1 - then.1) as f64 / n;
            total += bytes;
            if blocks.abs() >= 0.1 {
                let low = if c == 0 {
                    0
                } else {
                    common::heap::class_limit(c - 1) + 1
                };
                println!(
                    "  {low:>6}..{:<7} {blocks:>6.2} blocks {bytes:>8.0} bytes",
                    common::heap::class_limit(c)
                );
            }
        }
        println!(
            "  heap in all: {total:.0} bytes ({:.2} KiB) per socket",
            total / 1024.0
        );
    }
}
