//! What one BFF instance knows of the others: who is alive (from their
//! heartbeats, with their counts for `stats`), which pushes it has applied
//! already (so a redelivered or replayed control message acts once), and
//! the pushes it is waiting to hear back about. Every map here is bounded.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Most other instances remembered; more heartbeats than that are ignored.
const MAX_MEMBERS: usize = 1024;
/// Push ids remembered for de-duplication.
const MAX_SEEN: usize = 16_384;
/// How long a push id is remembered.
const SEEN_FOR: Duration = Duration::from_secs(600);
/// Pushes waited for at once.
const MAX_GATHERS: usize = 4096;

/// One instance's last heartbeat.
#[derive(Debug, Clone, Copy)]
struct Member {
    seen: Instant,
    sessions: u64,
    users: u64,
}

/// Sessions kept per other instance, at most.
pub(crate) const MAX_ROSTER: usize = 1_000_000;

/// What one instance reported for a push (or a presence query: its
/// sessions of each user asked about).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    pub(crate) instance: String,
    pub(crate) count: u64,
    pub(crate) users: Vec<(String, u64)>,
}

/// Counts over the live instances, this one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClusterCounts {
    pub(crate) instances: usize,
    pub(crate) sessions: u64,
    /// Users per instance, summed: a user on two instances counts twice.
    pub(crate) user_sessions: u64,
}

#[derive(Debug)]
pub(crate) struct Cluster {
    me: String,
    /// An instance not heard from for this long is taken for gone.
    expiry: Duration,
    members: Mutex<HashMap<String, Member>>,
    /// The sessions each other instance holds (session id to user id), as
    /// its heartbeats tell them: what to say `disconnected` for when it is
    /// lost.
    rosters: Mutex<HashMap<String, HashMap<String, String>>>,
    seen: Mutex<Seen>,
    gathers: Mutex<HashMap<String, mpsc::Sender<Ack>>>,
}

#[derive(Debug, Default)]
struct Seen {
    ids: HashSet<String>,
    order: VecDeque<(Instant, String)>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    pub(crate) fn new(me: String, heartbeat: Duration) -> Self {
        Self {
            me,
            expiry: heartbeat * 3,
            members: Mutex::default(),
            rosters: Mutex::default(),
            seen: Mutex::default(),
            gathers: Mutex::default(),
        }
    }

    pub(crate) fn me(&self) -> &str {
        &self.me
    }

    /// A heartbeat from `instance` (ours are ignored: we count ourselves).
    /// True when it is one not heard before.
    pub(crate) fn heard(&self, instance: &str, sessions: u64, users: u64, now: Instant) -> bool {
        if instance == self.me {
            return false;
        }
        let mut members = lock(&self.members);
        members.retain(|_, m| now.saturating_duration_since(m.seen) < self.expiry);
        if members.len() >= MAX_MEMBERS && !members.contains_key(instance) {
            return false;
        }
        members
            .insert(
                instance.to_owned(),
                Member {
                    seen: now,
                    sessions,
                    users,
                },
            )
            .is_none()
    }

    /// `instance` said it is leaving (its sessions closed themselves).
    pub(crate) fn left(&self, instance: &str) {
        lock(&self.members).remove(instance);
        lock(&self.rosters).remove(instance);
    }

    /// What `instance`'s heartbeat says of its sessions: all of them
    /// (`full`), or those opened and closed since its last one. At most
    /// [`MAX_ROSTER`] are kept per instance.
    pub(crate) fn roster(
        &self,
        instance: &str,
        full: bool,
        opened: Vec<(String, String)>,
        closed: Vec<String>,
    ) {
        if instance == self.me || !lock(&self.members).contains_key(instance) {
            return;
        }
        let mut rosters = lock(&self.rosters);
        let roster = rosters.entry(instance.to_owned()).or_default();
        if full {
            roster.clear();
        }
        for sid in closed {
            roster.remove(&sid);
        }
        for (sid, uid) in opened {
            if roster.len() >= MAX_ROSTER {
                break;
            }
            roster.insert(sid, uid);
        }
    }

    /// Instances not heard from for `after`, taken out: each with the
    /// sessions it held (session id, user id), sorted.
    pub(crate) fn lost(
        &self,
        now: Instant,
        after: Duration,
    ) -> Vec<(String, Vec<(String, String)>)> {
        let gone: Vec<String> = {
            let mut members = lock(&self.members);
            let gone: Vec<String> = members
                .iter()
                .filter(|(_, m)| now.saturating_duration_since(m.seen) >= after)
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                members.remove(id);
            }
            gone
        };
        let mut rosters = lock(&self.rosters);
        let mut out: Vec<(String, Vec<(String, String)>)> = gone
            .into_iter()
            .map(|id| {
                let mut sessions: Vec<(String, String)> = rosters
                    .remove(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .collect();
                sessions.sort();
                (id, sessions)
            })
            .collect();
        out.sort();
        out
    }

    /// Whether this instance comes first (by id) among the live ones: the
    /// one that speaks for a lost instance, so it is said once.
    pub(crate) fn speaks_for_the_lost(&self, now: Instant) -> bool {
        self.others(now).iter().all(|o| self.me < *o)
    }

    /// The other instances alive now.
    pub(crate) fn others(&self, now: Instant) -> HashSet<String> {
        lock(&self.members)
            .iter()
            .filter(|(_, m)| now.saturating_duration_since(m.seen) < self.expiry)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// This instance's counts plus the last ones each live instance sent.
    pub(crate) fn counts(&self, sessions: u64, users: u64, now: Instant) -> ClusterCounts {
        let members = lock(&self.members);
        let live = members
            .values()
            .filter(|m| now.saturating_duration_since(m.seen) < self.expiry);
        let mut counts = ClusterCounts {
            instances: 1,
            sessions,
            user_sessions: users,
        };
        for m in live {
            // Counts come from peers: summed without ever overflowing.
            counts.instances = counts.instances.saturating_add(1);
            counts.sessions = counts.sessions.saturating_add(m.sessions);
            counts.user_sessions = counts.user_sessions.saturating_add(m.users);
        }
        counts
    }

    /// True the first time `id` is seen (within [`SEEN_FOR`]).
    pub(crate) fn first_time(&self, id: &str, now: Instant) -> bool {
        let mut seen = lock(&self.seen);
        while let Some((at, old)) = seen.order.front() {
            if now.saturating_duration_since(*at) < SEEN_FOR && seen.order.len() < MAX_SEEN {
                break;
            }
            let old = old.clone();
            seen.ids.remove(&old);
            seen.order.pop_front();
        }
        if !seen.ids.insert(id.to_owned()) {
            return false;
        }
        seen.order.push_back((now, id.to_owned()));
        true
    }

    /// Start waiting for acks of push `id`; `None` when too many pushes are
    /// waited for already.
    pub(crate) fn gather(&self, id: &str) -> Option<mpsc::Receiver<Ack>> {
        let mut gathers = lock(&self.gathers);
        gathers.retain(|_, tx| !tx.is_closed());
        if gathers.len() >= MAX_GATHERS {
            return None;
        }
        let (tx, rx) = mpsc::channel(MAX_MEMBERS + 1);
        gathers.insert(id.to_owned(), tx);
        Some(rx)
    }

    pub(crate) fn done(&self, id: &str) {
        lock(&self.gathers).remove(id);
    }

    /// An ack for push `id`; dropped when nobody waits for it.
    pub(crate) fn acked(&self, id: &str, ack: Ack) {
        if let Some(tx) = lock(&self.gathers).get(id) {
            let _ = tx.try_send(ack);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_and_go() {
        let c = Cluster::new("me".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        c.heard("me", 100, 100, t0);
        c.heard("a", 2, 1, t0);
        c.heard("b", 3, 2, t0);
        assert_eq!(c.others(t0).len(), 2);
        assert_eq!(
            c.counts(1, 1, t0),
            ClusterCounts {
                instances: 3,
                sessions: 6,
                user_sessions: 4
            }
        );
        c.left("a");
        assert_eq!(c.others(t0), HashSet::from(["b".to_owned()]));
        assert!(c.others(t0 + Duration::from_secs(4)).is_empty(), "expired");
    }

    #[test]
    fn counts_from_peers_saturate() {
        let c = Cluster::new("me".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        c.heard("a", u64::MAX, u64::MAX, t0);
        c.heard("b", u64::MAX, 3, t0);
        let counts = c.counts(5, 5, t0);
        assert_eq!(
            (counts.sessions, counts.user_sessions),
            (u64::MAX, u64::MAX)
        );
        assert_eq!(counts.instances, 3);
    }

    #[test]
    fn a_push_is_applied_once() {
        let c = Cluster::new("me".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        assert!(c.first_time("p1", t0));
        assert!(!c.first_time("p1", t0));
        assert!(c.first_time("p2", t0));
        assert!(c.first_time("p1", t0 + SEEN_FOR + Duration::from_secs(1)));
        for i in 0..(MAX_SEEN * 2) {
            c.first_time(&format!("x{i}"), t0);
        }
        assert!(lock(&c.seen).ids.len() <= MAX_SEEN + 1);
    }

    #[test]
    fn a_lost_instance_takes_its_sessions_with_it_and_one_instance_says_so() {
        let c = Cluster::new("b".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        c.heard("a", 2, 1, t0);
        c.heard("c", 0, 0, t0);
        let s = |sid: &str, uid: &str| (sid.to_owned(), uid.to_owned());
        c.roster("a", true, vec![s("s1", "alice"), s("s2", "alice")], vec![]);
        c.roster("a", false, vec![s("s3", "bob")], vec!["s2".into()]);
        c.roster("unknown", true, vec![s("x", "y")], vec![]);
        assert!(!c.speaks_for_the_lost(t0), "a comes first");
        // c keeps beating, a does not.
        let t1 = t0 + Duration::from_millis(1500);
        c.heard("c", 0, 0, t1);
        assert!(c.lost(t1, Duration::from_secs(2)).is_empty());
        let t2 = t0 + Duration::from_millis(2100);
        let lost = c.lost(t2, Duration::from_secs(2));
        assert_eq!(
            lost,
            vec![("a".to_owned(), vec![s("s1", "alice"), s("s3", "bob")])]
        );
        assert!(c.speaks_for_the_lost(t2), "b before c");
        assert!(c.lost(t2, Duration::from_secs(2)).is_empty(), "said once");
        // One that leaves is not lost.
        c.left("c");
        assert!(
            c.lost(t2 + Duration::from_secs(9), Duration::from_secs(2))
                .is_empty()
        );
    }

    #[tokio::test]
    async fn acks_reach_the_waiting_push_only() {
        let c = Cluster::new("me".into(), Duration::from_secs(1));
        let mut rx = c.gather("p").unwrap();
        let ack = |i: &str| Ack {
            instance: i.into(),
            count: 2,
            users: vec![],
        };
        c.acked("p", ack("a"));
        c.acked("other", ack("b"));
        assert_eq!(rx.recv().await, Some(ack("a")));
        c.done("p");
        c.acked("p", ack("c"));
        assert_eq!(rx.recv().await, None);
    }
}
