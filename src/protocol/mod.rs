//! Wire types of both sides of the gateway: the WebSocket frames a client
//! sends and receives, and the NuroPb 0.1.1 message bodies on the broker.
//! Pure serde, no I/O.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use ts_rs::TS;

/// The NuroPb protocol version this gateway speaks (`nuropb_protocol` header).
pub(crate) const NUROPB_PROTOCOL_VERSION: &str = "0.1.1";
/// What the gateway writes in the `nuropb_version` header.
pub(crate) const NUROPB_LIBRARY_VERSION: &str = concat!("nuropb-bff-", env!("CARGO_PKG_VERSION"));

/// WebSocket close codes the gateway sends (bff-contract.md section 3).
pub mod close {
    /// An ordinary end (the client left, or the socket failed).
    pub const NORMAL: u16 = 1000;
    /// The gateway is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A socket over a connection cap that could not be refused before the
    /// upgrade (it named its user only in its first frame).
    pub const POLICY: u16 = 1008;
    /// A frame too large to take: before authentication, one over the
    /// token limit (16 KiB).
    pub const TOO_BIG: u16 = 1009;
    /// Two pings went unanswered: the peer is taken for dead.
    pub const NO_PONG: u16 = 1011;
    /// A service closed the session (`disconnect_users`).
    pub const DISCONNECTED: u16 = 4000;
    /// The token expired and no new one arrived in time.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// The connection never authenticated.
    pub const AUTH_REQUIRED: u16 = 4003;
    /// The outbound queue overflowed: the client reads too slowly.
    pub const SLOW_CONSUMER: u16 = 4008;

    /// Every code above by its name: what generated clients are given.
    pub const ALL: [(&str, u16); 9] = [
        ("NORMAL", NORMAL),
        ("GOING_AWAY", GOING_AWAY),
        ("POLICY", POLICY),
        ("TOO_BIG", TOO_BIG),
        ("NO_PONG", NO_PONG),
        ("DISCONNECTED", DISCONNECTED),
        ("TOKEN_EXPIRED", TOKEN_EXPIRED),
        ("AUTH_REQUIRED", AUTH_REQUIRED),
        ("SLOW_CONSUMER", SLOW_CONSUMER),
    ];
}

/// The error names the gateway itself produces (bff-contract.md section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, TS)]
#[ts(rename = "GatewayErrorName")]
pub enum ErrorName {
    InvalidMessage,
    RouteNotFound,
    Forbidden,
    NuropbNotDeliveredError,
    Timeout,
    MeshUnavailable,
    RateLimited,
    MessageTooLarge,
    Unauthorized,
    /// The gateway is draining for a shutdown: reconnect (to another instance).
    ShuttingDown,
    InternalError,
}

impl ErrorName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidMessage => "InvalidMessage",
            Self::RouteNotFound => "RouteNotFound",
            Self::Forbidden => "Forbidden",
            Self::NuropbNotDeliveredError => "NuropbNotDeliveredError",
            Self::Timeout => "Timeout",
            Self::MeshUnavailable => "MeshUnavailable",
            Self::RateLimited => "RateLimited",
            Self::MessageTooLarge => "MessageTooLarge",
            Self::Unauthorized => "Unauthorized",
            Self::ShuttingDown => "ShuttingDown",
            Self::InternalError => "InternalError",
        }
    }
}

/// An error as NuroPb carries it: `{"error": <Name>, "description": <text>}`
/// plus whatever else the service put there, passed through untouched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, TS)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ErrorBody {
    pub fn new(name: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            error: name.into(),
            description: Some(description.into()),
            extra: Map::new(),
        }
    }

    pub fn gateway(name: ErrorName, description: impl Into<String>) -> Self {
        Self::new(name.as_str(), description)
    }
}

// ---- client side ------------------------------------------------------

/// A frame a client sends. Unknown fields (a client's own `context`, say)
/// are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize, TS)]
#[serde(tag = "type", content = "payload", rename_all = "lowercase")]
pub(crate) enum ClientFrame {
    Request(ClientCall),
    Command(ClientCall),
    Subscribe(Topics),
    Unsubscribe(Topics),
    Authenticate(Authenticate),
}

#[derive(Debug, Clone, PartialEq, Deserialize, TS)]
pub struct ClientCall {
    pub service: String,
    pub method: String,
    #[serde(default)]
    #[ts(as = "Option<Map<String, Value>>", optional)]
    pub params: Params,
    #[serde(default)]
    #[ts(optional = nullable)]
    pub trace_id: Option<String>,
    /// A W3C `traceparent`: the call's trace continues the client's (a
    /// malformed one is ignored: a fresh trace).
    #[serde(default)]
    #[ts(optional = nullable)]
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, TS)]
pub(crate) struct Topics {
    pub topics: Vec<String>,
    /// On `subscribe`: resume after this position of the event log (the
    /// last one the client saw), the missed events first.
    #[serde(default)]
    #[ts(optional, type = "number")]
    pub since: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, TS)]
pub(crate) struct Authenticate {
    pub token: String,
}

/// Why a client frame could not be decoded, with the trace id when the frame
/// carried one so the client can pair the error with its request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FrameError {
    pub description: String,
    pub trace_id: Option<String>,
}

impl ClientFrame {
    /// Decode one text frame. Every failure says what was wrong.
    pub(crate) fn decode(text: &str) -> Result<Self, FrameError> {
        // A well-formed frame (nearly every one) read once, straight into
        // its types; any other is read again to say what is wrong with it.
        Self::decode_well_formed(text).map_or_else(|| Self::decode_checked(text), Ok)
    }

    /// The frame if it is well formed: the envelope with its payload left
    /// unread, then the payload into the type `type` names, whichever of
    /// the two fields comes first (serde's tagged enum would copy a payload
    /// that comes first into a buffer).
    fn decode_well_formed(text: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(rename = "type", borrow)]
            kind: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            payload: &'a serde_json::value::RawValue,
        }
        let envelope: Envelope<'_> = serde_json::from_str(text).ok()?;
        let payload = envelope.payload.get();
        Some(match envelope.kind.as_ref() {
            "request" => Self::Request(serde_json::from_str(payload).ok()?),
            "command" => Self::Command(serde_json::from_str(payload).ok()?),
            "subscribe" => Self::Subscribe(serde_json::from_str(payload).ok()?),
            "unsubscribe" => Self::Unsubscribe(serde_json::from_str(payload).ok()?),
            "authenticate" => Self::Authenticate(serde_json::from_str(payload).ok()?),
            _ => return None,
        })
    }

    /// Decode step by step: each check has its own message, and the trace
    /// id is kept when the frame had one.
    fn decode_checked(text: &str) -> Result<Self, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
            description: format!("frame is not valid JSON: {e}"),
            trace_id: None,
        })?;
        let trace_id = value
            .get("payload")
            .and_then(|p| p.get("trace_id"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let fail = |description: String| FrameError {
            description,
            trace_id: trace_id.clone(),
        };
        let obj = value
            .as_object()
            .ok_or_else(|| fail("frame must be a JSON object".into()))?;
        let kind = match obj.get("type") {
            Some(kind @ Value::String(_)) => kind,
            Some(_) => return Err(fail("field `type` must be a string".into())),
            None => return Err(fail("missing field `type`".into())),
        };
        let Some(payload) = obj.get("payload") else {
            return Err(fail("missing field `payload`".into()));
        };
        // Read again from text, `type` first, so serde reads the payload
        // straight from it: `Params` keeps the client's JSON, which only a
        // text deserializer can hand it.
        let text = format!("{{\"type\":{kind},\"payload\":{payload}}}");
        serde_json::from_str(&text).map_err(|e| {
            // Where in the rewritten text it failed means nothing to the
            // client.
            let message = e.to_string();
            let at = format!(" at line {} column {}", e.line(), e.column());
            let message = message.strip_suffix(&at).unwrap_or(&message);
            fail(format!("invalid frame: {message}"))
        })
    }
}

/// Who is on the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub user_id: String,
    pub username: Option<String>,
    pub roles: Vec<String>,
}

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(tag = "type", content = "payload", rename_all = "lowercase")]
pub(crate) enum ServerFrame {
    Event {
        topic: String,
        #[ts(as = "Value")]
        event: RawJson,
        /// Its place in the BFF's event log (events the routing file's
        /// rules deliver); what `since` resumes after.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional, type = "number")]
        position: Option<u64>,
    },
    Response {
        trace_id: String,
        #[ts(as = "Value")]
        result: RawJson,
        error: Option<ErrorBody>,
        /// A composed route's parts that failed, by key, when any did.
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        failed: Option<Map<String, Value>>,
    },
    Ack {
        trace_id: String,
    },
    Subscribed {
        topics: Vec<String>,
        /// Answering a `subscribe` with `since`: whether the events missed
        /// follow (true) or the client must refetch (false).
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        recovered: Option<bool>,
    },
    /// Subscriptions the gateway dropped on its own, and why: a reloaded
    /// routing table or the roles of a new token no longer allow them.
    Unsubscribed {
        topics: Vec<String>,
        reason: String,
    },
    Error {
        error: String,
        description: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        trace_id: Option<String>,
    },
}

/// The `reason` of an `unsubscribed` frame after a reload.
pub(crate) const NARROWED_BY_RELOAD: &str =
    "the routing table was reloaded and no longer allows these subscriptions";

impl ServerFrame {
    pub(crate) fn error(
        name: ErrorName,
        description: impl Into<String>,
        trace_id: Option<String>,
    ) -> Self {
        Self::Error {
            error: name.as_str().to_owned(),
            description: description.into(),
            trace_id,
        }
    }

    pub(crate) fn to_json(&self) -> String {
        // Serialising these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","payload":{"error":"InternalError","description":"unencodable frame"}}"#
                .to_owned()
        })
    }
}

mod json;
mod mesh;

pub use json::{Params, RawJson};
pub(crate) use mesh::*;

#[cfg(test)]
mod tests;
