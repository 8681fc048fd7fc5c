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

use crate::auth::AuthHook;
use crate::auth::{sign_hs256, unix_now};
use crate::config::Settings;
use crate::gateway::{Gateway, Serving};
use crate::hooks::WsHandler;
use crate::mesh::MemoryMesh;
use crate::routing::RouteTable;

/// Poll `check` every 20 ms until it answers `Some`, and return what it
/// answered; panic, naming `what`, once `within` has passed. The one way
/// a test waits for something to happen (a key set to load, a link to come
/// back, an instance to be seen).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::time::Duration;
/// use nuropb_bff::testing::eventually;
///
/// let mut polls = 0;
/// let seen = eventually("the third poll", Duration::from_secs(1), async || {
///     polls += 1;
///     (polls == 3).then_some(polls)
/// })
/// .await;
/// assert_eq!(seen, 3);
/// # }
/// ```
pub async fn eventually<T>(
    what: &str,
    within: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until `GET /readyz` on `addr` answers `status`, within `within`;
/// how long it took.
pub async fn readyz_becomes(addr: SocketAddr, status: u16, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    let what = format!("/readyz to answer {status}");
    eventually(&what, within, async || {
        let answer = http_get(addr, "/readyz").await.ok().map(|(s, _)| s);
        (answer == Some(status)).then_some(())
    })
    .await;
    started.elapsed()
}

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

/// A signing key made for a test, so no private key has to ship with a
/// crate: RSA 2048 for RS*/PS*, P-256 for ES256, P-384 for ES384, Ed25519
/// for EdDSA. Its public half comes as PEM (for `BFF_JWT_PUBLIC_KEY`) or
/// as a JWK (for a test JWKS endpoint).
#[derive(Clone)]
pub struct TestKey {
    alg: Algorithm,
    kid: String,
    encoding: EncodingKey,
    public_pem: String,
    jwk: Value,
}

impl std::fmt::Debug for TestKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
}

impl TestKey {
    /// A new key pair for `alg`, named by a random `kid`. Asymmetric
    /// algorithms only: an HS* `alg` panics (use [`hs256_token`]).
    pub fn generate(alg: Algorithm) -> Self {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::traits::PublicKeyParts as _;
        let lf = ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF;
        let mut rng = rand_core::OsRng;
        let kid = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        // An EC key on the curve of `$curve` (the p256 or p384 crate): the
        // encoding key, its public PEM and its JWK.
        macro_rules! ec_key {
            ($curve:ident, $crv:literal) => {{
                let private = $curve::SecretKey::random(&mut rng);
                let public = private.public_key();
                let point =
                    $curve::elliptic_curve::sec1::ToEncodedPoint::to_encoded_point(&public, false);
                let jwk = json!({
                    "kty": "EC",
                    "crv": $crv,
                    "x": b64url(point.x().expect("x")),
                    "y": b64url(point.y().expect("y")),
                });
                let pem = private.to_pkcs8_pem(lf).expect("EC PEM");
                let public_pem = public.to_public_key_pem(lf).expect("EC public PEM");
                (EncodingKey::from_ec_pem(pem.as_bytes()), public_pem, jwk)
            }};
        }
        let (encoding, public_pem, jwk) = match alg {
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => {
                let private = rsa::RsaPrivateKey::new(&mut rng, 2048).expect("RSA key generation");
                let public = private.to_public_key();
                let pem = private.to_pkcs1_pem(lf).expect("RSA PEM");
                let public_pem = rsa::pkcs8::EncodePublicKey::to_public_key_pem(&public, lf)
                    .expect("RSA public PEM");
                let jwk = json!({
                    "kty": "RSA",
                    "n": b64url(&public.n().to_bytes_be()),
                    "e": b64url(&public.e().to_bytes_be()),
                });
                (EncodingKey::from_rsa_pem(pem.as_bytes()), public_pem, jwk)
            }
            Algorithm::ES256 => ec_key!(p256, "P-256"),
            Algorithm::ES384 => ec_key!(p384, "P-384"),
            Algorithm::EdDSA => {
                let private = ed25519_dalek::SigningKey::generate(&mut rng);
                let public = private.verifying_key();
                let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": b64url(public.as_bytes())});
                let pem = private.to_pkcs8_pem(lf).expect("Ed25519 PEM");
                let public_pem = public.to_public_key_pem(lf).expect("Ed25519 public PEM");
                (EncodingKey::from_ed_pem(pem.as_bytes()), public_pem, jwk)
            }
            other => panic!("TestKey::generate: {other:?} is not an asymmetric algorithm"),
        };
        let mut key = Self {
            alg,
            kid,
            encoding: encoding.expect("the generated key loads"),
            public_pem,
            jwk,
        };
        key.refresh_jwk();
        key
    }

    /// The same key under another `kid`.
    pub fn with_kid(mut self, kid: &str) -> Self {
        self.kid = kid.to_owned();
        self.refresh_jwk();
        self
    }

    fn refresh_jwk(&mut self) {
        let alg = serde_json::to_value(self.alg).unwrap_or(Value::Null);
        if let Value::Object(o) = &mut self.jwk {
            o.insert("kid".into(), self.kid.clone().into());
            o.insert("use".into(), "sig".into());
            o.insert("alg".into(), alg);
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as SubjectPublicKeyInfo PEM.
    pub fn public_pem(&self) -> &str {
        &self.public_pem
    }

    /// The public key as a JWK with `kid`, `use` and `alg`.
    pub fn jwk(&self) -> Value {
        self.jwk.clone()
    }

    /// Sign `claims`; the header names the key's algorithm and `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding).expect("signing with a generated key")
    }

    /// A token for `sub` with `roles`, valid `ttl_secs`, naming `issuer`
    /// (and `audience`) when given.
    pub fn token(
        &self,
        sub: &str,
        roles: &[&str],
        ttl_secs: u64,
        issuer: Option<&str>,
        audience: Option<&str>,
    ) -> String {
        let mut claims =
            json!({"sub": sub, "name": sub, "roles": roles, "exp": unix_now() + ttl_secs});
        if let Some(iss) = issuer {
            claims["iss"] = iss.into();
        }
        if let Some(aud) = audience {
            claims["aud"] = aud.into();
        }
        self.sign(&claims)
    }
}

/// One frame of every kind the gateway sends, serialised as it sends them.
pub fn server_frame_samples() -> Vec<String> {
    crate::frontend::server_frame_samples()
}

/// A JWKS document publishing `keys`.
pub fn jwks_document(keys: &[&TestKey]) -> Value {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
}

/// An identity provider for tests: a JWKS endpoint (`/keys`) and an OIDC
/// discovery document on 127.0.0.1:0, publishing the public halves of its
/// keys. It runs on a thread of its own, so one instance (in a `static`)
/// can serve every test of a binary; it stops when dropped.
#[derive(Debug)]
pub struct TestIdp {
    /// The `iss` its tokens carry: `http://127.0.0.1:<port>`.
    pub issuer: String,
    pub jwks_url: String,
    keys: Vec<TestKey>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestIdp {
    /// Serve `keys` (at least one).
    pub fn start(keys: Vec<TestKey>) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("a test identity provider needs a key".into());
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let issuer = format!(
            "http://{}",
            listener.local_addr().map_err(|e| e.to_string())?
        );
        let jwks_url = format!("{issuer}/keys");
        let document = jwks_document(&keys.iter().collect::<Vec<_>>());
        let discovery = json!({"issuer": issuer, "jwks_uri": jwks_url});
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("test-idp".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let app = axum::Router::new()
                        .route(
                            "/keys",
                            axum::routing::get(move || async move { axum::Json(document) }),
                        )
                        .route(
                            "/.well-known/openid-configuration",
                            axum::routing::get(move || async move { axum::Json(discovery) }),
                        );
                    let _ = axum::serve(listener, app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.await;
                        })
                        .await;
                });
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            issuer,
            jwks_url,
            keys,
            stop: Some(stop),
        })
    }

    /// Its first key.
    pub fn key(&self) -> &TestKey {
        &self.keys[0]
    }

    /// A token for `sub` with `roles`, valid `ttl_secs`, signed with its
    /// first key and naming it as the issuer.
    pub fn token(&self, sub: &str, roles: &[&str], ttl_secs: u64) -> String {
        self.key()
            .token(sub, roles, ttl_secs, Some(&self.issuer), None)
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
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
        // Ready means the auth hook can verify (a JWKS has loaded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !gateway.is_ready() {
            if tokio::time::Instant::now() > deadline {
                return Err("the gateway did not become ready within 10 s (/readyz)".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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

    /// The next message off the socket within 10 seconds (`None` once the
    /// socket has ended); `waiting_for` names what did not come in time.
    async fn next_within(
        &mut self,
        waiting_for: &str,
    ) -> Result<Option<Result<Message, String>>, String> {
        let next = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
            .await
            .map_err(|_| format!("{waiting_for} within 10 s"))?;
        Ok(next.map(|m| m.map_err(|e| e.to_string())))
    }

    /// The next text frame as it came, unparsed (within 10 seconds);
    /// `None` once the socket is closed.
    pub async fn next_text(&mut self) -> Result<Option<String>, String> {
        loop {
            match self.next_within("no frame").await? {
                Some(Ok(Message::Text(t))) => return Ok(Some(t.as_str().to_owned())),
                Some(Ok(Message::Close(_))) | None => return Ok(None),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
            }
        }
    }

    /// Read to the server's close frame (each frame within 10 seconds):
    /// how many text frames came before it, and its close code (`None` if
    /// the socket just ended). A frame that does not read is an error.
    pub async fn texts_then_close(&mut self) -> Result<(usize, Option<u16>), String> {
        let mut texts = 0;
        loop {
            match self.next_within("socket not closed").await? {
                Some(Ok(Message::Close(frame))) => {
                    return Ok((texts, frame.map(|f| u16::from(f.code))));
                }
                Some(Ok(Message::Text(_))) => texts += 1,
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e),
                None => return Ok((texts, None)),
            }
        }
    }

    /// Wait for the server's close frame (within 10 seconds), skipping
    /// other frames; its close code, or `None` if the socket just ended.
    pub async fn closed(&mut self) -> Result<Option<u16>, String> {
        loop {
            match self.next_within("socket not closed").await? {
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
