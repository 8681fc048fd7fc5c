//! The gateway's own WebSocket frames on the wire: a header beside the
//! payload's shared bytes, and batches of them written with one vectored
//! write, from any offset.
//!
//! Why by hand: an event serialised once goes to thousands of sockets. A
//! WebSocket library copies each frame into its write buffer, once per
//! socket, and keeps that buffer at the size of the largest batch it ever
//! held; here a frame is its header (2 to 10 bytes, RFC 6455 section 5.2)
//! and a reference to the shared payload, nothing is copied, and nothing
//! is kept once written. A server's frames are never masked and never
//! fragmented, so the header depends on the payload's length alone.
//!
//! Writes may stop anywhere: a batch is written from a byte offset (what
//! the stream took already), which is how a frame that a stream took only
//! part of is finished later, by whoever writes next.

use std::io::IoSlice;

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// Frames written with one vectored write, at most: two slices each.
pub(crate) const MAX_BATCH: usize = 64;

/// The longest header of an unmasked frame: two bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

const TEXT: u8 = 0x1;
const PING: u8 = 0x9;

/// A frame of ours: its header and its payload (shared, not copied).
pub(crate) struct Frame {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Utf8Bytes,
}

impl Frame {
    /// A final, unmasked frame with `opcode`.
    fn new(opcode: u8, payload: Utf8Bytes) -> Self {
        let mut header = [0; MAX_HEADER];
        header[0] = 0x80 | opcode;
        let len = payload.len();
        let header_len = if len < 126 {
            header[1] = len as u8;
            2
        } else if let Ok(len) = u16::try_from(len) {
            header[1] = 126;
            header[2..4].copy_from_slice(&len.to_be_bytes());
            4
        } else {
            header[1] = 127;
            header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        };
        Self {
            header,
            header_len,
            payload,
        }
    }

    /// A text frame.
    pub(crate) fn text(payload: Utf8Bytes) -> Self {
        Self::new(TEXT, payload)
    }

    /// A ping with no payload.
    pub(crate) fn ping() -> Self {
        Self::new(PING, Utf8Bytes::default())
    }

    /// Its header, then its payload.
    pub(crate) fn parts(&self) -> [&[u8]; 2] {
        [
            &self.header[..usize::from(self.header_len)],
            self.payload.as_bytes(),
        ]
    }

    /// Its payload back.
    pub(crate) fn into_payload(self) -> Utf8Bytes {
        self.payload
    }

    /// Its bytes on the wire.
    pub(crate) fn wire_len(&self) -> usize {
        usize::from(self.header_len) + self.payload.len()
    }

    /// Its slices still to write once `skip` bytes of it are written.
    pub(crate) fn rest(&self, skip: usize) -> ([IoSlice<'_>; 2], usize) {
        let mut out = [IoSlice::new(&[]); 2];
        let n = slices_of(self.parts(), skip, &mut out);
        (out, n)
    }
}

/// A text frame encoded whole, header and payload in one buffer: what a
/// fan-out writes to every socket with one plain write each (no vector of
/// slices for the kernel to read per socket), encoded once.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    wire: Vec<u8>,
}

impl Encoded {
    pub(crate) fn text(payload: Utf8Bytes) -> Self {
        let frame = Frame::text(payload);
        let mut wire = Vec::with_capacity(frame.wire_len());
        for part in frame.parts() {
            wire.extend_from_slice(part);
        }
        Self { wire }
    }

    /// Its bytes on the wire.
    pub(crate) fn wire(&self) -> &[u8] {
        &self.wire
    }
}

/// The parts of `parts` still to write once `skip` bytes are written, into
/// `out`; how many there are (at most `out.len()`).
fn slices_of<'a>(
    parts: impl IntoIterator<Item = &'a [u8]>,
    mut skip: usize,
    out: &mut [IoSlice<'a>],
) -> usize {
    let mut n = 0;
    for part in parts {
        if n == out.len() {
            break;
        }
        if skip >= part.len() {
            skip -= part.len();
            continue;
        }
        out[n] = IoSlice::new(&part[skip..]);
        skip = 0;
        n += 1;
    }
    n
}

/// Frames to write together, at most [`MAX_BATCH`], and how much of the
/// first one is on the wire already.
#[derive(Default)]
pub(crate) struct Batch {
    frames: Vec<Frame>,
    /// Bytes of the first frame written before the batch was made (a
    /// frame a stream took only part of).
    started: usize,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("frames", &self.frames.len())
            .field("started", &self.started)
            .finish()
    }
}

impl Batch {
    pub(crate) fn with_capacity(frames: usize) -> Self {
        Self {
            frames: Vec::with_capacity(frames.min(MAX_BATCH)),
            started: 0,
        }
    }

    /// Add a text frame; false (and not added) once the batch is full.
    pub(crate) fn text(&mut self, text: Utf8Bytes) -> bool {
        self.push(Frame::text(text))
    }

    /// Add a ping with no payload; false once the batch is full.
    pub(crate) fn ping(&mut self) -> bool {
        self.push(Frame::ping())
    }

    /// Add the rest of a text frame of which `sent` bytes are on the wire
    /// already; only as the first frame (false, and not added, otherwise).
    pub(crate) fn text_from(&mut self, text: Utf8Bytes, sent: usize) -> bool {
        if !self.frames.is_empty() {
            return false;
        }
        let frame = Frame::text(text);
        self.started = sent.min(frame.wire_len());
        self.frames.push(frame);
        true
    }

    fn push(&mut self, frame: Frame) -> bool {
        if self.frames.len() >= MAX_BATCH {
            return false;
        }
        self.frames.push(frame);
        true
    }

    /// Whether it starts in the middle of a frame (its first bytes are on
    /// the wire already).
    pub(crate) fn starts_mid_frame(&self) -> bool {
        self.started > 0
    }

    /// How many frames it holds.
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    /// Its bytes still to write, headers included.
    pub(crate) fn wire_len(&self) -> usize {
        let all: usize = self.frames.iter().map(Frame::wire_len).sum();
        all - self.started
    }

    /// The slices still to write once `written` of its bytes are written,
    /// into `out`; how many there are.
    pub(crate) fn slices<'a>(&'a self, written: usize, out: &mut [IoSlice<'a>]) -> usize {
        let parts = self.frames.iter().flat_map(Frame::parts);
        slices_of(parts, self.started + written, out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::{self, Cursor, Read, Write};
    use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketContext};
    use tokio_tungstenite::tungstenite::{Error, Message};

    /// Write `batch` as a stream would take it, at most the next of
    /// `takes` bytes a write (cycled): a stream that takes a little at a
    /// time.
    pub(crate) fn write_in_pieces(batch: &Batch, takes: &[usize]) -> Vec<u8> {
        let total = batch.wire_len();
        let mut out = Vec::new();
        let mut written = 0;
        let mut takes = takes.iter().cycle();
        while written < total {
            let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
            let n = batch.slices(written, &mut slices);
            let mut budget = *takes.next().unwrap();
            for s in &slices[..n] {
                let k = s.len().min(budget);
                out.extend_from_slice(&s[..k]);
                budget -= k;
                written += k;
                if budget == 0 {
                    break;
                }
            }
        }
        out
    }

    /// A client's end: reads `input`; what it writes (a pong) is dropped.
    struct Wire(Cursor<Vec<u8>>);

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What a client reads of `batch` written whole.
    pub(crate) fn messages(batch: &Batch) -> Vec<Message> {
        read_as_client(write_in_pieces(batch, &[usize::MAX]))
    }

    /// What a client's tungstenite reads from `wire`, to its end.
    pub(crate) fn read_as_client(wire: Vec<u8>) -> Vec<Message> {
        let mut stream = Wire(Cursor::new(wire));
        let mut ws = WebSocketContext::new(Role::Client, None);
        let mut messages = Vec::new();
        loop {
            match ws.read(&mut stream) {
                Ok(m) => messages.push(m),
                // The end of the input, with no close frame.
                Err(Error::Protocol(_)) => break,
                Err(e) => panic!("a frame of ours did not read back: {e}"),
            }
        }
        messages
    }

    #[test]
    fn headers_take_the_length_form_the_payload_needs() {
        for (len, header_len, second) in [
            (0, 2, 0),
            (125, 2, 125),
            (126, 4, 126),
            (65_535, 4, 126),
            (65_536, 10, 127),
        ] {
            let frame = Frame::text("x".repeat(len).into());
            assert_eq!(usize::from(frame.header_len), header_len, "{len}");
            assert_eq!(frame.header[0], 0x81);
            assert_eq!(frame.header[1], second, "{len}");
            assert_eq!(frame.wire_len(), header_len + len);
        }
    }

    #[test]
    fn a_batch_stops_at_its_limit_and_a_rest_only_starts_one() {
        let mut batch = Batch::default();
        for i in 0..MAX_BATCH {
            assert!(batch.text(i.to_string().into()));
        }
        assert!(!batch.text("one too many".into()));
        assert!(!batch.ping());
        assert!(!batch.text_from("not first".into(), 1));
        assert_eq!(batch.len(), MAX_BATCH);
    }

    #[test]
    fn an_encoded_frame_is_the_frame_a_batch_writes() {
        for len in [0, 125, 126, 65_535, 65_536] {
            let payload: Utf8Bytes = "e".repeat(len).into();
            let encoded = Encoded::text(payload.clone());
            let mut batch = Batch::default();
            batch.text(payload);
            assert_eq!(encoded.wire(), write_in_pieces(&batch, &[usize::MAX]));
        }
    }

    proptest! {
        /// Whatever pieces the stream takes the batch in, a client reads
        /// back exactly its frames, in order.
        #[test]
        fn a_batch_reads_back_whole_however_it_is_written(
            texts in proptest::collection::vec(
                prop_oneof![
                    "[a-z{}\":, ]{0,140}",
                    // (A regex of this length takes a minute to generate.)
                    (120usize..70_000, proptest::char::range('a', 'z'))
                        .prop_map(|(n, c)| c.to_string().repeat(n)),
                ].prop_map(Some).boxed().prop_union(Just(None).boxed()),
                1..12,
            ),
            takes in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            let mut batch = Batch::default();
            for t in &texts {
                match t {
                    Some(t) => prop_assert!(batch.text(t.clone().into())),
                    None => prop_assert!(batch.ping()),
                }
            }
            let wire = write_in_pieces(&batch, &takes);
            prop_assert_eq!(wire.len(), batch.wire_len());
            let read = read_as_client(wire);
            prop_assert_eq!(read.len(), texts.len());
            for (m, t) in read.iter().zip(&texts) {
                match (m, t) {
                    (Message::Text(got), Some(t)) => prop_assert_eq!(got.as_str(), t.as_str()),
                    (Message::Ping(p), None) => prop_assert!(p.is_empty()),
                    (other, t) => prop_assert!(false, "read {other:?} for {t:?}"),
                }
            }
        }

        /// A frame cut anywhere, its start written alone and its rest as the
        /// head of a batch, reads back whole, followed by the batch's other
        /// frames.
        #[test]
        fn a_frame_cut_anywhere_is_finished_by_the_next_batch(
            first in prop_oneof![
                "[a-z ]{0,200}",
                (126usize..70_000, proptest::char::range('a', 'z'))
                    .prop_map(|(n, c)| c.to_string().repeat(n)),
            ],
            then in proptest::collection::vec("[a-z]{0,300}", 0..4),
            cut in any::<prop::sample::Index>(),
            takes in proptest::collection::vec(1usize..5000, 1..8),
        ) {
            let head = Frame::text(first.clone().into());
            let sent = cut.index(head.wire_len());
            let mut wire = Vec::new();
            for part in head.parts() {
                wire.extend_from_slice(part);
            }
            wire.truncate(sent);
            let (rest, n) = head.rest(sent);
            let rest_len: usize = rest[..n].iter().map(|s| s.len()).sum();
            prop_assert_eq!(rest_len, head.wire_len() - sent);
            let mut batch = Batch::default();
            prop_assert!(batch.text_from(first.clone().into(), sent));
            for t in &then {
                prop_assert!(batch.text(t.clone().into()));
            }
            wire.extend(write_in_pieces(&batch, &takes));
            let read = read_as_client(wire);
            let want: Vec<Message> = std::iter::once(&first)
                .chain(&then)
                .map(|t| Message::Text(t.clone().into()))
                .collect();
            prop_assert_eq!(read, want);
        }
    }
}
