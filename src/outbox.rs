//! A session's outbound side: its bounded queue (in frames and in bytes),
//! the client's TCP stream and who may write to it next, the session's
//! close signal and close reason, and its liveness (pings gone unanswered),
//! in one small allocation. The registry and the connection both hold it:
//! the gateway's keepalive pass (`keepalive`) reads the liveness through
//! the registry (which keeps the token's expiry: `watch`), the connection
//! writes it, and no socket needs a timer of its own.
//!
//! Why a producer writes to the stream itself: an event fanned out to
//! 10,000 sockets used to wake 10,000 tasks, each to write one frame. A
//! frame offered while nothing is queued and nobody is writing is written
//! by the producer, in its own turn, with one non-blocking vectored write:
//! no task is woken and nothing is queued. What the stream does not take
//! at once is queued (the part it took remembered), and the connection
//! finishes it. The queue's lock orders the writers: a frame is written
//! directly only under it, only when the queue is empty, the connection
//! is not writing a batch it took, and tungstenite owes the stream
//! nothing (a pong, a close): frames never interleave, and never overtake
//! one another.
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
//! writes before it queues more). Locks are never held across an `.await`,
//! and what is written under one never blocks (the stream is non-blocking).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::frame::{Batch, Encoded, Frame, MAX_BATCH};

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
    /// The client's stream, written under `state`'s lock by a producer
    /// (see [`State::may_write`]) and by the connection as the pen allows;
    /// read by the connection alone. `None`: a queue alone (tests).
    stream: Option<TcpStream>,
    /// Frames queued at most. (32-bit, as `max_bytes`: every session
    /// holds one, and they take one word together.)
    capacity: u32,
    /// Bytes queued at most (4 GiB at most); one frame larger than this is
    /// still taken into an empty queue, so no frame is undeliverable.
    max_bytes: u32,
    /// Pings sent since the client was last heard from; [`NEW`] until the
    /// keepalive first looks at the session.
    missed: AtomicU8,
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
    /// Bytes of the first frame on the wire already: a producer wrote it
    /// and the stream took only part of it. Whoever writes next finishes
    /// it first.
    head_sent: usize,
    /// Boxed: a session is closed once, and held open for its life.
    closed: Option<Box<CloseReason>>,
    /// A WebSocket ping is to be sent (a keepalive, not a queued frame).
    ping: bool,
    /// The connection holds the pen: it took a batch and is writing it
    /// without the lock. Put down when the batch is written whole; a batch
    /// that failed or was left half written keeps it for good.
    held: bool,
    /// tungstenite may hold bytes the stream did not take (a pong, the
    /// close handshake): set by each of its writes, cleared with `held`
    /// (the connection flushes tungstenite before each batch it writes).
    owed: bool,
}

impl State {
    /// The first frame, whole or the rest of it: once it leaves the queue,
    /// no frame in it is half written.
    fn pop_front(&mut self) -> Option<Utf8Bytes> {
        let frame = self.frames.pop_front()?;
        self.head_sent = 0;
        self.bytes = self.bytes.saturating_sub(frame.len());
        if self.frames.is_empty() {
            // Idle again: give the queue's memory back (an idle socket
            // then holds none; the next frame allocates a few slots).
            self.frames = VecDeque::new();
        }
        Some(frame)
    }

    /// Whether a producer may write a frame straight to the stream now:
    /// nothing queued before it (nor a frame half written) and nobody
    /// else's bytes in the middle of being written.
    fn may_write(&self) -> bool {
        self.frames.is_empty() && !self.held && !self.owed
    }

    /// What the connection writes next, as one batch: the rest of a frame
    /// half written first, a ping, then queued frames (up to
    /// [`MAX_BATCH`] in all). The connection holds the pen from here.
    fn take_batch(&mut self) -> Option<Batch> {
        let ping = self.ping && self.closed.is_none();
        if !ping && self.frames.is_empty() {
            return None;
        }
        let mut batch = Batch::with_capacity(self.frames.len() + usize::from(ping));
        let sent = self.head_sent;
        if sent > 0
            && let Some(head) = self.pop_front()
        {
            batch.text_from(head, sent);
        }
        if ping {
            self.ping = false;
            batch.ping();
        }
        while batch.len() < MAX_BATCH {
            let Some(frame) = self.pop_front() else {
                break;
            };
            batch.text(frame);
        }
        self.held = true;
        Some(batch)
    }
}

/// Write `slices` to `stream` without blocking: what it took, or `Pending`
/// with the task's waker registered for when it can take more.
pub(crate) fn poll_write(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    slices: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        match stream.try_write_vectored(slices) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready!(stream.poll_write_ready(cx))?;
            }
            taken => return Poll::Ready(taken),
        }
    }
}

/// Write `batch` to `stream` from its byte `*written` on, without blocking:
/// done, or `Pending` (what was taken counted in `*written`, the waker
/// registered) while the stream takes no more.
pub(crate) fn poll_write_batch(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    batch: &Batch,
    written: &mut usize,
) -> Poll<io::Result<()>> {
    let total = batch.wire_len();
    while *written < total {
        let mut slices = [io::IoSlice::new(&[]); 2 * MAX_BATCH];
        let n = batch.slices(*written, &mut slices);
        match ready!(poll_write(stream, cx, &slices[..n]))? {
            0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            k => *written += k,
        }
    }
    Poll::Ready(Ok(()))
}

/// `send(2)`'s flags for a producer's write: no `SIGPIPE` from a client
/// that went away (the write fails, and the connection meets it).
#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: i32 = libc::MSG_NOSIGNAL;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: i32 = 0;

/// A producer's write: one `send` on the stream's socket, past tokio's
/// readiness. Why past it: the pen ([`State::may_write`]) already says
/// whether the stream may take more (the connection holds it from the
/// first write the stream did not take whole until it has written all
/// that waits), so tokio's readiness would only be read again, and in a
/// fan-out that read is one more cache line of each of 10,000 sockets
/// (a tenth of the gateway's own time per delivery, measured). Nothing is
/// lost by it: a refused write leaves tokio's readiness as it was, and the
/// connection's own write, which finds the stream full, clears it and
/// waits for the stream as ever. Any failure is "took nothing" here.
fn send(stream: &TcpStream, slices: &[io::IoSlice<'_>]) -> usize {
    let socket = socket2::SockRef::from(stream);
    match slices {
        [one] => socket.send_with_flags(one, SEND_FLAGS),
        _ => socket.send_vectored_with_flags(slices, SEND_FLAGS),
    }
    .unwrap_or(0)
}

/// Write `frame` with one non-blocking vectored write: `Ok` when the
/// stream took it whole, else the frame back with the bytes it took (none
/// when it refused or failed: the connection writes it, and meets the
/// failure itself).
fn try_write(stream: &TcpStream, frame: Utf8Bytes) -> Result<(), (Utf8Bytes, usize)> {
    let whole = Frame::text(frame);
    let (slices, n) = whole.rest(0);
    let taken = send(stream, &slices[..n]);
    if taken >= whole.wire_len() {
        Ok(())
    } else {
        Err((whole.into_payload(), taken))
    }
}

impl Outbox {
    /// An empty outbox holding at most `capacity` frames (at least one).
    #[cfg(test)]
    pub(crate) fn new(capacity: usize) -> Self {
        Self::with_bytes(capacity, usize::MAX)
    }

    /// An empty outbox holding at most `capacity` frames (at least one) and
    /// `max_bytes` bytes (beyond one frame), with no stream.
    #[cfg(test)]
    pub(crate) fn with_bytes(capacity: usize, max_bytes: usize) -> Self {
        Self::build(None, capacity, max_bytes)
    }

    /// The outbox of the client on `stream`: at most `capacity` frames (at
    /// least one) and `max_bytes` bytes (beyond one frame) queued.
    pub(crate) fn on_stream(stream: TcpStream, capacity: usize, max_bytes: usize) -> Self {
        Self::build(Some(stream), capacity, max_bytes)
    }

    fn build(stream: Option<TcpStream>, capacity: usize, max_bytes: usize) -> Self {
        Self(Arc::new(Shared {
            state: Mutex::new(State::default()),
            consumer: AtomicWaker::new(),
            stream,
            capacity: u32::try_from(capacity.max(1)).unwrap_or(u32::MAX),
            max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
            missed: AtomicU8::new(NEW),
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

    /// The client's stream (`None` for a queue alone).
    pub(crate) fn stream(&self) -> Option<&TcpStream> {
        self.0.stream.as_ref()
    }

    /// Deliver a frame from another task without waiting: written to the
    /// stream at once when it may be and the stream takes it whole, else
    /// queued and the consumer woken.
    pub(crate) fn try_push(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        self.try_push_keep(frame).map_err(|(e, _)| e)
    }

    /// [`Outbox::try_push`] for a producer that keeps a refused frame to
    /// try again (a replay at the reader's pace).
    pub(crate) fn try_push_keep(&self, frame: Utf8Bytes) -> Result<(), (PushError, Utf8Bytes)> {
        let len = frame.len();
        self.push_with(frame, len, try_write, |frame| frame)
    }

    /// [`Outbox::try_push`] for one frame of a fan-out, encoded once for
    /// all its sessions (`encoded` is `frame` on the wire): written from
    /// that, by this task, when the pen is free; cloned into the queue only
    /// when it has to wait.
    pub(crate) fn push_encoded(
        &self,
        frame: &Utf8Bytes,
        encoded: &Encoded,
    ) -> Result<(), PushError> {
        let write = |stream: &TcpStream, frame| {
            let wire = encoded.wire();
            match send(stream, &[io::IoSlice::new(wire)]) {
                taken if taken >= wire.len() => Ok(()),
                taken => Err((frame, taken)),
            }
        };
        self.push_with(frame, frame.len(), write, Utf8Bytes::clone)
            .map_err(|(e, _)| e)
    }

    /// A producer's frame (`len` bytes), under the pen's rule: refused when
    /// the queue cannot take it; written by `write` when nothing is queued
    /// and nobody writes (which hands the frame back with the bytes the
    /// stream took when it did not take it whole); else, or for what is
    /// left, queued (`queued` makes the queue's own) and the connection
    /// woken. The frame's holder `T` is the frame itself, or a borrow of a
    /// fan-out's shared one, copied only if it must wait.
    fn push_with<T>(
        &self,
        frame: T,
        len: usize,
        write: impl FnOnce(&TcpStream, T) -> Result<(), (T, usize)>,
        queued: impl FnOnce(T) -> Utf8Bytes,
    ) -> Result<(), (PushError, T)> {
        let mut state = self.lock();
        if let Err(e) = self.admit(&state, len) {
            return Err((e, frame));
        }
        let mut frame = frame;
        if let Some(stream) = self.stream()
            && state.may_write()
        {
            // The queue is empty: what the stream took is of its head.
            (frame, state.head_sent) = match write(stream, frame) {
                Ok(()) => return Ok(()),
                Err(rest) => rest,
            };
        }
        let frame = queued(frame);
        state.bytes += frame.len();
        state.frames.push_back(frame);
        drop(state);
        self.0.consumer.wake();
        Ok(())
    }

    /// Whether a frame of `len` bytes may be queued now.
    fn admit(&self, state: &State, len: usize) -> Result<(), PushError> {
        if state.closed.is_some() {
            return Err(PushError::Closed);
        }
        let over_bytes =
            !state.frames.is_empty() && state.bytes.saturating_add(len) > self.max_bytes();
        if state.frames.len() >= self.capacity() || over_bytes {
            return Err(PushError::Full);
        }
        Ok(())
    }

    /// Queue a frame from the consumer's own task, which looks at the queue
    /// before it waits again: no wake-up (a task that wakes itself is
    /// requeued behind the others, and the runtime wakes an idle worker
    /// thread to come and take it), and no write of its own (its frames
    /// go out together, one batch). A refused frame is handed back.
    pub(crate) fn try_push_own(&self, frame: Utf8Bytes) -> Result<(), (PushError, Utf8Bytes)> {
        let mut state = self.lock();
        if let Err(e) = self.admit(&state, frame.len()) {
            return Err((e, frame));
        }
        state.bytes += frame.len();
        state.frames.push_back(frame);
        Ok(())
    }

    /// What is to be written now, as one batch (see [`Outbox::pop`]), or
    /// `None` when nothing is.
    pub(crate) fn pop_now(&self) -> Option<Batch> {
        self.lock().take_batch()
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

    /// What is to be written next, waiting for it: the rest of a frame a
    /// producer left half written, a ping, then queued frames, as one
    /// batch; frames queued before the outbox closed are still handed out,
    /// then `None`. The connection holds the pen until it puts it down
    /// ([`Outbox::written`]). For the one consumer's task: a second waiter
    /// would take the first one's wake-ups.
    pub(crate) fn pop(&self) -> impl Future<Output = Option<Batch>> + '_ {
        std::future::poll_fn(|cx| {
            // Registered before the look at the queue: what is queued after
            // the look wakes this task.
            self.0.consumer.register(cx.waker());
            let mut state = self.lock();
            if let Some(batch) = state.take_batch() {
                return Poll::Ready(Some(batch));
            }
            if state.closed.is_some() {
                // Nothing can be queued after the close: drained for good.
                return Poll::Ready(None);
            }
            Poll::Pending
        })
    }

    /// The batch the connection took is written whole, after all that
    /// tungstenite held: it puts the pen down, and producers may write
    /// again.
    pub(crate) fn written(&self) {
        let mut state = self.lock();
        state.held = false;
        state.owed = false;
    }

    /// Write bytes of tungstenite's own (a pong, the close handshake)
    /// between frames: the rest of a frame a producer left half written
    /// goes first. Until the connection's next batch is written
    /// ([`Outbox::written`]), producers queue rather than write.
    pub(crate) fn poll_write_own(
        &self,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let Some(stream) = self.stream() else {
            return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
        };
        let mut state = self.lock();
        state.owed = true;
        if state.head_sent > 0
            && let Some(head) = state.frames.front()
        {
            let mut rest = Batch::with_capacity(1);
            rest.text_from(head.clone(), state.head_sent);
            let mut written = 0;
            let done = poll_write_batch(stream, cx, &rest, &mut written);
            state.head_sent += written;
            ready!(done)?;
            state.pop_front();
        }
        poll_write(stream, cx, &[io::IoSlice::new(buf)])
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

    /// Whether the session is closed (or closing).
    pub(crate) fn is_closed(&self) -> bool {
        self.lock().closed.is_some()
    }
}

#[cfg(test)]
impl Outbox {
    /// The first queued frame, the pen aside (tests of the queue alone).
    pub(crate) fn try_pop(&self) -> Option<Utf8Bytes> {
        self.lock().pop_front()
    }

    /// The next queued frame, waiting for one; `None` once closed and
    /// drained.
    async fn pop_frame(&self) -> Option<Utf8Bytes> {
        std::future::poll_fn(|cx| {
            self.0.consumer.register(cx.waker());
            let mut state = self.lock();
            match state.pop_front() {
                Some(frame) => Poll::Ready(Some(frame)),
                None if state.closed.is_some() => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn len(&self) -> usize {
        self.lock().frames.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::frame::tests::messages;
    use tokio_tungstenite::tungstenite::Message;

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

    #[tokio::test]
    async fn a_ping_goes_first_once_and_never_after_the_close() {
        let o = Outbox::new(4);
        o.try_push("a".into()).unwrap();
        o.ping();
        o.ping();
        let batch = o.pop().await.unwrap();
        assert_eq!(
            messages(&batch),
            [Message::Ping(Default::default()), Message::Text("a".into())]
        );
        o.written();
        o.ping();
        o.close(1000, "bye");
        assert!(o.pop().await.is_none());
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
            async move { (o.pop_frame().await, o.pop().await.is_none()) }
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
        assert!(then, "drained: None");

        // Waiting, it wakes on the close alone.
        let o = Outbox::new(2);
        let consumer = tokio::spawn({
            let o = o.clone();
            async move { o.pop().await.is_none() }
        });
        tokio::task::yield_now().await;
        o.close(1000, "bye");
        let popped = tokio::time::timeout(Duration::from_secs(5), consumer).await;
        assert!(popped.unwrap().unwrap(), "woken by the close, drained");
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

    /// A TCP pair with small kernel buffers (the server's end to send, the
    /// client's to receive): writes are cut anywhere. Server first.
    pub(crate) async fn small_tcp_pair() -> (TcpStream, TcpStream) {
        let listening = tokio::net::TcpSocket::new_v4().unwrap();
        listening.set_send_buffer_size(4096).unwrap();
        listening.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = listening.listen(1).unwrap();
        let client = tokio::net::TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let (client, server) = tokio::join!(
            client.connect(listener.local_addr().unwrap()),
            listener.accept()
        );
        (server.unwrap().0, client.unwrap())
    }

    /// An outbox on the server's end of a small pair, and the client's end.
    async fn on_a_pair(capacity: usize) -> (Outbox, TcpStream) {
        let (server, client) = small_tcp_pair().await;
        (Outbox::on_stream(server, capacity, usize::MAX), client)
    }

    /// Write `batch` whole, as the connection does, and put the pen down.
    async fn write_batch(o: &Outbox, batch: &Batch) {
        let stream = o.stream().unwrap();
        let mut written = 0;
        std::future::poll_fn(|cx| poll_write_batch(stream, cx, batch, &mut written))
            .await
            .unwrap();
        o.written();
    }

    /// Read from `client` until `n` messages came (at most 10 s).
    async fn read_messages(client: &mut TcpStream, n: usize) -> Vec<Message> {
        use tokio::io::AsyncReadExt;
        let mut wire = Vec::new();
        let read = async {
            loop {
                let got = crate::frame::tests::read_as_client(wire.clone());
                if got.len() >= n {
                    return got;
                }
                let mut buf = vec![0; 65_536];
                let k = client.read(&mut buf).await.unwrap();
                assert!(k > 0, "the stream ended after {} messages", got.len());
                wire.extend_from_slice(&buf[..k]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the messages within 10 s")
    }

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    #[tokio::test]
    async fn a_frame_offered_to_an_idle_stream_is_written_at_once_and_never_past_a_writer() {
        let (o, mut client) = on_a_pair(8).await;
        // Idle: written by the producer, nothing queued, nobody woken.
        o.try_push(f("direct")).unwrap();
        assert!(o.is_empty());
        assert!(o.pop_now().is_none());
        assert_eq!(read_messages(&mut client, 1).await, [text("direct")]);

        // The connection holds the pen: offers queue behind its batch.
        o.try_push_own(f("the connection's")).unwrap();
        let batch = o.pop_now().unwrap();
        o.try_push(f("while it writes")).unwrap();
        assert_eq!(o.len(), 1);
        write_batch(&o, &batch).await;
        // Put down, but a frame is queued: the next offer queues too.
        o.try_push(f("behind the queue")).unwrap();
        assert_eq!(o.len(), 2);
        let batch = o.pop_now().unwrap();
        write_batch(&o, &batch).await;

        // tungstenite owes the stream (a pong it wrote): queued until the
        // connection's next batch, written after tungstenite's flush.
        let pong = [0x8a, 0x00];
        let wrote = std::future::poll_fn(|cx| o.poll_write_own(cx, &pong)).await;
        assert_eq!(wrote.unwrap(), 2);
        o.try_push(f("after the pong")).unwrap();
        assert_eq!(o.len(), 1);
        let batch = o.pop_now().unwrap();
        write_batch(&o, &batch).await;
        o.try_push(f("direct again")).unwrap();
        assert!(o.is_empty());

        assert_eq!(
            read_messages(&mut client, 6).await,
            [
                text("the connection's"),
                text("while it writes"),
                text("behind the queue"),
                Message::Pong(Default::default()),
                text("after the pong"),
                text("direct again"),
            ]
        );
    }

    #[tokio::test]
    async fn a_frame_the_stream_takes_in_part_is_finished_first_by_whoever_writes_next() {
        let big = |c: char| f(&c.to_string().repeat(400_000));
        // By the connection's next batch.
        let (o, mut client) = on_a_pair(8).await;
        o.try_push(big('a')).unwrap();
        let sent = o.lock().head_sent;
        assert!(sent > 0 && o.len() == 1, "taken in part: {sent} bytes");
        o.try_push(f("queued behind")).unwrap();
        let batch = o.pop_now().unwrap();
        let reading = tokio::spawn(async move { read_messages(&mut client, 2).await });
        write_batch(&o, &batch).await;
        assert_eq!(
            reading.await.unwrap(),
            [Message::Text(big('a')), text("queued behind")]
        );

        // By tungstenite's pong, which waits for it.
        let (o, mut client) = on_a_pair(8).await;
        o.try_push(big('b')).unwrap();
        assert!(o.lock().head_sent > 0);
        let reading = tokio::spawn(async move { read_messages(&mut client, 2).await });
        let pong = [0x8a, 0x00];
        let wrote = std::future::poll_fn(|cx| o.poll_write_own(cx, &pong)).await;
        assert_eq!(wrote.unwrap(), 2);
        assert!(o.is_empty(), "the half-written frame is done");
        assert_eq!(
            reading.await.unwrap(),
            [Message::Text(big('b')), Message::Pong(Default::default())]
        );
    }

    #[tokio::test]
    async fn a_fan_out_frame_is_written_from_its_encoding_or_waits_its_turn() {
        // The pen free: written from the encoding, nothing queued.
        let (o, mut client) = on_a_pair(8).await;
        let event = f("the event");
        let encoded = Encoded::text(event.clone());
        o.push_encoded(&event, &encoded).unwrap();
        assert!(o.is_empty());
        assert_eq!(read_messages(&mut client, 1).await, [text("the event")]);

        // Something queued first: it waits behind it, in order.
        o.try_push_own(f("queued first")).unwrap();
        o.push_encoded(&event, &encoded).unwrap();
        assert_eq!(o.len(), 2);
        let batch = o.pop_now().unwrap();
        let (got, ()) = tokio::join!(read_messages(&mut client, 2), write_batch(&o, &batch));
        assert_eq!(got, [text("queued first"), text("the event")]);

        // Taken in part: the rest is the connection's, before what follows.
        let big = f(&"z".repeat(400_000));
        let encoded = Encoded::text(big.clone());
        o.push_encoded(&big, &encoded).unwrap();
        assert!(o.lock().head_sent > 0, "taken in part");
        o.try_push(f("after it")).unwrap();
        let batch = o.pop_now().unwrap();
        let (got, ()) = tokio::join!(read_messages(&mut client, 2), write_batch(&o, &batch));
        assert_eq!(got, [Message::Text(big), text("after it")]);

        // A full queue refuses it; a closed outbox too.
        let (o, _client) = on_a_pair(1).await;
        o.try_push_own(f("one")).unwrap();
        assert_eq!(
            o.push_encoded(&event, &Encoded::text(event.clone())),
            Err(PushError::Full)
        );
        o.close(1000, "bye");
        assert_eq!(
            o.push_encoded(&event, &Encoded::text(event.clone())),
            Err(PushError::Closed)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fan_out_spread_over_the_workers_writes_each_stream_once() {
        // More outboxes than one task writes alone; one of them has a
        // frame queued already, one a full stream.
        let n = crate::spread::SPREAD_FROM + 88;
        let mut pairs = Vec::with_capacity(n);
        for _ in 0..n {
            pairs.push(on_a_pair(8).await);
        }
        pairs[1].0.try_push_own(f("queued first")).unwrap();
        let filler = f(&"y".repeat(400_000));
        pairs[2].0.try_push(filler.clone()).unwrap();
        let event = f("the event");
        let outboxes: Vec<Outbox> = pairs.iter().map(|(o, _)| o.clone()).collect();
        let context = (event.clone(), Encoded::text(event.clone()));
        let pushed = crate::spread::spread(outboxes, context, |(frame, encoded), o| {
            o.push_encoded(frame, encoded).is_ok()
        })
        .await;
        assert_eq!(pushed, n);
        for (i, (o, client)) in pairs.iter_mut().enumerate() {
            match i {
                1 | 2 => {
                    // Their connection writes what is queued, in order.
                    let batch = o.pop_now().unwrap();
                    let reading = read_messages(client, 2);
                    let (got, ()) = tokio::join!(reading, write_batch(o, &batch));
                    let first = if i == 1 {
                        f("queued first")
                    } else {
                        filler.clone()
                    };
                    assert_eq!(got, [Message::Text(first), text("the event")], "{i}");
                }
                _ => {
                    assert!(o.is_empty(), "{i}: written by the fan-out");
                    assert_eq!(read_messages(client, 1).await, [text("the event")], "{i}");
                }
            }
        }
    }
}
