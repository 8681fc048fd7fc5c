//! The BFF's event log on RabbitMQ: one stream queue per BFF, bound to the
//! events exchange with the event rules' topics, that every instance reads.
//! A message's stream offset is its position, the same on every instance,
//! which is what lets a client resume on another instance than it left.
//!
//! An instance that starts reads the stream from a little before now, to
//! fill its window of recent events, and must know where that history ends
//! and its news begins: it writes a marker of its own (a random nonce in a
//! header) into the stream, and everything after the marker is news. A
//! rebuilt link carries on from the offset after the last one read, so an
//! outage delays events but loses none.
//!
//! Older positions are read on a lane of their own, from the offset asked
//! for: every message passes the lane's size limit before anything parses
//! it, and the prefetch (acknowledged as each is taken) bounds what is held.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};
use tokio::sync::mpsc;

use super::super::lane::{EventsSpec, Incoming, Lane, LaneSpec, Received, StreamOffset};
use super::headers::decode_message;
use super::topology::fail;
use super::{AmqpConfig, Shared, lock};
use crate::mesh::{BoxStream, IncomingEvent, LogRead, MeshError, redact_url};
use crate::protocol::MeshMessage;

/// The header a marker carries: the nonce of the instance that wrote it.
pub(super) const MARKER_HEADER: &str = "x-nuropb-bff-marker";

/// The stream header RabbitMQ puts on each delivery: its offset.
const OFFSET_HEADER: &str = "x-stream-offset";

/// Deliveries a log reader holds at most.
const READ_PREFETCH: u16 = 64;

/// The BFF's event log: where it is and what it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLogConfig {
    /// The stream queue (`nuropb-bff-{name}-events`).
    pub queue: String,
    /// Events older than this are let go by the broker.
    pub max_age: Duration,
    /// The most the stream keeps, in bytes.
    pub max_bytes: u64,
    /// How far back an instance that starts reads, to fill its window.
    pub prefill: Duration,
}

/// Where this instance is in the log.
#[derive(Debug, Default)]
pub(super) struct LogState {
    /// One past the last offset read (0: none yet).
    next: AtomicU64,
    /// The marker was seen: what comes now is news.
    live: AtomicBool,
    /// This instance's marker nonce.
    nonce: std::sync::Mutex<String>,
    /// A marker that found the event queue full, handed over with the
    /// next item that fits.
    pub(super) pending_live: std::sync::Mutex<Option<u64>>,
    /// The link was built once: a rebuilt one leaves the log's bindings
    /// as they are but for this instance's own.
    established: AtomicBool,
}

impl LogState {
    /// Where the lane starts reading: after the last offset read, or (the
    /// first time) `prefill` before now.
    pub(super) fn start(&self, prefill: Duration) -> StreamOffset {
        match self.next.load(Ordering::Acquire) {
            0 => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                StreamOffset::Since(now.saturating_sub(prefill).as_secs())
            }
            next => StreamOffset::At(next),
        }
    }

    pub(super) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }

    /// True the first time only: the link is being built at start-up.
    pub(super) fn first_establish(&self) -> bool {
        !self.established.swap(true, Ordering::AcqRel)
    }
}

/// Declare the stream with its retention. One that exists with other
/// arguments (an operator changed them, or a policy) is taken as it is.
pub(super) async fn declare(
    connection: &lapin::Connection,
    ch: &Channel,
    c: &AmqpConfig,
    log: &EventLogConfig,
) -> Result<Option<Channel>, MeshError> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    args.insert(
        "x-max-age".into(),
        AMQPValue::LongString(format!("{}s", log.max_age.as_secs().max(1)).into()),
    );
    args.insert(
        "x-max-length-bytes".into(),
        AMQPValue::LongLongInt(i64::try_from(log.max_bytes).unwrap_or(i64::MAX)),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let queue: ShortString = log.queue.as_str().into();
    match ch.queue_declare(queue.clone(), durable, args).await {
        Ok(_) => Ok(None),
        Err(e) => {
            // The channel is closed by the refusal: a new one, and the
            // stream as it is.
            tracing::warn!(
                stream = %log.queue,
                error = %e,
                "the event log exists with other arguments; it is used as it is (change its retention with a policy)"
            );
            let again = connection
                .create_channel()
                .await
                .map_err(|e| fail(c, "cannot open a channel", e))?;
            again
                .queue_declare(
                    queue,
                    QueueDeclareOptions {
                        passive: true,
                        ..durable
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| fail(c, "cannot declare the event log", e))?;
            Ok(Some(again))
        }
    }
}

/// Write this instance's marker into the stream (the first time it reads
/// it): news begins after it.
pub(super) async fn write_marker(shared: &Shared, ch: &Channel) -> Result<(), MeshError> {
    let (Some(log), Some(state)) = (&shared.config.event_log, &shared.log) else {
        return Ok(());
    };
    if state.next.load(Ordering::Acquire) != 0 || state.is_live() {
        return Ok(());
    }
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    *lock(&state.nonce) = nonce.clone();
    let mut headers = FieldTable::default();
    headers.insert(MARKER_HEADER.into(), AMQPValue::LongString(nonce.into()));
    let c = &shared.config;
    ch.basic_publish(
        "".into(),
        log.queue.as_str().into(),
        BasicPublishOptions::default(),
        b"{}",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .map_err(|e| fail(c, "cannot write to the event log", e))?
    .await
    .map_err(|e| fail(c, "cannot write to the event log", e))
    .and_then(super::taken)
}

/// What the live lane makes of a delivery from the stream.
pub(super) enum Live {
    /// This instance's marker, at this offset: news from here on.
    Marker(u64),
    /// Another instance's marker: nothing.
    Skip,
    /// An event (the caller decodes it), at this offset if the broker said.
    Event { position: Option<u64>, live: bool },
}

/// Note a delivery's offset and tell what it is.
pub(super) fn on_delivery(state: &LogState, properties: &Received<'_>) -> Live {
    let position = properties.int_header(OFFSET_HEADER);
    if let Some(p) = position {
        state.next.fetch_max(p.saturating_add(1), Ordering::AcqRel);
    }
    if let Some(nonce) = properties.header(MARKER_HEADER) {
        let mine = *lock(&state.nonce) == *nonce;
        return match (mine, position) {
            (true, Some(p)) => {
                state.live.store(true, Ordering::Release);
                Live::Marker(p)
            }
            _ => Live::Skip,
        };
    }
    Live::Event {
        position,
        live: state.is_live(),
    }
}

/// Read the log from `from` through `until` on a lane of its own: events
/// (size-checked and decoded as on the live lane) and the positions that
/// hold none.
pub(super) fn read(
    shared: &Arc<Shared>,
    from: u64,
    until: u64,
) -> BoxStream<'static, Result<LogRead, MeshError>> {
    let Some(log) = shared.config.event_log.clone() else {
        return Box::pin(futures_util::stream::empty());
    };
    let (tx, rx) =
        mpsc::channel::<Result<(LogRead, Option<u64>), MeshError>>(usize::from(READ_PREFETCH) + 8);
    let c = shared.config.clone();
    let stop = shared.shutdown.clone();
    let (lane_tx, lane_rx) = tokio::sync::oneshot::channel::<Lane>();
    shared.tasks.spawn(async move {
        let name = format!("{} log reader", c.connection_name());
        let spec = LaneSpec {
            url: &c.url,
            name: &name,
            queue: None,
            prefetch: READ_PREFETCH,
            max_body: c.max_message_bytes as u64,
            ack_by_caller: true,
            events: Some(EventsSpec {
                queue: &log.queue,
                prefetch: READ_PREFETCH,
                from: Some(StreamOffset::At(from)),
            }),
        };
        let opened = tokio::time::timeout(c.connect_timeout, Lane::connect(spec)).await;
        let (lane, mut io) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                let _ = tx
                    .send(Err(MeshError::Unavailable(format!(
                        "reading the event log on {}: {e}",
                        redact_url(&c.url)
                    ))))
                    .await;
                return;
            }
            Err(_) => {
                let _ = tx
                    .send(Err(MeshError::Unavailable(
                        "reading the event log: no answer from the broker".into(),
                    )))
                    .await;
                return;
            }
        };
        let _ = lane_tx.send(lane);
        let mut take = |incoming: Incoming<'_>| {
            let item = match incoming {
                Incoming::Delivery {
                    properties,
                    body,
                    tag,
                    ..
                } => {
                    let position = properties.int_header(OFFSET_HEADER);
                    let Some(p) = position else {
                        return;
                    };
                    if properties.header(MARKER_HEADER).is_some() {
                        (LogRead::Skipped(p), Some(tag))
                    } else {
                        match decode_message(&properties, body) {
                            Ok(MeshMessage::Event(ev))
                                if super::drops::echoable(&ev.topic)
                                    && ev
                                        .trace_id
                                        .as_deref()
                                        .is_none_or(super::drops::echoable) =>
                            {
                                let mut ev = IncomingEvent::from(ev);
                                ev.position = Some(p);
                                (LogRead::Event(ev), Some(tag))
                            }
                            _ => (LogRead::Skipped(p), Some(tag)),
                        }
                    }
                }
                _ => return,
            };
            // Never full: the prefetch bounds what the broker sends before
            // the reader acknowledges.
            let _ = tx.try_send(Ok(item));
        };
        tokio::select! {
            _ = io.run(&mut take) => {}
            _ = tx.closed() => {}
            _ = stop.cancelled() => {}
        }
        io.close(Duration::from_secs(1)).await;
    });
    let state = (rx, None::<Lane>, Some(lane_rx), false);
    Box::pin(futures_util::stream::unfold(
        state,
        move |(mut rx, mut lane, mut lane_rx, done)| async move {
            if done {
                return None;
            }
            if let Some(waiting) = lane_rx.take() {
                lane = waiting.await.ok();
            }
            let item = rx.recv().await?;
            let item = match item {
                Ok((read, tag)) => {
                    if let (Some(lane), Some(tag)) = (&lane, tag) {
                        let _ = lane.ack(tag);
                    }
                    Ok(read)
                }
                Err(e) => Err(e),
            };
            let last = match &item {
                Ok(LogRead::Event(e)) => e.position.is_some_and(|p| p >= until),
                Ok(LogRead::Skipped(p)) => *p >= until,
                Err(_) => true,
            };
            Some((item, (rx, lane, lane_rx, last)))
        },
    ))
}
