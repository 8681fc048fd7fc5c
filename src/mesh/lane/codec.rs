//! The lane's codec: the part of AMQP 0-9-1 it speaks, read in place and
//! written straight into the write buffer where it can be (a delivery's
//! method and content header, a publish), through amq-protocol (the codec
//! lapin is built on) for the rest. No I/O.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, channel, connection, parse_class};
use amq_protocol::types::ShortString;

use super::LaneError;

/// The one channel the lane opens.
pub(super) const CHANNEL: u16 = 1;
pub(super) const FRAME_METHOD: u8 = 1;
pub(super) const FRAME_HEADER: u8 = 2;
pub(super) const FRAME_BODY: u8 = 3;
pub(super) const FRAME_HEARTBEAT: u8 = 8;
pub(super) const FRAME_END: u8 = 0xCE;
/// Type, channel and size before a frame's payload, and its end byte.
pub(super) const FRAME_OVERHEAD: usize = 8;
/// The basic class, whose content the lane sends and takes.
pub(super) const BASIC_CLASS: u16 = 60;

/// A received message's properties, read in place from its content header:
/// the correlation id and the headers, found without copying a string or
/// building a table. Made only from a header [`parse_header`] has checked
/// whole.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Received<'a> {
    correlation_id: Option<&'a [u8]>,
    reply_to: Option<&'a [u8]>,
    /// The header table's entries (after its size).
    headers: &'a [u8],
}

impl<'a> Received<'a> {
    /// The correlation id, if it has one in UTF-8.
    pub(crate) fn correlation_id(&self) -> Option<&'a str> {
        std::str::from_utf8(self.correlation_id?).ok()
    }

    /// The queue an answer goes to, if it names one in UTF-8.
    pub(crate) fn reply_to(&self) -> Option<&'a str> {
        std::str::from_utf8(self.reply_to?).ok()
    }

    /// An integer header's value (signed or unsigned, 8 to 64 bits; a
    /// stream's `x-stream-offset`); `None` when absent, of another type or
    /// negative.
    pub(crate) fn int_header(&self, name: &str) -> Option<u64> {
        for entry in table_entries(self.headers) {
            let (key, kind, value) = entry?;
            if key != name.as_bytes() {
                continue;
            }
            let be = |v: &[u8]| v.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
            return match kind {
                b'l' | b'I' | b's' | b'b' => {
                    // Two's complement: negative when the top bit is set.
                    let negative = value.first().is_some_and(|b| b & 0x80 != 0);
                    (!negative).then(|| be(value))
                }
                b'L' | b'i' | b'u' | b'B' => Some(be(value)),
                _ => None,
            };
        }
        None
    }

    /// A string header's value (a long string; bytes that are not UTF-8
    /// replaced); `None` when absent or of another type.
    pub(crate) fn header(&self, name: &str) -> Option<std::borrow::Cow<'a, str>> {
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
pub(super) struct Cursor<'a>(&'a [u8]);

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
pub(super) fn field_value<'a>(c: &mut Cursor<'a>, kind: u8) -> Option<&'a [u8]> {
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
pub(super) fn table_entries(table: &[u8]) -> impl Iterator<Item = Option<(&[u8], u8, &[u8])>> {
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
pub(super) fn parse_header(payload: &[u8]) -> Result<(u64, Received<'_>), LaneError> {
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
        reply_to: None,
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
            9 => c.short().map(|to| received.reply_to = Some(to)),
            // timestamp
            6 => c.u64().map(drop),
            // content-type, content-encoding, expiration,
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
pub(super) fn parse_deliver(payload: &[u8], consumer: &str) -> Option<(u64, bool)> {
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
pub(super) const BASIC_DELIVER: u16 = 60;

pub(super) fn decode_method(payload: &[u8]) -> Result<AMQPClass, LaneError> {
    parse_class(payload)
        .map(|(_, class)| class)
        .map_err(|_| LaneError::new("an undecodable method frame from the broker"))
}

/// The reason, if `class` is the broker closing the connection or channel.
pub(super) fn closed_by_broker(class: &AMQPClass) -> Option<LaneError> {
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

pub(super) fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) -> Result<(), LaneError> {
    let ctx = gen_frame(frame)(WriteContext::from(std::mem::take(out)))
        .map_err(|e| LaneError::new(format!("cannot encode a frame: {e}")))?;
    *out = ctx.write;
    Ok(())
}

pub(super) fn method_frame(channel: u16, class: AMQPClass) -> Result<Vec<u8>, LaneError> {
    let mut out = Vec::with_capacity(64);
    encode(&AMQPFrame::Method(channel, class), &mut out)?;
    Ok(out)
}

/// Body frames for `body`, each at most `frame_max` long.
pub(super) fn put_body(out: &mut Vec<u8>, body: &[u8], frame_max: usize) {
    for chunk in body.chunks(frame_max - FRAME_OVERHEAD) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&CHANNEL.to_be_bytes());
        // A chunk is under frame_max, which is a u32.
        out.extend_from_slice(&(chunk.len() as u32).to_be_bytes());
        out.extend_from_slice(chunk);
        out.push(FRAME_END);
    }
}

pub(super) fn short(s: &str, what: &str) -> Result<ShortString, LaneError> {
    check_short(s, what)?;
    Ok(s.into())
}

/// `basic.publish`'s method id.
pub(super) const BASIC_PUBLISH: u16 = 40;

/// The properties of a message published on the lane, borrowed from the
/// call: written straight into the write buffer, where lapin's
/// `BasicProperties` would copy each string and build a table first.
#[derive(Debug)]
pub(crate) struct Properties<'a> {
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
    pub(super) fn check(&self) -> Result<usize, LaneError> {
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
    pub(super) fn put(&self, out: &mut Vec<u8>) {
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
pub(super) struct Digits {
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
pub(super) fn put_frame(out: &mut Vec<u8>, kind: u8, payload: impl FnOnce(&mut Vec<u8>)) {
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
pub(super) fn put_short(out: &mut Vec<u8>, s: &str) {
    out.push(s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

pub(super) fn check_short(s: &str, what: &str) -> Result<(), LaneError> {
    if s.len() > 255 {
        return Err(LaneError::new(format!("{what} is over 255 bytes")));
    }
    Ok(())
}

pub(super) fn unexpected(wanted: &str, got: &AMQPClass) -> LaneError {
    LaneError::new(format!(
        "expected {wanted} from the broker, got {}",
        method_name(got)
    ))
}

pub(super) fn method_name(class: &AMQPClass) -> String {
    format!(
        "{}.{}",
        class.get_amqp_class_id(),
        class.get_amqp_method_id()
    )
}
