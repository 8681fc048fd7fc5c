//! Test helpers for generated BFFs (feature `testing`): run a BFF's gateway
//! on the in-process mesh with echo stubs on 127.0.0.1:0, talk to it over a
//! real WebSocket, and mint tokens. No broker needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Message, http};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::auth::{sign_hs256, unix_now};
use crate::config::Settings;
use crate::gateway::{Gateway, Serving};
use crate::hooks::{AuthHook, WsHandler};
use crate::mesh::MemoryMesh;
use crate::routing::RouteTable;

/// An HS256 token for `sub` with `roles`, valid for `ttl_secs`.
pub fn hs256_token(secret: &str, sub: &str, roles: &[&str], ttl_secs: u64) -> String {
    hs256_token_with(
        secret,
        &json!({"sub": sub, "name": sub, "roles": roles, "exp": unix_now() + ttl_secs}),
    )
}

/// Seconds since the Unix epoch, for `exp`, `nbf` and `iat` claims.
pub fn unix_time() -> u64 {
    unix_now()
}

/// An HS256 token carrying exactly `claims` (add `exp` yourself).
pub fn hs256_token_with(secret: &str, claims: &Value) -> String {
    sign_hs256(secret.as_bytes(), claims).unwrap_or_default()
}

/// An RS256 token signed with an RSA private key in PEM.
pub fn rs256_token(private_pem: &[u8], sub: &str, roles: &[&str], ttl_secs: u64) -> String {
    let claims = json!({"sub": sub, "name": sub, "roles": roles, "exp": unix_now() + ttl_secs});
    EncodingKey::from_rsa_pem(private_pem)
        .ok()
        .and_then(|k| encode(&Header::new(Algorithm::RS256), &claims, &k).ok())
        .unwrap_or_default()
}

/// A running test gateway on the in-process mesh; stops when dropped.
#[derive(Debug)]
pub struct TestBff {
    pub addr: SocketAddr,
    pub gateway: Gateway,
    /// The in-process mesh: echo stubs for the routed services; a test may
    /// add its own services.
    pub mesh: MemoryMesh,
    serving: Serving,
}

impl TestBff {
    /// Start a BFF from the same `settings` its binary runs with, on
    /// 127.0.0.1:0 and echo stubs for every routed service, with its own
    /// `auth` and `handler` hooks.
    pub async fn start(
        settings: Settings,
        auth: Arc<dyn AuthHook>,
        handler: Arc<dyn WsHandler>,
    ) -> Result<Self, String> {
        let mut settings = settings;
        settings.listen = "127.0.0.1:0".into();
        let routes = RouteTable::load(&settings.routes).map_err(|e| e.to_string())?;
        let mesh = MemoryMesh::with_echo_stubs(&routes);
        let gateway = Gateway::builder(settings)
            .routes(routes)
            .auth(auth)
            .handler(handler)
            .memory_mesh(mesh.clone())
            .start()
            .await
            .map_err(|e| e.to_string())?;
        let serving = gateway.clone().spawn().await.map_err(|e| e.to_string())?;
        Ok(Self {
            addr: serving.addr(),
            gateway,
            mesh,
            serving,
        })
    }

    pub fn ws_url(&self) -> String {
        self.serving.ws_url()
    }

    /// Open a socket with a bearer token (or none).
    pub async fn connect(&self, token: Option<&str>) -> Result<TestClient, String> {
        TestClient::connect(&self.ws_url(), token).await
    }
}

/// A WebSocket client speaking the gateway's JSON frames.
#[derive(Debug)]
pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl TestClient {
    /// Open a socket to `url` with a bearer token (or none).
    pub async fn connect(url: &str, token: Option<&str>) -> Result<Self, String> {
        let bearer = token.map(|t| format!("Bearer {t}"));
        Self::connect_with(url, |req| {
            if let Some(v) = bearer.as_deref().and_then(|b| b.parse().ok()) {
                req.headers_mut().insert("authorization", v);
            }
        })
        .await
    }

    /// Open a socket to `url` after `edit` has changed the handshake request
    /// (headers, cookies, origin). A refused handshake's error names the
    /// HTTP status.
    pub async fn connect_with(
        url: &str,
        edit: impl FnOnce(&mut http::Request<()>),
    ) -> Result<Self, String> {
        let mut req = url.into_client_request().map_err(|e| e.to_string())?;
        edit(&mut req);
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self { ws })
    }

    /// Send any WebSocket message (binary, ping, a raw close).
    pub async fn send_message(&mut self, message: Message) -> Result<(), String> {
        self.ws.send(message).await.map_err(|e| e.to_string())
    }

    /// Send a text frame as it is, valid JSON or not.
    pub async fn send_text(&mut self, text: &str) -> Result<(), String> {
        self.send_message(Message::Text(text.to_owned().into()))
            .await
    }

    pub async fn send(&mut self, frame: Value) -> Result<(), String> {
        self.send_text(&frame.to_string()).await
    }

    /// The next JSON frame, within 10 seconds.
    pub async fn recv(&mut self) -> Result<Value, String> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .map_err(|_| "no frame within 10 s".to_owned())?
                .ok_or("socket closed")?
                .map_err(|e| e.to_string())?;
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).map_err(|e| e.to_string());
                }
                Message::Close(f) => return Err(format!("closed: {f:?}")),
                _ => continue,
            }
        }
    }

    /// Wait for the server's close frame (within 10 seconds), skipping
    /// other frames; its close code, or `None` if the socket just ended.
    pub async fn closed(&mut self) -> Result<Option<u16>, String> {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .map_err(|_| "socket not closed within 10 s".to_owned())?;
            match msg {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Ok(None),
            }
        }
    }

    /// Send a request and wait for its response payload.
    pub async fn request(
        &mut self,
        service: &str,
        method: &str,
        params: Value,
    ) -> Result<Value, String> {
        let trace = uuid::Uuid::new_v4().simple().to_string();
        self.request_traced(service, method, params, &trace).await
    }

    /// Send a request with `trace_id` and wait for the response carrying
    /// it; frames for other requests and events that arrive first are
    /// skipped.
    pub async fn request_traced(
        &mut self,
        service: &str,
        method: &str,
        params: Value,
        trace_id: &str,
    ) -> Result<Value, String> {
        self.send(json!({"type":"request","payload":{"service":service,"method":method,"params":params,"trace_id":trace_id}}))
            .await?;
        loop {
            let frame = self.recv().await?;
            if frame["type"] == "response" && frame["payload"]["trace_id"] == trace_id {
                return Ok(frame["payload"].clone());
            }
        }
    }
}

/// `GET path` on `addr` over plain HTTP/1.1: the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("GET {path}: no answer within 10 s"))??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("GET {path}: not an HTTP response: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}
