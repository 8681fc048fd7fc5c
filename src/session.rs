//! The registry of live WebSocket sessions, by connection and by user: send
//! to one session, to every session of some users, to subscribers, or to
//! all; close the same way. Each session has a bounded outbound queue; a
//! session whose queue is full when a push arrives is closed rather than
//! allowed to grow.
//!
//! Admission is counted here too: a socket reserves its place (in all, and
//! per user) before the WebSocket upgrade, so caps hold under a burst of
//! concurrent handshakes.
//!
//! The registry lock is held only to find sessions; matching a topic
//! against a session's subscriptions and queueing frames happen after it is
//! released, under that session's own lock, so no client's input makes
//! another client's delivery wait.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use compact_str::CompactString;
use smallvec::SmallVec;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frame::Encoded;
use crate::metrics::Metrics;
use crate::outbox::{Liveness, Outbox, PushError};
use crate::protocol::{SessionInfo, close};
use crate::spread::spread;
use crate::topic;
use crate::watch::Watch;

/// A session or user id as the registry keeps it: one allocation that
/// its maps and the session's guard share, not a copy each.
type Id = Arc<str>;

#[derive(Debug)]
struct Entry {
    session_id: Id,
    user_id: Id,
    outbox: Outbox,
    state: Mutex<EntryState>,
}

/// What changes over a session's life: who it is (re-authentication
/// changes its roles) and its subscriptions.
#[derive(Debug)]
struct EntryState {
    /// The connection's own, shared: the registry copies nothing of it.
    info: Arc<SessionInfo>,
    /// Events at or before this log position are not sent (the client has
    /// them: it resumed after it).
    seen_through: Option<u64>,
    /// While a resume replays: live events wait here, in order, to follow
    /// the replay.
    held: Option<Box<Held>>,
    /// Sorted, without duplicates; at most the subscription cap.
    topics: Patterns,
}

/// A session's topic patterns. Inline: a fan-out matches each subscribed
/// session's patterns, and the usual session has one pattern of at most
/// 24 bytes, read here with the session's state, not behind two pointers
/// (the list's buffer, then the string's), each a cache miss per session
/// of a 10,000-session fan-out.
type Patterns = SmallVec<[CompactString; 1]>;

impl Entry {
    fn state(&self) -> MutexGuard<'_, EntryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self, code: u16, reason: &str) {
        self.outbox.close(code, reason);
    }

    /// Queue a frame without waiting (written at once when the stream is
    /// free); a full queue closes the session. With `encoded`, one frame
    /// of a fan-out, written from its encoding shared by all.
    fn push(
        &self,
        frame: &Utf8Bytes,
        metrics: Option<&Metrics>,
        encoded: Option<&Encoded>,
    ) -> bool {
        let pushed = match encoded {
            Some(encoded) => self.outbox.push_encoded(frame, encoded),
            None => self.outbox.try_push(frame.clone()),
        };
        match pushed {
            Ok(()) => true,
            Err(PushError::Full) => {
                if self
                    .outbox
                    .close(close::SLOW_CONSUMER, "outbound queue full")
                {
                    tracing::debug!(user_id = %self.user_id, "outbound queue full, closing slow session");
                    if let Some(m) = metrics {
                        m.slow_consumer_closed();
                    }
                }
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

/// One frame on its way to many sessions ([`Sessions::fan_out_event`],
/// [`Sessions::fan_out_to_users`], [`Sessions::fan_out_to_all`]): who may
/// get it was found under the registry's lock (and the caller's, such as
/// the event window's); [`Fanout::run`] picks and writes off them, each
/// session under its own lock, spread over the runtime's workers.
#[derive(Debug)]
pub(crate) struct Fanout {
    entries: Vec<Arc<Entry>>,
    pick: Pick,
}

/// What each session of a fan-out is given, and by what rule.
#[derive(Debug)]
struct Pick {
    frame: Utf8Bytes,
    /// The frame on the wire, encoded once for all (when there are several).
    encoded: Option<Encoded>,
    /// A mesh event's rule; `None` for a push to every session listed.
    event: Option<EventRule>,
    /// What a resuming session holds back at most ([`Sessions`]' limits).
    held_bytes: usize,
    held_frames: usize,
    metrics: Option<Metrics>,
}

/// Who a mesh event goes to among the sessions listed, and where it is in
/// the event log.
#[derive(Debug)]
struct EventRule {
    topic: Box<str>,
    subscribers: bool,
    roles: Vec<String>,
    position: Option<u64>,
}

impl Fanout {
    /// Give the frame to every session the rule picks; how many got it.
    /// Each session's check and push are one step under its lock, so a
    /// resume that begins (and takes that lock to hold live events back)
    /// comes wholly before or wholly after this event's push to it.
    pub(crate) async fn run(mut self) -> usize {
        if self.entries.len() > 1 {
            self.pick.encoded = Some(Encoded::text(self.pick.frame.clone()));
        }
        spread(self.entries, self.pick, Pick::give).await
    }
}

impl Pick {
    /// Give one session the frame when the rule picks it: whether it got
    /// it (queued, written, or held for after its resume's replay).
    fn give(&self, e: &Arc<Entry>) -> bool {
        let encoded = self.encoded.as_ref();
        let Some(rule) = &self.event else {
            return e.push(&self.frame, self.metrics.as_ref(), encoded);
        };
        let mut state = e.state();
        let allowed =
            rule.roles.is_empty() || rule.roles.iter().any(|r| state.info.roles.contains(r));
        if !allowed
            || (rule.subscribers && !state.topics.iter().any(|p| topic::matches(p, &rule.topic)))
        {
            return false;
        }
        if let (Some(p), Some(seen)) = (rule.position, state.seen_through)
            && p <= seen
        {
            return false;
        }
        if let Some(held) = state.held.as_mut() {
            held.bytes += self.frame.len();
            held.frames.push(self.frame.clone());
            if held.bytes > self.held_bytes || held.frames.len() > self.held_frames {
                state.held = None;
                drop(state);
                e.close(close::SLOW_CONSUMER, "outbound queue full");
                if let Some(m) = &self.metrics {
                    m.slow_consumer_closed();
                }
                return false;
            }
            return true;
        }
        // Still under the session's lock (see `Fanout::run`).
        let pushed = e.push(&self.frame, self.metrics.as_ref(), encoded);
        drop(state);
        pushed
    }
}

/// Live events held back while a resume replays what came before them.
#[derive(Debug, Default)]
struct Held {
    frames: Vec<Utf8Bytes>,
    bytes: usize,
}

#[derive(Debug, Default)]
struct UserEntry {
    /// A few at most (`max_connections_per_user`): a list, exactly as long
    /// as it has to be, costs less than a set.
    sessions: Vec<Id>,
    /// Sockets of this user between admission and registration.
    pending: usize,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<Id, Arc<Entry>>,
    by_user: HashMap<Id, UserEntry>,
    /// Sessions with at least one subscription.
    subscribed: HashMap<Id, Arc<Entry>>,
    /// Sockets admitted but not registered yet.
    pending: usize,
    /// Whom the keepalive looks at, tick by tick.
    watch: Watch<Id>,
}

impl Inner {
    fn user_count(&self, user: &str) -> usize {
        self.by_user
            .get(user)
            .map_or(0, |u| u.sessions.len() + u.pending)
    }

    fn release(&mut self, user: Option<&str>) {
        self.pending = self.pending.saturating_sub(1);
        if let Some(user) = user
            && let Some(u) = self.by_user.get_mut(user)
        {
            u.pending = u.pending.saturating_sub(1);
            if u.pending == 0 && u.sessions.is_empty() {
                self.by_user.remove(user);
            }
        }
    }

    fn unregister(&mut self, session_id: &str) {
        self.subscribed.remove(session_id);
        self.watch.remove(session_id);
        if let Some(entry) = self.sessions.remove(session_id)
            && let Some(u) = self.by_user.get_mut(&entry.user_id)
        {
            u.sessions.retain(|s| &**s != session_id);
            if u.sessions.is_empty() && u.pending == 0 {
                self.by_user.remove(&entry.user_id);
            }
        }
    }

    /// The registry's copy of `user`, shared when it has one already.
    fn user_id(&self, user: &str) -> Id {
        self.by_user
            .get_key_value(user)
            .map_or_else(|| Id::from(user), |(k, _)| k.clone())
    }
}

/// What one keepalive tick did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    pub(crate) pinged: usize,
    pub(crate) dead: usize,
    pub(crate) expired: usize,
}

/// The registry. Cheap to clone; clones share the sessions.
#[derive(Debug, Clone)]
pub struct Sessions {
    inner: Arc<Mutex<Inner>>,
    queue_capacity: usize,
    /// Bytes each session's outbound queue holds at most.
    queue_bytes: usize,
    /// Sockets upgraded without a token, not authenticated yet.
    waiting_for_auth: Arc<AtomicUsize>,
    metrics: Option<Metrics>,
}

/// Unregisters its session when dropped, so no path out of a connection
/// leaves a stale entry behind.
#[derive(Debug)]
pub(crate) struct SessionGuard {
    inner: Arc<Mutex<Inner>>,
    session_id: Id,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.unregister(&self.session_id);
    }
}

/// Counts for `stats` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCounts {
    pub sessions: usize,
    pub users: usize,
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Crowded {
    /// `max_connections` sockets are open.
    Total(usize),
    /// This user has `max_connections_per_user` sockets open.
    User(usize),
}

/// How many sockets may be open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caps {
    pub(crate) total: usize,
    pub(crate) per_user: usize,
}

/// A socket's place, held from before the upgrade until its session is
/// registered (or the socket goes away first).
#[derive(Debug)]
pub(crate) struct Admission {
    sessions: Sessions,
    user: Option<String>,
    released: bool,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if !self.released {
            self.sessions.lock().release(self.user.as_deref());
        }
    }
}

/// A socket's place among those waiting to authenticate: before it has, a
/// socket costs its buffers and a task, and any client can open one, so
/// their number is capped (`limits.max_unauthenticated`).
#[derive(Debug)]
pub(crate) struct AuthWait(Arc<AtomicUsize>);

impl Drop for AuthWait {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a subscription change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SubscribeError {
    /// The session would hold more than the cap.
    TooMany(usize),
}

impl Sessions {
    /// `queue_capacity` bounds each session's outbound queue (frames).
    pub(crate) fn new(queue_capacity: usize) -> Self {
        Self {
            inner: Arc::default(),
            queue_capacity: queue_capacity.max(1),
            queue_bytes: usize::MAX,
            waiting_for_auth: Arc::default(),
            metrics: None,
        }
    }

    /// A place among the sockets waiting to authenticate, if fewer than
    /// `cap` wait: held until the socket has authenticated or gone.
    pub(crate) fn wait_for_auth(&self, cap: usize) -> Option<AuthWait> {
        self.waiting_for_auth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(AuthWait(self.waiting_for_auth.clone()))
    }

    /// Bound each session's outbound queue in bytes as well.
    pub(crate) fn with_queue_bytes(mut self, bytes: usize) -> Self {
        self.queue_bytes = bytes.max(1);
        self
    }

    /// Count slow-consumer closes in these metrics.
    pub(crate) fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserve a place for a new socket, of `user` when the handshake
    /// already named one.
    pub(crate) fn admit(&self, user: Option<&str>, caps: Caps) -> Result<Admission, Crowded> {
        let mut inner = self.lock();
        if inner.sessions.len() + inner.pending >= caps.total {
            return Err(Crowded::Total(caps.total));
        }
        if let Some(user) = user {
            if inner.user_count(user) >= caps.per_user {
                return Err(Crowded::User(caps.per_user));
            }
            let key = inner.user_id(user);
            inner.by_user.entry(key).or_default().pending += 1;
        }
        inner.pending += 1;
        Ok(Admission {
            sessions: self.clone(),
            user: user.map(str::to_owned),
            released: false,
        })
    }

    /// Add a session in the place `admission` holds; it lives until the
    /// guard is dropped. A socket admitted before it named its user is
    /// counted against that user now. The outbox is what its connection
    /// writes out; its token expires at `expires_at` (Unix seconds;
    /// `None`: never).
    pub(crate) fn register(
        &self,
        mut admission: Admission,
        info: &Arc<SessionInfo>,
        caps: Caps,
        outbox: &Outbox,
        expires_at: Option<u64>,
    ) -> Result<SessionGuard, Crowded> {
        let mut inner = self.lock();
        let counted_as = admission.user.as_deref();
        if counted_as != Some(info.user_id.as_str()) {
            let others = inner.user_count(&info.user_id);
            if others >= caps.per_user {
                // The admission releases its place when dropped, which
                // takes the lock: let go of it first.
                drop(inner);
                return Err(Crowded::User(caps.per_user));
            }
        }
        inner.release(counted_as);
        admission.released = true;
        let session_id = Id::from(info.session_id.as_str());
        let user_id = inner.user_id(&info.user_id);
        let entry = Arc::new(Entry {
            session_id: session_id.clone(),
            user_id: user_id.clone(),
            outbox: outbox.clone(),
            state: Mutex::new(EntryState {
                info: Arc::clone(info),
                seen_through: None,
                held: None,
                topics: Patterns::new(),
            }),
        });
        let user = inner.by_user.entry(user_id).or_default();
        user.sessions.reserve_exact(1);
        user.sessions.push(session_id.clone());
        inner.watch.insert(session_id.clone(), expires_at);
        inner.sessions.insert(session_id.clone(), entry);
        drop(inner);
        Ok(SessionGuard {
            inner: self.inner.clone(),
            session_id,
        })
    }

    /// The outbox of a client on `stream`, bounded as this registry's
    /// sessions are.
    pub(crate) fn outbox_on(&self, stream: tokio::net::TcpStream) -> Outbox {
        Outbox::on_stream(stream, self.queue_capacity, self.queue_bytes)
    }

    /// Push a frame (the JSON text a client receives) to one session.
    /// False if it is gone or too slow.
    pub fn send_to_session(&self, session_id: &str, frame: Utf8Bytes) -> bool {
        let entry = self.lock().sessions.get(session_id).cloned();
        entry.is_some_and(|e| e.push(&frame, self.metrics.as_ref(), None))
    }

    /// The sessions of these users (each once, however often a user is
    /// named).
    fn of_users<S: AsRef<str>>(&self, user_ids: &[S]) -> Vec<Arc<Entry>> {
        let inner = self.lock();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for user in user_ids {
            let Some(u) = inner.by_user.get(user.as_ref()) else {
                continue;
            };
            if !seen.insert(user.as_ref()) {
                continue;
            }
            out.extend(
                u.sessions
                    .iter()
                    .filter_map(|s| inner.sessions.get(s))
                    .cloned(),
            );
        }
        out
    }

    fn push_all(&self, entries: &[Arc<Entry>], frame: &Utf8Bytes) -> usize {
        entries
            .iter()
            .filter(|e| e.push(frame, self.metrics.as_ref(), None))
            .count()
    }

    /// Push a frame to every session of these users; how many got it.
    pub fn send_to_users<S: AsRef<str>>(&self, user_ids: &[S], frame: Utf8Bytes) -> usize {
        self.push_all(&self.of_users(user_ids), &frame)
    }

    /// Push a frame to every session.
    pub fn broadcast(&self, frame: Utf8Bytes) -> usize {
        self.push_all(&self.everyone(), &frame)
    }

    /// [`Sessions::send_to_users`] as a fan-out, to run off the caller's
    /// locks ([`Fanout::run`]).
    pub(crate) fn fan_out_to_users<S: AsRef<str>>(
        &self,
        user_ids: &[S],
        frame: Utf8Bytes,
    ) -> Fanout {
        self.fanout(self.of_users(user_ids), frame, None)
    }

    /// [`Sessions::broadcast`] as a fan-out ([`Fanout::run`]).
    pub(crate) fn fan_out_to_all(&self, frame: Utf8Bytes) -> Fanout {
        self.fanout(self.everyone(), frame, None)
    }

    fn everyone(&self) -> Vec<Arc<Entry>> {
        self.lock().sessions.values().cloned().collect()
    }

    fn fanout(
        &self,
        entries: Vec<Arc<Entry>>,
        frame: Utf8Bytes,
        event: Option<EventRule>,
    ) -> Fanout {
        Fanout {
            entries,
            pick: Pick {
                frame,
                encoded: None,
                event,
                held_bytes: self.queue_bytes,
                held_frames: self.queue_capacity * 4,
                metrics: self.metrics.clone(),
            },
        }
    }

    /// A mesh event as a fan-out: to the sessions of `target` users when
    /// the event names any (else to all), only to those subscribed to a
    /// pattern matching `topic` when `subscribers`, and only to sessions
    /// holding one of `roles` (when there are any). `position` is its place
    /// in the event log: a session that has it already is skipped, one
    /// that is resuming holds it until its replay is done. Who may get it
    /// is found now (under the caller's lock, the event window's); who
    /// does, and the writes, when the caller runs it ([`Fanout::run`]),
    /// off that lock.
    pub(crate) fn fan_out_event(
        &self,
        topic: &str,
        target: Option<&[String]>,
        subscribers: bool,
        roles: &[String],
        frame: Utf8Bytes,
        position: Option<u64>,
    ) -> Fanout {
        let candidates: Vec<Arc<Entry>> = match target {
            Some(users) => self.of_users(users),
            None if subscribers => self.lock().subscribed.values().cloned().collect(),
            None => self.lock().sessions.values().cloned().collect(),
        };
        let rule = EventRule {
            topic: topic.into(),
            subscribers,
            roles: roles.to_vec(),
            position,
        };
        self.fanout(candidates, frame, Some(rule))
    }

    /// Every session now: its id and its user's.
    pub(crate) fn all(&self) -> Vec<(String, String)> {
        self.lock()
            .sessions
            .iter()
            .map(|(sid, e)| (sid.to_string(), e.user_id.to_string()))
            .collect()
    }

    /// Who a session is now.
    pub(crate) fn info(&self, session_id: &str) -> Option<Arc<SessionInfo>> {
        let entry = self.lock().sessions.get(session_id).cloned()?;
        let info = Arc::clone(&entry.state().info);
        Some(info)
    }

    /// Start a resume: live events for the session are held back from now
    /// on (until [`Sessions::release`]), and none at or before
    /// `seen_through` is sent. False if the session is gone or already
    /// resuming.
    pub(crate) fn hold(&self, session_id: &str, seen_through: u64) -> bool {
        let entry = self.lock().sessions.get(session_id).cloned();
        let Some(entry) = entry else {
            return false;
        };
        let mut state = entry.state();
        if state.held.is_some() {
            return false;
        }
        state.held = Some(Box::default());
        state.seen_through = Some(
            state
                .seen_through
                .map_or(seen_through, |s| s.max(seen_through)),
        );
        true
    }

    /// The live events held back so far, taken out (the session stays
    /// held): a replay queues them at the reader's pace before it ends.
    pub(crate) fn take_held(&self, session_id: &str) -> Vec<Utf8Bytes> {
        let entry = self.lock().sessions.get(session_id).cloned();
        let Some(entry) = entry else {
            return Vec::new();
        };
        let mut state = entry.state();
        match state.held.as_mut() {
            Some(held) => {
                held.bytes = 0;
                std::mem::take(&mut held.frames)
            }
            None => Vec::new(),
        }
    }

    /// End a resume: the live events held back are queued, in order, after
    /// what the replay queued (a full queue closes the session, as any).
    pub(crate) fn release(&self, session_id: &str) {
        let entry = self.lock().sessions.get(session_id).cloned();
        let Some(entry) = entry else {
            return;
        };
        // Under the session's lock: a live event that comes meanwhile
        // waits for it, and so follows the held ones.
        let mut state = entry.state();
        let held = state.held.take();
        for frame in held.map(|h| h.frames).unwrap_or_default() {
            if !entry.push(&frame, self.metrics.as_ref(), None) {
                break;
            }
        }
    }

    /// Queue one frame of a replay for a session, waiting (up to `patience`
    /// without progress) while its queue is full: a replay goes at the
    /// reader's pace. False if the session is gone, closed, or read nothing
    /// for that long (it is then closed as a slow consumer).
    pub(crate) async fn push_paced(
        &self,
        session_id: &str,
        frame: Utf8Bytes,
        patience: std::time::Duration,
    ) -> bool {
        let entry = self.lock().sessions.get(session_id).cloned();
        let Some(entry) = entry else {
            return false;
        };
        let deadline = tokio::time::Instant::now() + patience;
        let mut frame = frame;
        loop {
            match entry.outbox.try_push_keep(frame) {
                Ok(()) => return true,
                Err((PushError::Full, back)) => frame = back,
                Err((PushError::Closed, _)) => return false,
            }
            if tokio::time::Instant::now() >= deadline {
                entry.close(close::SLOW_CONSUMER, "outbound queue full");
                if let Some(m) = &self.metrics {
                    m.slow_consumer_closed();
                }
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// A session's subscriptions now, sorted.
    #[cfg(test)]
    fn topics(&self, session_id: &str) -> Vec<String> {
        let entry = self.lock().sessions.get(session_id).cloned();
        entry.map_or_else(Vec::new, |e| {
            e.state().topics.iter().map(|t| t.to_string()).collect()
        })
    }

    /// Add topic patterns to a session's subscriptions, all or none: the
    /// full set after, or an error when it would pass `max`.
    pub(crate) fn subscribe(
        &self,
        session_id: &str,
        topics: &[String],
        max: usize,
    ) -> Result<Vec<String>, SubscribeError> {
        self.update_topics(session_id, |set| {
            let new: HashSet<&str> = topics
                .iter()
                .map(String::as_str)
                .filter(|t| set.binary_search_by(|s| (**s).cmp(t)).is_err())
                .collect();
            if set.len() + new.len() > max {
                return Err(SubscribeError::TooMany(max));
            }
            set.extend(new.into_iter().map(CompactString::from));
            set.sort_unstable();
            Ok(())
        })
    }

    pub(crate) fn unsubscribe(&self, session_id: &str, topics: &[String]) -> Vec<String> {
        self.update_topics(session_id, |set| {
            set.retain(|s| !topics.iter().any(|t| **s == **t));
            Ok(())
        })
        .unwrap_or_default()
    }

    /// Replace who a session is (re-authentication: new roles) and keep
    /// only the subscriptions `still_allowed` under the new roles: the ones
    /// dropped.
    pub(crate) fn set_info(
        &self,
        info: &Arc<SessionInfo>,
        still_allowed: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        let entry = self.lock().sessions.get(info.session_id.as_str()).cloned();
        let Some(entry) = entry else {
            return Vec::new();
        };
        entry.state().info = Arc::clone(info);
        self.prune(&info.session_id, &entry, |_, t| still_allowed(t))
    }

    /// Keep, in every session, only the subscriptions `allowed` (given the
    /// session's roles) still lets through: a new routing table. Each
    /// session that lost some, with what it lost.
    pub(crate) fn retain_subscriptions(
        &self,
        allowed: impl Fn(&[String], &str) -> bool,
    ) -> Vec<(String, Vec<String>)> {
        let subscribed: Vec<(String, Arc<Entry>)> = self
            .lock()
            .subscribed
            .iter()
            .map(|(id, e)| (id.to_string(), Arc::clone(e)))
            .collect();
        subscribed
            .into_iter()
            .filter_map(|(id, entry)| {
                let dropped = self.prune(&id, &entry, &allowed);
                (!dropped.is_empty()).then_some((id, dropped))
            })
            .collect()
    }

    /// Drop the subscriptions of one session that `allowed` refuses; the
    /// ones dropped, in order.
    fn prune(
        &self,
        session_id: &str,
        entry: &Arc<Entry>,
        allowed: impl Fn(&[String], &str) -> bool,
    ) -> Vec<String> {
        // The registry's lock first, then the session's, as everywhere.
        let mut inner = self.lock();
        if !inner
            .sessions
            .get(session_id)
            .is_some_and(|e| Arc::ptr_eq(e, entry))
        {
            return Vec::new();
        }
        let mut state = entry.state();
        let info = Arc::clone(&state.info);
        let mut dropped = Vec::new();
        state.topics.retain(|t| {
            let keep = allowed(&info.roles, t);
            if !keep {
                dropped.push(t.to_string());
            }
            keep
        });
        if state.topics.is_empty() {
            inner.subscribed.remove(session_id);
        }
        dropped
    }

    fn update_topics(
        &self,
        session_id: &str,
        f: impl FnOnce(&mut Patterns) -> Result<(), SubscribeError>,
    ) -> Result<Vec<String>, SubscribeError> {
        let mut inner = self.lock();
        let Some(entry) = inner.sessions.get(session_id).cloned() else {
            return Ok(Vec::new());
        };
        let mut state = entry.state();
        f(&mut state.topics)?;
        if state.topics.is_empty() {
            inner.subscribed.remove(session_id);
        } else {
            inner
                .subscribed
                .insert(entry.session_id.clone(), Arc::clone(&entry));
        }
        if state.topics.capacity() > 2 * state.topics.len() + 4 {
            state.topics.shrink_to_fit();
        }
        Ok(state.topics.iter().map(|t| t.to_string()).collect())
    }

    pub fn close_session(&self, session_id: &str, code: u16, reason: &str) -> bool {
        let entry = self.lock().sessions.get(session_id).cloned();
        entry.map(|e| e.close(code, reason)).is_some()
    }

    /// Close every session of these users; how many were closed.
    pub fn close_users<S: AsRef<str>>(&self, user_ids: &[S], code: u16, reason: &str) -> usize {
        let entries = self.of_users(user_ids);
        entries.iter().for_each(|e| e.close(code, reason));
        entries.len()
    }

    /// The session's token now expires at `exp` (Unix seconds; `None`:
    /// never): a new token.
    pub(crate) fn set_expiry(&self, session_id: &str, exp: Option<u64>) {
        self.lock().watch.set_expiry(session_id, exp);
    }

    /// One keepalive tick (`keepalive`): close every session whose token
    /// has expired by `now` (Unix seconds); of the sessions in `bucket` of
    /// `buckets` (a round of `buckets` ticks looks at each once), close
    /// those that left `max_missed` pings unanswered and ping the others.
    /// The registry is locked only to pick them ([`Watch`]: the tick's
    /// share and the expired, not every session); they are closed and
    /// pinged after.
    pub(crate) fn sweep(&self, bucket: u64, buckets: u64, now: u64, max_missed: u8) -> Swept {
        let (expired, due) = {
            let mut inner = self.lock();
            let outbox = |inner: &Inner, id: &Id| inner.sessions.get(id).map(|e| e.outbox.clone());
            let expired: Vec<Outbox> = inner
                .watch
                .expired(now)
                .iter()
                .filter_map(|id| outbox(&inner, id))
                .collect();
            let due: Vec<Outbox> = inner
                .watch
                .due(bucket, buckets)
                .filter_map(|id| outbox(&inner, id))
                .collect();
            (expired, due)
        };
        let mut swept = Swept::default();
        for outbox in expired {
            if outbox.close(close::TOKEN_EXPIRED, "token expired") {
                swept.expired += 1;
            }
        }
        for outbox in due.iter().filter(|o| !o.is_closed()) {
            match outbox.keepalive(max_missed) {
                Liveness::New => {}
                Liveness::Pinged => swept.pinged += 1,
                Liveness::Dead => {
                    if outbox.close(close::NO_PONG, "no pong") {
                        swept.dead += 1;
                        if let Some(m) = &self.metrics {
                            m.dead_socket_closed();
                        }
                    }
                }
            }
        }
        swept
    }

    pub fn close_all(&self, code: u16, reason: &str) -> usize {
        let all: Vec<Arc<Entry>> = self.lock().sessions.values().cloned().collect();
        all.iter().for_each(|e| e.close(code, reason));
        all.len()
    }

    pub fn counts(&self) -> SessionCounts {
        let inner = self.lock();
        SessionCounts {
            sessions: inner.sessions.len(),
            users: inner
                .by_user
                .values()
                .filter(|u| !u.sessions.is_empty())
                .count(),
        }
    }

    /// The session ids a user holds now.
    pub fn sessions_of(&self, user_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .by_user
            .get(user_id)
            .map(|u| u.sessions.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CAPS: Caps = Caps {
        total: 100,
        per_user: 10,
    };

    fn info_with(sid: &str, uid: &str, roles: &[&str]) -> Arc<SessionInfo> {
        Arc::new(SessionInfo {
            session_id: sid.into(),
            user_id: uid.into(),
            username: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
        })
    }

    fn info(sid: &str, uid: &str) -> Arc<SessionInfo> {
        info_with(sid, uid, &[])
    }

    impl Sessions {
        /// An outbox bounded as this registry's, with no stream.
        fn test_outbox(&self) -> Outbox {
            Outbox::with_bytes(self.queue_capacity, self.queue_bytes)
        }
    }

    fn add(s: &Sessions, sid: &str, uid: &str) -> (SessionGuard, Outbox) {
        let a = s.admit(Some(uid), CAPS).unwrap();
        let o = s.test_outbox();
        (s.register(a, &info(sid, uid), CAPS, &o, None).unwrap(), o)
    }

    fn drain(o: &Outbox) -> Vec<String> {
        std::iter::from_fn(|| o.try_pop())
            .map(|m| m.to_string())
            .collect()
    }

    #[test]
    fn a_keepalive_round_pings_each_session_once_and_closes_the_dead_and_expired() {
        let s = Sessions::new(8);
        let sessions: Vec<(SessionGuard, Outbox)> = (0..40)
            .map(|i| {
                add(
                    &s,
                    &uuid::Uuid::new_v4().simple().to_string(),
                    &format!("u{i}"),
                )
            })
            .collect();
        let sid = |i: usize| sessions[i].0.session_id.to_string();
        s.set_expiry(&sid(0), Some(1_000));
        s.set_expiry(&sid(1), Some(2_000));
        let buckets = 4;
        // The first round looks at each session and pings none.
        let first: usize = (0..buckets).map(|b| s.sweep(b, buckets, 0, 2).pinged).sum();
        assert_eq!(first, 0);
        let mut pinged = 0;
        for bucket in 0..buckets {
            let swept = s.sweep(bucket, buckets, 1_500, 2);
            pinged += swept.pinged;
            assert_eq!(swept.expired, usize::from(bucket == 0), "expired once");
            assert_eq!(swept.dead, 0);
        }
        assert_eq!(pinged, 39, "all but the expired one, once each");
        assert_eq!(
            sessions[0].1.close_reason().map(|r| r.code),
            Some(close::TOKEN_EXPIRED)
        );
        assert!(sessions[1].1.close_reason().is_none());
        // A client that answers stays; one that does not is closed in the
        // round after its second ping.
        sessions[2].1.heard();
        let second: usize = (0..buckets)
            .map(|b| s.sweep(b, buckets, 1_500, 2).pinged)
            .sum();
        assert_eq!(second, 39);
        sessions[2].1.heard();
        let dead: usize = (0..buckets)
            .map(|b| s.sweep(b, buckets, 1_500, 2).dead)
            .sum();
        assert_eq!(dead, 38, "every silent session, and not the one heard");
        assert!(sessions[2].1.close_reason().is_none());
        assert_eq!(
            sessions[3].1.close_reason().map(|r| r.code),
            Some(close::NO_PONG)
        );
        // A new token moves the expiry: not closed at the old one, closed
        // at the new one.
        s.set_expiry(&sid(2), Some(2_000));
        s.set_expiry(&sid(2), Some(3_000));
        let expired = |now| -> usize {
            (0..buckets)
                .map(|b| s.sweep(b, buckets, now, 9).expired)
                .sum()
        };
        // (Session 1's token expired at 2,000, but it was closed as dead.)
        assert_eq!(expired(2_500), 0);
        assert!(sessions[2].1.close_reason().is_none());
        assert_eq!(expired(3_000), 1);
        assert_eq!(
            sessions[2].1.close_reason().map(|r| r.code),
            Some(close::TOKEN_EXPIRED)
        );
    }

    #[test]
    fn one_user_many_sessions() {
        let s = Sessions::new(8);
        let (_g1, c1) = add(&s, "s1", "alice");
        let (_g2, c2) = add(&s, "s2", "alice");
        let (_g3, c3) = add(&s, "s3", "bob");
        assert_eq!(
            s.counts(),
            SessionCounts {
                sessions: 3,
                users: 2
            }
        );
        assert_eq!(s.sessions_of("alice"), vec!["s1", "s2"]);

        assert_eq!(s.send_to_users(&["alice", "alice"], "a".into()), 2);
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
        let (g1, _c1) = add(&s, "s1", "alice");
        let (g2, _c2) = add(&s, "s2", "alice");
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
        assert!(s.lock().by_user.is_empty());
    }

    #[test]
    fn close_by_session_user_and_all() {
        let s = Sessions::new(8);
        let (_g1, c1) = add(&s, "s1", "alice");
        let (_g2, c2) = add(&s, "s2", "alice");
        let (_g3, c3) = add(&s, "s3", "bob");
        let (_g4, c4) = add(&s, "s4", "carol");
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
        let (_g, c) = add(&s, "s1", "u");
        assert!(s.send_to_session("s1", "1".into()));
        assert!(s.send_to_session("s1", "2".into()));
        assert!(!s.send_to_session("s1", "3".into()));
        assert!(c.is_closed());
        assert_eq!(c.close_reason().unwrap().code, close::SLOW_CONSUMER);
        assert_eq!(drain(&c), vec!["1", "2"]);
    }

    /// Run a fan-out here and now (outside a multi-threaded runtime it is
    /// worked through inline, without waiting).
    fn now(fanout: Fanout) -> usize {
        futures_util::FutureExt::now_or_never(fanout.run()).expect("an inline fan-out")
    }

    #[test]
    fn subscriptions_select_sessions_and_are_capped() {
        let s = Sessions::new(8);
        let (_g1, c1) = add(&s, "s1", "u1");
        let (_g2, c2) = add(&s, "s2", "u2");
        assert_eq!(
            s.subscribe("s1", &["orders.*".into(), "news.#".into()], 3),
            Ok(vec!["news.#".to_owned(), "orders.*".to_owned()])
        );
        let deliver = |t: &str, f: &str| now(s.fan_out_event(t, None, true, &[], f.into(), None));
        assert_eq!(deliver("orders.created", "o"), 1);
        assert_eq!(
            s.subscribe("s1", &["a".into(), "b".into()], 3),
            Err(SubscribeError::TooMany(3)),
            "all or nothing"
        );
        assert_eq!(s.topics("s1"), vec!["news.#", "orders.*"]);
        assert_eq!(
            s.subscribe("s1", &["news.#".into(), "a".into()], 3),
            Ok(vec!["a".into(), "news.#".into(), "orders.*".into()]),
            "a pattern held already does not count twice"
        );
        assert_eq!(
            s.unsubscribe("s1", &["orders.*".into()]),
            vec!["a", "news.#"]
        );
        assert_eq!(deliver("orders.created", "o2"), 0);
        assert_eq!(drain(&c1), vec!["o"]);
        assert!(drain(&c2).is_empty());
        s.unsubscribe("s1", &["a".into(), "news.#".into()]);
        assert!(s.lock().subscribed.is_empty());
    }

    #[test]
    fn targeted_events_never_widen() {
        let s = Sessions::new(8);
        let (_ga, ann) = add(&s, "sa", "ann");
        let (_gb, bob) = add(&s, "sb", "bob");
        s.subscribe("sa", &["orders.#".into()], 8).unwrap();
        s.subscribe("sb", &["orders.#".into()], 8).unwrap();
        let to_bob = ["bob".to_owned()];
        assert_eq!(
            now(s.fan_out_event("orders.x", Some(&to_bob), true, &[], "t".into(), None)),
            1
        );
        assert_eq!(
            now(s.fan_out_event("orders.x", Some(&to_bob), false, &[], "u".into(), None)),
            1
        );
        assert!(drain(&ann).is_empty());
        assert_eq!(drain(&bob), vec!["t", "u"]);
    }

    #[test]
    fn rule_roles_select_sessions_and_follow_reauthentication() {
        let s = Sessions::new(8);
        let (_g, c) = add(&s, "s1", "u");
        let admins = ["admin".to_owned()];
        assert_eq!(
            now(s.fan_out_event("x", None, false, &admins, "1".into(), None)),
            0
        );
        s.subscribe("s1", &["secret.#".into(), "news.#".into()], 8)
            .unwrap();
        assert!(
            s.set_info(&info_with("s1", "u", &["admin"]), |_| true)
                .is_empty()
        );
        assert_eq!(
            now(s.fan_out_event("x", None, false, &admins, "2".into(), None)),
            1
        );
        let dropped = s.set_info(&info("s1", "u"), |t| t != "secret.#");
        assert_eq!(dropped, vec!["secret.#"]);
        assert_eq!(s.topics("s1"), vec!["news.#"]);
        assert_eq!(
            now(s.fan_out_event("x", None, false, &admins, "3".into(), None)),
            0
        );
        assert_eq!(drain(&c), vec!["2"]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]

        /// Spread over two workers, a fan-out gives an event to exactly the
        /// sessions its rule picks (subscription, roles, what each has
        /// seen), once each, and a resuming session holds it for later.
        #[test]
        fn a_spread_fan_out_gives_the_event_to_whom_the_rule_picks(
            sessions in proptest::collection::vec(
                (0usize..3, proptest::bool::ANY, proptest::option::of(0u64..10)),
                crate::spread::SPREAD_FROM..crate::spread::SPREAD_FROM + 200,
            ),
            topic in 0usize..3,
            admins_only in proptest::bool::ANY,
            position in proptest::option::of(0u64..10),
        ) {
            const PATTERNS: [&str; 3] = ["a.#", "b.*", "a.x"];
            const TOPICS: [&str; 3] = ["a.x", "b.y", "a.z.w"];
            let caps = Caps { total: 4096, per_user: 4 };
            let s = Sessions::new(8);
            let mut outs = Vec::new();
            for (i, (pattern, admin, held)) in sessions.iter().enumerate() {
                let (sid, uid) = (format!("s{i}"), format!("u{i}"));
                let a = s.admit(Some(&uid), caps).unwrap();
                let o = s.test_outbox();
                let roles: &[&str] = if *admin { &["admin"] } else { &["user"] };
                let guard = s.register(a, &info_with(&sid, &uid, roles), caps, &o, None).unwrap();
                s.subscribe(&sid, &[PATTERNS[*pattern].into()], 8).unwrap();
                if let Some(through) = held {
                    assert!(s.hold(&sid, *through));
                }
                outs.push((guard, o));
            }
            let roles = if admins_only { vec!["admin".to_owned()] } else { Vec::new() };
            let fanout = s.fan_out_event(TOPICS[topic], None, true, &roles, "e".into(), position);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .build()
                .unwrap();
            let given = rt.block_on(fanout.run());
            let mut picked_in_all = 0;
            for (i, (pattern, admin, held)) in sessions.iter().enumerate() {
                let seen = matches!((position, held), (Some(p), Some(t)) if p <= *t);
                let picked = topic::matches(PATTERNS[*pattern], TOPICS[topic])
                    && (!admins_only || *admin)
                    && !seen;
                picked_in_all += usize::from(picked);
                let want = if picked { vec!["e".to_owned()] } else { Vec::new() };
                let out = &outs[i].1;
                if held.is_some() {
                    proptest::prop_assert!(drain(out).is_empty(), "{}: held back", i);
                    s.release(&format!("s{i}"));
                }
                proptest::prop_assert_eq!(drain(out), want, "session {}", i);
            }
            proptest::prop_assert_eq!(given, picked_in_all);
        }
    }

    #[tokio::test]
    async fn a_resume_that_begins_between_an_events_window_and_its_writes_gets_it_once() {
        let s = Sessions::new(8);
        let (_g, out) = add(&s, "s1", "u");
        s.subscribe("s1", &["news.#".into()], 8).unwrap();
        // Both events are in the window (who may get them found) when the
        // resume begins: its replay runs through 5, so 5 is the replay's
        // and 6 is held for after it.
        let fifth = s.fan_out_event("news.x", None, true, &[], "live 5".into(), Some(5));
        let sixth = s.fan_out_event("news.x", None, true, &[], "live 6".into(), Some(6));
        assert!(s.hold("s1", 5));
        assert_eq!(now(fifth), 0, "the replay has it");
        assert_eq!(now(sixth), 1, "held");
        assert!(drain(&out).is_empty(), "nothing live before the replay");
        assert!(
            s.push_paced("s1", "replay 5".into(), Duration::from_secs(1))
                .await
        );
        s.release("s1");
        assert_eq!(drain(&out), vec!["replay 5", "live 6"]);
    }

    #[tokio::test]
    async fn a_resume_holds_live_events_back_and_never_repeats_one() {
        let s = Sessions::new(8);
        let (_g, out) = add(&s, "s1", "u");
        s.subscribe("s1", &["news.#".into()], 8).unwrap();
        let deliver = |p: u64| {
            let frame = format!("live {p}");
            now(s.fan_out_event("news.x", None, true, &[], frame.into(), Some(p)))
        };
        assert!(s.hold("s1", 10));
        assert!(!s.hold("s1", 10), "one resume at a time");
        // At or before the replay's end: the replay has it.
        assert_eq!(deliver(9), 0);
        assert_eq!(deliver(10), 0);
        // After it: held, not queued yet.
        assert_eq!(deliver(11), 1);
        assert!(drain(&out).is_empty());
        for p in [7, 8] {
            let frame = format!("replay {p}");
            assert!(
                s.push_paced("s1", frame.into(), Duration::from_secs(1))
                    .await
            );
        }
        assert_eq!(s.take_held("s1"), vec![Utf8Bytes::from("live 11")]);
        assert_eq!(deliver(12), 1);
        s.release("s1");
        assert_eq!(deliver(13), 1);
        assert_eq!(deliver(10), 0, "still not what the replay covered");
        assert_eq!(
            drain(&out),
            vec!["replay 7", "replay 8", "live 12", "live 13"]
        );
    }

    #[tokio::test]
    async fn a_replay_nobody_reads_closes_the_session() {
        let s = Sessions::new(2);
        let (_g, out) = add(&s, "s1", "u");
        assert!(
            s.push_paced("s1", "1".into(), Duration::from_millis(50))
                .await
        );
        assert!(
            s.push_paced("s1", "2".into(), Duration::from_millis(50))
                .await
        );
        assert!(
            !s.push_paced("s1", "3".into(), Duration::from_millis(50))
                .await
        );
        assert_eq!(
            out.close_reason().map(|r| r.code),
            Some(close::SLOW_CONSUMER)
        );
        assert!(
            !s.push_paced("gone", "x".into(), Duration::from_millis(50))
                .await
        );
    }

    #[test]
    fn admission_caps_hold_before_registration() {
        let s = Sessions::new(8);
        let caps = Caps {
            total: 3,
            per_user: 2,
        };
        let a1 = s.admit(Some("ann"), caps).unwrap();
        let a2 = s.admit(Some("ann"), caps).unwrap();
        assert_eq!(s.admit(Some("ann"), caps).unwrap_err(), Crowded::User(2));
        let anon = s.admit(None, caps).unwrap();
        assert_eq!(s.admit(Some("bob"), caps).unwrap_err(), Crowded::Total(3));
        drop(a2);
        let _g1 = s
            .register(a1, &info("s1", "ann"), caps, &s.test_outbox(), None)
            .unwrap();
        // The anonymous handshake turns out to be ann's third socket.
        let a3 = s.admit(Some("ann"), caps).unwrap();
        assert_eq!(
            s.register(anon, &info("s2", "ann"), caps, &s.test_outbox(), None)
                .unwrap_err(),
            Crowded::User(2)
        );
        let _g3 = s
            .register(a3, &info("s3", "ann"), caps, &s.test_outbox(), None)
            .unwrap();
        assert_eq!(s.counts().sessions, 2);
        let inner = s.lock();
        assert_eq!(inner.pending, 0);
        assert_eq!(inner.by_user["ann"].pending, 0);
    }

    #[test]
    fn sockets_waiting_to_authenticate_are_capped() {
        let s = Sessions::new(8);
        let a = s.wait_for_auth(2).expect("first");
        let b = s.wait_for_auth(2).expect("second");
        assert!(s.wait_for_auth(2).is_none(), "over the cap");
        drop(a);
        let c = s.wait_for_auth(2).expect("a place freed");
        drop((b, c));
        assert_eq!(s.waiting_for_auth.load(Ordering::Acquire), 0);
    }
}
