//! Wire types of both sides of the gateway: the WebSocket frames a client
//! sends and receives, and the NuroPb 0.1.1 message bodies on the broker.
//! Pure serde, no I/O.

use std::sync::Arc;

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
    pub const ALL: [(&str, u16); 8] = [
        ("NORMAL", NORMAL),
        ("GOING_AWAY", GOING_AWAY),
        ("POLICY", POLICY),
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
}

#[derive(Debug, Clone, PartialEq, Deserialize, TS)]
pub(crate) struct Topics {
    pub topics: Vec<String>,
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

/// JSON as a service sent it: checked to be one well-formed value, then
/// passed to the client as it is, not parsed into a [`Value`] and written
/// again. With 4 KiB results, parsing and writing them was about a third
/// of the gateway's instructions per call (`cargo bench --bench hop --
/// --payload-bytes 4096`); passed on, the client also gets the service's
/// key order and numbers no `f64` can hold.
#[derive(Clone)]
pub struct RawJson(Box<serde_json::value::RawValue>);

impl RawJson {
    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parsed, for a hook that reads or changes it. Fails only on what
    /// JSON allows and a [`Value`] cannot hold (a number beyond `f64`).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// Written from a [`Value`].
    pub fn from_value(value: &Value) -> Self {
        // Writing a `Value` cannot fail: its keys are strings.
        serde_json::value::to_raw_value(value).map_or_else(|_| Self::null(), Self)
    }

    /// `null`.
    pub fn null() -> Self {
        Self(serde_json::value::RawValue::NULL.to_owned())
    }
}

impl From<Value> for RawJson {
    fn from(value: Value) -> Self {
        Self::from_value(&value)
    }
}

impl Default for RawJson {
    fn default() -> Self {
        Self::null()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl std::fmt::Debug for RawJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl Serialize for RawJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RawJson {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Box::<serde_json::value::RawValue>::deserialize(deserializer).map(Self)
    }
}

/// A call's params or its context: a JSON object, kept as text until
/// something reads or changes it. The params are the text the client sent:
/// a plain routed call writes it into the mesh request as it is. The
/// context is the session (shared), its token (written as JSON once per
/// session) and the call's trace id. A hook or a composed route that reads
/// either (through `Deref` to the map) parses it once, and one that changes
/// it (`DerefMut`) writes the changed map instead.
///
/// Params are checked on arrival: an object, every number one a [`Value`]
/// can hold (so that reading the map cannot fail later), nested no deeper
/// than a [`Value`] may be. Read from JSON text (serde_json's `from_str` or
/// `from_slice`): keeping the text takes serde_json's text deserializer,
/// so deserializing one from a [`Value`] is refused.
#[derive(Clone)]
pub struct Params(ParamsRepr);

#[derive(Clone)]
enum ParamsRepr {
    /// Text; parsed on the first read.
    Text(Text, std::sync::OnceLock<Map<String, Value>>),
    /// Built or changed here.
    Map(Map<String, Value>),
}

#[derive(Clone)]
enum Text {
    /// As the client sent it.
    Raw(Box<serde_json::value::RawValue>),
    /// A call's context: the session (its id and user), its token as JSON
    /// (written once per session), the call's trace id.
    Context {
        session: Arc<crate::session::SessionInfo>,
        token: Option<Arc<serde_json::value::RawValue>>,
        trace_id: Box<str>,
    },
}

impl Text {
    /// The object as a map, read back from what it writes. Params were
    /// checked to be a readable object when they arrived; a context is
    /// written here (strings, and null for no token).
    fn map(&self) -> Map<String, Value> {
        match serde_json::to_value(self) {
            Ok(Value::Object(map)) => map,
            _ => Map::new(),
        }
    }
}

impl Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Text::Raw(raw) => raw.serialize(serializer),
            // The token's JSON written as it is: escaped once per session,
            // not once per call.
            Text::Context {
                session,
                token,
                trace_id,
            } => {
                let mut map = serializer.serialize_map(Some(4))?;
                map.serialize_entry("Authorization", &token.as_deref())?;
                map.serialize_entry("session_id", &session.session_id)?;
                map.serialize_entry("trace_id", trace_id)?;
                map.serialize_entry("user_id", &session.user_id)?;
                map.end()
            }
        }
    }
}

impl Params {
    /// A call's context: `session`'s ids, its `token` written as JSON (a
    /// string), and the call's trace id.
    pub(crate) fn context(
        session: Arc<crate::session::SessionInfo>,
        token: Option<Arc<serde_json::value::RawValue>>,
        trace_id: &str,
    ) -> Self {
        Self(ParamsRepr::Text(
            Text::Context {
                session,
                token,
                trace_id: trace_id.into(),
            },
            std::sync::OnceLock::new(),
        ))
    }

    /// About how long its JSON is, to size a buffer it is written into:
    /// exact for text as it came, an estimate for a context, a guess for a
    /// map.
    pub(crate) fn len_hint(&self) -> usize {
        match &self.0 {
            ParamsRepr::Text(Text::Raw(raw), _) => raw.get().len(),
            ParamsRepr::Text(
                Text::Context {
                    session,
                    token,
                    trace_id,
                },
                _,
            ) => {
                // Keys, quotes and separators, then the values.
                64 + token.as_ref().map_or(4, |t| t.get().len())
                    + session.session_id.len()
                    + session.user_id.len()
                    + trace_id.len()
            }
            ParamsRepr::Map(map) => 16 * map.len() + 2,
        }
    }
}

impl Default for Params {
    fn default() -> Self {
        Self(ParamsRepr::Map(Map::new()))
    }
}

impl From<Map<String, Value>> for Params {
    fn from(map: Map<String, Value>) -> Self {
        Self(ParamsRepr::Map(map))
    }
}

impl From<Params> for Map<String, Value> {
    /// The map, taking the parsed one if something read it already.
    fn from(params: Params) -> Self {
        match params.0 {
            ParamsRepr::Text(text, mut parsed) => parsed.take().unwrap_or_else(|| text.map()),
            ParamsRepr::Map(map) => map,
        }
    }
}

impl std::ops::Deref for Params {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Map<String, Value> {
        match &self.0 {
            ParamsRepr::Text(text, parsed) => parsed.get_or_init(|| text.map()),
            ParamsRepr::Map(map) => map,
        }
    }
}

impl std::ops::DerefMut for Params {
    fn deref_mut(&mut self) -> &mut Map<String, Value> {
        if let ParamsRepr::Text(text, parsed) = &mut self.0 {
            let map = parsed.take().unwrap_or_else(|| text.map());
            self.0 = ParamsRepr::Map(map);
        }
        match &mut self.0 {
            ParamsRepr::Map(map) => map,
            ParamsRepr::Text(..) => unreachable!("made a map just above"),
        }
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ParamsRepr::Text(Text::Raw(raw), _) => f.write_str(raw.get()),
            // Never the token.
            ParamsRepr::Text(
                Text::Context {
                    session, trace_id, ..
                },
                _,
            ) => f
                .debug_struct("Context")
                .field("session_id", &session.session_id)
                .field("trace_id", trace_id)
                .field("user_id", &session.user_id)
                .finish_non_exhaustive(),
            ParamsRepr::Map(map) => map.fmt(f),
        }
    }
}

impl Serialize for Params {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            ParamsRepr::Text(text, _) => text.serialize(serializer),
            ParamsRepr::Map(map) => map.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(deserializer)?;
        serde_json::from_str::<ReadableObject>(raw.get()).map_err(serde::de::Error::custom)?;
        Ok(Self(ParamsRepr::Text(
            Text::Raw(raw),
            std::sync::OnceLock::new(),
        )))
    }
}

/// A JSON object that parses into a [`Map`], read without building one.
struct ReadableObject;

impl<'de> Deserialize<'de> for ReadableObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_map(Readable)
            .map(|Readable| ReadableObject)
    }
}

/// Any JSON value a [`Value`] can hold, read without building it: numbers
/// are parsed (one beyond `f64` fails as it would for a [`Value`]),
/// strings are not copied.
#[derive(Clone, Copy)]
struct Readable;

impl<'de> Deserialize<'de> for Readable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Readable)
    }
}

impl<'de> serde::de::Visitor<'de> for Readable {
    type Value = Readable;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<Readable>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, Readable>()?
            .is_some()
        {}
        Ok(self)
    }
}

/// A frame the gateway sends.
#[derive(Debug, Clone, PartialEq, Serialize, TS)]
#[serde(tag = "type", content = "payload", rename_all = "lowercase")]
pub(crate) enum ServerFrame {
    Event {
        topic: String,
        event: Value,
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
    },
    Error {
        error: String,
        description: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        #[ts(optional)]
        trace_id: Option<String>,
    },
}

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

// ---- mesh side --------------------------------------------------------

/// The `nuropb_type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MessageType {
    Request,
    Response,
    Command,
    Event,
}

impl MessageType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::Command => "command",
            Self::Event => "event",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "request" => Some(Self::Request),
            "response" => Some(Self::Response),
            "command" => Some(Self::Command),
            "event" => Some(Self::Event),
            _ => None,
        }
    }
}

/// A NuroPb message body; the `tag` field names the variant. Read with
/// [`MeshMessage::decode_as`], which the headers' type steers.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "tag", rename_all = "lowercase")]
pub(crate) enum MeshMessage {
    Request(RequestBody),
    Command(RequestBody),
    Event(EventBody),
    Response(ResponseBody),
}

impl MeshMessage {
    /// Decode a body whose headers say it is a `kind`: straight into that
    /// variant's type (serde's tagged enum would first copy every value of
    /// the body into a buffer), refused if its `tag` is not `kind`.
    ///
    /// The body is checked to be UTF-8 in one pass first, and read as text:
    /// reading bytes, serde_json checks each string on its own, which costs
    /// more for a body of many short strings.
    pub(crate) fn decode_as(kind: MessageType, data: &[u8]) -> Result<Self, String> {
        let data =
            std::str::from_utf8(data).map_err(|e| format!("undecodable body: not UTF-8 ({e})"))?;
        Ok(match kind {
            // What arrives on every call and in every burst is read in one
            // pass, its tag with it.
            MessageType::Response => {
                let r: ResponseIn<'_> = decode_tagged(kind, data, |r: &ResponseIn<'_>| &r.tag)?;
                Self::Response(ResponseBody {
                    correlation_id: r.correlation_id,
                    context: Map::new(),
                    trace_id: None,
                    result: r.result,
                    error: r.error,
                    warning: None,
                    reply_to: String::new(),
                })
            }
            MessageType::Event => {
                let e: EventIn<'_> = decode_tagged(kind, data, |e: &EventIn<'_>| &e.tag)?;
                Self::Event(EventBody {
                    correlation_id: e.correlation_id,
                    context: Map::new(),
                    trace_id: e.trace_id,
                    topic: e.topic,
                    event: e.event,
                    target: e.target,
                })
            }
            // Requests and commands (a gateway in service mode takes them):
            // the tag first, then the body.
            MessageType::Request | MessageType::Command => {
                let tag = tag_of(data).map_err(undecodable)?;
                if tag != kind.as_str() {
                    return Err(mismatch(kind, &tag));
                }
                let body = serde_json::from_str(data).map_err(undecodable)?;
                if kind == MessageType::Request {
                    Self::Request(body)
                } else {
                    Self::Command(body)
                }
            }
        })
    }

    pub(crate) fn message_type(&self) -> MessageType {
        match self {
            Self::Request(_) => MessageType::Request,
            Self::Command(_) => MessageType::Command,
            Self::Event(_) => MessageType::Event,
            Self::Response(_) => MessageType::Response,
        }
    }
}

fn undecodable(e: serde_json::Error) -> String {
    format!("undecodable body: {e}")
}

fn mismatch(kind: MessageType, tag: &str) -> String {
    format!(
        "nuropb_type header `{}` does not match body tag `{tag}`",
        kind.as_str()
    )
}

/// A body's tag, every other field skipped unread.
fn tag_of(data: &str) -> Result<std::borrow::Cow<'_, str>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(borrow)]
        tag: std::borrow::Cow<'a, str>,
    }
    serde_json::from_str::<Tag<'_>>(data).map(|t| t.tag)
}

/// Decode a body whose type reads its tag too, in one pass, and check the
/// tag. A body that does not decode as `kind` but carries another kind's
/// tag is refused as that kind, as a separate look at the tag would.
fn decode_tagged<'a, T: Deserialize<'a>>(
    kind: MessageType,
    data: &'a str,
    tag: impl FnOnce(&T) -> &str,
) -> Result<T, String> {
    match serde_json::from_str::<T>(data) {
        Ok(body) => match tag(&body) {
            t if t == kind.as_str() => Ok(body),
            t => Err(mismatch(kind, t)),
        },
        Err(e) => Err(match tag_of(data) {
            Ok(t) if t != kind.as_str() => mismatch(kind, &t),
            _ => undecodable(e),
        }),
    }
}

/// What the gateway reads of a response, its tag with it.
#[derive(Deserialize)]
struct ResponseIn<'a> {
    #[serde(borrow)]
    tag: std::borrow::Cow<'a, str>,
    correlation_id: String,
    #[serde(default)]
    result: RawJson,
    #[serde(default)]
    error: Option<ErrorBody>,
}

/// What the gateway reads of an event, its tag with it.
#[derive(Deserialize)]
struct EventIn<'a> {
    #[serde(borrow)]
    tag: std::borrow::Cow<'a, str>,
    correlation_id: String,
    #[serde(default)]
    trace_id: Option<String>,
    topic: String,
    #[serde(default)]
    event: Value,
    #[serde(default)]
    target: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestBody {
    pub correlation_id: String,
    #[serde(default)]
    pub context: Map<String, Value>,
    #[serde(default)]
    pub trace_id: Option<String>,
    pub service: String,
    pub method: String,
    #[serde(default)]
    pub params: Map<String, Value>,
}

/// A request or command body written from borrowed parts: the same JSON as
/// [`MeshMessage::Request`] / [`MeshMessage::Command`] of a [`RequestBody`],
/// without copying the call's maps to build one.
#[derive(Debug, Serialize)]
pub(crate) struct RequestBodyRef<'a> {
    /// `request` or `command`: the variant's tag, first as serde writes it.
    pub tag: &'static str,
    pub correlation_id: &'a str,
    pub context: &'a Params,
    pub trace_id: Option<&'a str>,
    pub service: &'a str,
    pub method: &'a str,
    pub params: &'a Params,
}

impl RequestBodyRef<'_> {
    /// The body as JSON, written into a buffer sized for it once (growing
    /// one from serde_json's default 128 bytes copied a 1 KiB body four
    /// times).
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.size_hint());
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// About how long the body's JSON is (at least that, unless a string
    /// needs escapes or a map was changed).
    fn size_hint(&self) -> usize {
        128 + self.correlation_id.len()
            + self.trace_id.map_or(4, str::len)
            + self.service.len()
            + self.method.len()
            + self.context.len_hint()
            + self.params.len_hint()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventBody {
    pub correlation_id: String,
    /// Written for NuroPb peers; skipped unread on receipt (nothing in the
    /// gateway reads an event's context), so a burst of events costs no
    /// copy of it.
    #[serde(default, skip_deserializing)]
    pub context: Map<String, Value>,
    #[serde(default)]
    pub trace_id: Option<String>,
    pub topic: String,
    #[serde(default)]
    pub event: Value,
    #[serde(default)]
    pub target: Option<Vec<String>>,
}

/// A response as the gateway writes it; one arriving is read as a
/// [`ResponseIn`], for its correlation id, result and error only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct ResponseBody {
    pub correlation_id: String,
    pub context: Map<String, Value>,
    pub trace_id: Option<String>,
    pub result: RawJson,
    pub error: Option<ErrorBody>,
    pub warning: Option<String>,
    pub reply_to: String,
}

#[cfg(test)]
mod tests;
