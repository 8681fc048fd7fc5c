//! The AMQP mesh against the RabbitMQ on this machine: two peers, one
//! serving stub methods, one calling them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{amqp_url, eventually, rabbitmqctl, unique};
use nuropb_bff::{
    AmqpConfig, AmqpMesh, BoxFuture, Call, ErrorBody, IncomingEvent, IncomingRequest, Mesh,
    MeshError, MeshHandler, OutgoingEvent, StubService,
};
use serde_json::{Map, Value, json};

#[derive(Debug, Default)]
struct Recorder {
    commands: Mutex<Vec<String>>,
    events: Mutex<Vec<(String, Option<Vec<String>>)>>,
}

impl MeshHandler for Recorder {
    fn handle_request(&self, r: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        self.commands.lock().unwrap().push(r.method);
        Box::pin(async { Ok(Value::Null) })
    }
    fn handle_event(&self, e: IncomingEvent) -> BoxFuture<'_, ()> {
        self.events.lock().unwrap().push((e.topic, e.target));
        Box::pin(async {})
    }
}

fn call(service: &str, method: &str, params: Value, ttl: Duration) -> Call {
    Call {
        service: service.into(),
        method: method.into(),
        params: params.as_object().cloned().unwrap_or_default().into(),
        context: Default::default(),
        ttl,
        trace_id: Some("trace-1".into()),
    }
}

async fn peer(name: &str, handler: Arc<dyn MeshHandler>, bindings: Vec<String>) -> AmqpMesh {
    let mut config = AmqpConfig::new(amqp_url(), name);
    config.event_bindings = bindings;
    AmqpMesh::connect(config, handler)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672 (rabbitmq-server -detached)")
}

#[tokio::test]
async fn request_response_errors_no_route_and_timeout_over_the_broker() {
    let svc_name = unique("calc");
    let stub = StubService::new(svc_name.clone())
        .method("add", |r: IncomingRequest| async move {
            let a = r.params["a"].as_i64().unwrap_or(0);
            let b = r.params["b"].as_i64().unwrap_or(0);
            Ok(json!(a + b))
        })
        .method("ctx", |r: IncomingRequest| async move {
            Ok(json!({"trace": r.trace_id, "ctx": r.context}))
        })
        .method("slow", |_| async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok(Value::Null)
        })
        .method("fail", |_| async {
            Err(ErrorBody::new("NuropbException", "nope"))
        });
    let server = peer(&svc_name, Arc::new(stub), vec![]).await;
    let client = peer(&unique("client"), Arc::new(Recorder::default()), vec![]).await;
    let ttl = Duration::from_secs(10);

    let r = client
        .request(&call(&svc_name, "add", json!({"a": 2, "b": 3}), ttl))
        .await;
    assert_eq!(r, Ok(json!(5)));

    let mut c = call(&svc_name, "ctx", json!({}), ttl);
    c.context.insert("user_id".into(), json!("u7"));
    let r = client.request(&c).await.unwrap();
    assert_eq!(r["trace"], "trace-1");
    assert_eq!(r["ctx"]["user_id"], "u7");

    // Many in flight over one connection.
    let calls = (0..200).map(|i| {
        let c = call(&svc_name, "add", json!({"a": i, "b": 1}), ttl);
        let client = &client;
        async move { client.request(&c).await }
    });
    let results = futures_util::future::join_all(calls).await;
    for (i, r) in results.into_iter().enumerate() {
        assert_eq!(r, Ok(json!(i as i64 + 1)));
    }

    let r = client
        .request(&call(&svc_name, "fail", json!({}), ttl))
        .await;
    assert_eq!(
        r,
        Err(MeshError::Remote(ErrorBody::new("NuropbException", "nope")))
    );

    // NO_ROUTE comes back at once, not after the 30 s ttl.
    let started = Instant::now();
    let absent = unique("absent");
    let r = client
        .request(&call(&absent, "x", json!({}), Duration::from_secs(30)))
        .await;
    assert!(
        matches!(&r, Err(MeshError::NotDelivered { service, method }) if *service == absent && method == "x"),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );

    let r = client
        .request(&call(
            &svc_name,
            "slow",
            json!({}),
            Duration::from_millis(300),
        ))
        .await;
    assert_eq!(r, Err(MeshError::Timeout(Duration::from_millis(300))));

    // A caller that gives up (its future dropped) leaves nothing behind
    // either; nor did any call above.
    let slow = call(&svc_name, "slow", json!({}), ttl);
    let gave_up = tokio::time::timeout(Duration::from_millis(200), client.request(&slow)).await;
    assert!(gave_up.is_err(), "{gave_up:?}");
    assert_eq!(client.calls_waiting(), 0);

    client.close(Duration::from_secs(5)).await;
    server.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn commands_and_events_reach_their_peers() {
    let rec = Arc::new(Recorder::default());
    let name = unique("listener");
    let topic_root = unique("topic").replace('-', "_");
    let listener = peer(&name, rec.clone(), vec![format!("{topic_root}.#")]).await;
    let sender = peer(&unique("sender"), Arc::new(Recorder::default()), vec![]).await;

    sender
        .command(call(&name, "do_it", json!({}), Duration::from_secs(10)))
        .await
        .unwrap();
    let r = sender
        .command(call(
            &unique("absent"),
            "do_it",
            json!({}),
            Duration::from_secs(10),
        ))
        .await;
    assert!(matches!(r, Err(MeshError::NotDelivered { .. })), "{r:?}");

    for (suffix, target) in [("a.b", Some(vec!["u1".to_owned()])), ("c", None)] {
        sender
            .publish_event(OutgoingEvent {
                topic: format!("{topic_root}.{suffix}"),
                event: json!({"k": 1}),
                context: Map::new(),
                target,
                trace_id: None,
            })
            .await
            .unwrap();
    }
    sender
        .publish_event(OutgoingEvent {
            topic: "unrelated.topic".into(),
            event: json!({}),
            context: Map::new(),
            target: None,
            trace_id: None,
        })
        .await
        .unwrap();
    eventually("the command", Duration::from_secs(10), async || {
        (rec.commands.lock().unwrap().len() == 1).then_some(())
    })
    .await;
    eventually("two events", Duration::from_secs(10), async || {
        (rec.events.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    assert_eq!(rec.commands.lock().unwrap()[0], "do_it");
    let events = rec.events.lock().unwrap().clone();
    assert!(events.contains(&(format!("{topic_root}.a.b"), Some(vec!["u1".to_owned()]))));
    assert!(events.contains(&(format!("{topic_root}.c"), None)));

    sender.close(Duration::from_secs(5)).await;
    listener.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_named_in_the_error() {
    let mut config = AmqpConfig::new("amqp://guest:hunter2@127.0.0.1:1/%2f", "x");
    config.connect_timeout = Duration::from_secs(5);
    let err = AmqpMesh::connect(config, Arc::new(Recorder::default()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1"), "{text}");
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

/// Have the broker close the connection whose name is `connection_name`
/// (as an operator's `rabbitmqctl close_connection` or a broker failover
/// would).
fn broker_closes(connection_name: &str) {
    let listing = rabbitmqctl(&["list_connections", "-q", "pid", "client_properties"]);
    let pid = listing
        .lines()
        .find(|l| l.contains(connection_name))
        .and_then(|l| l.split('\t').next())
        .unwrap_or_else(|| panic!("no broker connection named {connection_name}:\n{listing}"))
        .to_owned();
    rabbitmqctl(&["close_connection", &pid, "reconnect test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_reconnects_after_the_broker_drops_its_connection() {
    let svc_name = unique("recon");
    let stub = StubService::new(svc_name.clone())
        .method("add", |r: IncomingRequest| async move {
            Ok(json!(
                r.params["a"].as_i64().unwrap_or(0) + r.params["b"].as_i64().unwrap_or(0)
            ))
        })
        .method("slow", |_| async {
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(Value::Null)
        });
    let server = peer(&svc_name, Arc::new(stub), vec![]).await;
    let recorder = Arc::new(Recorder::default());
    let mut config = AmqpConfig::new(amqp_url(), unique("client"));
    config.event_bindings = vec![format!("{svc_name}.#")];
    config.max_backoff = Duration::from_millis(500);
    let name = config.connection_name();
    let client = AmqpMesh::connect(config, recorder.clone()).await.unwrap();
    let ttl = Duration::from_secs(30);
    let add = |a: i64| call(&svc_name, "add", json!({"a": a, "b": 1}), ttl);
    assert_eq!(client.request(&add(1)).await, Ok(json!(2)));

    // A call in flight when the connection goes fails at once, not after
    // its 30 s ttl.
    let in_flight = {
        let client = client.clone();
        let c = call(&svc_name, "slow", json!({}), ttl);
        tokio::spawn(async move { client.request(&c).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let losses = client.reconnects();
    let dropped_at = Instant::now();
    tokio::task::spawn_blocking(move || broker_closes(&name))
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the in-flight call must end when the connection drops")
        .unwrap();
    assert!(matches!(r, Err(MeshError::Unavailable(_))), "{r:?}");
    // Counted, not watched: the link can be back before a poll of
    // `is_ready` ever sees it down.
    eventually(
        "the mesh to notice the loss",
        Duration::from_secs(10),
        async || (client.reconnects() > losses).then_some(()),
    )
    .await;

    // Back by itself: requests, and the event bindings of the new queue.
    eventually("a reconnect", Duration::from_secs(30), async || {
        client.is_ready().then_some(())
    })
    .await;
    println!("reconnected {:?} after the drop", dropped_at.elapsed());
    assert_eq!(client.request(&add(41)).await, Ok(json!(42)));
    server
        .publish_event(OutgoingEvent {
            topic: format!("{svc_name}.changed"),
            event: json!({"n": 1}),
            context: Map::new(),
            target: None,
            trace_id: None,
        })
        .await
        .unwrap();
    eventually(
        "the event after reconnecting",
        Duration::from_secs(10),
        async || (!recorder.events.lock().unwrap().is_empty()).then_some(()),
    )
    .await;

    client.close(Duration::from_secs(5)).await;
    server.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn malformed_broker_messages_are_dropped_and_both_peers_keep_serving() {
    use lapin::options::BasicPublishOptions;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let svc_name = unique("sturdy");
    let stub = StubService::new(svc_name.clone()).method("add", |r: IncomingRequest| async move {
        Ok(json!(
            r.params["a"].as_i64().unwrap_or(0) + r.params["b"].as_i64().unwrap_or(0)
        ))
    });
    let server = peer(&svc_name, Arc::new(stub), vec![]).await;
    let recorder = Arc::new(Recorder::default());
    let client = peer(&unique("client"), recorder.clone(), vec![]).await;

    let raw = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = raw.create_channel().await.unwrap();
    let nuropb = |kind: &str, protocol: &str| {
        let mut h = FieldTable::default();
        h.insert(
            "nuropb_protocol".into(),
            AMQPValue::LongString(protocol.into()),
        );
        h.insert("nuropb_type".into(), AMQPValue::LongString(kind.into()));
        Some(h)
    };
    let response_queue = client.config().response_queue();
    let cases: Vec<(Option<FieldTable>, Vec<u8>)> = vec![
        (None, b"no headers at all".to_vec()),
        (nuropb("request", "0.1.1"), b"not json".to_vec()),
        (nuropb("request", "0.1.1"), vec![0xff, 0xfe, 0x00]),
        (nuropb("request", "0.1.1"), b"[1,2,3]".to_vec()),
        (nuropb("request", "0.1.1"), br#"{"tag":"request"}"#.to_vec()),
        (nuropb("request", "9.9.9"), b"{}".to_vec()),
        (nuropb("gossip", "0.1.1"), b"{}".to_vec()),
        (
            nuropb("event", "0.1.1"),
            br#"{"tag":"request","service":"x","method":"y","params":{},"context":{},"correlation_id":"c","trace_id":null}"#.to_vec(),
        ),
        (
            nuropb("response", "0.1.1"),
            br#"{"tag":"response","correlation_id":"nobody-waits","context":{},"trace_id":null,"result":1,"error":null}"#.to_vec(),
        ),
    ];
    for queue in [format!("nuropb-{svc_name}-sq"), response_queue] {
        for (headers, body) in &cases {
            let mut props = BasicProperties::default();
            if let Some(h) = headers {
                props = props.with_headers(h.clone());
            }
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .unwrap();
        }
    }
    // Give both peers time to chew on all of it.
    tokio::time::sleep(Duration::from_millis(500)).await;

    assert!(server.is_ready() && client.is_ready());
    let r = client
        .request(&call(
            &svc_name,
            "add",
            json!({"a": 20, "b": 22}),
            Duration::from_secs(10),
        ))
        .await;
    assert_eq!(r, Ok(json!(42)));
    assert!(
        recorder.events.lock().unwrap().is_empty(),
        "a malformed message reached the handler"
    );

    let _ = raw.close(200, "bye".into()).await;
    client.close(Duration::from_secs(5)).await;
    server.close(Duration::from_secs(5)).await;
}

/// Counts the control messages it is given.
#[derive(Debug, Default)]
struct Controls(std::sync::atomic::AtomicUsize);

impl MeshHandler for Controls {
    fn handle_request(&self, _: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        Box::pin(async { Ok(Value::Null) })
    }
    fn handle_control(&self, _: Value) -> BoxFuture<'_, ()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Box::pin(async {})
    }
}

/// Messages that reach an instance's response queue while its lane is
/// still setting up (the response queue's consumer receives while the
/// event consumer is asked for) are read once the lane reads. They came
/// to a consumer without acknowledgements: handing them back, as the lane
/// once did, made the broker close the channel (406, unknown delivery
/// tag) and the link was rebuilt each time another instance spoke at the
/// wrong moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_messages_that_come_while_the_link_starts_are_read_and_it_stays_up() {
    let control = unique("ctl");
    let config = |name: &str| {
        let mut config = AmqpConfig::new(amqp_url(), name);
        config.control_exchange = Some(control.clone());
        // An event queue: a second consumer set up after the response
        // queue's.
        config.event_bindings = vec![format!("{name}.#")];
        config
    };
    // Another instance, speaking to all without pause.
    let talker = AmqpMesh::connect(config(&unique("talker")), Arc::new(Controls::default()))
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let talking = {
        let (talker, stop) = (talker.clone(), stop.clone());
        tokio::spawn(async move {
            let mut sent = 0u64;
            while !stop.is_cancelled() {
                talker
                    .broadcast_control(json!({"n": sent}))
                    .await
                    .expect("the talker's broadcast");
                sent += 1;
            }
            sent
        })
    };
    for _ in 0..6 {
        let heard = Arc::new(Controls::default());
        let mesh = AmqpMesh::connect(config(&unique("flooded")), heard.clone())
            .await
            .unwrap();
        eventually(
            "control messages to arrive",
            Duration::from_secs(10),
            async || (heard.0.load(std::sync::atomic::Ordering::Relaxed) > 50).then_some(()),
        )
        .await;
        assert_eq!(
            mesh.reconnects(),
            0,
            "the link broke while it started: {:?}",
            mesh.messages_dropped()
        );
        mesh.close(Duration::from_secs(2)).await;
    }
    stop.cancel();
    let sent = talking.await.unwrap();
    assert!(sent > 0);
    talker.close(Duration::from_secs(2)).await;
}

/// An event the broker refuses (a bound queue that is full and rejects
/// publishes) is an error to the publisher, not a success: the BFF counts
/// a lifecycle event so refused as dropped, and a mesh peer hears it.
#[tokio::test]
async fn an_event_the_broker_nacks_is_an_error_not_a_success() {
    use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{Connection, ConnectionProperties};

    let topic = format!("{}.full", unique("nack"));
    let queue = unique("nack-full");
    let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            auto_delete: false,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        queue.as_str().into(),
        "nuropb-events-exchange".into(),
        topic.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publisher = peer(&unique("nack-pub"), Arc::new(Recorder::default()), vec![]).await;
    let event = |n: u64| OutgoingEvent {
        topic: topic.clone(),
        event: json!({"n": n}),
        context: Map::new(),
        target: None,
        trace_id: None,
    };
    assert_eq!(
        publisher.publish_event(event(1)).await,
        Ok(()),
        "room for one"
    );
    let refused = publisher.publish_event(event(2)).await;
    assert!(
        matches!(&refused, Err(MeshError::Unavailable(why)) if why.contains("refused")),
        "{refused:?}"
    );
    // The refusal does not break the link: the next one that fits goes.
    ch.queue_purge(queue.as_str().into(), Default::default())
        .await
        .unwrap();
    assert_eq!(publisher.publish_event(event(3)).await, Ok(()));
    assert_eq!(publisher.reconnects(), 0);
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    publisher.close(Duration::from_secs(2)).await;
}
