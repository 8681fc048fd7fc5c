//! Requests/s and latency through the gateway on one WebSocket with many
//! requests in flight. Not a test: prints numbers.
//!
//!   cargo bench --bench gateway                       # via RabbitMQ (127.0.0.1:5672)
//!   cargo bench --bench gateway -- --memory           # in-process mesh
//!   cargo bench --bench gateway -- --requests 50000 --in-flight 128
//!   cargo bench --bench gateway -- --memory --payload 30000 --read-buffer 2048
//!
//! Under `cargo test` (no `--bench` argument) it makes a short smoke run
//! and fails if any request failed.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, Gateway, IncomingRequest, MemoryMesh, NoAuth, RouteTable, Settings,
    StubService,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() {
    let memory = std::env::args().any(|a| a == "--memory");
    let benching = common::benching();
    let total = common::arg("--requests", if benching { 20_000 } else { 1_000 });
    let in_flight = common::arg("--in-flight", 64);
    // Bytes of padding in each request (and so in each echoed response).
    let payload = "p".repeat(common::arg("--payload", 0));
    let read_buffer = common::arg(
        "--read-buffer",
        nuropb_bff::Limits::default().read_buffer_bytes,
    );
    let url = std::env::var("BFF_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let svc = format!("bench-echo-{suffix}");

    let routes = RouteTable::parse("bench", &format!("[[route]]\ncall = \"{svc}.*\"\n")).unwrap();
    let mut settings = Settings::new(format!("bench-bff-{suffix}"));
    settings.limits.max_in_flight = in_flight.max(1);
    settings.limits.read_buffer_bytes = read_buffer;
    settings.shutdown_grace_ms = 5_000;
    if !memory {
        settings.amqp_url = url.clone().into();
    }
    let echo = Arc::new(
        StubService::new(svc.clone()).method("echo", |r: IncomingRequest| async move {
            Ok(Value::Object(r.params))
        }),
    );
    let mut builder = Gateway::builder(settings)
        .routes(routes)
        .auth(Arc::new(NoAuth));
    let mut echo_server = None;
    if memory {
        let mesh = MemoryMesh::new();
        mesh.add_service(svc.clone(), echo, vec![]);
        builder = builder.memory_mesh(mesh);
    } else {
        let server = AmqpMesh::connect(AmqpConfig::new(&url, &svc), echo)
            .await
            .expect("RabbitMQ on 127.0.0.1:5672");
        echo_server = Some(server);
    }
    let gw = builder.start().await.expect("the gateway starts");
    let serving = gw.spawn().await.expect("the gateway serves");
    let addr = serving.addr();

    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    let (mut tx, mut rx) = ws.split();
    let _hello = rx.next().await;

    let send = |i: usize| {
        Message::Text(
            json!({"type":"request","payload":{"service":svc,"method":"echo","params":{"i":i,"pad":payload},"trace_id":i.to_string()}})
                .to_string()
                .into(),
        )
    };
    let mut sent_at: HashMap<String, Instant> = HashMap::with_capacity(in_flight * 2);
    let mut latencies = Vec::with_capacity(total);
    let started = Instant::now();
    let mut next = 0;
    while next < in_flight.min(total) {
        sent_at.insert(next.to_string(), Instant::now());
        tx.send(send(next)).await.unwrap();
        next += 1;
    }
    let mut errors = 0usize;
    while latencies.len() + errors < total {
        let msg = tokio::time::timeout(Duration::from_secs(30), rx.next())
            .await
            .expect("no response within 30 s")
            .unwrap()
            .unwrap();
        let Message::Text(t) = msg else { continue };
        let v: Value = serde_json::from_str(t.as_str()).unwrap();
        let trace = v["payload"]["trace_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if let Some(at) = sent_at.remove(&trace) {
            if v["payload"]["error"].is_null() {
                latencies.push(at.elapsed());
            } else {
                errors += 1;
            }
        }
        if next < total {
            sent_at.insert(next.to_string(), Instant::now());
            tx.send(send(next)).await.unwrap();
            next += 1;
        }
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "mesh={} requests={} in_flight={} payload={} read_buffer={} errors={} elapsed={:.2?} rate={:.0} req/s p50={:.2?} p99={:.2?} max={:.2?}",
        if memory { "memory" } else { "amqp" },
        total,
        in_flight,
        payload.len(),
        read_buffer,
        errors,
        elapsed,
        total as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        latencies.last().copied().unwrap_or_default(),
    );
    let _ = serving.stop().await;
    if let Some(m) = echo_server {
        m.close(Duration::from_secs(2)).await;
    }
    if errors > 0 {
        eprintln!("{errors} requests failed");
        std::process::exit(1);
    }
}
