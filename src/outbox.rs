//! A session's outbound queue: bounded in frames and in bytes, plus the
//! session's close signal and close reason, and its liveness (pings gone
//! unanswered, when its token expires), in one small allocation. The
//! registry and the connection both hold it: the gateway's keepalive pass
//! (`keepalive`) reads the liveness through the registry, the connection
//! writes it, and no socket needs a timer of its own.
//!
//! Why not `tokio::sync::mpsc` with a `CancellationToken`: a bounded tokio
//! channel allocates its first block of 32 slots and two cache-padded halves
//! up front, about 1.5 KiB per session, held by every idle socket. This
//! queue allocates nothing until the first frame and keeps the close signal
//! beside the frames. A fleet holds tens of thousands of idle sockets, so
//! per-socket bytes matter (see `benches/idle_sockets.rs`).
//!
//! One consumer, the connection's own task, drains it and waits for frames;
//! any number of producers fill it and none waits: a full queue is the
//! producer's to handle (the hub counts a slow consumer; the connection
//! writes before it queues more). Locks are never held across an `.await`.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Why and how a session is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CloseReason {
    pub code: u16,
    pub reason: String,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PushError {
    /// The queue holds its capacity of frames.
    Full,
    /// The session is closed.
    Closed,
}

/// A session's bounded outbound queue. Cheap to clone; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct Outbox(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The consumer's task, woken when another task queues a frame or a
    /// ping, or closes the outbox. One consumer: a waker slot, not a
    /// `Notify` (whose waiter list costs a lock and a link each time the
    /// consumer waits).
    consumer: AtomicWaker,
    /// Frames queued at most. (32-bit, as `max_bytes`: every session
    /// holds one, and they take one word together.)
    capacity: u32,
    /// Bytes queued at most (4 GiB at most); one frame larger than this is
    /// still taken into an empty queue, so no frame is undeliverable.
    max_bytes: u32,
    /// Pings sent since the client was last heard from; [`NEW`] until the
    /// keepalive first looks at the session.
    missed: AtomicU8,
    /// When the session's token expires (Unix seconds); 0 for never.
    expires_at: AtomicU64,
}

/// `missed` of a session the keepalive has not looked at yet: it is not
/// pinged in the round it opened in.
const NEW: u8 = u8::MAX;

/// What a keepalive look at a session found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    /// Its first look: pinged from the next round on.
    New,
    /// Pinged (again).
    Pinged,
    /// It left `max_missed` pings unanswered: dead.
    Dead,
}

#[derive(Debug, Default)]
struct State {
    frames: VecDeque<Utf8Bytes>,
    /// The bytes of `frames`.
    bytes: usize,
    /// Boxed: a session is closed once, and held open for its life.
    closed: Option<Box<CloseReason>>,
    /// A WebSocket ping is to be sent (a keepalive, not a queued frame).
    ping: bool,
}

/// What the connection writes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    Frame(Utf8Bytes),
    Ping,
}

impl State {
    fn pop_front(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.pop_front()?;
        self.bytes = self.bytes.saturating_sub(frame.len());
        if self.frames.is_empty() {
            // Idle again: give the queue's memory back (an idle socket
            // then holds none; the next frame allocates a few slots).
            self.frames = VecDeque::new();
        }
        Some(frame)
    }
}

impl Outbox {
    /// An empty outbox holding at most `capacity` frames (at least one).
    #[cfg(test)]
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_bytes(capacity, usize::MAX)
    }

    /// An empty outbox holding at most `capacity` frames (at least one) and
    /// `max_bytes` bytes (beyond one frame).
    pub(crate) fn with_bytes(capacity: usize, max_bytes: usize) -> Self {
        Self(Arc::new(Shared {
            state: Mutex::new(State::default()),
            consumer: AtomicWaker::new(),
            capacity: u32::try_from(capacity.max(1)).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            missed: AtomicU8::new(NEW),
            expires_at: AtomicU64::new(0),
        }))
    }

    fn capacity(&self) -> usize {
        self.0.capacity as usize
    }

    fn max_bytes(&self) -> usize {
        self.0.max_bytes as usize
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a frame without waiting, and wake the consumer.
    pub(crate) fn try_push(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        self.try_push_own(frame).map_err(|(e, _)| e)?;
        self.0.consumer.wake();
        Ok(())
    }

    /// [`Outbox::try_push`] from another task that keeps a refused frame to
    /// try again (a replay at the reader's pace).
    pub(crate) fn try_push_keep(&self, frame: Utf8Bytes) -> Result<(), (PushError, Utf8Bytes)> {
        self.try_push_own(frame)?;
        self.0.consumer.wake();
        Ok(())
    }

    /// Queue a frame from the consumer's own task, which looks at the queue
    /// before it waits again: no wake-up. (A task that wakes itself is
    /// requeued behind the others, and the runtime wakes an idle worker
    /// thread to come and take it.) A refused frame is handed back.
    pub(crate) fn try_push_own(&self, frame: Utf8Bytes) -> Result<(), (PushError, Utf8Bytes)> {
        let mut state = self.lock();
        if state.closed.is_some() {
            return Err((PushError::Closed, frame));
        }
        let over_bytes =
            !state.frames.is_empty() && state.bytes.saturating_add(frame.len()) > self.max_bytes();
        if state.frames.len() >= self.capacity() || over_bytes {
            return Err((PushError::Full, frame));
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        Ok(())
    }

    /// The next frame if one is queued (the connection batches with it).
    pub(crate) fn try_pop(&self) -> Option<Utf8Bytes> {
        self.lock().pop_front()
    }

    /// Up to `max` queued frames, handed to `each` in order under one lock
    /// (the connection writes them as one batch).
    pub(crate) fn pop_queued(&self, max: usize, mut each: impl FnMut(Utf8Bytes)) {
        let mut state = self.lock();
        for _ in 0..max {
            let Some(frame) = state.pop_front() else {
                break;
            };
            each(frame);
        }
    }

    /// Ask the connection to send a ping (at most one waits at a time).
    pub(crate) fn ping(&self) {
        {
            let mut state = self.lock();
            if state.closed.is_some() || state.ping {
                return;
            }
            state.ping = true;
        }
        self.0.consumer.wake();
    }

    /// The next frame (or ping), waiting for one; frames queued before the
    /// outbox closed are still handed out, then `None`. For the one
    /// consumer's task: a second waiter would take the first one's wake-ups.
    pub(crate) fn pop(&self) -> impl Future<Output = Option<Out>> + '_ {
        std::future::poll_fn(|cx| {
            // Registered before the look at the queue: what is queued after
            // the look wakes this task.
            self.0.consumer.register(cx.waker());
            let mut state = self.lock();
            if state.ping && state.closed.is_none() {
                state.ping = false;
                return Poll::Ready(Some(Out::Ping));
            }
            if let Some(frame) = state.pop_front() {
                return Poll::Ready(Some(Out::Frame(frame)));
            }
            if state.closed.is_some() {
                // Nothing can be queued after the close: drained for good.
                return Poll::Ready(None);
            }
            Poll::Pending
        })
    }

    /// The client was heard from (any frame answers a ping).
    pub(crate) fn heard(&self) {
        // Read first: a busy socket does not write the shared line per frame.
        if self.0.missed.load(Relaxed) != 0 {
            self.0.missed.store(0, Relaxed);
        }
    }

    /// Ping the client, unless it left `max_missed` pings unanswered (or
    /// this is the keepalive's first look at it).
    pub(crate) fn keepalive(&self, max_missed: u8) -> Liveness {
        let missed = self.0.missed.load(Relaxed);
        if missed == NEW {
            self.0.missed.store(0, Relaxed);
            return Liveness::New;
        }
        if missed >= max_missed {
            return Liveness::Dead;
        }
        self.0.missed.store(missed + 1, Relaxed);
        self.ping();
        Liveness::Pinged
    }

    /// The session's token expires at `exp` (Unix seconds); `None`: never.
    pub(crate) fn set_expiry(&self, exp: Option<u64>) {
        // 0 means never: an `exp` of 0 is long past, as 1 is.
        self.0
            .expires_at
            .store(exp.map_or(0, |e| e.max(1)), Relaxed);
    }

    /// Whether the session's token has expired by `now` (Unix seconds).
    pub(crate) fn expired(&self, now: u64) -> bool {
        let exp = self.0.expires_at.load(Relaxed);
        exp != 0 && now >= exp
    }

    /// Close the session. The first reason given is kept; returns whether
    /// this call closed it.
    pub(crate) fn close(&self, code: u16, reason: &str) -> bool {
        {
            let mut state = self.lock();
            if state.closed.is_some() {
                return false;
            }
            state.closed = Some(Box::new(CloseReason {
                code,
                reason: reason.to_owned(),
            }));
        }
        self.0.consumer.wake();
        true
    }

    /// The reason the session was closed with, once it is.
    pub(crate) fn close_reason(&self) -> Option<CloseReason> {
        self.lock().closed.as_deref().cloned()
    }
}

#[cfg(test)]
impl Outbox {
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }

    async fn pop_frame(&self) -> Option<Utf8Bytes> {
        match self.pop().await? {
            Out::Frame(f) => Some(f),
            Out::Ping => None,
        }
    }

    fn len(&self) -> usize {
        self.lock().frames.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_pinged_until_it_misses_too_many_and_a_frame_forgives() {
        let o = Outbox::new(4);
        assert_eq!(o.keepalive(2), Liveness::New, "not pinged as it opens");
        assert!(o.try_pop().is_none());
        assert_eq!(o.keepalive(2), Liveness::Pinged);
        assert_eq!(o.keepalive(2), Liveness::Pinged);
        assert_eq!(o.keepalive(2), Liveness::Dead);
        assert_eq!(o.keepalive(2), Liveness::Dead, "and stays dead");
        o.heard();
        assert_eq!(o.keepalive(2), Liveness::Pinged);
        assert_eq!(o.keepalive(0), Liveness::Dead);
        assert_eq!(o.keepalive(u8::MAX - 1), Liveness::Pinged, "no overflow");
    }

    #[test]
    fn a_token_expires_at_its_second_and_zero_is_long_past() {
        let o = Outbox::new(4);
        assert!(!o.expired(u64::MAX), "no token expiry: never");
        o.set_expiry(Some(100));
        assert!(!o.expired(99));
        assert!(o.expired(100));
        o.set_expiry(Some(0));
        assert!(o.expired(1));
        o.set_expiry(None);
        assert!(!o.expired(u64::MAX));
    }

    #[tokio::test]
    async fn a_ping_goes_first_once_and_never_after_the_close() {
        let o = Outbox::new(4);
        o.try_push("a".into()).unwrap();
        o.ping();
        o.ping();
        assert_eq!(o.pop().await, Some(Out::Ping));
        assert_eq!(o.pop().await, Some(Out::Frame("a".into())));
        o.ping();
        o.close(1000, "bye");
        assert_eq!(o.pop().await, None);
    }
    use std::time::Duration;

    fn f(s: &str) -> Utf8Bytes {
        s.to_owned().into()
    }

    #[tokio::test]
    async fn bounded_and_ordered() {
        let o = Outbox::new(2);
        assert_eq!(o.try_push(f("a")), Ok(()));
        assert_eq!(o.try_push(f("b")), Ok(()));
        assert_eq!(o.try_push(f("c")), Err(PushError::Full));
        assert_eq!(o.len(), 2);
        assert_eq!(o.pop_frame().await.as_deref(), Some("a"));
        assert_eq!(o.try_pop().as_deref(), Some("b"));
        assert!(o.is_empty());
    }

    #[tokio::test]
    async fn close_keeps_the_first_reason_and_drains_what_was_queued() {
        let o = Outbox::new(4);
        o.try_push(f("last words")).unwrap();
        assert!(o.close(4000, "bye"));
        assert!(!o.close(1001, "later"));
        assert_eq!(o.try_push(f("too late")), Err(PushError::Closed));
        assert_eq!(o.close_reason().map(|r| r.code), Some(4000));
        assert_eq!(o.pop_frame().await.as_deref(), Some("last words"));
        assert_eq!(o.pop_frame().await, None);
    }

    #[tokio::test]
    async fn the_consumer_wakes_on_a_push_from_another_task_and_on_close() {
        let o = Outbox::new(2);
        // The consumer waits for a frame.
        let consumer = tokio::spawn({
            let o = o.clone();
            async move { o.pop_frame().await }
        });
        tokio::task::yield_now().await;
        o.try_push(f("x")).unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), consumer).await;
        assert_eq!(got.unwrap().unwrap().as_deref(), Some("x"));

        // The consumer's own frames are queued in order with the others,
        // bounded the same way, and refused once closed.
        o.try_push_own(f("own")).unwrap();
        o.try_push(f("other")).unwrap();
        assert_eq!(o.try_push_own(f("over")), Err((PushError::Full, f("over"))));
        assert_eq!(o.try_pop().as_deref(), Some("own"));
        assert_eq!(o.pop_frame().await.as_deref(), Some("other"));

        // The consumer wakes on close, with what was queued, then `None`.
        let consumer = tokio::spawn({
            let o = o.clone();
            async move { (o.pop_frame().await, o.pop().await) }
        });
        tokio::task::yield_now().await;
        o.try_push(f("last")).unwrap();
        o.close(1001, "shutdown");
        assert_eq!(
            o.try_push_own(f("late")),
            Err((PushError::Closed, f("late")))
        );
        let popped = tokio::time::timeout(Duration::from_secs(5), consumer).await;
        let (last, then) = popped.unwrap().unwrap();
        assert_eq!(last.as_deref(), Some("last"));
        assert_eq!(then, None);

        // Waiting, it wakes on the close alone.
        let o = Outbox::new(2);
        let consumer = tokio::spawn({
            let o = o.clone();
            async move { o.pop().await }
        });
        tokio::task::yield_now().await;
        o.close(1000, "bye");
        let popped = tokio::time::timeout(Duration::from_secs(5), consumer).await;
        assert_eq!(popped.unwrap().unwrap(), None);
    }

    #[tokio::test]
    async fn memory_is_taken_on_demand_and_given_back_after_a_burst() {
        let o = Outbox::new(256);
        assert_eq!(o.lock().frames.capacity(), 0);
        for i in 0..200 {
            o.try_push(f(&i.to_string())).unwrap();
        }
        for _ in 0..200 {
            o.pop_frame().await.unwrap();
        }
        assert!(
            o.lock().frames.capacity() <= 16,
            "{}",
            o.lock().frames.capacity()
        );
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let o = Outbox::with_bytes(100, 10);
        let frame = |n: usize| Utf8Bytes::from("x".repeat(n));
        // One frame over the bound still goes into an empty queue.
        assert_eq!(o.try_push(frame(20)), Ok(()));
        assert_eq!(o.try_push(frame(1)), Err(PushError::Full));
        assert_eq!(o.try_pop().map(|f| f.len()), Some(20));
        assert_eq!(o.try_push(frame(6)), Ok(()));
        assert_eq!(o.try_push(frame(4)), Ok(()));
        assert_eq!(o.try_push(frame(1)), Err(PushError::Full), "11 bytes");
        assert_eq!(o.try_pop().map(|f| f.len()), Some(6));
        assert_eq!(
            o.try_push(frame(6)),
            Ok(()),
            "the popped bytes are free again"
        );
    }
}
