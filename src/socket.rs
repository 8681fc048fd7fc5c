//! One client's WebSocket on its TCP stream, read and written by the one
//! task that serves it.
//!
//! Why not tokio-tungstenite's stream: it lets two tasks share a socket and
//! every socket pays for that, idle or not: two waker proxies (an `Arc`
//! each), hyper's boxed upgraded stream around the TCP stream, and
//! tungstenite's write buffer, which keeps the capacity of the largest
//! batch it ever wrote (an idle socket that once got 64 events at once
//! kept their bytes). Here the socket has one owner: the task's context is
//! handed down on each poll (no proxy, nothing stored), frames are read by
//! tungstenite's `WebSocketContext` (masking, fragments, control frames,
//! the frame size cap), and the gateway's own frames are written straight
//! from their shared bytes, a header beside each, with one vectored write
//! per batch: an event serialised once for 10,000 sockets is not copied
//! once per socket.
//!
//! What tungstenite writes itself (a pong, the close handshake) must never
//! land inside one of our frames: its pending output is flushed before each
//! batch of ours, and a batch that failed or was left half written (its
//! write timed out) breaks the stream for good: every later write fails at
//! once.
//!
//! Before a socket says who it is, what it may send in all is its
//! [`ReadBudget`]: each read is cut to what is left.

use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

use crate::budget::ReadBudget;

/// Frames written with one vectored write, at most: two slices each.
pub(crate) const MAX_BATCH: usize = 64;

/// The longest header of an unmasked frame: two bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// A frame of ours: its header and its payload (shared, not copied).
struct Frame {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Utf8Bytes,
}

impl Frame {
    /// A final, unmasked frame with `opcode` (RFC 6455 section 5.2).
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

    fn parts(&self) -> [&[u8]; 2] {
        [
            &self.header[..usize::from(self.header_len)],
            self.payload.as_bytes(),
        ]
    }
}

const TEXT: u8 = 0x1;
const PING: u8 = 0x9;

/// Frames to write together, at most [`MAX_BATCH`].
#[derive(Default)]
pub(crate) struct Batch {
    frames: Vec<Frame>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch")
            .field("frames", &self.frames.len())
            .finish()
    }
}

impl Batch {
    pub(crate) fn with_capacity(frames: usize) -> Self {
        Self {
            frames: Vec::with_capacity(frames.min(MAX_BATCH)),
        }
    }

    /// Add a text frame; false (and not added) once the batch is full.
    pub(crate) fn text(&mut self, text: Utf8Bytes) -> bool {
        self.push(Frame::new(TEXT, text))
    }

    /// Add a ping with no payload; false once the batch is full.
    pub(crate) fn ping(&mut self) -> bool {
        self.push(Frame::new(PING, Utf8Bytes::default()))
    }

    fn push(&mut self, frame: Frame) -> bool {
        if self.frames.len() >= MAX_BATCH {
            return false;
        }
        self.frames.push(frame);
        true
    }

    /// Its bytes on the wire, headers included.
    fn wire_len(&self) -> usize {
        self.frames
            .iter()
            .map(|f| usize::from(f.header_len) + f.payload.len())
            .sum()
    }

    /// The slices still to write once `skip` bytes are written, into `out`;
    /// how many there are.
    fn slices<'a>(&'a self, mut skip: usize, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for part in self.frames.iter().flat_map(Frame::parts) {
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
}

/// The stream as tungstenite sees it during one poll: the task's context
/// handed down, `WouldBlock` for `Pending`.
struct Io<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
    budget: &'a mut ReadBudget,
    broken: bool,
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let allowed = self.budget.allowed(buf.len())?;
        let mut buf = ReadBuf::new(&mut buf[..allowed]);
        match Pin::new(&mut *self.tcp).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len();
                self.budget.spend(n);
                Ok(n)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Io<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.broken {
            return Err(broken());
        }
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // A TCP stream holds nothing back to flush.
        Ok(())
    }
}

fn broken() -> io::Error {
    io::Error::new(
        io::ErrorKind::BrokenPipe,
        "a write failed or was left half done: the socket takes no more",
    )
}

/// `WouldBlock` as `Pending`; the socket closing as `Ok`.
fn pending_or<T>(r: Result<T, Error>, closed: impl FnOnce() -> T) -> Poll<io::Result<T>> {
    match r {
        Ok(v) => Poll::Ready(Ok(v)),
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
        Err(Error::ConnectionClosed | Error::AlreadyClosed) => Poll::Ready(Ok(closed())),
        Err(Error::Io(e)) => Poll::Ready(Err(e)),
        Err(e) => Poll::Ready(Err(io::Error::other(e))),
    }
}

/// An upgraded connection's WebSocket, for the one task that serves it.
pub(crate) struct Socket {
    tcp: TcpStream,
    ws: WebSocketContext,
    budget: ReadBudget,
    /// A write of ours failed or was left half done (the stream may be
    /// mid-frame): nothing more is written.
    broken: bool,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("broken", &self.broken)
            .finish()
    }
}

impl Socket {
    /// The WebSocket of a connection hyper upgraded: its TCP stream back
    /// from hyper, and what the client sent after its upgrade request
    /// (read by hyper with it) first. `None` for a stream that is not a
    /// plain TCP stream (the gateway serves no other).
    pub(crate) fn upgraded(
        upgraded: Upgraded,
        config: WebSocketConfig,
        mut budget: ReadBudget,
    ) -> Option<Self> {
        let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
        let early = parts.read_buf;
        // What came early counts against the budget as any read does.
        if budget.allowed(early.len()).ok()? < early.len() {
            return None;
        }
        budget.spend(early.len());
        let ws = if early.is_empty() {
            WebSocketContext::new(Role::Server, Some(config))
        } else {
            WebSocketContext::from_partially_read(early.to_vec(), Role::Server, Some(config))
        };
        Some(Self {
            tcp: parts.io.into_inner(),
            ws,
            budget,
            broken: false,
        })
    }

    /// The socket authenticated: it may send what its limits allow.
    pub(crate) fn lift_budget(&mut self) {
        self.budget.lift();
    }

    /// Run `f` on tungstenite's context with the stream of this poll.
    fn with<T>(
        &mut self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut WebSocketContext, &mut Io<'_, '_>) -> T,
    ) -> T {
        let mut io = Io {
            tcp: &mut self.tcp,
            cx,
            budget: &mut self.budget,
            broken: self.broken,
        };
        f(&mut self.ws, &mut io)
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Message, Error>>> {
        match self.with(cx, |ws, io| ws.read(io)) {
            Ok(message) => Poll::Ready(Some(Ok(message))),
            Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    /// The next message from the client; `None` once the socket is closed.
    /// (Pongs and the reply to a close are written by tungstenite meanwhile.)
    pub(crate) fn next(&mut self) -> impl Future<Output = Option<Result<Message, Error>>> + '_ {
        poll_fn(move |cx| self.poll_next(cx))
    }

    /// Write what tungstenite holds (a pong, a close reply).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        pending_or(self.with(cx, |ws, io| ws.flush(io)), || ())
    }

    /// Whether a write failed or was left half done: the socket takes no
    /// more.
    pub(crate) fn is_broken(&self) -> bool {
        self.broken
    }

    /// Write `batch`: whatever tungstenite holds first, then the batch's
    /// frames with as few vectored writes as the stream takes. Failed, or
    /// cancelled halfway (a timeout), the socket is broken: nothing more is
    /// written.
    pub(crate) async fn write(&mut self, batch: &Batch) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        // Broken until the whole batch is written.
        self.broken = true;
        poll_fn(|cx| self.poll_flush(cx)).await?;
        let total = batch.wire_len();
        let mut written = 0;
        poll_fn(|cx| {
            while written < total {
                let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
                let n = batch.slices(written, &mut slices);
                match Pin::new(&mut self.tcp).poll_write_vectored(cx, &slices[..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(k)) => written += k,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(Ok(()))
        })
        .await?;
        self.broken = false;
        Ok(())
    }

    /// Write one text frame.
    pub(crate) async fn send(&mut self, text: Utf8Bytes) -> io::Result<()> {
        let mut batch = Batch::with_capacity(1);
        batch.text(text);
        self.write(&batch).await
    }

    /// Start the closing handshake with `code` and `reason` (tungstenite
    /// writes the close frame, and replies to the client's), and write
    /// what it holds. Nothing is written once the socket is broken.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        let mut frame = Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.to_owned().into(),
        });
        poll_fn(|cx| {
            let result = match frame.take() {
                Some(frame) => self.with(cx, |ws, io| ws.close(io, Some(frame))),
                // Queued already: drive the writing on.
                None => self.with(cx, |ws, io| ws.flush(io)),
            };
            pending_or(result, || ())
        })
        .await
    }

    /// Write what tungstenite still holds (the reply to a client's close),
    /// then leave the stream to be dropped.
    pub(crate) async fn finish(&mut self) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        poll_fn(|cx| self.poll_flush(cx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    /// Write `batch` the way `Socket::write` does, with writes that take
    /// at most the next of `takes` bytes each (cycled): a stream that
    /// takes a little at a time.
    fn write_in_pieces(batch: &Batch, takes: &[usize]) -> Vec<u8> {
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

    /// A client's end: reads `input`, and what it writes (a pong) goes to
    /// `output`.
    struct Wire {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What a client's tungstenite reads from `wire`, to its end.
    fn read_as_client(wire: Vec<u8>) -> Vec<Message> {
        let mut stream = Wire {
            input: Cursor::new(wire),
            output: Vec::new(),
        };
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
            let frame = Frame::new(TEXT, "x".repeat(len).into());
            assert_eq!(usize::from(frame.header_len), header_len, "{len}");
            assert_eq!(frame.header[0], 0x81);
            assert_eq!(frame.header[1], second, "{len}");
        }
    }

    #[test]
    fn a_batch_stops_at_its_limit() {
        let mut batch = Batch::default();
        for i in 0..MAX_BATCH {
            assert!(batch.text(i.to_string().into()));
        }
        assert!(!batch.text("one too many".into()));
        assert!(!batch.ping());
        assert_eq!(batch.frames.len(), MAX_BATCH);
    }

    proptest! {
        /// Whatever pieces the stream takes the batch in, a client reads
        /// back exactly its frames, in order.
        #[test]
        fn a_batch_reads_back_whole_however_it_is_written(
            texts in proptest::collection::vec(
                prop_oneof![
                    "[a-z{}\":, ]{0,140}",
                    "[a-z]{120,70000}",
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
    }
}
