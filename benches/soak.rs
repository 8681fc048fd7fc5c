//! A soak run, not a test: a gateway (a child process, so its memory is its
//! own) under mixed load with client churn, while the broker is restarted
//! every few minutes and the gateway's queues are deleted. It reports
//! requests answered, refused and lost (the goal is 0 lost), how long each
//! recovery took, and the gateway's RSS over time; and events published
//! through it all (a peer publishes one every 20 ms) against what each
//! subscribed socket received: every one, once, in order, is the goal.
//!
//!   cargo bench --bench soak                          # 20 minutes
//!   cargo bench --bench soak -- --minutes 5 --restart-every 60 --clients 40
//!
//! Restarting the broker (`rabbitmqctl stop_app` / `start_app`) disturbs
//! everything else using it: run it on a machine of its own. Under
//! `cargo test` it makes a 10-second smoke run with one queue deletion and
//! no broker restart.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, Gateway, IncomingRequest, NoAuth, RouteTable, Settings, StubService,
};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The gateway side: serve `{svc}.*` until stdin closes.
async fn server(name: String, svc: String, instance: String) {
    let routes = RouteTable::parse(
        "soak",
        &format!("[[route]]\ncall = \"{svc}.*\"\n\n[[event]]\ntopic = \"{svc}-news.#\"\n"),
    )
    .unwrap();
    let mut settings = Settings::new(name);
    settings.amqp_url = AMQP_URL.into();
    settings.instance_id = Some(instance);
    settings.limits.max_connections_per_user = 10_000;
    let gw = Gateway::builder(settings)
        .routes(routes)
        .auth(Arc::new(NoAuth))
        .start()
        .await
        .expect("the gateway starts (is RabbitMQ up?)");
    let listener = gw.bind().await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
        })
        .await;
    };
    gw.serve(listener, stdin_closed).await.unwrap();
}

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    answered: AtomicU64,
    refused: AtomicU64,
}

/// One client: connects, keeps `depth` requests in flight for `life`, then
/// leaves (churn). Requests it never got an answer for are lost.
async fn client(url: String, svc: String, depth: usize, life: Duration, tally: Arc<Tally>) {
    let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
        return;
    };
    let (mut tx, mut rx) = ws.split();
    let _hello = rx.next().await;
    let until = Instant::now() + life;
    let mut pending = 0usize;
    let mut n = 0u64;
    loop {
        while pending < depth && Instant::now() < until {
            n += 1;
            let frame = json!({"type":"request","payload":{"service":svc,"method":"echo","params":{"n":n},"trace_id":n.to_string()}});
            if tx
                .send(Message::Text(frame.to_string().into()))
                .await
                .is_err()
            {
                return;
            }
            tally.sent.fetch_add(1, Ordering::Relaxed);
            pending += 1;
        }
        if pending == 0 {
            break;
        }
        let next = tokio::time::timeout(Duration::from_secs(60), rx.next()).await;
        let t = match next {
            Ok(Some(Ok(Message::Text(t)))) => t,
            // A keepalive ping (the stream answers it).
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            // The socket ended or went silent: what is pending is lost.
            _ => return,
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
        if v["type"] == "response" {
            pending -= 1;
            if v["payload"]["error"].is_null() {
                tally.answered.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = tx.send(Message::Close(None)).await;
}

/// One subscriber: subscribes to `topic` and keeps the `n` of each event
/// it receives, in order, until `stop`.
async fn subscriber(url: String, topic: String, stop: Arc<AtomicBool>) -> Vec<u64> {
    let Ok((ws, _)) = tokio_tungstenite::connect_async(url.as_str()).await else {
        return Vec::new();
    };
    let (mut tx, mut rx) = ws.split();
    let _hello = rx.next().await;
    let frame = json!({"type":"subscribe","payload":{"topics":[topic]}});
    if tx
        .send(Message::Text(frame.to_string().into()))
        .await
        .is_err()
    {
        return Vec::new();
    }
    let mut got = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let next = tokio::time::timeout(Duration::from_secs(1), rx.next()).await;
        let t = match next {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) | Err(_) => continue,
            Ok(None | Some(Err(_))) => break,
        };
        let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
        if v["type"] == "event"
            && let Some(n) = v["payload"]["event"]["n"].as_u64()
        {
            got.push(n);
        }
    }
    let _ = tx.send(Message::Close(None)).await;
    got
}

/// Publish an event on `topic` every 20 ms until `stop`, each until the
/// broker confirms it; how many were confirmed (`n` from 0).
async fn publisher(mesh: AmqpMesh, topic: String, stop: Arc<AtomicBool>) -> u64 {
    use nuropb_bff::Mesh;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let event = nuropb_bff::OutgoingEvent {
            topic: topic.clone(),
            event: json!({ "n": n }),
            context: Default::default(),
            target: None,
            trace_id: None,
        };
        match mesh.publish_event(event).await {
            Ok(()) => n += 1,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// Time until `/readyz` answers 200 again.
async fn recovery(addr: std::net::SocketAddr) -> Duration {
    let started = Instant::now();
    // Give the gateway a moment to notice before polling.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while started.elapsed() < Duration::from_secs(120) {
        let ok = nuropb_bff::testing::http_get(addr, "/readyz")
            .await
            .is_ok_and(|(s, _)| s == 200);
        if ok {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--server") {
        let get = |k: usize| args.get(i + k).cloned().unwrap_or_default();
        return server(get(1), get(2), get(3)).await;
    }
    let benching = common::benching();
    let minutes = common::arg("--minutes", 20);
    let run_for = if benching {
        Duration::from_secs(minutes as u64 * 60)
    } else {
        Duration::from_secs(10)
    };
    let restart_every = Duration::from_secs(common::arg("--restart-every", 180) as u64);
    let clients = common::arg("--clients", if benching { 40 } else { 8 });
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let (name, svc, instance) = (
        format!("soak-bff-{suffix}"),
        format!("soak-echo-{suffix}"),
        format!("i{suffix}"),
    );

    let echo = StubService::new(svc.clone()).method("echo", |r: IncomingRequest| async move {
        Ok(Value::Object(r.params))
    });
    let service = AmqpMesh::connect(AmqpConfig::new(AMQP_URL, &svc), Arc::new(echo))
        .await
        .expect("RabbitMQ on 127.0.0.1:5672");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--server", &name, &svc, &instance])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().expect("the gateway's address");
    let url = format!("ws://{addr}/ws");
    let pid = child.id();

    // Subscribers for the whole run, and a peer publishing to them.
    let events_stop = Arc::new(AtomicBool::new(false));
    let subscribers: Vec<_> = (0..if benching { 10 } else { 4 })
        .map(|_| {
            tokio::spawn(subscriber(
                url.clone(),
                format!("{svc}-news.#"),
                events_stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publishing_stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn(publisher(
        service.clone(),
        format!("{svc}-news.tick"),
        publishing_stop.clone(),
    ));

    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let load = {
        let (tally, url, svc) = (tally.clone(), url.clone(), svc.clone());
        tokio::spawn(async move {
            let mut clients_running = tokio::task::JoinSet::new();
            let mut k = 0u64;
            while started.elapsed() < run_for {
                while clients_running.len() < clients {
                    k += 1;
                    // Lives from 2 to 20 seconds (2 to 4 in a smoke run):
                    // steady churn.
                    let life = Duration::from_secs(2 + k % if benching { 19 } else { 3 });
                    clients_running.spawn(client(url.clone(), svc.clone(), 4, life, tally.clone()));
                }
                let _ = clients_running.join_next().await;
            }
            while clients_running.join_next().await.is_some() {}
        })
    };

    let mut recoveries = Vec::new();
    let mut next_restart = restart_every;
    let mut deleted = false;
    let mut next_rss = Duration::ZERO;
    println!(
        "soak: {clients} clients x 4 in flight for {run_for:?}; broker restart every {restart_every:?}"
    );
    while started.elapsed() < run_for {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = started.elapsed();
        if now >= next_rss {
            println!(
                "t={:>5.0}s rss={} KiB sent={} answered={} refused={}",
                now.as_secs_f64(),
                common::rss_kib(pid),
                tally.sent.load(Ordering::Relaxed),
                tally.answered.load(Ordering::Relaxed),
                tally.refused.load(Ordering::Relaxed)
            );
            next_rss = now + Duration::from_secs(if benching { 30 } else { 2 });
        }
        if !deleted && now >= run_for / 2 {
            deleted = true;
            for queue in [
                format!("nuropb-{name}-sq"),
                format!("nuropb-{name}-{instance}-rq"),
            ] {
                common::rabbitmqctl(&["delete_queue", &queue]);
                let took = recovery(addr).await;
                println!("incident: {queue} deleted; ready again after {took:?}");
                recoveries.push((format!("delete {queue}"), took));
            }
        }
        if benching && now >= next_restart && now + Duration::from_secs(30) < run_for {
            next_restart = now + restart_every;
            common::rabbitmqctl(&["stop_app"]);
            tokio::time::sleep(Duration::from_secs(5)).await;
            common::rabbitmqctl(&["start_app"]);
            let took = recovery(addr).await;
            println!("incident: broker restarted (5 s down); ready again after {took:?}");
            recoveries.push(("broker restart".to_owned(), took));
        }
    }
    let _ = load.await;
    publishing_stop.store(true, Ordering::Relaxed);
    let published = publishing.await.unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(3)).await;
    events_stop.store(true, Ordering::Relaxed);
    let mut complete = 0;
    let mut most_missed = 0u64;
    let subscribed = subscribers.len();
    for s in subscribers {
        let got = s.await.unwrap_or_default();
        let whole = got.iter().copied().eq(0..published);
        if whole {
            complete += 1;
        }
        let mut seen = got;
        seen.sort_unstable();
        seen.dedup();
        let missed = (0..published)
            .filter(|n| seen.binary_search(n).is_err())
            .count() as u64;
        most_missed = most_missed.max(missed);
    }
    let restarts = recoveries
        .iter()
        .filter(|(what, _)| what == "broker restart")
        .count();
    println!(
        "events: {published} published; {complete} of {subscribed} subscribers got every one once, in order; the most any missed: {most_missed}"
    );
    let (sent, answered, refused) = (
        tally.sent.load(Ordering::Relaxed),
        tally.answered.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed),
    );
    let lost = sent.saturating_sub(answered + refused);
    println!(
        "soak done after {:?}: sent={sent} answered={answered} refused={refused} lost={lost} rss_end={} KiB",
        started.elapsed(),
        common::rss_kib(pid)
    );
    for (what, took) in &recoveries {
        println!("  recovery: {what}: {took:?}");
    }
    drop(child.stdin.take());
    let _ = child.wait();
    service.close(Duration::from_secs(2)).await;
    if answered == 0 || lost > 0 {
        eprintln!("soak failed: {answered} answered, {lost} lost");
        std::process::exit(1);
    }
    // Without a broker restart nothing may be missed. (Across one, RabbitMQ
    // 3.10 has been seen to confirm and not store events published as the
    // stream starts again: PROTOCOL.md, section 5. Reported, not failed.)
    if published == 0 || (restarts == 0 && complete < subscribed) {
        eprintln!(
            "soak failed: {published} events published, {complete} of {subscribed} subscribers got them all"
        );
        std::process::exit(1);
    }
}
