//! Helpers shared by the integration tests: a gateway on 127.0.0.1:0, a
//! WebSocket client that speaks JSON frames, token minting.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use nuropb_bff::{AuthHook, Gateway, GatewayConfig, Mesh, RouteTable, WsHandler};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret";

pub fn token(sub: &str, roles: &[&str], exp_in_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "name": format!("{sub} name"), "roles": roles, "exp": now + exp_in_secs}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub struct Running {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("gateway did not stop in time")
                .unwrap()
                .unwrap();
        }
    }
}

/// Start a gateway over `mesh_for(gateway)` on an ephemeral port.
pub async fn start(
    routes: &str,
    auth: Arc<dyn AuthHook>,
    handler: Arc<dyn WsHandler>,
    configure: impl FnOnce(&mut GatewayConfig),
    mesh_for: impl FnOnce(&Gateway) -> Arc<dyn Mesh>,
) -> Running {
    let routes = RouteTable::parse("routes.toml", routes).unwrap();
    let mut config = GatewayConfig::new("test-bff");
    configure(&mut config);
    let gateway = Gateway::new(config, routes, auth, handler);
    let mesh = mesh_for(&gateway);
    gateway.set_mesh(mesh);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let g = gateway.clone();
    let task = tokio::spawn(async move {
        g.serve(
            listener,
            async move {
                let _ = rx.await;
            },
            Duration::from_secs(5),
        )
        .await
    });
    Running {
        addr,
        gateway,
        stop: Some(tx),
        task: Some(task),
    }
}

#[derive(Debug)]
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

pub async fn connect_with(
    url: &str,
    edit: impl FnOnce(&mut http::Request<()>),
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request().unwrap();
    edit(&mut req);
    let (ws, _) = tokio_tungstenite::connect_async(req).await?;
    Ok(Client { ws })
}

/// Connect with a bearer token and read the hello event.
pub async fn connect(url: &str, token: &str) -> (Client, Value) {
    let bearer = format!("Bearer {token}");
    let mut c = connect_with(url, |r| {
        r.headers_mut()
            .insert("authorization", bearer.parse().unwrap());
    })
    .await
    .expect("handshake");
    let hello = c.recv().await;
    assert_eq!(hello["type"], "event", "{hello}");
    assert_eq!(hello["payload"]["topic"], "hello", "{hello}");
    (c, hello)
}

impl Client {
    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::Text(t.to_owned().into()))
            .await
            .unwrap();
    }

    /// The next JSON text frame, within 10 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("no frame within 10 s")
                .expect("socket closed")
                .expect("socket error");
            match msg {
                Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Wait for the close frame; its code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("socket not closed within 10 s");
            match msg {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn request(
        &mut self,
        service: &str,
        method: &str,
        params: Value,
        trace: &str,
    ) -> Value {
        self.send(json!({"type":"request","payload":{"service":service,"method":method,"params":params,"trace_id":trace}}))
            .await;
        let resp = self.recv().await;
        assert_eq!(resp["type"], "response", "{resp}");
        assert_eq!(resp["payload"]["trace_id"], trace, "{resp}");
        resp["payload"].clone()
    }
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The broker URL of the tests: `BFF_TEST_AMQP_URL` or the local RabbitMQ.
pub fn amqp_url() -> String {
    std::env::var("BFF_TEST_AMQP_URL").unwrap_or_else(|_| AMQP_URL.to_owned())
}

/// A name no other test run uses, for queues and services.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The Python with nuropb 0.1.8: `NUROPB_PYTHON` or the repo's `.venv`.
pub fn nuropb_python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("NUROPB_PYTHON") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        p.exists(),
        "no Python with nuropb: run `bash scripts/setup-python.sh` (creates .venv) or set NUROPB_PYTHON"
    );
    p
}
