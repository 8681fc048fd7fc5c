//! NuroPb 0.1.1 message bodies on the broker: what the gateway writes and
//! how it reads what arrives (steered by the `nuropb_type` header).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{ErrorBody, Params, RawJson};

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
    /// Kept as the text it came in: checked to be JSON, never built into
    /// a tree (an array of small numbers would take 17 times its size).
    #[serde(default)]
    event: RawJson,
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
    pub(super) fn size_hint(&self) -> usize {
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
    /// The payload, as the JSON text it travels as.
    #[serde(default)]
    pub event: RawJson,
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
