//! Messages from the broker the mesh let go, counted by why: any peer on
//! the broker can publish anything, so a message too large, undecodable,
//! with a field that cannot be echoed, or of a kind no one expects there is
//! dropped (never the link), counted for `bff_mesh_messages_dropped_total`,
//! and logged at most once a second, so a flood cannot fill the log either.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::throttle::Throttle;

/// Why a message was dropped: the metric's `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DropReason {
    /// Its body was over `limits.max_mesh_message_bytes`.
    TooLarge,
    /// Headers or body that do not make a NuroPb message.
    Undecodable,
    /// A field the gateway would copy into a property, header or log line
    /// (a correlation id, a trace id) of the wrong length or form.
    BadField,
    /// A message of a kind that does not belong where it came.
    Unexpected,
}

impl DropReason {
    pub(crate) const ALL: [DropReason; 4] = [
        DropReason::TooLarge,
        DropReason::Undecodable,
        DropReason::BadField,
        DropReason::Unexpected,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            DropReason::TooLarge => "too_large",
            DropReason::Undecodable => "undecodable",
            DropReason::BadField => "bad_field",
            DropReason::Unexpected => "unexpected",
        }
    }
}

/// The counts, and the throttle of the log line.
#[derive(Debug)]
pub(crate) struct Drops {
    counts: [AtomicU64; 4],
    logged: Throttle,
}

impl Default for Drops {
    fn default() -> Self {
        Self {
            counts: Default::default(),
            logged: Throttle::every(1),
        }
    }
}

impl Drops {
    /// Count a drop; log it unless a drop was logged this second already.
    pub(crate) fn drop_message(&self, reason: DropReason, what: &str) {
        self.counts[reason as usize].fetch_add(1, Ordering::Relaxed);
        if self.logged.ready() {
            tracing::warn!(
                reason = reason.label(),
                "dropped a message from the broker: {what} (at most one such line a second; bff_mesh_messages_dropped_total counts them all)"
            );
        }
    }

    /// Every reason with its count.
    pub(crate) fn counts(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (r.label(), self.counts[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn count(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }
}

/// A field a peer sent that the gateway copies into an AMQP short string
/// (a correlation id), a header or a log line (a trace id): 1 to 255
/// visible ASCII characters, so it can neither overflow the property nor
/// forge a log line.
pub(crate) fn echoable(field: &str) -> bool {
    (1..=255).contains(&field.len()) && field.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_are_counted_by_reason() {
        let drops = Drops::default();
        for _ in 0..3 {
            drops.drop_message(DropReason::TooLarge, "a 70 MiB event");
        }
        drops.drop_message(DropReason::BadField, "a 300-byte correlation id");
        assert_eq!(drops.count(DropReason::TooLarge), 3);
        assert_eq!(drops.count(DropReason::BadField), 1);
        assert_eq!(drops.count(DropReason::Undecodable), 0);
        let counts = drops.counts();
        assert_eq!(counts.len(), 4);
        assert!(counts.contains(&("too_large", 3)), "{counts:?}");
    }

    #[test]
    fn only_short_visible_fields_are_echoed() {
        assert!(echoable("6f1c2b-trace"));
        assert!(echoable(&"x".repeat(255)));
        for bad in ["", &"x".repeat(256), "a b", "line\nbreak", "ünï", "tab\t"] {
            assert!(!echoable(bad), "{bad:?}");
        }
    }
}
