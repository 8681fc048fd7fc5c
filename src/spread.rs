//! One piece of work for each of many sockets, spread over the runtime's
//! workers: an event fanned out to 10,000 sessions is 10,000 writes, the
//! kernel's work (on loopback the reader's receive path runs in the
//! writer's turn too), and one task doing them all keeps one core busy
//! while the other idles. Split in a few shares per worker ([`SHARES`]),
//! each share a task: a worker busy elsewhere (the broker's socket, a
//! request) leaves its shares to the others, which steal them, and the
//! last delivery comes when the cores are through, not when the slowest
//! of one share per worker is. (One share per worker: the last 1% of an
//! event's deliveries came 10-20% later, measured in the hop bench.)
//!
//! The work for one item is synchronous and bounded (a lock, a check, a
//! non-blocking write), so a share never waits and a share's task is done
//! once its loop is. The caller awaits every share; if the caller is
//! dropped first, the shares still run to their end on their own (each is
//! one bounded loop), so nothing a fan-out began is left half done.

use std::sync::Arc;

/// Fewer items than this are worked through by the caller's own task: a
/// task a worker costs more than it saves on a short loop.
pub(crate) const SPREAD_FROM: usize = 512;

/// Shares per worker, each at least `SPREAD_FROM / 2` items.
const SHARES: usize = 4;

/// Run `each(context, item)` for every item, in shares over the runtime's
/// workers when there are many; how many returned true.
pub(crate) async fn spread<T, C>(items: Vec<T>, context: C, each: fn(&C, &T) -> bool) -> usize
where
    T: Send + 'static,
    C: Send + Sync + 'static,
{
    let workers = tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers());
    if items.len() < SPREAD_FROM || workers < 2 {
        return items.iter().filter(|item| each(&context, item)).count();
    }
    let context = Arc::new(context);
    let share = items.len().div_ceil(workers * SHARES).max(SPREAD_FROM / 2);
    let mut items = items;
    let mut shares = Vec::with_capacity(workers * SHARES);
    // Every share in a task of its own, none worked here: a task spawned
    // last waits in its worker's slot for the next turn, where no other
    // worker can take it; those before it are taken by idle workers.
    while !items.is_empty() {
        let mine = items.split_off(items.len().saturating_sub(share));
        let context = Arc::clone(&context);
        shares.push(tokio::spawn(async move {
            mine.iter().filter(|item| each(&context, item)).count()
        }));
    }
    let mut done = 0;
    for share in shares {
        match share.await {
            Ok(n) => done += n,
            // A share that panicked: its items after the panic got nothing.
            Err(e) => tracing::error!(error = %e, "a fan-out share failed"),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Each item's visits, and how many returned true.
    fn visit(n: usize, keep: fn(usize) -> bool) -> (Vec<usize>, usize) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let seen: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
        let counted = rt.block_on(spread(
            (0..n).collect(),
            (Arc::clone(&seen), keep),
            |(seen, keep), i| {
                seen[*i].fetch_add(1, Ordering::Relaxed);
                keep(*i)
            },
        ));
        (
            seen.iter().map(|v| v.load(Ordering::Relaxed)).collect(),
            counted,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Spread or not, each item is worked once and the count is the
        /// sequential one.
        #[test]
        fn every_item_once_and_the_count_of_those_kept(n in 0usize..3 * SPREAD_FROM, m in 1usize..7) {
            static M: AtomicUsize = AtomicUsize::new(1);
            M.store(m, Ordering::Relaxed);
            let (seen, counted) = visit(n, |i| i % M.load(Ordering::Relaxed) == 0);
            prop_assert!(seen.iter().all(|v| *v == 1), "{seen:?}");
            prop_assert_eq!(counted, (0..n).filter(|i| i % m == 0).count());
        }
    }

    #[test]
    fn shares_finish_when_their_caller_is_dropped() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let n = 4 * SPREAD_FROM;
        let seen = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let work = spread((0..n).collect::<Vec<_>>(), Arc::clone(&seen), |seen, _| {
                std::thread::sleep(std::time::Duration::from_micros(20));
                seen.fetch_add(1, Ordering::Relaxed);
                true
            });
            // Polled once (the shares spawned), then dropped.
            let mut work = Box::pin(work);
            assert!(futures_util::poll!(work.as_mut()).is_pending());
            drop(work);
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while seen.load(Ordering::Relaxed) < n {
                assert!(tokio::time::Instant::now() < deadline, "the shares stopped");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        assert_eq!(seen.load(Ordering::Relaxed), n);
    }
}
