//! The registry of live WebSocket sessions, by connection and by user: send
//! to one session, to every session of some users, or to all; close the
//! same way. Each session has a bounded outbound queue; a session whose queue
//! is full when a push arrives is closed rather than allowed to grow.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::ws::Utf8Bytes;

use crate::metrics::Metrics;
use crate::outbox::{Outbox, PushError};
use crate::protocol::close;
use crate::routing::topic_matches;

/// Who is on the other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub session_id: String,
    pub user_id: String,
    pub username: Option<String>,
    pub roles: Vec<String>,
}

#[derive(Debug)]
struct Entry {
    user_id: String,
    outbox: Outbox,
    topics: HashSet<String>,
}

impl Entry {
    fn close(&self, code: u16, reason: &str) {
        self.outbox.close(code, reason);
    }

    /// Queue a frame without waiting; a full queue closes the session.
    fn push(&self, frame: &Utf8Bytes, metrics: Option<&Metrics>) -> bool {
        match self.outbox.try_push(frame.clone()) {
            Ok(()) => true,
            Err(PushError::Full) => {
                tracing::warn!(user_id = %self.user_id, "outbound queue full, closing slow session");
                self.close(close::SLOW_CONSUMER, "outbound queue full");
                if let Some(m) = metrics {
                    m.slow_consumer_closed();
                }
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Entry>,
    by_user: HashMap<String, HashSet<String>>,
}

/// The registry. Cheap to clone; clones share the sessions.
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    queue_capacity: usize,
    metrics: Option<Metrics>,
}

/// Unregisters its session when dropped, so no path out of a connection
/// leaves a stale entry behind.
#[derive(Debug)]
pub(crate) struct SessionGuard {
    sessions: Sessions,
    session_id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.unregister(&self.session_id);
    }
}

/// Counts for `stats` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounts {
    pub sessions: usize,
    pub users: usize,
}

impl Sessions {
    /// `queue_capacity` bounds each session's outbound queue (frames).
    pub(crate) fn new(queue_capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            queue_capacity: queue_capacity.max(1),
            metrics: None,
        }
    }

    /// Count slow-consumer closes in these metrics.
    pub(crate) fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Add a session; it lives until the guard is dropped. The outbox is
    /// what its connection writes out.
    pub(crate) fn register(&self, info: &SessionInfo) -> (SessionGuard, Outbox) {
        let outbox = Outbox::new(self.queue_capacity);
        let entry = Entry {
            user_id: info.user_id.clone(),
            outbox: outbox.clone(),
            topics: HashSet::new(),
        };
        let mut inner = self.lock();
        inner
            .by_user
            .entry(info.user_id.clone())
            .or_default()
            .insert(info.session_id.clone());
        inner.sessions.insert(info.session_id.clone(), entry);
        drop(inner);
        (
            SessionGuard {
                sessions: self.clone(),
                session_id: info.session_id.clone(),
            },
            outbox,
        )
    }

    fn unregister(&self, session_id: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.sessions.remove(session_id)
            && let Some(set) = inner.by_user.get_mut(&entry.user_id)
        {
            set.remove(session_id);
            if set.is_empty() {
                inner.by_user.remove(&entry.user_id);
            }
        }
    }

    /// Push a frame to one session. False if it is gone or too slow.
    pub fn send_to_session(&self, session_id: &str, frame: Utf8Bytes) -> bool {
        self.lock()
            .sessions
            .get(session_id)
            .is_some_and(|e| e.push(&frame, self.metrics.as_ref()))
    }

    /// Push a frame to every session of these users; how many got it.
    pub fn send_to_users<S: AsRef<str>>(&self, user_ids: &[S], frame: Utf8Bytes) -> usize {
        let inner = self.lock();
        let mut delivered = 0;
        for user in user_ids {
            for sid in inner.by_user.get(user.as_ref()).into_iter().flatten() {
                if inner
                    .sessions
                    .get(sid)
                    .is_some_and(|e| e.push(&frame, self.metrics.as_ref()))
                {
                    delivered += 1;
                }
            }
        }
        delivered
    }

    /// Push a frame to every session.
    pub fn broadcast(&self, frame: Utf8Bytes) -> usize {
        let inner = self.lock();
        inner
            .sessions
            .values()
            .filter(|e| e.push(&frame, self.metrics.as_ref()))
            .count()
    }

    /// Push a frame to the sessions subscribed to a pattern matching `topic`.
    pub(crate) fn send_to_subscribers(&self, topic: &str, frame: Utf8Bytes) -> usize {
        let inner = self.lock();
        inner
            .sessions
            .values()
            .filter(|e| e.topics.iter().any(|p| topic_matches(p, topic)))
            .filter(|e| e.push(&frame, self.metrics.as_ref()))
            .count()
    }

    /// Add topic patterns to a session's subscriptions; the full set after.
    pub(crate) fn subscribe(&self, session_id: &str, topics: &[String]) -> Vec<String> {
        self.update_topics(session_id, |set| set.extend(topics.iter().cloned()))
    }

    pub(crate) fn unsubscribe(&self, session_id: &str, topics: &[String]) -> Vec<String> {
        self.update_topics(session_id, |set| {
            for t in topics {
                set.remove(t);
            }
        })
    }

    fn update_topics(&self, session_id: &str, f: impl FnOnce(&mut HashSet<String>)) -> Vec<String> {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get_mut(session_id) else {
            return Vec::new();
        };
        f(&mut entry.topics);
        let mut topics: Vec<String> = entry.topics.iter().cloned().collect();
        topics.sort();
        topics
    }

    pub fn close_session(&self, session_id: &str, code: u16, reason: &str) -> bool {
        self.lock()
            .sessions
            .get(session_id)
            .map(|e| e.close(code, reason))
            .is_some()
    }

    /// Close every session of these users; how many were closed.
    pub fn close_users<S: AsRef<str>>(&self, user_ids: &[S], code: u16, reason: &str) -> usize {
        let inner = self.lock();
        let mut closed = 0;
        for user in user_ids {
            for sid in inner.by_user.get(user.as_ref()).into_iter().flatten() {
                if let Some(e) = inner.sessions.get(sid) {
                    e.close(code, reason);
                    closed += 1;
                }
            }
        }
        closed
    }

    pub fn close_all(&self, code: u16, reason: &str) -> usize {
        let inner = self.lock();
        inner.sessions.values().for_each(|e| e.close(code, reason));
        inner.sessions.len()
    }

    pub fn counts(&self) -> SessionCounts {
        let inner = self.lock();
        SessionCounts {
            sessions: inner.sessions.len(),
            users: inner.by_user.len(),
        }
    }

    /// The session ids a user holds now.
    pub fn sessions_of(&self, user_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .by_user
            .get(user_id)
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(sid: &str, uid: &str) -> SessionInfo {
        SessionInfo {
            session_id: sid.into(),
            user_id: uid.into(),
            username: None,
            roles: vec![],
        }
    }

    fn drain(o: &Outbox) -> Vec<String> {
        std::iter::from_fn(|| o.try_pop())
            .map(|m| m.to_string())
            .collect()
    }

    #[test]
    fn one_user_many_sessions() {
        let s = Sessions::new(8);
        let (_g1, c1) = s.register(&info("s1", "alice"));
        let (_g2, c2) = s.register(&info("s2", "alice"));
        let (_g3, c3) = s.register(&info("s3", "bob"));
        assert_eq!(
            s.counts(),
            SessionCounts {
                sessions: 3,
                users: 2
            }
        );
        assert_eq!(s.sessions_of("alice"), vec!["s1", "s2"]);

        assert_eq!(s.send_to_users(&["alice"], "a".into()), 2);
        assert!(s.send_to_session("s3", "b".into()));
        assert_eq!(s.broadcast("all".into()), 3);
        assert_eq!(s.send_to_users(&["nobody"], "x".into()), 0);
        assert!(!s.send_to_session("nope", "x".into()));

        assert_eq!(drain(&c1), vec!["a", "all"]);
        assert_eq!(drain(&c2), vec!["a", "all"]);
        assert_eq!(drain(&c3), vec!["b", "all"]);
    }

    #[test]
    fn dropping_the_guard_unregisters() {
        let s = Sessions::new(8);
        let (g1, _c1) = s.register(&info("s1", "alice"));
        let (g2, _c2) = s.register(&info("s2", "alice"));
        drop(g1);
        assert_eq!(s.sessions_of("alice"), vec!["s2"]);
        drop(g2);
        assert_eq!(
            s.counts(),
            SessionCounts {
                sessions: 0,
                users: 0
            }
        );
    }

    #[test]
    fn close_by_session_user_and_all() {
        let s = Sessions::new(8);
        let (_g1, c1) = s.register(&info("s1", "alice"));
        let (_g2, c2) = s.register(&info("s2", "alice"));
        let (_g3, c3) = s.register(&info("s3", "bob"));
        let (_g4, c4) = s.register(&info("s4", "carol"));
        assert!(s.close_session("s4", close::DISCONNECTED, "bye"));
        assert!(c4.is_closed());
        assert_eq!(c4.close_reason().unwrap().code, close::DISCONNECTED);
        assert_eq!(s.close_users(&["alice"], close::DISCONNECTED, "bye"), 2);
        assert!(c1.is_closed() && c2.is_closed());
        assert!(!c3.is_closed());
        assert_eq!(s.close_all(close::GOING_AWAY, "shutdown"), 4);
        assert!(c3.is_closed());
        // The first reason given sticks.
        assert_eq!(c1.close_reason().unwrap().code, close::DISCONNECTED);
    }

    #[test]
    fn a_full_queue_closes_the_slow_session_and_loses_nothing_queued() {
        let s = Sessions::new(2);
        let (_g, c) = s.register(&info("s1", "u"));
        assert!(s.send_to_session("s1", "1".into()));
        assert!(s.send_to_session("s1", "2".into()));
        assert!(!s.send_to_session("s1", "3".into()));
        assert!(c.is_closed());
        assert_eq!(c.close_reason().unwrap().code, close::SLOW_CONSUMER);
        assert_eq!(drain(&c), vec!["1", "2"]);
    }

    #[test]
    fn subscriptions_select_sessions() {
        let s = Sessions::new(8);
        let (_g1, c1) = s.register(&info("s1", "u1"));
        let (_g2, c2) = s.register(&info("s2", "u2"));
        assert_eq!(
            s.subscribe("s1", &["orders.*".into(), "news.#".into()]),
            vec!["news.#", "orders.*"]
        );
        assert_eq!(s.send_to_subscribers("orders.created", "o".into()), 1);
        assert_eq!(s.unsubscribe("s1", &["orders.*".into()]), vec!["news.#"]);
        assert_eq!(s.send_to_subscribers("orders.created", "o2".into()), 0);
        assert_eq!(drain(&c1), vec!["o"]);
        assert!(drain(&c2).is_empty());
    }
}
