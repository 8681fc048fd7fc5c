//! At most one log line per interval for a thing a peer can make happen as
//! often as it likes (a dropped message, a control message not believed):
//! the counters in the metrics say how many, the log says that and why.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lets one caller through per `every_secs` (by the wall clock's seconds).
#[derive(Debug)]
pub(crate) struct Throttle {
    every_secs: u64,
    /// Unix second of the last one let through; 0 before any.
    last: AtomicU64,
}

impl Throttle {
    pub(crate) const fn every(secs: u64) -> Self {
        Self {
            every_secs: secs,
            last: AtomicU64::new(0),
        }
    }

    /// True for the first caller in each interval; lock-free.
    pub(crate) fn ready(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last.load(Ordering::Relaxed);
        now >= last.saturating_add(self.every_secs)
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_caller_per_interval() {
        let t = Throttle::every(60);
        assert!(t.ready(), "the first");
        assert!(!t.ready(), "within the minute");
        t.last.store(1, Ordering::Relaxed);
        assert!(t.ready(), "a minute has passed");
    }
}
