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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
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

/// A BFF process routing `service.*` (with `route_extra` in its route)
/// and `grace_ms` to drain, serving; and the folder of its settings.
fn start_bff(service: &str, route_extra: &str, grace_ms: u64) -> (BffProcess, SocketAddr, Dir) {
    let dir = Dir(std::env::temp_dir().join(unique("bff-shutdown")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let routes = dir.0.join("routes.toml");
    std::fs::write(
        &routes,
        format!("[[route]]\ncall = \"{service}.*\"\n{route_extra}"),
    )
    .unwrap();
    let config = dir.0.join("default.toml");
    std::fs::write(
        &config,
        format!(
            "mesh_service_name = \"{}\"\nlisten = \"127.0.0.1:0\"\namqp_url = \"{}\"\n\
             routes = \"{}\"\nws_path = \"/ws\"\nallowed_origins = []\nauth = \"jwt-hs256\"\n\
             jwt_secret = \"{SECRET}\"\nshutdown_grace_ms = {grace_ms}\nlog = \"info\"\n",
            unique("shutdown-bff"),
            amqp_url(),
            routes.display(),
        ),
    )
    .unwrap();
    let mut bff = BffProcess::spawn(
        &std::env::current_exe().unwrap(),
        &dir.0,
        &[],
        &[(CHILD_VAR, "1"), ("BFF_CONFIG", &config.to_string_lossy())],
    );
    let addr = bff.serving_addr();
    (bff, addr, dir)
}

/// A folder removed when dropped.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn request(service: &str, ms: u64, trace_id: &str) -> Value {
    json!({"type":"request","payload":{"service":service,"method":"wait","params":{"ms":ms},"trace_id":trace_id}})
}

async fn sigterm_drains_the_calls_in_flight_then_closes_and_exits_0() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let (mut bff, addr, _dir) = start_bff(&svc, "", 10_000);
    let url = format!("ws://{addr}/ws");
    readyz_becomes(addr, 200, Duration::from_secs(10)).await;
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
    readyz_becomes(addr, 503, Duration::from_millis(1000)).await;
    let not_ready_after = signalled.elapsed();
    let late = nuropb_bff::testing::TestClient::connect(&url, Some(&token("late", &[], 300))).await;
    assert!(late.unwrap_err().contains("503"));
    // A new call on the open socket is refused, naming the shutdown.
    drain_answers(&mut c, &svc, in_flight, 1500).await;
    assert!(
        not_ready_after < Duration::from_millis(1000),
        "readyz turned 503 {not_ready_after:?} after the signal"
    );
    // Then the close, once every call is answered, and a clean exit.
    assert_eq!(c.closed().await.unwrap(), Some(1001));
    let (status, log) = bff.exit(Duration::from_secs(15));
    assert!(status.success(), "exit {status}; log:\n{log}");
    service.close(Duration::from_secs(2)).await;
}

async fn a_second_sigterm_ends_the_drain_at_once() {
    let svc = unique("slow");
    let service = slow_service(&svc).await;
    let (mut bff, addr, _dir) = start_bff(&svc, "timeout_ms = 60000\n", 30_000);
    let (mut c, _) = connect(&format!("ws://{addr}/ws"), &token("hal", &[], 300)).await;
    c.send(request(&svc, 20_000, "long")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bff.terminate();
    // Listening for the second signal once the drain has begun.
    bff.wait_for("draining", Duration::from_secs(5));
    readyz_becomes(addr, 503, Duration::from_secs(2)).await;
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
    let (status, log) = bff.exit(Duration::from_secs(5));
    assert!(status.success(), "exit {status}; log:\n{log}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "{:?}",
        signalled.elapsed()
    );
    service.close(Duration::from_secs(2)).await;
}
