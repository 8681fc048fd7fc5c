//! Whom a keepalive tick looks at: the sessions whose turn it is to be
//! pinged, and those whose token has expired.
//!
//! Why an index: a tick used to walk every session in the registry, under
//! its lock, to find the few of its bucket (hashing each session's id) and
//! the expired (reading each session's outbox): three cache misses per
//! session per second, about 3 ms a second at 10,000 sessions and ten times
//! that at 100,000, with every connect and every fan-out waiting on the
//! lock meanwhile. Here a tick's work is what it does: the sessions of its
//! share of the slots, and the expired, taken in expiry order.
//!
//! Each session is kept in one of [`SLOTS`] slots, chosen by its id (random
//! ids fill them evenly); a tick of `bucket` in `buckets` takes the slots
//! `[bucket * SLOTS / buckets, (bucket + 1) * SLOTS / buckets)`, so a round
//! of `buckets` ticks takes every slot once, whatever `buckets` is. Tokens'
//! expiries are kept in order beside; an expired session leaves that order
//! when a tick hands it out, and the slots when it unregisters. Bounded by
//! construction: one slot entry and at most one expiry per registered
//! session.

use std::collections::BTreeSet;

/// How many slots the sessions are kept in: a tick of a ping interval cut
/// into more buckets than this takes no slot in some ticks.
pub(crate) const SLOTS: usize = 1024;

/// The keepalive's index of the registry's sessions, by key `K` (a
/// session's id).
#[derive(Debug)]
pub(crate) struct Watch<K> {
    /// Each session's key and its expiry (0: none), in its slot.
    slots: Box<[Vec<(K, u64)>]>,
    /// (expiry, key) of every session with an expiry not handed out yet.
    expiring: BTreeSet<(u64, K)>,
}

impl<K> Default for Watch<K> {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            expiring: BTreeSet::new(),
        }
    }
}

/// The slot of a session id: its bytes folded.
fn slot_of(id: &str) -> usize {
    let folded = id
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (folded % SLOTS as u64) as usize
}

/// The stored form of an expiry: `None` is 0 (never); `Some(0)` is long
/// past, as 1 is.
fn stored(exp: Option<u64>) -> u64 {
    exp.map_or(0, |e| e.max(1))
}

impl<K: Ord + Clone + AsRef<str>> Watch<K> {
    /// Watch `key`, whose token expires at `exp` (Unix seconds; `None`:
    /// never). A key watched already is left as it is.
    pub(crate) fn insert(&mut self, key: K, exp: Option<u64>) {
        let slot = &mut self.slots[slot_of(key.as_ref())];
        if slot.iter().any(|(k, _)| *k == key) {
            return;
        }
        let exp = stored(exp);
        if exp != 0 {
            self.expiring.insert((exp, key.clone()));
        }
        slot.push((key, exp));
    }

    /// Stop watching `key` (a key not watched: nothing).
    pub(crate) fn remove(&mut self, key: &str) {
        let slot = &mut self.slots[slot_of(key)];
        if let Some(at) = slot.iter().position(|(k, _)| k.as_ref() == key) {
            let (k, exp) = slot.swap_remove(at);
            if exp != 0 {
                self.expiring.remove(&(exp, k));
            }
            if slot.capacity() > 2 * slot.len() + 4 {
                slot.shrink_to_fit();
            }
        }
    }

    /// `key`'s token now expires at `exp` (a new token); false when `key`
    /// is not watched.
    pub(crate) fn set_expiry(&mut self, key: &str, exp: Option<u64>) -> bool {
        let slot = &mut self.slots[slot_of(key)];
        let Some((k, old)) = slot.iter_mut().find(|(k, _)| k.as_ref() == key) else {
            return false;
        };
        let new = stored(exp);
        if *old != 0 {
            self.expiring.remove(&(*old, k.clone()));
        }
        if new != 0 {
            self.expiring.insert((new, k.clone()));
        }
        *old = new;
        true
    }

    /// The keys whose token has expired by `now` (Unix seconds), each
    /// handed out once: they leave the expiry order (not the slots).
    pub(crate) fn expired(&mut self, now: u64) -> Vec<K> {
        let mut out = Vec::new();
        while self.expiring.first().is_some_and(|(exp, _)| *exp <= now) {
            if let Some((_, key)) = self.expiring.pop_first() {
                out.push(key);
            }
        }
        out
    }

    /// The keys whose turn it is in tick `bucket` of a round of `buckets`.
    pub(crate) fn due(&self, bucket: u64, buckets: u64) -> impl Iterator<Item = &K> {
        let buckets = u128::from(buckets.max(1));
        let bucket = u128::from(bucket) % buckets;
        let bound = |b: u128| usize::try_from(b * SLOTS as u128 / buckets).unwrap_or(SLOTS);
        self.slots[bound(bucket)..bound(bucket + 1)]
            .iter()
            .flatten()
            .map(|(k, _)| k)
    }

    /// How many keys are watched.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slots.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, Option<u64>),
        Remove(u8),
        SetExpiry(u8, Option<u64>),
        Expired(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let exp = prop::option::of(0u64..40);
        prop_oneof![
            (any::<u8>(), exp.clone()).prop_map(|(k, e)| Op::Insert(k, e)),
            any::<u8>().prop_map(Op::Remove),
            (any::<u8>(), exp).prop_map(|(k, e)| Op::SetExpiry(k, e)),
            (0u64..40).prop_map(Op::Expired),
        ]
    }

    fn key(k: u8) -> String {
        format!("{k:02x}-session")
    }

    proptest! {
        /// Against a plain map of key to expiry: the keys watched, and
        /// each expired key handed out once, at the first look at or after
        /// its expiry, never before it, never after its removal.
        #[test]
        fn expiries_are_handed_out_once_and_in_time(ops in prop::collection::vec(op(), 0..200)) {
            let mut w = Watch::<String>::default();
            // key -> (expiry, handed out already)
            let mut model: BTreeMap<String, (u64, bool)> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, e) => {
                        w.insert(key(k), e);
                        model.entry(key(k)).or_insert((stored(e), false));
                    }
                    Op::Remove(k) => {
                        w.remove(&key(k));
                        model.remove(&key(k));
                    }
                    Op::SetExpiry(k, e) => {
                        let known = w.set_expiry(&key(k), e);
                        prop_assert_eq!(known, model.contains_key(&key(k)));
                        if let Some(m) = model.get_mut(&key(k)) {
                            *m = (stored(e), false);
                        }
                    }
                    Op::Expired(now) => {
                        let mut got = w.expired(now);
                        got.sort();
                        let mut want = Vec::new();
                        for (k, (exp, out)) in model.iter_mut() {
                            if *exp != 0 && *exp <= now && !*out {
                                *out = true;
                                want.push(k.clone());
                            }
                        }
                        prop_assert_eq!(got, want);
                    }
                }
                prop_assert_eq!(w.len(), model.len());
            }
        }

        /// Whatever the number of buckets, a round of ticks takes every
        /// key watched exactly once.
        #[test]
        fn a_round_takes_every_key_once(
            keys in prop::collection::btree_set("[0-9a-f]{32}", 0..300),
            buckets in prop_oneof![1u64..3000, Just(u64::MAX)],
            start in any::<u64>(),
        ) {
            let mut w = Watch::<String>::default();
            for k in &keys {
                w.insert(k.clone(), None);
            }
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            // A round of u64::MAX ticks is not walked: its ticks past the
            // first SLOTS + 1 take no slot (each takes at most one).
            let ticks = buckets.min(3000);
            for t in 0..ticks {
                for k in w.due(start.wrapping_add(t), buckets) {
                    *seen.entry(k.clone()).or_default() += 1;
                }
            }
            if buckets <= 3000 {
                prop_assert_eq!(seen.len(), keys.len());
                prop_assert!(seen.values().all(|n| *n == 1));
            } else {
                prop_assert!(seen.values().all(|n| *n == 1));
            }
        }
    }

    #[test]
    fn a_token_expires_at_its_second_and_zero_is_long_past() {
        let mut w = Watch::<String>::default();
        w.insert("never".into(), None);
        w.insert("zero".into(), Some(0));
        w.insert("hundred".into(), Some(100));
        assert_eq!(w.expired(0), Vec::<String>::new(), "0 is no time at all");
        assert_eq!(w.expired(1), vec!["zero".to_owned()]);
        assert_eq!(w.expired(99), Vec::<String>::new());
        assert_eq!(w.expired(100), vec!["hundred".to_owned()]);
        assert_eq!(w.expired(u64::MAX), Vec::<String>::new(), "never");
        assert!(w.set_expiry("never", Some(200)));
        assert!(!w.set_expiry("gone", Some(200)));
        assert_eq!(w.expired(200), vec!["never".to_owned()]);
    }

    #[test]
    fn a_removed_key_is_neither_due_nor_expired() {
        let mut w = Watch::<String>::default();
        w.insert("a".into(), Some(5));
        w.insert("b".into(), Some(5));
        w.remove("a");
        w.remove("a");
        assert_eq!(w.expired(10), vec!["b".to_owned()]);
        assert_eq!(w.expired(10), Vec::<String>::new(), "handed out once");
        let due: Vec<&String> = (0..4).flat_map(|b| w.due(b, 4)).collect();
        assert_eq!(due, vec![&"b".to_owned()]);
    }
}
