//! The bare relay: the least a WebSocket-to-NuroPb gateway can do, the
//! ceiling the hop bench reads the BFF's requests against beside the
//! direct path. No authentication, routing table, limits, spans, metrics
//! or recovery: a socket's `request` frame becomes a NuroPb request on the
//! RPC exchange, its response becomes the socket's `response` frame. Built
//! the way a careful hand would build it (one task a socket that reads and
//! writes, one lapin channel, answers routed by correlation id), so what
//! it reaches is what any gateway on this machine could.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

/// Where each call in flight is answered: its socket and the id the
/// socket gave it.
type Waiting = Arc<Mutex<HashMap<u64, (mpsc::Sender<String>, String)>>>;

#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(borrow)]
    payload: Request<'a>,
}

#[derive(Deserialize)]
struct Request<'a> {
    service: &'a str,
    method: &'a str,
    #[serde(borrow)]
    params: &'a RawValue,
    #[serde(default)]
    trace_id: Option<String>,
}

#[derive(Deserialize)]
struct Response<'a> {
    #[serde(borrow)]
    result: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<&'a RawValue>,
}

/// Serve sockets on a free port (printed first) until stdin closes,
/// relaying their requests to the mesh at `amqp_url` with `headers` (the
/// NuroPb request headers).
pub(crate) async fn serve(amqp_url: &str, headers: FieldTable) {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .expect("the relay reaches the broker");
    let channel = connection.create_channel().await.unwrap();
    let (reply_to, mut consumer) = super::reply_queue(&channel).await;
    let waiting: Waiting = Arc::default();
    let answers = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(id) = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| c.as_str().parse::<u64>().ok())
                else {
                    continue;
                };
                let Some((socket, trace_id)) = waiting.lock().unwrap().remove(&id) else {
                    continue;
                };
                let Ok(response) = serde_json::from_slice::<Response>(&delivery.data) else {
                    continue;
                };
                let null = RawValue::NULL;
                let frame = format!(
                    r#"{{"type":"response","payload":{{"result":{},"error":{},"trace_id":{}}}}}"#,
                    response.result.unwrap_or(null),
                    response.error.unwrap_or(null),
                    serde_json::to_string(&trace_id).unwrap(),
                );
                let _ = socket.try_send(frame);
            }
        })
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!("{}", listener.local_addr().unwrap());
    let next_id = Arc::new(AtomicU64::new(1));
    let accepting = async {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let relay = Relay {
                channel: channel.clone(),
                reply_to: reply_to.clone(),
                headers: headers.clone(),
                waiting: waiting.clone(),
                next_id: next_id.clone(),
            };
            tokio::spawn(relay.socket(tcp));
        }
    };
    tokio::select! {
        _ = accepting => {}
        _ = super::until_stdin_closes() => {}
    }
    answers.abort();
    let _ = connection.close(200, "bye".into()).await;
}

struct Relay {
    channel: lapin::Channel,
    reply_to: String,
    headers: FieldTable,
    waiting: Waiting,
    next_id: Arc<AtomicU64>,
}

impl Relay {
    /// One socket: its requests published as they come, its answers
    /// written as they come back, by this one task.
    async fn socket(self, tcp: tokio::net::TcpStream) {
        let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
            return;
        };
        // The clients wait for a first frame, as the BFF's hello.
        if ws
            .send(Message::Text(r#"{"type":"hello"}"#.into()))
            .await
            .is_err()
        {
            return;
        }
        let (tx, mut answers) = mpsc::channel::<String>(1024);
        loop {
            tokio::select! {
                Some(answer) = answers.recv() => {
                    if ws.send(Message::Text(answer.into())).await.is_err() {
                        return;
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(text))) => self.publish(&text, &tx).await,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }

    async fn publish(&self, text: &str, answer_to: &mpsc::Sender<String>) {
        let Ok(Frame { payload: call }) = serde_json::from_str::<Frame>(text) else {
            return;
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = format!(
            r#"{{"tag":"request","correlation_id":"{id}","context":{{}},"trace_id":{},"service":{},"method":{},"params":{}}}"#,
            serde_json::to_string(&call.trace_id).unwrap(),
            serde_json::to_string(call.service).unwrap(),
            serde_json::to_string(call.method).unwrap(),
            call.params,
        );
        self.waiting.lock().unwrap().insert(
            id,
            (answer_to.clone(), call.trace_id.clone().unwrap_or_default()),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_correlation_id(id.to_string().into())
            .with_reply_to(self.reply_to.as_str().into())
            .with_expiration("30000".into())
            .with_headers(self.headers.clone());
        let _ = self
            .channel
            .basic_publish(
                "nuropb-rpc-exchange".into(),
                call.service.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body.as_bytes(),
                props,
            )
            .await;
    }
}
