//! The gateway: the shared state every connection uses (mesh, sessions,
//! routes, auth, handler hooks), the WebSocket handler hooks a BFF
//! customises, and the BFF's own methods on the mesh.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::AuthHook;
use crate::mesh::{
    BoxFuture, Call, IncomingEvent, IncomingRequest, Mesh, MeshError, MeshHandler, unknown_method,
};
use crate::metrics::Metrics;
use crate::protocol::{ClientCall, ErrorBody, ErrorName, ServerFrame};
use crate::routing::{Delivery, RouteTable};
use crate::session::{CLOSE_DISCONNECTED, SessionInfo, Sessions};

/// Per-connection limits. The defaults suit a browser frontend; every one is
/// a setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest client frame accepted, in bytes; larger ones get `MessageTooLarge`.
    pub max_frame_bytes: usize,
    /// Requests one connection may have in flight; more get `RateLimited`.
    pub max_in_flight: usize,
    /// Frames queued towards one slow client before it is disconnected.
    pub outbound_queue: usize,
    /// How long a connection without a handshake token has to authenticate.
    pub auth_timeout: Duration,
    /// How long one write to a client may take before the client is dropped.
    pub write_timeout: Duration,
    /// tungstenite's read buffer, which every socket keeps: the largest part
    /// of an idle socket's memory. 2048 keeps an idle socket near 6.5 KiB;
    /// larger values save a little CPU only on large client frames (about
    /// 8% on 30 KB requests against 4096).
    pub read_buffer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 * 1024,
            max_in_flight: 64,
            outbound_queue: 256,
            auth_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            read_buffer_bytes: 2048,
        }
    }
}

/// What a gateway is, apart from its collaborators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The BFF's own service name on the mesh.
    pub mesh_service_name: String,
    /// The WebSocket endpoint path.
    pub ws_path: String,
    /// Browser origins allowed to open a socket; `*` allows any.
    pub allowed_origins: Vec<String>,
    pub limits: Limits,
}

impl GatewayConfig {
    pub fn new(mesh_service_name: impl Into<String>) -> Self {
        Self {
            mesh_service_name: mesh_service_name.into(),
            ws_path: "/ws".into(),
            allowed_origins: vec!["http://localhost:3000".into()],
            limits: Limits::default(),
        }
    }
}

/// What a BFF-local route gets: who asked, what they asked, and a mesh client
/// that calls on their behalf.
#[derive(Debug, Clone)]
pub struct LocalCall {
    pub session: SessionInfo,
    pub call: ClientCall,
    pub mesh: MeshClient,
}

/// Calls the mesh on behalf of one client, with the context the gateway
/// built for them. BFF code is trusted: these calls are not checked against
/// the routing table.
#[derive(Debug, Clone)]
pub struct MeshClient {
    mesh: Arc<dyn Mesh>,
    context: Map<String, Value>,
    trace_id: String,
    timeout: Duration,
}

impl MeshClient {
    pub fn new(
        mesh: Arc<dyn Mesh>,
        context: Map<String, Value>,
        trace_id: String,
        timeout: Duration,
    ) -> Self {
        Self {
            mesh,
            context,
            trace_id,
            timeout,
        }
    }

    pub async fn request(
        &self,
        service: &str,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<Value, MeshError> {
        self.mesh
            .request(Call {
                service: service.to_owned(),
                method: method.to_owned(),
                params,
                context: self.context.clone(),
                ttl: self.timeout,
                trace_id: Some(self.trace_id.clone()),
            })
            .await
    }
}

/// The WebSocket handler hooks of a BFF. Every method has a default, so a
/// BFF overrides only what it needs.
pub trait WsHandler: Send + Sync + fmt::Debug + 'static {
    /// The `hello` event sent once a connection is authenticated.
    fn hello(&self, session: &SessionInfo) -> Value {
        json!({
            "session_id": session.session_id,
            "user_id": session.user_id,
            "username": session.username,
        })
    }

    /// A BFF-local route: answer `call` here (composing mesh calls, say)
    /// instead of forwarding it. `None` forwards through the routing table.
    fn local_request(
        &self,
        call: LocalCall,
    ) -> Option<BoxFuture<'static, Result<Value, ErrorBody>>> {
        let _ = call;
        None
    }

    /// Change a mesh call before it is sent (extra params, a header in the
    /// context). The routing table has already allowed it.
    fn on_request(&self, session: &SessionInfo, call: &mut Call) {
        let _ = (session, call);
    }

    /// Change a service's result before the client sees it.
    fn on_response(&self, session: &SessionInfo, call: &Call, result: Value) -> Value {
        let _ = (session, call);
        result
    }

    /// Change or drop (`None`) a mesh event before it is pushed to clients.
    fn on_event(&self, topic: &str, event: Value) -> Option<Value> {
        let _ = topic;
        Some(event)
    }
}

/// The hooks with every default.
#[derive(Debug, Clone, Default)]
pub struct DefaultHandler;
impl WsHandler for DefaultHandler {}

pub(crate) struct Inner {
    pub(crate) config: GatewayConfig,
    pub(crate) routes: Arc<RouteTable>,
    pub(crate) auth: Arc<dyn AuthHook>,
    pub(crate) handler: Arc<dyn WsHandler>,
    pub(crate) sessions: Sessions,
    pub(crate) metrics: Metrics,
    pub(crate) mesh: OnceLock<Arc<dyn Mesh>>,
    pub(crate) shutdown: CancellationToken,
    pub(crate) tasks: TaskTracker,
}

/// The gateway. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Gateway(pub(crate) Arc<Inner>);

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.0.config)
            .field("sessions", &self.0.sessions.counts())
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// A gateway without a mesh yet: connect one with [`Gateway::mesh_service`]
    /// as its handler, then [`Gateway::set_mesh`].
    pub fn new(
        config: GatewayConfig,
        routes: RouteTable,
        auth: Arc<dyn AuthHook>,
        handler: Arc<dyn WsHandler>,
    ) -> Self {
        let metrics = Metrics::new();
        let sessions = Sessions::new(config.limits.outbound_queue).with_metrics(metrics.clone());
        Self(Arc::new(Inner {
            config,
            routes: Arc::new(routes),
            auth,
            handler,
            sessions,
            metrics,
            mesh: OnceLock::new(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        }))
    }

    /// Attach the mesh. Only the first call has effect.
    pub fn set_mesh(&self, mesh: Arc<dyn Mesh>) {
        let _ = self.0.mesh.set(mesh);
    }

    pub fn mesh(&self) -> Option<&Arc<dyn Mesh>> {
        self.0.mesh.get()
    }

    /// The BFF's own service, to hand to the mesh so other services can push
    /// to clients through it.
    pub fn mesh_service(&self) -> Arc<dyn MeshHandler> {
        Arc::new(BffService {
            name: self.0.config.mesh_service_name.clone(),
            routes: self.0.routes.clone(),
            sessions: self.0.sessions.clone(),
            handler: self.0.handler.clone(),
            metrics: self.0.metrics.clone(),
        })
    }

    /// The topic patterns the gateway must receive events for.
    pub fn event_bindings(&self) -> Vec<String> {
        self.0
            .routes
            .events()
            .iter()
            .map(|r| r.pattern.clone())
            .collect()
    }

    pub fn sessions(&self) -> &Sessions {
        &self.0.sessions
    }

    pub fn routes(&self) -> &RouteTable {
        &self.0.routes
    }

    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub fn config(&self) -> &GatewayConfig {
        &self.0.config
    }

    /// Whether the mesh can take calls.
    pub fn is_ready(&self) -> bool {
        let ready = self.0.mesh.get().is_some_and(|m| m.is_ready());
        self.0.metrics.set_mesh_ready(ready);
        ready
    }

    /// Cancelled when the gateway starts shutting down.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.0.shutdown
    }

    /// Stop: refuse new sockets, close every session with 1001, and wait (at
    /// most `grace`) for connection tasks to finish.
    pub async fn shutdown(&self, grace: Duration) {
        self.0.shutdown.cancel();
        self.0
            .sessions
            .close_all(crate::session::CLOSE_GOING_AWAY, "server shutting down");
        self.0.tasks.close();
        if tokio::time::timeout(grace, self.0.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.0.tasks.len(),
                "connections still open after the shutdown grace period"
            );
        }
    }
}

/// The BFF on the mesh: push methods for other services, and fan-out of
/// mesh events to sessions by the routing file's event rules.
#[derive(Debug)]
struct BffService {
    name: String,
    routes: Arc<RouteTable>,
    sessions: Sessions,
    handler: Arc<dyn WsHandler>,
    metrics: Metrics,
}

fn event_frame(topic: &str, event: Value) -> Utf8Bytes {
    ServerFrame::Event {
        topic: topic.to_owned(),
        event,
    }
    .to_json()
    .into()
}

fn string_list(params: &Map<String, Value>, key: &str) -> Result<Vec<String>, ErrorBody> {
    let bad = || {
        ErrorBody::new(
            "NuropbValidationError",
            format!("`{key}` must be a list of strings"),
        )
    };
    match params.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

fn push_parts(params: &Map<String, Value>) -> Result<(String, Value), ErrorBody> {
    let message = params
        .get("message")
        .cloned()
        .ok_or_else(|| ErrorBody::new("NuropbValidationError", "`message` is required"))?;
    let topic = match params.get("topic") {
        None | Some(Value::Null) => "message".to_owned(),
        Some(Value::String(t)) => t.clone(),
        Some(_) => {
            return Err(ErrorBody::new(
                "NuropbValidationError",
                "`topic` must be a string",
            ));
        }
    };
    Ok((topic, message))
}

impl BffService {
    fn describe(&self) -> Value {
        let method = |description: &str, props: Value, required: Value| {
            json!({
                "description": description,
                "requires_encryption": false,
                "parameters": {"type": "object", "properties": props, "required": required},
            })
        };
        let list = json!({"type": "list", "description": "", "default": ""});
        let any = json!({"type": "", "description": "", "default": ""});
        let opt_topic = json!({"type": "str", "description": "", "default": "message"});
        json!({
            "service_name": self.name,
            "service_version": env!("CARGO_PKG_VERSION"),
            "description": "WebSocket Backend-For-Frontend gateway (nuropb-bff)",
            "encrypted_methods": false,
            "warnings": [],
            "methods": {
                "send_to_users": method(
                    "Push a message to every connection of these users",
                    json!({"user_ids": list, "message": any, "topic": opt_topic}),
                    json!(["user_ids", "message"]),
                ),
                "broadcast": method(
                    "Push a message to every connection",
                    json!({"message": any, "topic": opt_topic}),
                    json!(["message"]),
                ),
                "disconnect_users": method(
                    "Close every connection of these users",
                    json!({"user_ids": list}),
                    json!(["user_ids"]),
                ),
                "stats": method("Connection counts of this instance", json!({}), json!([])),
            },
        })
    }

    fn call(&self, request: &IncomingRequest) -> Result<Value, ErrorBody> {
        let p = &request.params;
        match request.method.as_str() {
            "nuropb_describe" => Ok(self.describe()),
            "send_to_users" => {
                let users = string_list(p, "user_ids")?;
                let (topic, message) = push_parts(p)?;
                let n = self
                    .sessions
                    .send_to_users(&users, event_frame(&topic, message));
                self.metrics.pushed("send_to_users", n);
                Ok(json!({"delivered": n}))
            }
            "broadcast" => {
                let (topic, message) = push_parts(p)?;
                let n = self.sessions.broadcast(event_frame(&topic, message));
                self.metrics.pushed("broadcast", n);
                Ok(json!({"delivered": n}))
            }
            "disconnect_users" => {
                let users = string_list(p, "user_ids")?;
                let n = self.sessions.close_users(
                    &users,
                    CLOSE_DISCONNECTED,
                    "disconnected by the server",
                );
                Ok(json!({"disconnected": n}))
            }
            "stats" => {
                let c = self.sessions.counts();
                Ok(json!({"sessions": c.sessions, "users": c.users}))
            }
            other => Err(unknown_method(&self.name, other)),
        }
    }
}

impl MeshHandler for BffService {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>> {
        let result = self.call(&request);
        Box::pin(async move { result })
    }

    fn handle_event(&self, event: IncomingEvent) -> BoxFuture<'_, ()> {
        if let Some(rule) = self.routes.event_rule(&event.topic) {
            if let Some(payload) = self.handler.on_event(&event.topic, event.event) {
                let frame = event_frame(&event.topic, payload);
                let n = match rule.delivery {
                    Delivery::All => self.sessions.broadcast(frame),
                    Delivery::Target => match &event.target {
                        Some(users) => self.sessions.send_to_users(users, frame),
                        None => 0,
                    },
                    Delivery::Subscribers => self.sessions.send_to_subscribers(&event.topic, frame),
                };
                self.metrics.pushed("event", n);
                tracing::debug!(topic = %event.topic, delivery = %rule.delivery, sessions = n, "mesh event pushed");
            }
        } else {
            tracing::debug!(topic = %event.topic, "mesh event matches no event rule, dropped");
        }
        Box::pin(async {})
    }
}

/// The client error for a gateway-side refusal.
pub(crate) fn refusal(name: ErrorName, description: impl Into<String>) -> ErrorBody {
    ErrorBody::gateway(name, description)
}
