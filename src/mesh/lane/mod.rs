//! The request lane: RPC requests out and their responses (and the
//! instance's events) in, on a broker connection of the gateway's own that
//! one task drives: the mesh's supervisor runs its read and write loops
//! together ([`LaneIo::run`]).
//!
//! lapin runs one I/O thread per connection, and every frame crosses between
//! it and the runtime's workers through channels; most of what a request
//! cost the gateway was those hand-offs (docs/perf-history.md). On the lane a
//! request is encoded straight into a write buffer. When nothing else is
//! queued or being written, the publishing task writes it to the socket
//! itself (on plain TCP); otherwise the lane's task flushes the buffer, as
//! many requests per write as have queued since the last one. The same
//! task reads the socket, and a response completes its call from there,
//! with no other task or thread in between.
//!
//! The lane speaks only the part of AMQP 0-9-1 it needs, through
//! amq-protocol (the codec lapin is built on): the handshake, one channel,
//! `basic.publish`, `basic.consume` (the response queue without acks,
//! events and service requests with a prefetch and acks),
//! `basic.return`, heartbeats and closing. Anything else the broker says
//! that matters (the consumer cancelled, the channel or the connection
//! closed, a frame over the negotiated size, silence past two heartbeats)
//! ends the lane with the reason, and the mesh rebuilds its whole link.
//!
//! Its rooms: `codec` (frames read in place and written into the buffer),
//! `socket` (TCP or TLS, and the frame reader), `handshake`, `early` (what
//! a consumer receives while the handshake still runs, kept to be read
//! first), and `assemble` (messages put back together from frames: a state
//! machine without a socket). This file holds the lane itself: the write
//! queue, the two loops, and what a caller sees.

mod assemble;
mod codec;
mod early;
mod handshake;
mod socket;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use assemble::{Assembled, Assembler};
use codec::{
    BASIC_CLASS, BASIC_PUBLISH, CHANNEL, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD,
    FRAME_OVERHEAD, check_short, closed_by_broker, method_frame, method_name, parse_header,
    put_body, put_frame, put_short,
};
pub(crate) use codec::{Properties, Received};
use socket::{FrameReader, Writer};

/// Encoded frames waiting to be written, at most: past it a publish is
/// refused (the broker is not reading) instead of growing memory.
const MAX_BACKLOG: usize = 16 << 20;

/// Why the lane could not start or had to end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(super) struct LaneError(String);

impl LaneError {
    fn new(what: impl Into<String>) -> Self {
        Self(what.into())
    }
}

impl From<std::io::Error> for LaneError {
    fn from(e: std::io::Error) -> Self {
        Self(format!("socket: {e}"))
    }
}

/// The sending half, shared by every call: cheap to clone.
#[derive(Debug, Clone)]
pub(super) struct Lane {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Encoded frames the writer has not taken yet.
    out: Mutex<Vec<u8>>,
    /// The writer holds frames it took from `out` and has not written all
    /// of yet. Changed and read only with `out` locked.
    writing: AtomicBool,
    /// The socket, on a plain TCP connection: a publish that finds nothing
    /// queued and nothing being written writes itself, without waking the
    /// writer.
    direct: Option<Arc<OwnedWriteHalf>>,
    /// Wakes the writer: there is something in `out`.
    wake: Notify,
    /// False once either task has ended: nothing more can be sent.
    open: AtomicBool,
    /// Why the broker blocks this connection (a memory or disk alarm),
    /// while it does: publishes are refused at once rather than queued
    /// behind a socket the broker has stopped reading.
    blocked: Mutex<Option<String>>,
    /// The negotiated frame size: bodies are cut to it.
    frame_max: usize,
}

/// A message the broker sent the lane, for the mesh to take apart.
#[derive(Debug)]
pub(super) enum Incoming<'a> {
    /// From one of the consumed queues: the event queue's when `event`.
    Delivery {
        properties: Received<'a>,
        body: &'a [u8],
        event: bool,
        /// Its delivery tag, for a lane whose caller acknowledges
        /// ([`LaneSpec::ack_by_caller`]).
        tag: u64,
    },
    /// A `mandatory` publish nobody could take (NO_ROUTE).
    Returned { properties: Received<'a> },
    /// A message over the size the lane takes: let go as it came (and
    /// acknowledged), never gathered.
    TooLarge { event: bool, size: u64 },
}

/// The receiving half and the socket: run by the mesh's supervisor.
pub(super) struct LaneIo {
    inner: Arc<Inner>,
    frames: FrameReader,
    writer: Writer,
    reading: Reading,
}

/// How the lane reads: silence it takes for a lost broker, how often it
/// acknowledges, and the largest message it gathers.
#[derive(Debug, Clone, Copy)]
struct Reading {
    heartbeat: Option<Duration>,
    prefetch: u16,
    max_body: u64,
    ack_by_caller: bool,
}

impl std::fmt::Debug for LaneIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneIo")
            .field("reading", &self.reading)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the caller of [`Lane::connect`] asks of the lane.
#[derive(Debug, Clone, Copy)]
pub(super) struct LaneSpec<'a> {
    pub(super) url: &'a str,
    /// Shown by the broker for the connection.
    pub(super) name: &'a str,
    /// The queue to consume (the instance's response queue, or the BFF's
    /// service queue), if any.
    pub(super) queue: Option<&'a str>,
    /// Deliveries of `queue` the broker may send before they are
    /// acknowledged (when they are: see `ack_by_caller`).
    pub(super) prefetch: u16,
    /// The largest message body taken; a larger one is let go as it comes
    /// (`Incoming::TooLarge`), never buffered, and the lane carries on.
    pub(super) max_body: u64,
    /// The caller acknowledges each delivery once it has handled it
    /// ([`Lane::ack`]), so the prefetch bounds the deliveries being
    /// handled. Otherwise the lane acknowledges the events in batches as
    /// they arrive, and `queue` is consumed without acknowledgements: it
    /// is the instance's own response queue, deleted with the connection,
    /// so nothing in it could ever be delivered again, and an
    /// acknowledgement would buy nothing and cost the broker a record per
    /// message (10-30 us of its CPU per call, measured in the hop bench).
    /// The lane still takes no more than it reads: what the broker sends
    /// waits in the socket, and the broker's own flow control holds the
    /// rest in the queue.
    pub(super) ack_by_caller: bool,
    /// The queue events come from, if the lane takes events.
    pub(super) events: Option<EventsSpec<'a>>,
}

/// Where a lane takes events from.
#[derive(Debug, Clone, Copy)]
pub(super) struct EventsSpec<'a> {
    pub(super) queue: &'a str,
    pub(super) prefetch: u16,
    /// For a stream: where to start reading (the consumer is then not
    /// exclusive: every instance reads the same stream).
    pub(super) from: Option<StreamOffset>,
}

/// A position in a stream to read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamOffset {
    /// This offset.
    At(u64),
    /// The first chunk written at or after this Unix time, in seconds.
    Since(u64),
}

/// The consumer tags the lane asks for: which queue a delivery came from.
const RESPONSES_TAG: &str = "responses";
const EVENTS_TAG: &str = "events";

impl Lane {
    /// Open the connection and the channel, and start consuming `queue`.
    /// The caller bounds the time this takes.
    pub(super) async fn connect(spec: LaneSpec<'_>) -> Result<(Lane, LaneIo), LaneError> {
        let opened = handshake::open(spec).await?;
        let inner = Arc::new(Inner {
            out: Mutex::new(Vec::new()),
            writing: AtomicBool::new(false),
            direct: opened.direct,
            wake: Notify::new(),
            open: AtomicBool::new(true),
            blocked: Mutex::new(None),
            frame_max: opened.frame_max,
        });
        let io = LaneIo {
            inner: inner.clone(),
            frames: opened.frames,
            writer: opened.writer,
            reading: Reading {
                heartbeat: opened.heartbeat,
                prefetch: opened.ack_prefetch,
                max_body: spec.max_body,
                ack_by_caller: spec.ack_by_caller,
            },
        };
        Ok((Lane { inner }, io))
    }

    /// Whether the lane can still send.
    pub(super) fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Acknowledge delivery `tag`, once handled (a lane whose caller
    /// acknowledges). A lane that has ended cannot: the broker gives the
    /// delivery to the next consumer.
    pub(super) fn ack(&self, tag: u64) -> Result<(), LaneError> {
        self.inner.ack(tag)
    }

    /// Refuse delivery `tag` without requeueing it: the broker
    /// dead-letters it.
    pub(super) fn reject(&self, tag: u64) -> Result<(), LaneError> {
        let reject = basic::AMQPMethod::Reject(basic::Reject {
            delivery_tag: tag,
            requeue: false,
        });
        self.inner.queue_method(CHANNEL, AMQPClass::Basic(reject))
    }

    /// Why the broker blocks publishing on this connection, while it does.
    pub(super) fn blocked(&self) -> Option<String> {
        lock(&self.inner.blocked).clone()
    }

    /// Queue a message for the broker; the writer sends it with whatever
    /// else is waiting. Fails at once when the lane has ended or the broker
    /// has not taken [`MAX_BACKLOG`] bytes already queued.
    pub(super) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        properties: &Properties<'_>,
        body: &[u8],
    ) -> Result<(), LaneError> {
        if !self.is_open() {
            return Err(LaneError::new("the request lane is closed"));
        }
        if let Some(why) = self.blocked() {
            return Err(LaneError::new(format!(
                "the broker is blocking publishes ({why})"
            )));
        }
        check_short(exchange, "the exchange name")?;
        check_short(routing_key, "the routing key")?;
        let header_size = properties.check()?;
        if header_size + FRAME_OVERHEAD > self.inner.frame_max {
            return Err(LaneError::new(
                "the message's properties are over the broker's frame size",
            ));
        }
        // Written straight into the write buffer: nothing is built first.
        self.inner.queue(|out| {
            put_frame(out, FRAME_METHOD, |out| {
                out.extend_from_slice(&BASIC_CLASS.to_be_bytes());
                out.extend_from_slice(&BASIC_PUBLISH.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // reserved (ticket)
                put_short(out, exchange);
                put_short(out, routing_key);
                out.push(u8::from(mandatory)); // bit 0; immediate (bit 1) off
            });
            put_frame(out, FRAME_HEADER, |out| {
                out.extend_from_slice(&BASIC_CLASS.to_be_bytes());
                out.extend_from_slice(&0u16.to_be_bytes()); // weight
                out.extend_from_slice(&(body.len() as u64).to_be_bytes());
                properties.put(out);
            });
            put_body(out, body, self.inner.frame_max);
        })
    }
}

impl Inner {
    /// Acknowledge one delivery.
    fn ack(&self, tag: u64) -> Result<(), LaneError> {
        let ack = basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: false,
        });
        self.queue_method(CHANNEL, AMQPClass::Basic(ack))
    }

    /// Queue one method frame.
    fn queue_method(&self, channel: u16, class: AMQPClass) -> Result<(), LaneError> {
        let frame = method_frame(channel, class)?;
        self.queue(|out| out.extend_from_slice(&frame))
    }

    fn queue(&self, put: impl FnOnce(&mut Vec<u8>)) -> Result<(), LaneError> {
        let mut out = lock(&self.out);
        if out.len() > MAX_BACKLOG {
            return Err(LaneError::new(
                "the request lane is backed up: the broker is not reading",
            ));
        }
        let was_empty = out.is_empty();
        put(&mut out);
        if was_empty
            && !self.writing.load(Ordering::Relaxed)
            && let Some(socket) = &self.direct
        {
            // Nothing queued before and nothing being written: write it
            // here, in the caller's turn, rather than wake the writer for
            // it. What the socket does not take now, the writer writes.
            // The queue stays locked for the write, which keeps the bytes
            // in order; the socket is non-blocking, so that is a copy into
            // the kernel (or nothing, when it would block), and a
            // publisher on another worker waits that long at most.
            match socket.try_write(&out) {
                Ok(n) if n == out.len() => {
                    out.clear();
                    return Ok(());
                }
                Ok(n) => drop(out.drain(..n)),
                // Would block, or failed: the writer meets the same and
                // ends the lane with the reason.
                Err(_) => {}
            }
        }
        drop(out);
        if was_empty {
            self.wake.notify_one();
        }
        Ok(())
    }
}

impl LaneIo {
    /// Drive the lane until it ends: read and dispatch what the broker
    /// sends with `on`, write what the lane has queued. Returns why it
    /// ended (after [`Lane::close`], once the broker has answered). Run
    /// again after being cancelled, it carries on (shutdown does, to send
    /// the goodbye).
    pub(super) async fn run(&mut self, on: &mut (dyn FnMut(Incoming<'_>) + Send)) -> LaneError {
        let inner = self.inner.clone();
        let outcome = tokio::select! {
            r = read_loop(&inner, &mut self.frames, self.reading, on) => r,
            w = write_loop(&inner, &mut self.writer, self.reading.heartbeat) => w,
        };
        inner.open.store(false, Ordering::Release);
        outcome
    }

    /// Say goodbye to the broker and run until it answers, for at most
    /// `within`, so it logs a clean close rather than a dropped socket.
    /// Nothing can be sent on the lane from here on.
    pub(super) async fn close(&mut self, within: Duration) {
        self.inner.open.store(false, Ordering::Release);
        let close = connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        });
        if self
            .inner
            .queue_method(0, AMQPClass::Connection(close))
            .is_ok()
        {
            let mut ignore = |_: Incoming<'_>| {};
            let _ = tokio::time::timeout(within, self.run(&mut ignore)).await;
        }
    }
}

async fn write_loop(inner: &Inner, writer: &mut Writer, heartbeat: Option<Duration>) -> LaneError {
    let mut batch = Vec::new();
    loop {
        let idle = async {
            match heartbeat {
                Some(every) => tokio::time::sleep(every / 2).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = inner.wake.notified() => {}
            _ = idle => {
                let _ = inner.queue(|out| {
                    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
                });
            }
        }
        {
            let mut out = lock(&inner.out);
            std::mem::swap(&mut *out, &mut batch);
            inner.writing.store(!batch.is_empty(), Ordering::Relaxed);
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = writer.write_all(&batch).await {
            return e.into();
        }
        batch.clear();
        {
            let _out = lock(&inner.out);
            inner.writing.store(false, Ordering::Relaxed);
        }
        if batch.capacity() > 1 << 20 {
            batch = Vec::new();
        }
    }
}

async fn read_loop(
    inner: &Inner,
    frames: &mut FrameReader,
    reading: Reading,
    on: &mut (dyn FnMut(Incoming<'_>) + Send),
) -> LaneError {
    match read(inner, frames, reading, on).await {
        Err(e) => e,
        Ok(never) => match never {},
    }
}

/// Read frames, hand whole messages to `on` and acknowledge them, until
/// the broker ends the lane or breaks the protocol.
async fn read(
    inner: &Inner,
    frames: &mut FrameReader,
    reading: Reading,
    on: &mut (dyn FnMut(Incoming<'_>) + Send),
) -> Result<Infallible, LaneError> {
    let Reading {
        heartbeat,
        prefetch,
        max_body,
        ack_by_caller,
    } = reading;
    // Acknowledge once half the prefetch is taken: the broker never waits
    // on an ack, and an ack rides along with the next requests.
    let ack_every = u64::from(prefetch / 2).max(1);
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    let mut assembler = Assembler::new(EVENTS_TAG, max_body);
    let silence = heartbeat.map(|h| h * 2);
    loop {
        while let Some(frame) = frames.buf.buffered()? {
            let payload = frames.buf.payload(frame);
            match assembler.frame(frame.kind, frame.channel, payload)? {
                Assembled::Pending => {}
                Assembled::Method(class) => on_method(inner, class)?,
                Assembled::TooLarge { tag, event, size } => {
                    on(Incoming::TooLarge { event, size });
                    match tag {
                        Some(tag) if ack_by_caller => inner.ack(tag)?,
                        Some(tag) if event => {
                            unacked += 1;
                            last_tag = tag;
                        }
                        // A response: consumed without acknowledgements.
                        Some(_) | None => {}
                    }
                }
                Assembled::Message {
                    tag,
                    event,
                    header,
                    body,
                } => {
                    let Ok((_, properties)) = parse_header(header) else {
                        continue;
                    };
                    match tag {
                        Some(tag) => {
                            on(Incoming::Delivery {
                                properties,
                                body: body.as_slice(),
                                event,
                                tag,
                            });
                            // Responses are consumed without
                            // acknowledgements (`LaneSpec::ack_by_caller`).
                            if !ack_by_caller && event {
                                unacked += 1;
                                last_tag = tag;
                            }
                        }
                        None => on(Incoming::Returned { properties }),
                    }
                }
            }
        }
        if unacked >= ack_every {
            let ack = basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: last_tag,
                multiple: true,
            });
            inner.queue_method(CHANNEL, AMQPClass::Basic(ack))?;
            unacked = 0;
        }
        frames.fill(silence).await?;
    }
}

/// A method the broker sent outside any message: the ends of the lane
/// (a consumer cancelled, the channel or the connection closed) are errors
/// that say why; anything else is ignored.
fn on_method(inner: &Inner, class: AMQPClass) -> Result<(), LaneError> {
    match class {
        AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => Err(LaneError::new(
            "the broker cancelled a consumer (its queue is gone)",
        )),
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Err(LaneError::new("closed")),
        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
            let ok = connection::AMQPMethod::CloseOk(connection::CloseOk {});
            let _ = inner.queue_method(0, AMQPClass::Connection(ok));
            Err(closed_by_broker(&class).unwrap_or_else(|| LaneError::new("closed")))
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
            Err(closed_by_broker(&class).unwrap_or_else(|| LaneError::new("closed")))
        }
        AMQPClass::Connection(connection::AMQPMethod::Blocked(b)) => {
            let why = b.reason.as_str().chars().take(200).collect::<String>();
            tracing::warn!(reason = %why, "the broker blocks publishing (a resource alarm): calls are refused until it unblocks");
            *lock(&inner.blocked) = Some(why);
            Ok(())
        }
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => {
            if lock(&inner.blocked).take().is_some() {
                tracing::warn!("the broker unblocked publishing: calls flow again");
            }
            Ok(())
        }
        other => {
            tracing::debug!(method = %method_name(&other), "request lane: ignored a method from the broker");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
