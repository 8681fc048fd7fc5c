//! Pings and token expiry for every socket, from one task per gateway.
//!
//! Why not a timer in each socket's task: tokio's timer (112 bytes) and the
//! loop's bookkeeping around it were what kept every idle socket's task in
//! a 896-byte block rather than a 768-byte one, and each socket woke on its
//! own to ping. Here one tick (a second, or the ping interval if that is
//! shorter) closes the sessions whose token has expired and pings the
//! sessions of one bucket: each session once per ping interval (from its
//! second round on: not as it opens), the buckets spread over it by
//! session id, so no tick pings them all. A
//! session that left [`MAX_MISSED_PINGS`] pings unanswered is closed (`no
//! pong`); any frame from its client answers (the connection tells its
//! outbox). The work of a tick is bounded by the sessions the registry
//! holds, and its lock is held only to pick them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::auth::unix_now;
use crate::session::Sessions;

/// Pings a client may leave unanswered before it is taken for dead.
pub(crate) const MAX_MISSED_PINGS: u8 = 2;

/// The longest tick: token expiry is looked at at least this often.
const MAX_TICK: Duration = Duration::from_secs(1);

/// The shortest tick, whatever the ping interval says.
const MIN_TICK: Duration = Duration::from_millis(10);

/// The tick and the number of buckets for `ping_interval`: a tick of at
/// most a second, and as many buckets as ticks fit in the interval.
pub(crate) fn schedule(ping_interval: Duration) -> (Duration, u64) {
    let tick = ping_interval.clamp(MIN_TICK, MAX_TICK);
    let buckets = (ping_interval.as_millis() / tick.as_millis()).max(1);
    (tick, u64::try_from(buckets).unwrap_or(u64::MAX))
}

/// Tick until `until` is cancelled.
pub(crate) async fn run(sessions: Sessions, ping_interval: Duration, until: CancellationToken) {
    let (tick, buckets) = schedule(ping_interval);
    // The first tick a whole tick from now: a socket is not pinged as it
    // opens.
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bucket = 0u64;
    loop {
        tokio::select! {
            _ = until.cancelled() => return,
            _ = every.tick() => {}
        }
        sessions.sweep(bucket, buckets, unix_now(), MAX_MISSED_PINGS);
        bucket = (bucket + 1) % buckets;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_tick_is_a_second_at_most_and_the_buckets_fill_the_interval() {
        assert_eq!(schedule(Duration::from_secs(25)), (MAX_TICK, 25));
        assert_eq!(
            schedule(Duration::from_millis(200)),
            (Duration::from_millis(200), 1)
        );
        assert_eq!(schedule(Duration::ZERO), (MIN_TICK, 1));
        assert_eq!(schedule(Duration::from_millis(1500)), (MAX_TICK, 1));
    }

    proptest! {
        /// Whatever the interval: a tick between the bounds, and the
        /// buckets' round no longer than the interval (a session is pinged
        /// at least once per interval), nor a tick shorter.
        #[test]
        fn every_session_is_pinged_within_its_interval(ms in 0u64..10_000_000) {
            let interval = Duration::from_millis(ms);
            let (tick, buckets) = schedule(interval);
            prop_assert!(tick >= MIN_TICK && tick <= MAX_TICK);
            prop_assert!(buckets >= 1);
            let round = tick * u32::try_from(buckets).unwrap();
            prop_assert!(round <= interval.max(MIN_TICK));
            prop_assert!(round + tick > interval);
        }
    }
}
