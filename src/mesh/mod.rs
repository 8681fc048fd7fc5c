//! The transport to the service mesh, as a trait with two implementations:
//! [`amqp::AmqpMesh`] on RabbitMQ (lapin) and [`memory::MemoryMesh`] in
//! process, for tests and broker-less development.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::protocol::{ErrorBody, ErrorName, Params, RawJson};

mod amqp;
mod lane;
mod memory;

pub use amqp::{AmqpConfig, AmqpMesh, EventLogConfig};
pub use memory::{EchoService, MemoryMesh, StubService};

pub(crate) use crate::config::redact_url;

/// A boxed, sendable future: what the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One request or command for a mesh service.
#[derive(Clone, PartialEq)]
pub struct Call {
    pub service: String,
    pub method: String,
    /// As the client sent them until a hook reads or changes them
    /// ([`Params`] derefs to the map).
    pub params: Params,
    /// The gateway's context for the service (the user, the session, the
    /// token, the trace id); kept as text the same way as the params.
    pub context: Params,
    /// How long the caller waits; also the message's `expiration`.
    pub ttl: Duration,
    pub trace_id: Option<String>,
}

impl fmt::Debug for Call {
    // The context carries the user's token: never in logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Call")
            .field("service", &self.service)
            .field("method", &self.method)
            .field("params", &self.params)
            .field("context_keys", &self.context.keys().collect::<Vec<_>>())
            .field("ttl", &self.ttl)
            .field("trace_id", &self.trace_id)
            .finish()
    }
}

/// An event to publish on the events exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingEvent {
    pub topic: String,
    pub event: Value,
    pub context: Map<String, Value>,
    pub target: Option<Vec<String>>,
    pub trace_id: Option<String>,
}

/// A request or command that reached this peer's own service queue.
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingRequest {
    pub method: String,
    pub params: Map<String, Value>,
    pub context: Map<String, Value>,
    pub trace_id: Option<String>,
}

/// An event from the mesh. Its payload is the JSON text it arrived in
/// ([`RawJson::to_value`] parses it for whoever needs a tree).
#[derive(Debug, Clone, PartialEq)]
pub struct IncomingEvent {
    pub topic: String,
    pub event: RawJson,
    pub target: Option<Vec<String>>,
    pub trace_id: Option<String>,
    /// Its place in the BFF's event log (the same on every instance), when
    /// it came through one.
    pub position: Option<u64>,
    /// False for an event read to fill the log's window at start (raised
    /// before this instance was there: history, not news).
    pub live: bool,
}

/// A stream of items, boxed (what [`Mesh::read_log`] returns).
pub type BoxStream<'a, T> = Pin<Box<dyn futures_util::Stream<Item = T> + Send + 'a>>;

impl From<crate::protocol::RequestBody> for IncomingRequest {
    fn from(r: crate::protocol::RequestBody) -> Self {
        Self {
            method: r.method,
            params: r.params,
            context: r.context,
            trace_id: r.trace_id,
        }
    }
}

impl From<crate::protocol::EventBody> for IncomingEvent {
    fn from(e: crate::protocol::EventBody) -> Self {
        Self {
            topic: e.topic,
            event: e.event,
            target: e.target,
            trace_id: e.trace_id,
            position: None,
            live: true,
        }
    }
}

/// What reading the event log from a position gives, one at a time.
#[derive(Debug, Clone, PartialEq)]
pub enum LogRead {
    /// An event, with its position.
    Event(IncomingEvent),
    /// A position that holds no event for the gateway (another instance's
    /// marker, a message that was dropped): read past.
    Skipped(u64),
}

/// Why a mesh call did not produce a result. `Clone` so one failure (a lost
/// connection) can reach every waiter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MeshError {
    /// No queue is bound to the service name (AMQP NO_ROUTE).
    #[error("Service {service} not available. unable to call method {method}")]
    NotDelivered { service: String, method: String },
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The broker connection is down or refused the message.
    #[error("service mesh unavailable: {0}")]
    Unavailable(String),
    /// The broker is up but blocks publishing (a memory or disk alarm):
    /// why, in the broker's words. Calls are refused at once until it
    /// unblocks.
    #[error("the broker is blocking publishes ({0}); calls are refused until it unblocks")]
    Blocked(String),
    /// The service answered with an error: passed to the client unchanged.
    #[error("{}: {}", .0.error, .0.description.as_deref().unwrap_or(""))]
    Remote(ErrorBody),
}

impl MeshError {
    /// The gateway's own name for this failure; `None` for a service's
    /// error, which passes through under the service's name.
    pub fn gateway_name(&self) -> Option<ErrorName> {
        match self {
            MeshError::NotDelivered { .. } => Some(ErrorName::NuropbNotDeliveredError),
            MeshError::Timeout(_) => Some(ErrorName::Timeout),
            MeshError::Unavailable(_) | MeshError::Blocked(_) => Some(ErrorName::MeshUnavailable),
            MeshError::Remote(_) => None,
        }
    }

    /// The error object a client sees. Broker details stay in the log.
    pub fn to_client(&self) -> ErrorBody {
        match self {
            MeshError::NotDelivered { .. } => {
                ErrorBody::gateway(ErrorName::NuropbNotDeliveredError, self.to_string())
            }
            MeshError::Timeout(d) => ErrorBody::gateway(
                ErrorName::Timeout,
                format!("no response within {} ms", d.as_millis()),
            ),
            MeshError::Unavailable(_) => ErrorBody::gateway(
                ErrorName::MeshUnavailable,
                "the service mesh is not reachable; try again later",
            ),
            // The broker's own reason ("low on memory"): it tells the
            // client to wait rather than retry at once, and names nothing
            // of the deployment.
            MeshError::Blocked(_) => {
                ErrorBody::gateway(ErrorName::MeshUnavailable, self.to_string())
            }
            MeshError::Remote(body) => body.clone(),
        }
    }
}

/// A result JSON allows and a [`Value`] cannot hold (a number beyond
/// `f64`), for a caller that needs the parsed value.
pub(crate) fn unreadable(call: &Call, e: &serde_json::Error) -> MeshError {
    MeshError::Remote(ErrorBody::gateway(
        ErrorName::InternalError,
        format!(
            "the result of {}.{} cannot be read: {e}",
            call.service, call.method
        ),
    ))
}

/// The client side of the mesh: what the gateway calls.
pub trait Mesh: Send + Sync + fmt::Debug + 'static {
    /// Call `service.method` and wait for its result. The call is
    /// borrowed: the caller keeps it (the `on_response` hook sees it), and
    /// a mesh that only encodes it copies nothing.
    fn request<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<Value, MeshError>>;
    /// [`request`](Self::request), the result as the JSON the service
    /// sent: what the gateway passes to a client. A mesh that receives JSON
    /// overrides it to pass that on unparsed; the default writes the parsed
    /// result.
    fn request_raw<'a>(&'a self, call: &'a Call) -> BoxFuture<'a, Result<RawJson, MeshError>> {
        Box::pin(async move { self.request(call).await.map(RawJson::from) })
    }
    /// Send a command; resolves once the broker accepted it.
    fn command(&self, call: Call) -> BoxFuture<'_, Result<(), MeshError>>;
    /// Publish an event on the events exchange.
    fn publish_event(&self, event: OutgoingEvent) -> BoxFuture<'_, Result<(), MeshError>>;
    /// Whether calls can be made now (drives `/readyz`).
    fn is_ready(&self) -> bool;
    /// Why the mesh is not ready, when it can say more than "down" (the
    /// broker blocking publishes under a resource alarm): `/readyz` shows it.
    fn unready_reason(&self) -> Option<String> {
        None
    }
    /// Messages from the broker let go so far (too large, undecodable, a
    /// field that cannot be echoed, out of place), by the metric's reason.
    fn messages_dropped(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Mesh events dropped so far because the gateway could not keep up.
    fn events_dropped(&self) -> u64 {
        0
    }
    /// Times the link to the broker was lost and rebuilt.
    fn reconnects(&self) -> u64 {
        0
    }
    /// Read the event log from position `from` through `until`, in order.
    /// The first item is at `from` unless the log no longer keeps it (then
    /// it starts later: the caller sees the gap). A mesh without a log
    /// yields nothing.
    fn read_log(&self, from: u64, until: u64) -> BoxStream<'_, Result<LogRead, MeshError>> {
        let _ = (from, until);
        Box::pin(futures_util::stream::empty())
    }
    /// Send a control message to every instance of this BFF, this one
    /// included ([`MeshHandler::handle_control`] receives it).
    fn broadcast_control(&self, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        let _ = body;
        Box::pin(async { Err(MeshError::Unavailable("no control channel".into())) })
    }
    /// Send a control message to one instance of this BFF.
    fn send_control(&self, instance: &str, body: Value) -> BoxFuture<'_, Result<(), MeshError>> {
        let _ = (instance, body);
        Box::pin(async { Err(MeshError::Unavailable("no control channel".into())) })
    }
}

/// The topic of control messages between the instances of one BFF (they
/// travel on the BFF's own fanout exchange or straight to an instance's
/// response queue, never on the events exchange).
pub(crate) const CONTROL_TOPIC: &str = "nuropb-bff.control";

/// The service side: what a peer does with requests and events addressed to
/// it. The gateway's own mesh methods implement this.
pub trait MeshHandler: Send + Sync + fmt::Debug + 'static {
    fn handle_request(&self, request: IncomingRequest) -> BoxFuture<'_, Result<Value, ErrorBody>>;
    /// Events matching the peer's bindings. The default drops them.
    fn handle_event(&self, event: IncomingEvent) -> BoxFuture<'_, ()> {
        let _ = event;
        Box::pin(async {})
    }
    /// The event log is read up to `position`, where this instance's news
    /// begins (the events before it were history). In order with
    /// [`handle_event`](Self::handle_event). The default ignores it.
    fn handle_log_live(&self, position: u64) -> BoxFuture<'_, ()> {
        let _ = position;
        Box::pin(async {})
    }
    /// Events of the log at or before `position` were lost on their way to
    /// the handler (its queue was full): a window of the log must not
    /// claim to hold them. Called as it happens, not in order with events.
    fn log_gap(&self, position: u64) {
        let _ = position;
    }
    /// A control message from an instance of the same BFF. The default
    /// drops it.
    fn handle_control(&self, body: Value) -> BoxFuture<'_, ()> {
        let _ = body;
        Box::pin(async {})
    }
}

/// The error nuropb answers for a method a service does not have.
pub(crate) fn unknown_method(service: &str, method: &str) -> ErrorBody {
    ErrorBody::new(
        "NuropbException",
        format!(
            "Runtime exception calling {service}.{method}:AttributeError: unknown method {method}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_debug_carries_no_token() {
        let mut context = Map::new();
        context.insert(
            "Authorization".into(),
            Value::String("eyJ.secret.sig".into()),
        );
        let call = Call {
            service: "s".into(),
            method: "m".into(),
            params: Default::default(),
            context: context.into(),
            ttl: Duration::from_secs(1),
            trace_id: None,
        };
        let text = format!("{call:?}");
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("Authorization"), "{text}");
    }
}
