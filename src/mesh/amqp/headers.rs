//! The NuroPb headers: what the gateway writes on every message it sends
//! (protocol, type, version, trace id), and the check of a received
//! message's headers before its body is decoded.

use lapin::types::{AMQPValue, FieldTable};

use super::super::lane::Received;
use crate::protocol::{MeshMessage, MessageType, NUROPB_LIBRARY_VERSION, NUROPB_PROTOCOL_VERSION};

/// The NuroPb headers of a message of `kind`, sorted by name; `None` is
/// void.
pub(super) fn nuropb_headers(
    kind: MessageType,
    trace_id: Option<&str>,
) -> [(&str, Option<&str>); 5] {
    [
        ("encrypted", Some("")),
        ("nuropb_protocol", Some(NUROPB_PROTOCOL_VERSION)),
        ("nuropb_type", Some(kind.as_str())),
        ("nuropb_version", Some(NUROPB_LIBRARY_VERSION)),
        ("trace_id", trace_id),
    ]
}

/// [`nuropb_headers`] as lapin's table.
pub(super) fn header_table(kind: MessageType, trace_id: Option<&str>) -> FieldTable {
    let mut h = FieldTable::default();
    for (name, value) in nuropb_headers(kind, trace_id) {
        let value = value.map_or(AMQPValue::Void, |v| AMQPValue::LongString(v.into()));
        h.insert(name.into(), value);
    }
    h
}

/// Check a received message's NuroPb headers (read in place by the lane)
/// and decode its body; why not, if not.
pub(super) fn decode_message(props: &Received<'_>, data: &[u8]) -> Result<MeshMessage, String> {
    let protocol = props.header("nuropb_protocol");
    if protocol.as_deref() != Some(NUROPB_PROTOCOL_VERSION) {
        return Err(format!("unsupported nuropb_protocol {protocol:?}"));
    }
    let kind = props.header("nuropb_type");
    let Some(kind) = kind.as_deref().and_then(MessageType::parse) else {
        return Err(format!("unknown nuropb_type {kind:?}"));
    };
    if props.header("encrypted").as_deref() == Some("yes") {
        return Err("encrypted payloads are not supported by this gateway".into());
    }
    MeshMessage::decode_as(kind, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_nuropb_fields() {
        let h = header_table(MessageType::Request, Some("t1"));
        let get = |k: &str| h.inner().get(k).cloned();
        assert_eq!(
            get("nuropb_protocol"),
            Some(AMQPValue::LongString("0.1.1".into()))
        );
        assert_eq!(
            get("nuropb_type"),
            Some(AMQPValue::LongString("request".into()))
        );
        assert_eq!(get("trace_id"), Some(AMQPValue::LongString("t1".into())));
        assert_eq!(get("encrypted"), Some(AMQPValue::LongString("".into())));
        let h = header_table(MessageType::Event, None);
        assert_eq!(h.inner().get("trace_id"), Some(&AMQPValue::Void));
    }
}
