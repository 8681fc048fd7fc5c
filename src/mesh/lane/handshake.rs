//! The lane's handshake: protocol header, PLAIN login, tuning (frame size,
//! heartbeat), the vhost, one channel, and a consumer with its own prefetch
//! for each queue the lane takes. Each step waits for the broker's answer;
//! the caller bounds the whole.

use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use amq_protocol::uri::AMQPUri;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;

use super::assemble::DEFAULT_FRAME_MAX;
use super::codec::{CHANNEL, method_frame, short, unexpected};
use super::socket::{FrameReader, Writer, open_socket};
use super::{EVENTS_TAG, LaneError, LaneSpec, RESPONSES_TAG, StreamOffset};

/// The heartbeat asked for unless the URL says, in seconds.
const DEFAULT_HEARTBEAT: u16 = 30;

/// A connection through its handshake, consuming.
pub(super) struct Opened {
    pub(super) frames: FrameReader,
    pub(super) writer: Writer,
    /// The socket, on plain TCP, for publishes that write it directly.
    pub(super) direct: Option<Arc<OwnedWriteHalf>>,
    pub(super) frame_max: usize,
    pub(super) heartbeat: Option<Duration>,
    /// Acknowledge once every half of this many deliveries.
    pub(super) ack_prefetch: u16,
}

/// Open the connection and the channel, and start consuming the spec's
/// queues.
pub(super) async fn open(spec: LaneSpec<'_>) -> Result<Opened, LaneError> {
    let uri: AMQPUri = spec
        .url
        .parse()
        .map_err(|e| LaneError::new(format!("bad AMQP URL: {e}")))?;
    let (reader, mut writer, direct) = open_socket(&uri).await?;
    let mut frames = FrameReader::new(reader);
    writer.write_all(b"AMQP\x00\x00\x09\x01").await?;

    let start = match frames.method().await? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Start(s))) => s,
        (_, other) => return Err(unexpected("connection.start", &other)),
    };
    let mechanisms = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
    if !mechanisms.split_whitespace().any(|m| m == "PLAIN") {
        return Err(LaneError::new(format!(
            "the broker offers no PLAIN login (offers: {mechanisms})"
        )));
    }
    let user = &uri.authority.userinfo;
    let response = format!("\0{}\0{}", user.username, user.password);
    let start_ok = connection::AMQPMethod::StartOk(connection::StartOk {
        client_properties: client_properties(spec.name),
        mechanism: "PLAIN".into(),
        response: LongString::from(response),
        locale: "en_US".into(),
    });
    send(&mut writer, 0, AMQPClass::Connection(start_ok)).await?;

    let tune = match frames.method().await? {
        (0, AMQPClass::Connection(connection::AMQPMethod::Tune(t))) => t,
        (_, other) => return Err(unexpected("connection.tune", &other)),
    };
    let wanted_frame = uri.query.frame_max.unwrap_or(DEFAULT_FRAME_MAX);
    let frame_max = match tune.frame_max {
        0 => wanted_frame,
        offered => offered.min(wanted_frame),
    }
    .max(4096);
    let wanted_heartbeat = uri.query.heartbeat.unwrap_or(DEFAULT_HEARTBEAT);
    let heartbeat = match (tune.heartbeat, wanted_heartbeat) {
        (_, 0) => 0,
        (0, mine) => mine,
        (theirs, mine) => theirs.min(mine),
    };
    let tune_ok = connection::AMQPMethod::TuneOk(connection::TuneOk {
        channel_max: 1,
        frame_max,
        heartbeat,
    });
    send(&mut writer, 0, AMQPClass::Connection(tune_ok)).await?;
    frames.buf.set_frame_max(frame_max as usize);
    let open = connection::AMQPMethod::Open(connection::Open {
        virtual_host: short(&uri.vhost, "the vhost")?,
    });
    ask(
        &mut writer,
        &mut frames,
        0,
        AMQPClass::Connection(open),
        "connection.open-ok",
        |a| matches!(a, AMQPClass::Connection(connection::AMQPMethod::OpenOk(_))),
    )
    .await?;

    let open = channel::AMQPMethod::Open(channel::Open {});
    ask(
        &mut writer,
        &mut frames,
        CHANNEL,
        AMQPClass::Channel(open),
        "channel.open-ok",
        |a| matches!(a, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))),
    )
    .await?;
    // The prefetch set before each consume is that consumer's own; a
    // consumer without acknowledgements (the response queue's, unless the
    // caller acknowledges: `LaneSpec::ack_by_caller`) has none.
    let mut consumers = Vec::new();
    if let Some(queue) = spec.queue {
        let prefetch = spec.ack_by_caller.then_some(spec.prefetch.max(2));
        consumers.push((queue, prefetch, RESPONSES_TAG, None));
    }
    if let Some(events) = spec.events {
        consumers.push((
            events.queue,
            Some(events.prefetch.max(2)),
            EVENTS_TAG,
            events.from,
        ));
    }
    for &(queue, prefetch, tag, from) in &consumers {
        if let Some(prefetch) = prefetch {
            let qos = basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            });
            ask(
                &mut writer,
                &mut frames,
                CHANNEL,
                AMQPClass::Basic(qos),
                "basic.qos-ok",
                |a| matches!(a, AMQPClass::Basic(basic::AMQPMethod::QosOk(_))),
            )
            .await?;
        }
        let mut arguments = FieldTable::default();
        if let Some(from) = from {
            let offset = match from {
                StreamOffset::At(n) => AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
                StreamOffset::Since(secs) => AMQPValue::Timestamp(secs),
            };
            arguments.insert("x-stream-offset".into(), offset);
        }
        let consume = basic::AMQPMethod::Consume(basic::Consume {
            queue: short(queue, "the queue name")?,
            consumer_tag: tag.into(),
            no_local: false,
            no_ack: prefetch.is_none(),
            // The instance's own queues are its alone; a queue its
            // instances share (the service queue, the event stream) is not.
            exclusive: !spec.ack_by_caller && from.is_none(),
            nowait: false,
            arguments,
        });
        let wanted = "basic.consume-ok";
        ask(
            &mut writer,
            &mut frames,
            CHANNEL,
            AMQPClass::Basic(consume),
            wanted,
            |a| matches!(a, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))),
        )
        .await?;
    }
    // What came while the consumers were set up is read first once the
    // lane reads. What did not fit goes back to its queue if its consumer
    // acknowledges; one without acknowledgements had nothing to give back.
    let early = frames.early.take();
    let mut lost = 0usize;
    for (tag, consumer) in early.let_go {
        let acked = consumers
            .iter()
            .any(|c| c.2 == consumer.as_str() && c.1.is_some() && c.3.is_none());
        if !acked {
            lost += 1;
            continue;
        }
        let nack = basic::AMQPMethod::Nack(basic::Nack {
            delivery_tag: tag,
            multiple: false,
            requeue: true,
        });
        send(&mut writer, CHANNEL, AMQPClass::Basic(nack)).await?;
    }
    if lost > 0 {
        tracing::warn!(
            lane = spec.name,
            lost,
            "messages that came while the lane was starting were let go (over {} bytes)",
            super::early::EARLY_MAX
        );
    }
    frames.buf.unread(early.frames);
    // Acks are per channel: one for all every half of the smaller
    // prefetch, so neither consumer ever waits on one.
    let ack_prefetch = consumers.iter().filter_map(|c| c.1).min().unwrap_or(2);

    let heartbeat = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
    Ok(Opened {
        frames,
        writer,
        direct,
        frame_max: frame_max as usize,
        heartbeat,
        ack_prefetch,
    })
}

/// The client's properties: who it is, and that it wants a `basic.cancel`
/// when its queue goes, a close frame (not a dropped socket) when its
/// credentials are refused, and `connection.blocked` when a resource alarm
/// stops the broker taking publishes.
fn client_properties(name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for cap in [
        "consumer_cancel_notify",
        "authentication_failure_close",
        "connection.blocked",
    ] {
        capabilities.insert(cap.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    props.insert("product".into(), s("nuropb-bff"));
    props.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    props.insert("platform".into(), s("Rust"));
    props.insert("connection_name".into(), s(name));
    props.insert("capabilities".into(), AMQPValue::FieldTable(capabilities));
    props
}

async fn send(writer: &mut Writer, channel: u16, class: AMQPClass) -> Result<(), LaneError> {
    let frame = method_frame(channel, class)?;
    writer.write_all(&frame).await?;
    Ok(())
}

/// One step of the handshake: send `class` on `channel` and take the
/// broker's answer, which `answers` must accept (it is `wanted`).
async fn ask(
    writer: &mut Writer,
    frames: &mut FrameReader,
    channel: u16,
    class: AMQPClass,
    wanted: &str,
    answers: fn(&AMQPClass) -> bool,
) -> Result<(), LaneError> {
    send(writer, channel, class).await?;
    match frames.method().await? {
        (ch, answer) if ch == channel && answers(&answer) => Ok(()),
        (_, other) => Err(unexpected(wanted, &other)),
    }
}
