//! A deploy as an operator makes one: SIGTERM to a BFF process with
//! requests in flight. `/readyz` turns 503 while they are still running,
//! new sockets are refused, every request in flight is answered, a new one
//! is refused naming the shutdown, then the socket closes with 1001 and
//! the process exits 0. A second SIGTERM ends the drain at once.
//!
//! The BFF process is this binary again, started with [`CHILD_VAR`]: it
//! runs `nuropb_bff::main` as a generated BFF's `main` does, so the signal
//! handling under test is the runtime's own. Its own harness (no libtest):
//! `cargo test --test shutdown`. Against the local RabbitMQ.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use common::*;
use nuropb_bff::DefaultHandler;
use serde_json::{Value, json};

/// Set in the BFF process this binary starts of itself.
const CHILD_VAR: &str = "BFF_TEST_SHUTDOWN_CHILD";

fn main() -> ExitCode {
    if std::env::var_os(CHILD_VAR).is_some() {
        return nuropb_bff::main(
            "shutdown-test",
            "0",
            nuropb_bff::auth_from_settings,
            Arc::new(DefaultHandler),
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(sigterm_drains_the_calls_in_flight_then_closes_and_exits_0());
    println!("test sigterm_drains_the_calls_in_flight_then_closes_and_exits_0 ... ok");
    rt.block_on(a_second_sigterm_ends_the_drain_at_once());
    println!("test a_second_sigterm_ends_the_drain_at_once ... ok");
    ExitCode::SUCCESS
}

/// A BFF process and its log lines.
struct Bff {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
    dir: PathBuf,
}

impl Bff {
    /// Start a BFF routing `service.*` (with `route_extra` in its route)
    /// and `grace_ms` to drain; waits until it serves.
    fn start(service: &str, route_extra: &str, grace_ms: u64) -> (Self, SocketAddr) {
        let dir = std::env::temp_dir().join(unique("bff-shutdown"));
        std::fs::create_dir_all(&dir).unwrap();
        let routes = dir.join("routes.toml");
        std::fs::write(
            &routes,
            format!("[[route]]\ncall = \"{service}.*\"\n{route_extra}"),
        )
        .unwrap();
        let config = dir.join("default.toml");
        std::fs::write(
            &config,
            format!(
                "mesh_service_name = \"{}\"\nlisten = \"127.0.0.1:0\"\namqp_url = \"{}\"\n\
                 routes = \"{}\"\nws_path = \"/ws\"\nallowed_origins = []\nauth = \"jwt-hs256\"\njwt_secret = \"{SECRET}\"\n\
                 shutdown_grace_ms = {grace_ms}\nlog = \"info\"\n",
                unique("shutdown-bff"),
                amqp_url(),
                routes.display(),
            ),
        )
        .unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_VAR, "1")
            .env("BFF_CONFIG", &config)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the BFF process");
        let (tx, lines) = channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let mut bff = Self {
            child,
            lines,
            log: Vec::new(),
            dir,
        };
        let line = bff.wait_for("serving", Duration::from_secs(30));
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        (bff, addr)
    }

    /// The first log line (from now) holding `text`, within `within`.
    fn wait_for(&mut self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no log line with {text:?} within {within:?}; log:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Wait (up to `within`) for the process to exit: its status.
    fn exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            while let Ok(line) = self.lines.try_recv() {
                self.log.push(line);
            }
            assert!(
                Instant::now() < deadline,
                "the BFF did not exit within {within:?}; log:\n{}",
                self.log.join("\n")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bff {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn readyz(addr: SocketAddr) -> Option<u16> {
    http_get(addr, "/readyz")
        .await
        .ok()
        .map(|(status, _)| status)
}

/// Poll `/readyz` until it answers `status`, within `within`.
async fn until_readyz(addr: SocketAddr, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    while readyz(addr).await != Some(status) {
        assert!(
            Instant::now() < deadline,
            "/readyz not {status} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn request(service: &str, ms: u64, trace_id: &str) -> Value {
    json!({"type":"request","payload":{"service":service,"method":"wait","params":{"ms":ms},"trace_id":trace_id}})
}

async fn sigterm_drains_the_calls_in_flight_then_closes_and_exits_0() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let (mut bff, addr) = Bff::start(&svc, "", 10_000);
    let url = format!("ws://{addr}/ws");
    until_readyz(addr, 200, Duration::from_secs(10)).await;
    let (mut c, _) = connect(&url, &token("dee", &[], 300)).await;
    let in_flight = 16;
    for i in 0..in_flight {
        c.send(request(&svc, 1500, &format!("w{i}"))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    bff.terminate();
    // Not ready while the calls still run (they end 1.2 s from now, and the
    // socket closes only after them), and no new sockets.
    until_readyz(addr, 503, Duration::from_millis(1000)).await;
    let not_ready_after = signalled.elapsed();
    let late = nuropb_bff::testing::TestClient::connect(&url, Some(&token("late", &[], 300))).await;
    assert!(late.unwrap_err().contains("503"));
    // A new call on the open socket is refused, naming the shutdown.
    c.send(request(&svc, 0, "new")).await.unwrap();
    let mut answered = 0;
    let mut refused_new = false;
    while answered < in_flight || !refused_new {
        let frame = c.recv().await.unwrap();
        let p = &frame["payload"];
        if p["trace_id"] == "new" {
            assert_eq!(p["error"]["error"], "ShuttingDown", "{frame}");
            refused_new = true;
        } else {
            assert_eq!(p["result"], 1500, "{frame}");
            answered += 1;
        }
    }
    assert!(
        not_ready_after < Duration::from_millis(1000),
        "readyz turned 503 {not_ready_after:?} after the signal"
    );
    // Then the close, once every call is answered, and a clean exit.
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    let status = bff.exit(Duration::from_secs(15));
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        bff.log.join("\n")
    );
    service.close(Duration::from_secs(2)).await;
}

async fn a_second_sigterm_ends_the_drain_at_once() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let (mut bff, addr) = Bff::start(&svc, "timeout_ms = 60000\n", 30_000);
    let (mut c, _) = connect(&format!("ws://{addr}/ws"), &token("hal", &[], 300)).await;
    c.send(request(&svc, 20_000, "long")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bff.terminate();
    // Listening for the second signal once the drain has begun.
    bff.wait_for("draining", Duration::from_secs(5));
    until_readyz(addr, 503, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    bff.terminate();
    // The call still running is answered with the shutdown, the socket
    // closed with 1001, and the process ends, long before the 20 s call or
    // the 30 s grace.
    let frame = c.recv().await.unwrap();
    assert_eq!(frame["payload"]["trace_id"], "long", "{frame}");
    assert_eq!(
        frame["payload"]["error"]["error"], "ShuttingDown",
        "{frame}"
    );
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    let status = bff.exit(Duration::from_secs(5));
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        bff.log.join("\n")
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    service.close(Duration::from_secs(2)).await;
}
