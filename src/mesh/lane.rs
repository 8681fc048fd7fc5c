//! The request lane: RPC requests out and their responses in, on a broker
//! connection of the gateway's own that two tokio tasks drive.
//!
//! lapin runs one I/O thread per connection, and every frame crosses between
//! it and the runtime's workers through channels; most of what a request
//! cost the gateway was those hand-offs (BENCHMARKS.md). On the lane a
//! request is encoded straight into a write buffer. When nothing else is
//! queued or being written, the publishing task writes it to the socket
//! itself (on plain TCP); otherwise the lane's task flushes the buffer, as
//! many requests per write as have queued since the last one. The same
//! task reads the socket, and a response completes its call from there,
//! with no other task or thread in between.
//!
//! The lane speaks only the part of AMQP 0-9-1 it needs, through
//! amq-protocol (the codec lapin is built on): the handshake, one channel,
//! `basic.publish`, `basic.consume` with a prefetch and batched acks,
//! `basic.return`, heartbeats and closing. Anything else the broker says
//! that matters (the consumer cancelled, the channel or the connection
//! closed, a frame over the negotiated size, silence past two heartbeats)
//! ends the lane with the reason, and the mesh rebuilds its whole link.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, parse_class};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

/// The one channel the lane opens.
const CHANNEL: u16 = 1;
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before a frame's payload, and its end byte.
const FRAME_OVERHEAD: usize = 8;
/// The basic class, whose content the lane sends and takes.
const BASIC_CLASS: u16 = 60;
/// The frame size asked for unless the URL says (RabbitMQ's default).
const DEFAULT_FRAME_MAX: u32 = 128 * 1024;
/// The heartbeat asked for unless the URL says, in seconds.
const DEFAULT_HEARTBEAT: u16 = 30;
/// Encoded frames waiting to be written, at most: past it a publish is
/// refused (the broker is not reading) instead of growing memory.
const MAX_BACKLOG: usize = 16 << 20;
/// The largest message body taken from the broker; a larger one ends the
/// lane rather than being buffered.
const MAX_BODY: u64 = 64 << 20;
/// Read this much at a time.
const READ_CHUNK: usize = 64 * 1024;

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
    },
    /// A `mandatory` publish nobody could take (NO_ROUTE).
    Returned { properties: Received<'a> },
}

/// A received message's properties, read in place from its content header:
/// the correlation id and the headers, found without copying a string or
/// building a table. Made only from a header [`parse_header`] has checked
/// whole.
#[derive(Debug, Clone, Copy)]
pub(super) struct Received<'a> {
    correlation_id: Option<&'a [u8]>,
    /// The header table's entries (after its size).
    headers: &'a [u8],
}

impl<'a> Received<'a> {
    /// The correlation id, if it has one in UTF-8.
    pub(super) fn correlation_id(&self) -> Option<&'a str> {
        std::str::from_utf8(self.correlation_id?).ok()
    }

    /// A string header's value (a long string; bytes that are not UTF-8
    /// replaced); `None` when absent or of another type.
    pub(super) fn header(&self, name: &str) -> Option<std::borrow::Cow<'a, str>> {
        for entry in table_entries(self.headers) {
            let (key, kind, value) = entry?;
            if key == name.as_bytes() {
                return (kind == b'S').then(|| String::from_utf8_lossy(value));
            }
        }
        None
    }
}

/// Reads AMQP's big-endian fields off a slice; `None` when it runs out.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(taken)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    fn short(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn long(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_be_bytes(self.array()?);
        self.take(usize::try_from(n).ok()?)
    }
}

/// Read one field value of type `kind` (RabbitMQ's field types, as lapin's
/// codec reads them): its bytes, a long string's or table's without their
/// size; `None` for an unknown type or a short table.
fn field_value<'a>(c: &mut Cursor<'a>, kind: u8) -> Option<&'a [u8]> {
    match kind {
        b't' | b'b' | b'B' => c.take(1),
        b's' | b'U' | b'u' => c.take(2),
        b'I' | b'i' | b'f' => c.take(4),
        b'D' => c.take(5),
        b'l' | b'L' | b'd' | b'T' => c.take(8),
        b'S' | b'x' | b'A' | b'F' => c.long(),
        b'V' => Some(&[][..]),
        _ => None,
    }
}

/// A header table's entries (after its size), in order: the name, the
/// field type and the value's bytes; `None` for the first entry that does
/// not parse, and nothing after it.
fn table_entries(table: &[u8]) -> impl Iterator<Item = Option<(&[u8], u8, &[u8])>> {
    let mut c = Cursor(table);
    let mut broken = false;
    std::iter::from_fn(move || {
        if broken || c.0.is_empty() {
            return None;
        }
        let key = c.short();
        let entry = key.and_then(|key| {
            let kind = c.u8()?;
            Some((key, kind, field_value(&mut c, kind)?))
        });
        broken = entry.is_none();
        Some(entry)
    })
}

/// A content header frame's payload: the body's size and the properties,
/// the header table checked entry by entry.
fn parse_header(payload: &[u8]) -> Result<(u64, Received<'_>), LaneError> {
    let bad = || LaneError::new("an undecodable content header");
    let mut c = Cursor(payload);
    if c.u16() != Some(BASIC_CLASS) {
        return Err(bad());
    }
    let _weight = c.u16().ok_or_else(bad)?;
    let size = c.u64().ok_or_else(bad)?;
    let flags = c.u16().ok_or_else(bad)?;
    // Bit 0 says another flag word follows; basic has 14 properties, all
    // in the first word, so any further word must name none.
    let mut more = flags & 1 != 0;
    while more {
        let word = c.u16().ok_or_else(bad)?;
        if word & !1 != 0 {
            return Err(bad());
        }
        more = word & 1 != 0;
    }
    if flags & 0b10 != 0 {
        return Err(bad());
    }
    let mut received = Received {
        correlation_id: None,
        headers: &[],
    };
    for bit in (2..=15).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        let read = match bit {
            // headers
            13 => c
                .long()
                .filter(|table| table_entries(table).all(|entry| entry.is_some()))
                .map(|table| received.headers = table),
            // delivery-mode, priority
            12 | 11 => c.u8().map(drop),
            10 => c.short().map(|id| received.correlation_id = Some(id)),
            // timestamp
            6 => c.u64().map(drop),
            // content-type, content-encoding, reply-to, expiration,
            // message-id, type, user-id, app-id, cluster-id
            _ => c.short().map(drop),
        };
        read.ok_or_else(bad)?;
    }
    Ok((size, received))
}

/// A `basic.deliver` read in place: its delivery tag, and whether it came
/// to the consumer tagged `consumer`. `None` for any other method, or a
/// deliver cut short. What follows its fields is left unread, as lapin's
/// codec leaves it: the one reader of deliveries.
fn parse_deliver(payload: &[u8], consumer: &str) -> Option<(u64, bool)> {
    let mut c = Cursor(payload);
    if c.u16()? != BASIC_CLASS || c.u16()? != BASIC_DELIVER {
        return None;
    }
    let tag = c.short()?;
    let delivery_tag = c.u64()?;
    // redelivered (a bit), the exchange, the routing key.
    c.u8()?;
    c.short()?;
    c.short()?;
    Some((delivery_tag, tag == consumer.as_bytes()))
}

/// `basic.deliver`'s method id.
const BASIC_DELIVER: u16 = 60;

type Reader = Pin<Box<dyn AsyncRead + Send>>;
type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// The write half of a plain TCP connection, shared by the writer task and
/// the publishes that write directly ([`Inner::queue`]).
struct SharedWrite(Arc<OwnedWriteHalf>);

impl AsyncWrite for SharedWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.0.as_ref().as_ref().poll_write_ready(cx))?;
            match self.0.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                written => return std::task::Poll::Ready(written),
            }
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // The socket closes when the lane (both halves) is dropped.
        std::task::Poll::Ready(Ok(()))
    }
}

/// The receiving half and the socket: run by the mesh's supervisor.
pub(super) struct LaneIo {
    inner: Arc<Inner>,
    frames: FrameReader,
    writer: Writer,
    heartbeat: Option<Duration>,
    prefetch: u16,
}

impl std::fmt::Debug for LaneIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneIo")
            .field("heartbeat", &self.heartbeat)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One frame whole in the read buffer: its type, channel and where its
/// payload lies.
#[derive(Debug, Clone, Copy)]
struct Frame {
    kind: u8,
    channel: u16,
    start: usize,
    end: usize,
}

/// Frames off the socket: reads in chunks and cuts them, refusing any
/// frame over the negotiated size before buffering it.
struct FrameReader {
    io: Reader,
    buf: Vec<u8>,
    pos: usize,
    frame_max: usize,
}

impl FrameReader {
    fn new(io: Reader) -> Self {
        Self {
            io,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            frame_max: DEFAULT_FRAME_MAX as usize,
        }
    }

    /// The next frame already in the buffer, if one is whole.
    fn buffered(&mut self) -> Result<Option<Frame>, LaneError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]) as usize;
        if size + FRAME_OVERHEAD > self.frame_max {
            return Err(LaneError::new(format!(
                "the broker sent a {size}-byte frame, over the {} negotiated",
                self.frame_max
            )));
        }
        if avail.len() < size + FRAME_OVERHEAD {
            return Ok(None);
        }
        if avail[7 + size] != FRAME_END {
            return Err(LaneError::new("a frame from the broker lacks its end byte"));
        }
        let frame = Frame {
            kind: avail[0],
            channel: u16::from_be_bytes([avail[1], avail[2]]),
            start: self.pos + 7,
            end: self.pos + 7 + size,
        };
        self.pos += size + FRAME_OVERHEAD;
        Ok(Some(frame))
    }

    fn payload(&self, frame: Frame) -> &[u8] {
        &self.buf[frame.start..frame.end]
    }

    /// Read more from the socket; `within` bounds the wait (heartbeats).
    async fn fill(&mut self, within: Option<Duration>) -> Result<(), LaneError> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        if self.buf.capacity() > 4 * READ_CHUNK.max(self.frame_max) && self.buf.len() < READ_CHUNK {
            self.buf.shrink_to(READ_CHUNK);
        }
        self.buf.reserve(READ_CHUNK);
        let read = self.io.read_buf(&mut self.buf);
        let n = match within {
            Some(limit) => tokio::time::timeout(limit, read).await.map_err(|_| {
                LaneError::new(format!(
                    "no word from the broker in {limit:?} (heartbeats missed)"
                ))
            })??,
            None => read.await?,
        };
        if n == 0 {
            return Err(LaneError::new("the broker closed the connection"));
        }
        Ok(())
    }

    /// The next method frame, reading as needed: the handshake's steps.
    /// Heartbeats pass; the broker closing says why.
    async fn method(&mut self) -> Result<(u16, AMQPClass), LaneError> {
        loop {
            while let Some(frame) = self.buffered()? {
                match frame.kind {
                    FRAME_HEARTBEAT => continue,
                    FRAME_METHOD => {}
                    other => {
                        return Err(LaneError::new(format!(
                            "a frame of type {other} during the handshake"
                        )));
                    }
                }
                let class = decode_method(self.payload(frame))?;
                if let Some(why) = closed_by_broker(&class) {
                    return Err(why);
                }
                return Ok((frame.channel, class));
            }
            self.fill(None).await?;
        }
    }
}

fn decode_method(payload: &[u8]) -> Result<AMQPClass, LaneError> {
    parse_class(payload)
        .map(|(_, class)| class)
        .map_err(|_| LaneError::new("an undecodable method frame from the broker"))
}

/// The reason, if `class` is the broker closing the connection or channel.
fn closed_by_broker(class: &AMQPClass) -> Option<LaneError> {
    let (what, code, text) = match class {
        AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
            ("connection", c.reply_code, c.reply_text.as_str())
        }
        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
            ("channel", c.reply_code, c.reply_text.as_str())
        }
        _ => return None,
    };
    Some(LaneError::new(format!(
        "the broker closed the {what}: {code} {text}"
    )))
}

fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) -> Result<(), LaneError> {
    let ctx = gen_frame(frame)(WriteContext::from(std::mem::take(out)))
        .map_err(|e| LaneError::new(format!("cannot encode a frame: {e}")))?;
    *out = ctx.write;
    Ok(())
}

fn method_frame(channel: u16, class: AMQPClass) -> Result<Vec<u8>, LaneError> {
    let mut out = Vec::with_capacity(64);
    encode(&AMQPFrame::Method(channel, class), &mut out)?;
    Ok(out)
}

/// Body frames for `body`, each at most `frame_max` long.
fn put_body(out: &mut Vec<u8>, body: &[u8], frame_max: usize) {
    for chunk in body.chunks(frame_max - FRAME_OVERHEAD) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&CHANNEL.to_be_bytes());
        // A chunk is under frame_max, which is a u32.
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
        out.push(FRAME_END);
    }
}

fn short(s: &str, what: &str) -> Result<ShortString, LaneError> {
    check_short(s, what)?;
    Ok(s.into())
}

/// The client's properties: who it is, and that it wants a `basic.cancel`
/// when its queue goes and a close frame (not a dropped socket) when its
/// credentials are refused.
fn client_properties(name: &str) -> FieldTable {
    let mut capabilities = FieldTable::default();
    for cap in ["consumer_cancel_notify", "authentication_failure_close"] {
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

async fn open_socket(
    uri: &AMQPUri,
) -> Result<(Reader, Writer, Option<Arc<OwnedWriteHalf>>), LaneError> {
    let host = uri.authority.host.as_str();
    let stream = TcpStream::connect((host, uri.authority.port))
        .await
        .map_err(|e| LaneError::new(format!("cannot connect: {e}")))?;
    stream.set_nodelay(true)?;
    match uri.scheme {
        AMQPScheme::AMQP => {
            let (r, w) = stream.into_split();
            let w = Arc::new(w);
            Ok((Box::pin(r), Box::pin(SharedWrite(w.clone())), Some(w)))
        }
        AMQPScheme::AMQPS => {
            let tls = tls_connector()?;
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_owned())
                .map_err(|e| LaneError::new(format!("TLS: {host}: {e}")))?;
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|e| LaneError::new(format!("TLS handshake: {e}")))?;
            let (r, w) = tokio::io::split(stream);
            Ok((Box::pin(r), Box::pin(w), None))
        }
    }
}

/// TLS to the broker, trusting the system's roots (`SSL_CERT_FILE` and
/// `SSL_CERT_DIR` honoured), as lapin's connection does.
fn tls_connector() -> Result<tokio_rustls::TlsConnector, LaneError> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(LaneError::new("TLS: no trusted root certificates found"));
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LaneError::new(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// What the caller of [`Lane::connect`] asks of the lane.
#[derive(Debug, Clone, Copy)]
pub(super) struct LaneSpec<'a> {
    pub(super) url: &'a str,
    /// Shown by the broker for the connection.
    pub(super) name: &'a str,
    /// The queue to consume (the instance's response queue).
    pub(super) queue: &'a str,
    /// Deliveries the broker may send before they are acknowledged.
    pub(super) prefetch: u16,
    /// The instance's event queue and its prefetch, if it takes events.
    pub(super) events: Option<(&'a str, u16)>,
}

/// The consumer tags the lane asks for: which queue a delivery came from.
const RESPONSES_TAG: &str = "responses";
const EVENTS_TAG: &str = "events";

impl Lane {
    /// Open the connection and the channel, and start consuming `queue`.
    /// The caller bounds the time this takes.
    pub(super) async fn connect(spec: LaneSpec<'_>) -> Result<(Lane, LaneIo), LaneError> {
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
        frames.frame_max = frame_max as usize;
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
        // The prefetch set before each consume is that consumer's own.
        let mut consumers = vec![(spec.queue, spec.prefetch.max(2), RESPONSES_TAG)];
        if let Some((queue, prefetch)) = spec.events {
            consumers.push((queue, prefetch.max(2), EVENTS_TAG));
        }
        for &(queue, prefetch, tag) in &consumers {
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
            let consume = basic::AMQPMethod::Consume(basic::Consume {
                queue: short(queue, "the queue name")?,
                consumer_tag: tag.into(),
                no_local: false,
                no_ack: false,
                exclusive: true,
                nowait: false,
                arguments: FieldTable::default(),
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
        // Acks are per channel: one for all every half of the smaller
        // prefetch, so neither consumer ever waits on one.
        let ack_prefetch = consumers.iter().map(|c| c.1).min().unwrap_or(2);

        let inner = Arc::new(Inner {
            out: Mutex::new(Vec::new()),
            writing: AtomicBool::new(false),
            direct,
            wake: Notify::new(),
            open: AtomicBool::new(true),
            frame_max: frame_max as usize,
        });
        let heartbeat = (heartbeat > 0).then(|| Duration::from_secs(u64::from(heartbeat)));
        let io = LaneIo {
            inner: inner.clone(),
            frames,
            writer,
            heartbeat,
            prefetch: ack_prefetch,
        };
        Ok((Lane { inner }, io))
    }

    /// Whether the lane can still send.
    pub(super) fn is_open(&self) -> bool {
        self.inner.open.load(Ordering::Acquire)
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

/// `basic.publish`'s method id.
const BASIC_PUBLISH: u16 = 40;

/// The properties of a message published on the lane, borrowed from the
/// call: written straight into the write buffer, where lapin's
/// `BasicProperties` would copy each string and build a table first.
#[derive(Debug)]
pub(super) struct Properties<'a> {
    pub content_type: &'a str,
    pub correlation_id: &'a str,
    pub reply_to: &'a str,
    /// Milliseconds, as AMQP's decimal string.
    pub expiration_ms: u64,
    /// Long-string headers in the order they are written (a broker does not
    /// mind the order; lapin writes them sorted by name); `None` is void.
    pub headers: &'a [(&'a str, Option<&'a str>)],
}

impl Properties<'_> {
    /// The content header frame's payload size, once every string is known
    /// to fit its AMQP type.
    fn check(&self) -> Result<usize, LaneError> {
        check_short(self.content_type, "the content type")?;
        check_short(self.correlation_id, "the correlation id")?;
        check_short(self.reply_to, "the reply queue")?;
        let mut table = 0usize;
        for (name, value) in self.headers {
            check_short(name, "a header name")?;
            table += 1 + name.len() + 1 + value.map_or(0, |v| 4 + v.len());
        }
        if u32::try_from(table).is_err() {
            return Err(LaneError::new("the headers are over 4 GiB"));
        }
        let shorts = [self.content_type, self.correlation_id, self.reply_to]
            .iter()
            .map(|s| 1 + s.len())
            .sum::<usize>();
        let expiration = 1 + Digits::of(self.expiration_ms).as_bytes().len();
        // class, weight, body size, flags; the table's size; the strings.
        Ok(2 + 2 + 8 + 2 + 4 + table + shorts + expiration)
    }

    /// The flags and the property list, in AMQP's order.
    fn put(&self, out: &mut Vec<u8>) {
        // content-type (15), headers (13), correlation-id (10), reply-to
        // (9), expiration (8).
        let flags: u16 = 1 << 15 | 1 << 13 | 1 << 10 | 1 << 9 | 1 << 8;
        out.extend_from_slice(&flags.to_be_bytes());
        put_short(out, self.content_type);
        let size_at = out.len();
        out.extend_from_slice(&[0; 4]);
        for (name, value) in self.headers {
            put_short(out, name);
            match value {
                Some(v) => {
                    out.push(b'S');
                    // Checked to fit a u32 with the table.
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v.as_bytes());
                }
                None => out.push(b'V'),
            }
        }
        let table = (out.len() - size_at - 4) as u32;
        out[size_at..size_at + 4].copy_from_slice(&table.to_be_bytes());
        put_short(out, self.correlation_id);
        put_short(out, self.reply_to);
        put_short(out, Digits::of(self.expiration_ms).as_str());
    }
}

/// A u64's decimal digits, on the stack.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn of(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Self { buf, start }
    }
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
    fn as_str(&self) -> &str {
        // Only ASCII digits were written.
        std::str::from_utf8(self.as_bytes()).unwrap_or("0")
    }
}

/// One frame on the lane's channel: its header, what `payload` writes, its
/// size put in after, and the end byte.
fn put_frame(out: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
    out.push(kind);
    out.extend_from_slice(&CHANNEL.to_be_bytes());
    let size_at = out.len();
    out.extend_from_slice(&[0; 4]);
    payload(out);
    // Callers check that a frame fits frame_max, a u32.
    let size = (out.len() - size_at - 4) as u32;
    out[size_at..size_at + 4].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// An AMQP short string; [`check_short`] has checked its length.
fn put_short(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

fn check_short(s: &str, what: &str) -> Result<(), LaneError> {
    if s.len() > 255 {
        return Err(LaneError::new(format!("{what} is over 255 bytes")));
    }
    Ok(())
}

impl Inner {
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

fn unexpected(wanted: &str, got: &AMQPClass) -> LaneError {
    LaneError::new(format!(
        "expected {wanted} from the broker, got {}",
        method_name(got)
    ))
}

fn method_name(class: &AMQPClass) -> String {
    format!(
        "{}.{}",
        class.get_amqp_class_id(),
        class.get_amqp_method_id()
    )
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

/// A message whose content frames are still arriving.
struct Content {
    /// The delivery tag, or `None` for a returned message.
    tag: Option<u64>,
    /// From the event queue.
    event: bool,
    /// Its content header has come (the read loop keeps its bytes).
    has_header: bool,
    size: u64,
    body: Vec<u8>,
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
            r = read_loop(&inner, &mut self.frames, self.heartbeat, self.prefetch, on) => r,
            w = write_loop(&inner, &mut self.writer, self.heartbeat) => w,
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
    heartbeat: Option<Duration>,
    prefetch: u16,
    on: &mut (dyn FnMut(Incoming<'_>) + Send),
) -> LaneError {
    // Acknowledge once half the prefetch is taken: the broker never waits
    // on an ack, and an ack rides along with the next requests.
    let ack_every = u64::from(prefetch / 2).max(1);
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    let mut content: Option<Content> = None;
    // The content header of the message in `content`.
    let mut header: Vec<u8> = Vec::new();
    let silence = heartbeat.map(|h| h * 2);
    loop {
        loop {
            let frame = match frames.buffered() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return e,
            };
            if frame.channel != CHANNEL && frame.kind != FRAME_HEARTBEAT && frame.channel != 0 {
                return LaneError::new(format!("a frame on channel {}", frame.channel));
            }
            let payload = frames.payload(frame);
            match frame.kind {
                FRAME_HEARTBEAT => {}
                FRAME_METHOD => {
                    if content.is_some() {
                        return LaneError::new("a method frame inside a message's content");
                    }
                    // Deliveries, nearly every frame, are read in place; a
                    // deliver cut short is undecodable to the codec below.
                    if let Some((tag, event)) = parse_deliver(payload, EVENTS_TAG) {
                        let mut c = Content::new(Some(tag));
                        c.event = event;
                        content = Some(c);
                        continue;
                    }
                    let class = match decode_method(payload) {
                        Ok(c) => c,
                        Err(e) => return e,
                    };
                    match class {
                        AMQPClass::Basic(basic::AMQPMethod::Return(_)) => {
                            content = Some(Content::new(None));
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(_)) => {
                            return LaneError::new(
                                "the broker cancelled a consumer (its queue is gone)",
                            );
                        }
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => {
                            return LaneError::new("closed");
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                            let ok = connection::AMQPMethod::CloseOk(connection::CloseOk {});
                            let _ = inner.queue_method(0, AMQPClass::Connection(ok));
                            return closed_by_broker(&class)
                                .unwrap_or_else(|| LaneError::new("closed"));
                        }
                        AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                            return closed_by_broker(&class)
                                .unwrap_or_else(|| LaneError::new("closed"));
                        }
                        other => {
                            tracing::debug!(method = %method_name(&other), "request lane: ignored a method from the broker");
                        }
                    }
                }
                FRAME_HEADER => {
                    let Some(mut c) = content.take().filter(|c| !c.has_header) else {
                        return LaneError::new("a content header without its method");
                    };
                    let size = match parse_header(payload) {
                        Ok((size, _)) => size,
                        Err(e) => return e,
                    };
                    if size > MAX_BODY {
                        return LaneError::new(format!(
                            "the broker sent a {size}-byte message, over the {MAX_BODY} taken"
                        ));
                    }
                    c.size = size;
                    c.has_header = true;
                    // Kept until the body is whole; one message's content
                    // at a time on the channel, so one buffer serves all.
                    header.clear();
                    header.extend_from_slice(payload);
                    if c.size == 0 {
                        c.finish(&header, &[], on, &mut unacked, &mut last_tag);
                    } else {
                        content = Some(c);
                    }
                }
                FRAME_BODY => {
                    let Some(mut c) = content.take().filter(|c| c.has_header) else {
                        return LaneError::new("a content body without its header");
                    };
                    let have = c.body.len() as u64 + payload.len() as u64;
                    if have > c.size {
                        return LaneError::new("a content body longer than its header said");
                    }
                    if have < c.size {
                        // Grown as frames come, never reserved up front
                        // from what the header claims.
                        c.body.extend_from_slice(payload);
                        content = Some(c);
                    } else if c.body.is_empty() {
                        // The whole body in one frame: straight from the
                        // read buffer.
                        c.finish(&header, payload, on, &mut unacked, &mut last_tag);
                    } else {
                        c.body.extend_from_slice(payload);
                        let body = std::mem::take(&mut c.body);
                        c.finish(&header, &body, on, &mut unacked, &mut last_tag);
                    }
                }
                other => return LaneError::new(format!("a frame of unknown type {other}")),
            }
        }
        if unacked >= ack_every {
            let ack = basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: last_tag,
                multiple: true,
            });
            if let Err(e) = inner.queue_method(CHANNEL, AMQPClass::Basic(ack)) {
                return e;
            }
            unacked = 0;
        }
        if let Err(e) = frames.fill(silence).await {
            return e;
        }
    }
}

impl Content {
    fn new(tag: Option<u64>) -> Self {
        Self {
            tag,
            event: false,
            has_header: false,
            size: 0,
            body: Vec::new(),
        }
    }

    /// Hand the whole message to `on`; `header` is its content header,
    /// checked when it came.
    fn finish(
        self,
        header: &[u8],
        body: &[u8],
        on: &mut (dyn FnMut(Incoming<'_>) + Send),
        unacked: &mut u64,
        last_tag: &mut u64,
    ) {
        let Ok((_, properties)) = parse_header(header) else {
            return;
        };
        match self.tag {
            Some(tag) => {
                on(Incoming::Delivery {
                    properties,
                    body,
                    event: self.event,
                });
                *unacked += 1;
                *last_tag = tag;
            }
            None => on(Incoming::Returned { properties }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::AMQPContentHeader;
    use amq_protocol::frame::parsing::parse_content_header;
    use amq_protocol::protocol::BasicProperties;

    fn reader_of(bytes: Vec<u8>) -> FrameReader {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = b.write_all(&bytes).await;
        });
        FrameReader::new(Box::pin(a))
    }

    #[tokio::test]
    async fn frames_over_the_negotiated_size_are_refused_before_buffering() {
        // A header announcing a 1 MiB payload: refused from its 7 bytes.
        let mut bytes = vec![FRAME_BODY, 0, 1];
        bytes.extend_from_slice(&(1u32 << 20).to_be_bytes());
        let mut r = reader_of(bytes);
        r.fill(None).await.unwrap();
        let err = r.buffered().unwrap_err();
        assert!(err.to_string().contains("negotiated"), "{err}");
    }

    #[tokio::test]
    async fn a_frame_without_its_end_byte_is_refused() {
        let mut bytes = vec![FRAME_BODY, 0, 1, 0, 0, 0, 2, b'h', b'i', 0x00];
        bytes.extend_from_slice(&[0; 4]);
        let mut r = reader_of(bytes);
        r.fill(None).await.unwrap();
        assert!(r.buffered().unwrap_err().to_string().contains("end byte"));
    }

    #[test]
    fn bodies_are_cut_to_the_frame_size() {
        let mut out = Vec::new();
        let body = vec![7u8; 10_000];
        put_body(&mut out, &body, 4096);
        // 4088 + 4088 + 1824
        assert_eq!(out.len(), 10_000 + 3 * FRAME_OVERHEAD);
        assert_eq!(&out[3..7], &4088u32.to_be_bytes());
        assert_eq!(out[7 + 4088], FRAME_END);
    }

    #[tokio::test]
    async fn a_publish_encodes_method_header_and_body_that_parse_back() {
        let inner = test_inner();
        let lane = Lane {
            inner: inner.clone(),
        };
        let props = Properties {
            content_type: "application/json",
            correlation_id: "abc",
            reply_to: "rq",
            expiration_ms: 500,
            headers: &[("trace_id", Some("t"))],
        };
        lane.publish("x", "svc", true, &props, b"{\"a\":1}")
            .unwrap();
        let bytes = std::mem::take(&mut *lock(&inner.out));
        let mut r = reader_of(bytes);
        r.fill(None).await.unwrap();
        let m = r.buffered().unwrap().unwrap();
        match decode_method(r.payload(m)).unwrap() {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => {
                assert_eq!(p.exchange.as_str(), "x");
                assert_eq!(p.routing_key.as_str(), "svc");
                assert!(p.mandatory);
            }
            other => panic!("{other:?}"),
        }
        let h = r.buffered().unwrap().unwrap();
        let (_, header) = parse_content_header(r.payload(h)).unwrap();
        assert_eq!(header.body_size, 7);
        assert_eq!(
            header
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some("abc")
        );
        let b = r.buffered().unwrap().unwrap();
        assert_eq!(r.payload(b), b"{\"a\":1}");
        // Closed: refused at once.
        inner.open.store(false, Ordering::Release);
        assert!(lane.publish("x", "svc", true, &props, b"{}").is_err());
    }

    /// A content header as lapin's codec writes it: every basic property
    /// set, and a header of every field type a broker sends.
    fn full_header(body_size: u64) -> Vec<u8> {
        use amq_protocol::types::{DecimalValue, FieldArray};
        let mut nested = FieldTable::default();
        nested.insert("deep".into(), AMQPValue::LongString("no".into()));
        let mut headers = FieldTable::default();
        let values = [
            AMQPValue::Boolean(true),
            AMQPValue::ShortShortInt(-1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(-2),
            AMQPValue::ShortUInt(2),
            AMQPValue::LongInt(-3),
            AMQPValue::LongUInt(3),
            AMQPValue::LongLongInt(-4),
            AMQPValue::Float(1.5),
            AMQPValue::Double(2.5),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 314,
            }),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString("x".into())])),
            AMQPValue::Timestamp(1_700_000_000),
            AMQPValue::FieldTable(nested),
            AMQPValue::ByteArray(vec![1u8, 2, 3].into()),
            AMQPValue::Void,
        ];
        for (i, v) in values.into_iter().enumerate() {
            headers.insert(format!("h{i:02}").into(), v);
        }
        headers.insert(
            "nuropb_type".into(),
            AMQPValue::LongString("response".into()),
        );
        headers.insert(
            "z_bytes".into(),
            AMQPValue::LongString(vec![0xff, b'a'].into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_correlation_id("corr-1".into())
            .with_reply_to("rq".into())
            .with_expiration("1000".into())
            .with_message_id("m".into())
            .with_timestamp(1_700_000_000)
            .with_type("t".into())
            .with_user_id("guest".into())
            .with_app_id("app".into())
            .with_cluster_id("c".into());
        let header = AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size,
            properties,
        };
        let mut out = Vec::new();
        encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
        // The payload: without the frame's 7-byte head and its end byte.
        out[7..out.len() - 1].to_vec()
    }

    #[test]
    fn a_content_header_is_read_in_place_as_lapins_codec_wrote_it() {
        let payload = full_header(1234);
        let (size, p) = parse_header(&payload).unwrap();
        assert_eq!(size, 1234);
        assert_eq!(p.correlation_id(), Some("corr-1"));
        assert_eq!(p.header("nuropb_type").as_deref(), Some("response"));
        // Bytes that are not UTF-8 are replaced, not refused.
        assert_eq!(p.header("z_bytes").as_deref(), Some("\u{fffd}a"));
        // A header of another type is no string; a nested one is not a
        // top-level one; an absent one is absent.
        assert_eq!(p.header("h00"), None);
        assert_eq!(p.header("deep"), None);
        assert_eq!(p.header("absent"), None);
        // Only the correlation id and the headers: nothing else set.
        let bare = {
            let header = AMQPContentHeader {
                class_id: BASIC_CLASS,
                body_size: 0,
                properties: BasicProperties::default(),
            };
            let mut out = Vec::new();
            encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
            out[7..out.len() - 1].to_vec()
        };
        let (size, p) = parse_header(&bare).unwrap();
        assert_eq!((size, p.correlation_id(), p.header("x")), (0, None, None));
    }

    #[test]
    fn a_cut_or_malformed_content_header_is_refused_not_misread() {
        let payload = full_header(7);
        // Cut anywhere: refused (never a panic, never a short read taken
        // for the whole).
        for cut in 0..payload.len() {
            assert!(parse_header(&payload[..cut]).is_err(), "cut at {cut}");
        }
        // Another class.
        let mut other = payload.clone();
        other[1] = 50;
        assert!(parse_header(&other).is_err());
        // A field of a type no broker sends ('h00' holds a boolean).
        let at = payload.windows(4).position(|w| w == b"h00t").unwrap();
        let mut unknown = payload.clone();
        unknown[at + 3] = b'?';
        assert!(parse_header(&unknown).is_err());
        // A continuation flag word naming more properties.
        let mut more = payload[..14].to_vec();
        more[13] |= 1;
        more.extend_from_slice(&[0x80, 0x00]);
        more.extend_from_slice(&payload[14..]);
        assert!(parse_header(&more).is_err());
    }

    #[test]
    fn a_deliver_is_read_in_place_and_anything_else_is_left_to_the_codec() {
        let frame = deliver_to(EVENTS_TAG, 42);
        let payload = &frame[7..frame.len() - 1];
        assert_eq!(parse_deliver(payload, EVENTS_TAG), Some((42, true)));
        assert_eq!(parse_deliver(payload, RESPONSES_TAG), Some((42, false)));
        // Cut short: neither reader takes it, so the lane ends on it
        // (never an unread deliver left to the codec's ignored methods).
        for cut in 0..payload.len() {
            assert_eq!(parse_deliver(&payload[..cut], EVENTS_TAG), None);
            assert!(decode_method(&payload[..cut]).is_err(), "cut at {cut}");
        }
        // Bytes after its fields are left unread by both, as lapin's codec
        // leaves them.
        let mut longer = payload.to_vec();
        longer.extend_from_slice(b"more");
        assert_eq!(parse_deliver(&longer, EVENTS_TAG), Some((42, true)));
        assert!(matches!(
            decode_method(&longer),
            Ok(AMQPClass::Basic(basic::AMQPMethod::Deliver(_)))
        ));
        let ack = method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: false,
            })),
        );
        assert_eq!(parse_deliver(&ack[7..ack.len() - 1], EVENTS_TAG), None);
    }

    /// What lapin's codec writes for the same publish.
    fn lapin_publish(
        mandatory: bool,
        props: &Properties<'_>,
        body: &[u8],
        frame_max: usize,
    ) -> Vec<u8> {
        let publish = basic::AMQPMethod::Publish(basic::Publish {
            exchange: "nuropb-rpc-exchange".into(),
            routing_key: "orders".into(),
            mandatory,
            immediate: false,
        });
        let mut out = method(CHANNEL, AMQPClass::Basic(publish));
        let mut headers = FieldTable::default();
        for (name, value) in props.headers {
            let value = value.map_or(AMQPValue::Void, |v| AMQPValue::LongString(v.into()));
            headers.insert((*name).into(), value);
        }
        let properties = BasicProperties::default()
            .with_content_type(props.content_type.into())
            .with_correlation_id(props.correlation_id.into())
            .with_reply_to(props.reply_to.into())
            .with_expiration(props.expiration_ms.to_string().into())
            .with_headers(headers);
        let header = AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size: body.len() as u64,
            properties,
        };
        encode(&AMQPFrame::Header(CHANNEL, header), &mut out).unwrap();
        put_body(&mut out, body, frame_max);
        out
    }

    #[test]
    fn a_publish_is_written_byte_for_byte_as_lapins_codec_writes_it() {
        let body = vec![b'x'; 10_000];
        for (trace_id, expiration_ms, mandatory) in [
            (Some("t-1"), 1, true),
            (None, 30_000, true),
            (Some(""), u64::MAX, false),
        ] {
            let headers = [
                ("encrypted", Some("")),
                ("nuropb_protocol", Some("0.1.1")),
                ("nuropb_type", Some("request")),
                ("nuropb_version", Some("0.1.8")),
                ("trace_id", trace_id),
            ];
            let props = Properties {
                content_type: "application/json",
                correlation_id: "5f0c2e8d9a1b4c3d8e7f6a5b4c3d2e1f",
                reply_to: "nuropb-bff-abc-rq",
                expiration_ms,
                headers: &headers,
            };
            let inner = test_inner();
            let lane = Lane {
                inner: inner.clone(),
            };
            for body in [&body[..], b"", b"{}"] {
                lane.publish("nuropb-rpc-exchange", "orders", mandatory, &props, body)
                    .unwrap();
                let ours = std::mem::take(&mut *lock(&inner.out));
                assert_eq!(
                    ours,
                    lapin_publish(mandatory, &props, body, inner.frame_max),
                    "trace_id {trace_id:?}, expiration {expiration_ms}, body {} bytes",
                    body.len()
                );
            }
        }
    }

    #[test]
    fn a_publish_that_cannot_be_written_is_refused_and_queues_nothing() {
        let inner = test_inner();
        let lane = Lane {
            inner: inner.clone(),
        };
        let long = "n".repeat(256);
        let huge = "v".repeat(5000);
        let ok = Properties {
            content_type: "application/json",
            correlation_id: "c",
            reply_to: "rq",
            expiration_ms: 1,
            headers: &[],
        };
        let cases = [
            ("exchange", long.as_str(), "svc", Properties { ..ok }),
            ("routing key", "x", long.as_str(), Properties { ..ok }),
            (
                "content type",
                "x",
                "svc",
                Properties {
                    content_type: &long,
                    ..ok
                },
            ),
            (
                "correlation",
                "x",
                "svc",
                Properties {
                    correlation_id: &long,
                    ..ok
                },
            ),
            (
                "reply",
                "x",
                "svc",
                Properties {
                    reply_to: &long,
                    ..ok
                },
            ),
            (
                "header name",
                "x",
                "svc",
                Properties {
                    headers: &[(long.as_str(), None)],
                    ..ok
                },
            ),
            (
                "frame size",
                "x",
                "svc",
                Properties {
                    headers: &[("trace_id", Some(huge.as_str()))],
                    ..ok
                },
            ),
        ];
        for (what, exchange, routing_key, props) in cases {
            let e = lane
                .publish(exchange, routing_key, true, &props, b"{}")
                .expect_err(what);
            assert!(
                e.to_string().contains("over"),
                "{what}: the error says why: {e}"
            );
            assert!(lock(&inner.out).is_empty(), "{what}: nothing was queued");
        }
    }

    /// Publishes that write the socket themselves and the writer task,
    /// mixed as a peer that stops reading makes them: every byte arrives,
    /// in the order it was queued.
    #[tokio::test]
    async fn direct_and_queued_writes_reach_the_socket_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut peer, _) = listener.accept().await.unwrap();
        let (_read, write) = ours.into_split();
        let write = Arc::new(write);
        let inner = Arc::new(Inner {
            direct: Some(write.clone()),
            ..Arc::into_inner(test_inner()).unwrap()
        });

        // While the writer holds frames it has not written all of, a
        // publish waits behind them, even with nothing queued.
        inner.writing.store(true, Ordering::Relaxed);
        inner.queue(|out| out.extend_from_slice(b"held")).unwrap();
        assert_eq!(lock(&inner.out).as_slice(), b"held");
        lock(&inner.out).clear();
        inner.writing.store(false, Ordering::Relaxed);
        // Nothing queued, nothing being written: written at once.
        inner.queue(|out| out.extend_from_slice(b"first")).unwrap();
        assert!(lock(&inner.out).is_empty());
        let mut sent = b"first".to_vec();
        // The peer does not read: the socket fills, and what it cannot
        // take waits for the writer, with everything queued after it.
        let mut chunks = 0u32;
        while lock(&inner.out).is_empty() {
            chunks += 1;
            assert!(chunks < 2000, "the socket never filled");
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i as u32 ^ chunks) as u8).collect();
            inner.queue(|out| out.extend_from_slice(&chunk)).unwrap();
            sent.extend_from_slice(&chunk);
        }
        for tail in [&b"after"[..], b"the", b"fill"] {
            inner.queue(|out| out.extend_from_slice(tail)).unwrap();
            sent.extend_from_slice(tail);
        }
        let writer = {
            let inner = inner.clone();
            tokio::spawn(async move {
                let mut writer: Writer = Box::pin(SharedWrite(write));
                write_loop(&inner, &mut writer, None).await
            })
        };
        let mut received = vec![0u8; sent.len()];
        tokio::time::timeout(Duration::from_secs(20), peer.read_exact(&mut received))
            .await
            .expect("everything arrives")
            .unwrap();
        assert!(received == sent, "the bytes arrived out of order");
        // Once the writer is idle, a publish writes directly again.
        tokio::time::timeout(Duration::from_secs(5), async {
            while inner.writing.load(Ordering::Relaxed) || !lock(&inner.out).is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        inner.queue(|out| out.extend_from_slice(b"last")).unwrap();
        assert!(lock(&inner.out).is_empty());
        let mut last = [0u8; 4];
        peer.read_exact(&mut last).await.unwrap();
        assert_eq!(&last, b"last");

        // Publishes while the writer has a batch in flight and the peer
        // reads slowly: still in order.
        let mut sent = Vec::new();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 8 * 1024];
            loop {
                match tokio::time::timeout(Duration::from_millis(500), peer.read(&mut buf)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                    _ => return got,
                }
                tokio::task::yield_now().await;
            }
        });
        for i in 0..400u32 {
            let chunk: Vec<u8> = (0..16 * 1024).map(|j| (j as u32 ^ i) as u8).collect();
            inner.queue(|out| out.extend_from_slice(&chunk)).unwrap();
            sent.extend_from_slice(&chunk);
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let got = reader.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes arrived out of order");
        writer.abort();
    }

    fn test_inner() -> Arc<Inner> {
        Arc::new(Inner {
            out: Mutex::new(Vec::new()),
            writing: AtomicBool::new(false),
            direct: None,
            wake: Notify::new(),
            open: AtomicBool::new(true),
            frame_max: 4096,
        })
    }

    fn method(channel: u16, class: AMQPClass) -> Vec<u8> {
        method_frame(channel, class).unwrap()
    }

    fn deliver(tag: u64) -> Vec<u8> {
        deliver_to(RESPONSES_TAG, tag)
    }

    fn deliver_to(consumer: &str, tag: u64) -> Vec<u8> {
        method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: consumer.into(),
                delivery_tag: tag,
                redelivered: false,
                exchange: "".into(),
                routing_key: "rq".into(),
            })),
        )
    }

    fn header(size: u64, correlation_id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let props = BasicProperties::default().with_correlation_id(correlation_id.into());
        let h = AMQPContentHeader {
            class_id: BASIC_CLASS,
            body_size: size,
            properties: props,
        };
        encode(&AMQPFrame::Header(CHANNEL, h), &mut out).unwrap();
        out
    }

    fn body(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_body(&mut out, bytes, 4096);
        out
    }

    /// What the read loop dispatched from `bytes` (then the socket closes),
    /// and why it ended.
    async fn read_all(
        bytes: Vec<u8>,
        prefetch: u16,
    ) -> (Vec<(String, Vec<u8>)>, LaneError, Vec<u8>) {
        let inner = test_inner();
        let mut frames = reader_of(bytes);
        frames.frame_max = 4096;
        let mut got = Vec::new();
        let mut on = |m: Incoming<'_>| match m {
            Incoming::Delivery {
                properties,
                body,
                event,
            } => got.push((
                format!(
                    "{}{}",
                    if event { "event " } else { "" },
                    properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default()
                ),
                body.to_vec(),
            )),
            Incoming::Returned { properties } => got.push((
                format!(
                    "returned {}",
                    properties
                        .correlation_id()
                        .as_ref()
                        .map(|c| c.to_string())
                        .unwrap_or_default()
                ),
                Vec::new(),
            )),
        };
        let why = read_loop(&inner, &mut frames, None, prefetch, &mut on).await;
        let queued = std::mem::take(&mut *lock(&inner.out));
        (got, why, queued)
    }

    #[tokio::test]
    async fn deliveries_in_one_or_many_body_frames_are_dispatched_whole_and_acked() {
        let big = vec![b'x'; 10_000];
        let mut bytes = Vec::new();
        bytes.extend(deliver(1));
        bytes.extend(header(2, "a"));
        bytes.extend(body(b"{}"));
        bytes.extend(deliver(2));
        bytes.extend(header(big.len() as u64, "b"));
        bytes.extend(body(&big));
        bytes.extend(deliver(3));
        bytes.extend(header(0, "c"));
        bytes.extend(deliver_to(EVENTS_TAG, 4));
        bytes.extend(header(2, "e"));
        bytes.extend(body(b"{}"));
        let (got, why, queued) = read_all(bytes, 4).await;
        assert_eq!(got.len(), 4, "{got:?}");
        // The event queue's consumer tag marks an event.
        assert_eq!(got[3], ("event e".into(), b"{}".to_vec()));
        assert_eq!(got[0], ("a".into(), b"{}".to_vec()));
        assert_eq!(got[1].0, "b");
        assert_eq!(got[1].1, big);
        assert_eq!(got[2], ("c".into(), Vec::new()));
        assert!(why.to_string().contains("closed the connection"), "{why}");
        // Half the prefetch taken: one ack for all so far.
        let mut r = reader_of(queued);
        r.fill(None).await.unwrap();
        let f = r.buffered().unwrap().unwrap();
        match decode_method(r.payload(f)).unwrap() {
            AMQPClass::Basic(basic::AMQPMethod::Ack(a)) => {
                assert!(a.multiple);
                assert!(a.delivery_tag >= 2, "{a:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_returned_request_is_reported_by_its_correlation_id() {
        let mut bytes = method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
                exchange: "x".into(),
                routing_key: "svc".into(),
            })),
        );
        bytes.extend(header(2, "r1"));
        bytes.extend(body(b"{}"));
        let (got, _, _) = read_all(bytes, 64).await;
        assert_eq!(got, vec![("returned r1".to_owned(), Vec::new())]);
    }

    #[tokio::test]
    async fn a_hostile_or_broken_broker_ends_the_lane_with_the_reason() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("longer than its header", {
                let mut b = deliver(1);
                b.extend(header(1, "a"));
                b.extend(body(b"{}"));
                b
            }),
            ("without its method", header(2, "a")),
            ("without its header", {
                let mut b = deliver(1);
                b.extend(body(b"{}"));
                b
            }),
            ("over the", {
                let mut b = deliver(1);
                b.extend(header(MAX_BODY + 1, "a"));
                b
            }),
            ("inside a message's content", {
                let mut b = deliver(1);
                b.extend(deliver(2));
                b
            }),
            (
                "cancelled a consumer",
                method(
                    CHANNEL,
                    AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                        consumer_tag: "c".into(),
                        nowait: true,
                    })),
                ),
            ),
            (
                "404 NOT_FOUND",
                method(
                    CHANNEL,
                    AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                        reply_code: 404,
                        reply_text: "NOT_FOUND".into(),
                        class_id: 0,
                        method_id: 0,
                    })),
                ),
            ),
            ("on channel 7", {
                let mut b = deliver(1);
                b[1..3].copy_from_slice(&7u16.to_be_bytes());
                b
            }),
            ("unknown type", vec![9, 0, 1, 0, 0, 0, 0, FRAME_END]),
            (
                "undecodable method",
                vec![FRAME_METHOD, 0, 1, 0, 0, 0, 2, 0xff, 0xff, FRAME_END],
            ),
        ];
        for (want, bytes) in cases {
            let (got, why, _) = read_all(bytes, 64).await;
            assert!(got.is_empty(), "{want}: dispatched {got:?}");
            assert!(why.to_string().contains(want), "{want}: ended with: {why}");
        }
    }

    #[tokio::test]
    async fn the_broker_closing_the_connection_is_answered_and_named() {
        let bytes = method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: 320,
                reply_text: "CONNECTION_FORCED".into(),
                class_id: 0,
                method_id: 0,
            })),
        );
        let (_, why, queued) = read_all(bytes, 64).await;
        assert!(why.to_string().contains("320 CONNECTION_FORCED"), "{why}");
        let mut r = reader_of(queued);
        r.fill(None).await.unwrap();
        let f = r.buffered().unwrap().unwrap();
        assert!(matches!(
            decode_method(r.payload(f)).unwrap(),
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
        ));
    }
}
