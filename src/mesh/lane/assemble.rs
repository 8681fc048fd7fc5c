//! Messages out of bytes, without a socket. [`FrameBuf`] cuts what was read
//! into frames, refusing a frame over the negotiated size from its first 7
//! bytes, before any of it is buffered. [`Assembler`] puts a message's
//! method, content header and body frames back together, checking their
//! order, channel and sizes: a body over the limit is let go frame by
//! frame, and one within it is gathered into one allocation of its size.
//! Both are plain state machines that the tests feed bytes; the lane's read
//! loop feeds them the socket.

use amq_protocol::protocol::{AMQPClass, basic};

use super::LaneError;
use super::codec::{
    CHANNEL, FRAME_BODY, FRAME_END, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FRAME_OVERHEAD,
    decode_method, parse_deliver, parse_header,
};

/// Read this much at a time.
pub(super) const READ_CHUNK: usize = 64 * 1024;
/// The frame size until the handshake has tuned one (RabbitMQ's default).
pub(super) const DEFAULT_FRAME_MAX: u32 = 128 * 1024;

/// One frame whole in the read buffer: its type, channel and where its
/// payload lies.
#[derive(Debug, Clone, Copy)]
pub(super) struct Frame {
    pub(super) kind: u8,
    pub(super) channel: u16,
    start: usize,
    end: usize,
}

/// Bytes read and not yet cut into frames.
#[derive(Debug)]
pub(super) struct FrameBuf {
    buf: Vec<u8>,
    pos: usize,
    frame_max: usize,
}

impl FrameBuf {
    pub(super) fn new() -> Self {
        Self {
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
            frame_max: DEFAULT_FRAME_MAX as usize,
        }
    }

    /// The largest frame taken from here on (as the handshake tuned it).
    pub(super) fn set_frame_max(&mut self, frame_max: usize) {
        self.frame_max = frame_max;
    }

    /// The next frame already in the buffer, if one is whole.
    pub(super) fn buffered(&mut self) -> Result<Option<Frame>, LaneError> {
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

    pub(super) fn payload(&self, frame: Frame) -> &[u8] {
        &self.buf[frame.start..frame.end]
    }

    /// The whole frame, its header and end byte included.
    pub(super) fn raw(&self, frame: Frame) -> &[u8] {
        &self.buf[frame.start - 7..=frame.end]
    }

    /// Put `frames` (whole, as [`Self::raw`] gave them) in front of what
    /// is still to be cut: they are read first.
    pub(super) fn unread(&mut self, mut frames: Vec<u8>) {
        if frames.is_empty() {
            return;
        }
        frames.extend_from_slice(&self.buf[self.pos..]);
        self.buf = frames;
        self.pos = 0;
    }

    /// The buffer to read more into, after what was cut already is let go
    /// (and a buffer a large frame grew is shrunk back).
    pub(super) fn spare(&mut self) -> &mut Vec<u8> {
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
        &mut self.buf
    }

    /// Take `bytes` as if read (for tests and tools).
    #[cfg(test)]
    pub(super) fn push(&mut self, bytes: &[u8]) {
        self.spare().extend_from_slice(bytes);
    }
}

/// A message body: the one body frame it came in, still in the read
/// buffer, or the frames gathered.
#[derive(Debug)]
pub(super) enum Body<'a> {
    Frame(&'a [u8]),
    Gathered(Vec<u8>),
}

impl Body<'_> {
    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            Body::Frame(b) => b,
            Body::Gathered(b) => b,
        }
    }
}

/// What one frame made.
#[derive(Debug)]
pub(super) enum Assembled<'a> {
    /// Nothing to act on yet: a heartbeat, or part of a message.
    Pending,
    /// A method the lane acts on itself (anything but a deliver or a
    /// return, which start a message).
    Method(AMQPClass),
    /// A whole message: a delivery (with its tag, and whether it came to
    /// the event consumer) or, without a tag, a returned publish. Its
    /// content header was checked whole when it came.
    Message {
        tag: Option<u64>,
        event: bool,
        header: &'a [u8],
        body: Body<'a>,
    },
    /// A message whose header announced a body over the limit: its body
    /// frames were counted and let go as they came, never gathered. A
    /// delivery still has to be acknowledged.
    TooLarge {
        tag: Option<u64>,
        event: bool,
        size: u64,
    },
}

/// A message whose content frames are still arriving.
#[derive(Debug)]
struct Content {
    /// The delivery tag, or `None` for a returned message.
    tag: Option<u64>,
    /// From the event queue.
    event: bool,
    /// Its content header has come (its bytes are in `Assembler::header`).
    has_header: bool,
    size: u64,
    /// Over the limit: its body is counted in `skipped`, not kept.
    too_large: bool,
    skipped: u64,
    body: Vec<u8>,
}

/// Puts messages back together from their frames, on the lane's one
/// channel: one message's content at a time.
#[derive(Debug)]
pub(super) struct Assembler {
    content: Option<Content>,
    /// The content header of the message in `content`: one buffer serves
    /// every message.
    header: Vec<u8>,
    /// Deliveries to this consumer tag are events.
    events_tag: &'static str,
    /// The largest body taken; a larger one is let go frame by frame, from
    /// what its header announced, and reported as [`Assembled::TooLarge`].
    max_body: u64,
}

impl Assembler {
    pub(super) fn new(events_tag: &'static str, max_body: u64) -> Self {
        Self {
            content: None,
            header: Vec::new(),
            events_tag,
            max_body,
        }
    }

    /// Take one frame. An error is a broker (or a peer) breaking the
    /// protocol: the lane ends with it.
    pub(super) fn frame<'a>(
        &'a mut self,
        kind: u8,
        channel: u16,
        payload: &'a [u8],
    ) -> Result<Assembled<'a>, LaneError> {
        if channel != CHANNEL && kind != FRAME_HEARTBEAT && channel != 0 {
            return Err(LaneError::new(format!("a frame on channel {channel}")));
        }
        match kind {
            FRAME_HEARTBEAT => Ok(Assembled::Pending),
            FRAME_METHOD => self.method(payload),
            FRAME_HEADER => self.header(payload),
            FRAME_BODY => self.body(payload),
            other => Err(LaneError::new(format!("a frame of unknown type {other}"))),
        }
    }

    /// Bytes of message content held now (the header and a gathered body).
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.header.capacity() + self.content.as_ref().map_or(0, |c| c.body.capacity())
    }

    fn start(&mut self, tag: Option<u64>, event: bool) {
        self.content = Some(Content {
            tag,
            event,
            has_header: false,
            size: 0,
            too_large: false,
            skipped: 0,
            body: Vec::new(),
        });
    }

    fn method<'a>(&mut self, payload: &'a [u8]) -> Result<Assembled<'a>, LaneError> {
        if self.content.is_some() {
            return Err(LaneError::new("a method frame inside a message's content"));
        }
        // Deliveries, nearly every frame, are read in place; a deliver cut
        // short is undecodable to the codec below.
        if let Some((tag, event)) = parse_deliver(payload, self.events_tag) {
            self.start(Some(tag), event);
            return Ok(Assembled::Pending);
        }
        match decode_method(payload)? {
            AMQPClass::Basic(basic::AMQPMethod::Return(_)) => {
                self.start(None, false);
                Ok(Assembled::Pending)
            }
            other => Ok(Assembled::Method(other)),
        }
    }

    fn header<'a>(&'a mut self, payload: &[u8]) -> Result<Assembled<'a>, LaneError> {
        let Some(mut content) = self.content.take().filter(|c| !c.has_header) else {
            return Err(LaneError::new("a content header without its method"));
        };
        let (size, _) = parse_header(payload)?;
        content.size = size;
        content.has_header = true;
        if size > self.max_body {
            // Not an error: any peer can publish a large message, and the
            // link is everyone's. Its frames pass, uncollected.
            content.too_large = true;
            self.content = Some(content);
            return Ok(Assembled::Pending);
        }
        self.header.clear();
        self.header.extend_from_slice(payload);
        if size == 0 {
            return Ok(Assembled::Message {
                tag: content.tag,
                event: content.event,
                header: &self.header,
                body: Body::Frame(&[]),
            });
        }
        self.content = Some(content);
        Ok(Assembled::Pending)
    }

    fn body<'a>(&'a mut self, payload: &'a [u8]) -> Result<Assembled<'a>, LaneError> {
        let Some(mut content) = self.content.take().filter(|c| c.has_header) else {
            return Err(LaneError::new("a content body without its header"));
        };
        let have = content.body.len() as u64 + content.skipped + payload.len() as u64;
        if have > content.size {
            return Err(LaneError::new("a content body longer than its header said"));
        }
        if content.too_large {
            content.skipped = have;
            if have < content.size {
                self.content = Some(content);
                return Ok(Assembled::Pending);
            }
            return Ok(Assembled::TooLarge {
                tag: content.tag,
                event: content.event,
                size: content.size,
            });
        }
        if have < content.size {
            if content.body.is_empty() {
                // Gathered in one allocation of the announced size, which
                // is within the limit: no doubling while it grows, so a
                // message costs its size here, not twice that.
                content
                    .body
                    .reserve_exact(usize::try_from(content.size).unwrap_or(0));
            }
            content.body.extend_from_slice(payload);
            self.content = Some(content);
            return Ok(Assembled::Pending);
        }
        let body = if content.body.is_empty() {
            // The whole body in one frame: straight from the read buffer.
            Body::Frame(payload)
        } else {
            content.body.extend_from_slice(payload);
            Body::Gathered(content.body)
        };
        Ok(Assembled::Message {
            tag: content.tag,
            event: content.event,
            header: &self.header,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::protocol::{AMQPClass, basic};

    use super::super::EVENTS_TAG;
    use super::super::codec::{CHANNEL, FRAME_BODY, FRAME_END, FRAME_HEARTBEAT, method_name};
    use super::super::tests::{body, deliver, header, method};
    use super::*;
    use crate::mesh::lane::LaneError;

    /// What an assembler made of `bytes`, cut into frames by a [`FrameBuf`]
    /// that is handed them `chunk` bytes at a time: each message as its
    /// correlation id (or `returned`, `method`) and body, and the error that
    /// ended it, if one did. No socket, no task.
    fn assemble(bytes: &[u8], chunk: usize) -> (Vec<(String, Vec<u8>)>, Option<LaneError>) {
        let mut buf = FrameBuf::new();
        buf.set_frame_max(4096);
        let mut assembler = Assembler::new(EVENTS_TAG, 1 << 16);
        let mut got = Vec::new();
        for piece in bytes.chunks(chunk.max(1)) {
            buf.push(piece);
            loop {
                let frame = match buf.buffered() {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(e) => return (got, Some(e)),
                };
                let payload = buf.payload(frame);
                match assembler.frame(frame.kind, frame.channel, payload) {
                    Ok(Assembled::Pending) => {}
                    Ok(Assembled::Method(class)) => got.push((method_name(&class), Vec::new())),
                    Ok(Assembled::TooLarge { size, .. }) => {
                        got.push((format!("too large {size}"), Vec::new()))
                    }
                    Ok(Assembled::Message {
                        tag, header, body, ..
                    }) => {
                        let (_, properties) = parse_header(header).expect("checked when it came");
                        let id = properties.correlation_id().unwrap_or_default().to_owned();
                        let name = if tag.is_some() {
                            id
                        } else {
                            format!("returned {id}")
                        };
                        got.push((name, body.as_slice().to_vec()));
                    }
                    Err(e) => return (got, Some(e)),
                }
            }
        }
        (got, None)
    }

    fn returned() -> Vec<u8> {
        method(
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
                exchange: "".into(),
                routing_key: "svc".into(),
            })),
        )
    }

    #[test]
    fn the_assembler_puts_messages_together_from_frames_cut_anywhere() {
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut bytes = Vec::new();
        for part in [
            deliver(1),
            header(2, "one"),
            body(b"{}"),
            [FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END].to_vec(),
            deliver(2),
            header(big.len() as u64, "many"),
            body(&big),
            deliver(3),
            header(0, "empty"),
            returned(),
            header(0, "lost"),
            method(
                CHANNEL,
                AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
            ),
        ] {
            bytes.extend_from_slice(&part);
        }
        let expected = vec![
            ("one".to_owned(), b"{}".to_vec()),
            ("many".to_owned(), big.clone()),
            ("empty".to_owned(), Vec::new()),
            ("returned lost".to_owned(), Vec::new()),
            ("60.11".to_owned(), Vec::new()),
        ];
        // Whole, a byte at a time, and in odd chunks: the same messages.
        for chunk in [bytes.len(), 1, 7, 4095, 4097] {
            let (got, err) = assemble(&bytes, chunk);
            assert!(err.is_none(), "chunk {chunk}: {err:?}");
            assert_eq!(got, expected, "chunk {chunk}");
        }
    }

    #[test]
    fn a_message_over_the_limit_passes_uncollected_and_the_next_one_is_whole() {
        let big: Vec<u8> = vec![b'0'; (1 << 16) + 10_000];
        let mut bytes = deliver(1);
        bytes.extend_from_slice(&header(big.len() as u64, "big"));
        bytes.extend_from_slice(&body(&big));
        bytes.extend_from_slice(&deliver(2));
        bytes.extend_from_slice(&header(2, "next"));
        bytes.extend_from_slice(&body(b"{}"));
        let mut buf = FrameBuf::new();
        buf.set_frame_max(4096);
        let mut assembler = Assembler::new(EVENTS_TAG, 1 << 16);
        buf.push(&bytes);
        let mut made = Vec::new();
        while let Some(frame) = buf.buffered().unwrap() {
            let payload = buf.payload(frame);
            match assembler.frame(frame.kind, frame.channel, payload).unwrap() {
                Assembled::Pending => {}
                Assembled::TooLarge { tag, size, .. } => {
                    made.push(format!("too large {tag:?} {size}"))
                }
                Assembled::Message { tag, body, .. } => {
                    made.push(format!("{tag:?} {}", body.as_slice().len()))
                }
                Assembled::Method(_) => made.push("method".into()),
            }
            // Nothing gathered for the large one: one header at most.
            assert!(assembler.held() <= 4096, "{} held", assembler.held());
        }
        assert_eq!(
            made,
            [
                format!("too large Some(1) {}", big.len()),
                "Some(2) 2".into()
            ]
        );
    }

    #[test]
    fn the_assembler_refuses_frames_out_of_order_or_over_their_sizes() {
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (vec![header(2, "x")], "without its method"),
            (vec![deliver(1), body(b"{}")], "without its header"),
            (vec![deliver(1), deliver(2)], "inside a message"),
            (
                vec![deliver(1), header(1, "x"), body(b"{}")],
                "longer than its header",
            ),
            (vec![vec![9, 0, 1, 0, 0, 0, 0, FRAME_END]], "unknown type 9"),
            (
                vec![vec![FRAME_BODY, 0, 7, 0, 0, 0, 0, FRAME_END]],
                "channel 7",
            ),
        ];
        for (frames, why) in cases {
            let bytes: Vec<u8> = frames.concat();
            let (_, err) = assemble(&bytes, bytes.len());
            let err = err.unwrap_or_else(|| panic!("{why}: accepted"));
            assert!(err.to_string().contains(why), "{why}: {err}");
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, cutting and assembling them ends in messages
        /// or an error: never a panic, never a body longer than the limit.
        #[test]
        fn any_bytes_are_assembled_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), chunk in 1usize..64) {
            let (got, _) = assemble(&bytes, chunk);
            for (_, body) in got {
                proptest::prop_assert!(body.len() <= 1 << 16);
            }
        }

        /// A message's body cut into frames of any sizes is put back whole.
        #[test]
        fn a_body_cut_anywhere_is_put_back_whole(
            body_bytes in proptest::collection::vec(proptest::num::u8::ANY, 1..3000),
            cuts in proptest::collection::vec(1usize..500, 1..12),
        ) {
            let mut bytes = deliver(7);
            bytes.extend_from_slice(&header(body_bytes.len() as u64, "cut"));
            let mut rest = &body_bytes[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (part, tail) = rest.split_at((*cut).min(rest.len()));
                bytes.extend_from_slice(&body(part));
                rest = tail;
            }
            let (got, err) = assemble(&bytes, 13);
            proptest::prop_assert!(err.is_none(), "{:?}", err);
            proptest::prop_assert_eq!(got, vec![("cut".to_owned(), body_bytes)]);
        }
    }
}
