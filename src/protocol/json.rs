//! JSON kept as the text it came in: a service's result ([`RawJson`]) and a
//! call's params and context ([`Params`]), checked on arrival and parsed only
//! when a hook reads them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::SessionInfo;

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
        session: Arc<SessionInfo>,
        token: Option<Arc<serde_json::value::RawValue>>,
        trace_id: Box<str>,
        /// The call's span as a W3C `traceparent`, for a service that
        /// continues the trace.
        traceparent: Option<Box<str>>,
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
                traceparent,
            } => {
                let mut map =
                    serializer.serialize_map(Some(4 + usize::from(traceparent.is_some())))?;
                map.serialize_entry("Authorization", &token.as_deref())?;
                map.serialize_entry("session_id", &session.session_id)?;
                map.serialize_entry("trace_id", trace_id)?;
                if let Some(traceparent) = traceparent {
                    map.serialize_entry("traceparent", traceparent)?;
                }
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
        session: Arc<SessionInfo>,
        token: Option<Arc<serde_json::value::RawValue>>,
        trace_id: &str,
        traceparent: Option<&str>,
    ) -> Self {
        Self(ParamsRepr::Text(
            Text::Context {
                session,
                token,
                trace_id: trace_id.into(),
                traceparent: traceparent.map(Into::into),
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
                    traceparent,
                },
                _,
            ) => {
                // Keys, quotes and separators, then the values.
                80 + token.as_ref().map_or(4, |t| t.get().len())
                    + traceparent.as_ref().map_or(0, |t| t.len())
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
