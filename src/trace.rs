//! W3C trace context for a client call: what a client may send
//! (`traceparent`), and what the BFF puts on the mesh message so a
//! service's logs and spans join the browser's trace. The NuroPb
//! `trace_id` is the trace's id (32 lowercase hex digits); the call's own
//! span is a child of the client's, or the root of a fresh trace when the
//! client sent none (or one that does not parse: never an error).
//!
//! Parsing follows the W3C Trace Context spec's `traceparent` grammar:
//! version `00` is exactly 55 characters; a later version may carry more
//! after a `-`; `ff` is no version; ids of all zeros are invalid; hex is
//! lowercase only. Bounded by construction: nothing past 256 bytes is read.

use std::fmt::Write as _;

/// A position in a trace: its id, a span in it, whether it is sampled, and
/// the span it is under (none for a trace's root, or for a context read
/// from a header, whose parent is not said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: [u8; 16],
    pub(crate) span_id: [u8; 8],
    pub(crate) sampled: bool,
    pub(crate) parent: Option<[u8; 8]>,
    /// The parent is another process's span (the client's).
    pub(crate) remote_parent: bool,
}

fn hex_bytes<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn random<const N: usize>() -> [u8; N] {
    loop {
        let bits = fastrand::u128(..).to_be_bytes();
        let mut out = [0u8; N];
        out.copy_from_slice(&bits[..N]);
        if out.iter().any(|b| *b != 0) {
            return out;
        }
    }
}

/// Whether a fresh trace with this id is sampled at `ratio`: its last 8
/// bytes (the random part), halved, against `ratio` of 2^63.
pub(crate) fn sampled_at(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio >= 1.0 {
        return true;
    }
    if ratio.is_nan() || ratio <= 0.0 {
        return false;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let bound = (ratio * (1u64 << 63) as f64) as u64;
    (u64::from_be_bytes(low) >> 1) < bound
}

impl TraceContext {
    /// A `traceparent` header's value, if it is a valid one.
    pub(crate) fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        if header.len() < 55 || header.len() > 256 || !header.is_ascii() {
            return None;
        }
        let version = hex_bytes::<1>(&header[..2])?[0];
        if version == 0xff || &header[2..3] != "-" {
            return None;
        }
        if version == 0 && header.len() != 55 {
            return None;
        }
        if header.len() > 55 && &header[55..56] != "-" {
            return None;
        }
        let (trace, span, flags) = (&header[3..35], &header[36..52], &header[53..55]);
        if &header[35..36] != "-" || &header[52..53] != "-" {
            return None;
        }
        let trace_id = hex_bytes::<16>(trace)?;
        let span_id = hex_bytes::<8>(span)?;
        let flags = hex_bytes::<1>(flags)?[0];
        if trace_id.iter().all(|b| *b == 0) || span_id.iter().all(|b| *b == 0) {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
            parent: None,
            remote_parent: false,
        })
    }

    /// The start of a fresh trace, sampled by its id at `ratio`.
    pub(crate) fn root(ratio: f64) -> Self {
        let trace_id = random();
        Self {
            trace_id,
            span_id: random(),
            sampled: sampled_at(&trace_id, ratio),
            parent: None,
            remote_parent: false,
        }
    }

    /// A span of the same trace under this one.
    pub(crate) fn child(&self) -> Self {
        Self {
            span_id: random(),
            parent: Some(self.span_id),
            remote_parent: false,
            ..*self
        }
    }

    /// A span of this process under this one, which another process's is.
    pub(crate) fn remote_child(&self) -> Self {
        Self {
            remote_parent: true,
            ..self.child()
        }
    }

    /// The trace id as NuroPb carries it: 32 lowercase hex digits.
    pub(crate) fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// This position as a `traceparent` value (version 00).
    pub(crate) fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_parses_and_a_child_keeps_the_trace() {
        let t = TraceContext::parse(GOOD).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled);
        assert_eq!(t.traceparent(), GOOD);
        let c = t.remote_child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        assert_eq!(c.parent, Some(t.span_id));
        assert!(c.remote_parent && !c.child().remote_parent);
    }

    #[test]
    fn malformed_ones_are_refused_and_make_a_fresh_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0é736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
        // A later version may say more, after a dash.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-comes";
        assert!(!TraceContext::parse(later).unwrap().sampled);
        assert_eq!(TraceContext::parse("garbage"), None);
        let fresh = TraceContext::root(1.0);
        assert_ne!(fresh.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(fresh.trace_id_hex().len(), 32);
    }

    proptest! {
        /// Any text parses or is refused without a panic; what it makes
        /// of a valid one is written back the same (version 00).
        #[test]
        fn parsing_never_panics_and_round_trips(s in ".{0,80}") {
            if let Some(t) = TraceContext::parse(&s) {
                prop_assert_eq!(TraceContext::parse(&t.traceparent()), Some(t));
            }
        }

        #[test]
        fn what_it_writes_it_reads(trace in any::<[u8; 16]>(), span in any::<[u8; 8]>(), sampled in any::<bool>()) {
            prop_assume!(trace.iter().any(|b| *b != 0) && span.iter().any(|b| *b != 0));
            let t = TraceContext { trace_id: trace, span_id: span, sampled, parent: None, remote_parent: false };
            prop_assert_eq!(TraceContext::parse(&t.traceparent()), Some(t));
        }
    }
}
