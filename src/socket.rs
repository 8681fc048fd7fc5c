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
//! Reading: tungstenite keeps a buffer of its own for the frame it is
//! assembling, allocated when the socket opens and kept for its life; it
//! is given [`FRAME_BUFFER`] bytes, not the read size. What comes from the
//! TCP stream is read `read_buffer_bytes` at a time into a buffer of ours
//! that exists only while it holds unread bytes: an idle socket holds no
//! read buffer, and a busy one still reads in large syscalls.
//!
//! Before a socket says who it is, what it may send in all is its
//! [`ReadBudget`]: each read is cut to what is left.

use std::future::poll_fn;
use std::io::{self, IoSlice, Read, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

use crate::budget::ReadBudget;

/// tungstenite's own buffer, which every socket keeps: the most it takes
/// from our read buffer at once. A larger frame grows it to the frame's
/// size, and it may keep that capacity afterwards (the memory a socket
/// that sent large frames holds, as before).
pub(crate) const FRAME_BUFFER: usize = 256;

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
    read: &'a mut ReadAhead,
    broken: bool,
}

/// What was read from the stream and not yet taken by tungstenite, and
/// what may still be read.
struct ReadAhead {
    /// Empty, it holds no memory.
    unread: BytesMut,
    /// Bytes read from the stream at once, at most.
    chunk: u32,
    budget: ReadBudget,
}

impl Io<'_, '_> {
    /// Read from the stream into `unread` (empty): at most a chunk, cut to
    /// the budget. `WouldBlock` (the waker registered) when there is
    /// nothing; `unread` stays empty at the stream's end.
    fn fill(&mut self) -> io::Result<()> {
        let read = &mut *self.read;
        let allowed = read.budget.allowed(read.chunk as usize)?;
        read.unread.reserve(allowed);
        loop {
            match self
                .tcp
                .try_read_buf(&mut (&mut read.unread).limit(allowed))
            {
                Ok(n) => {
                    read.budget.spend(n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match self.tcp.poll_read_ready(self.cx) {
                        Poll::Ready(Ok(())) => continue,
                        Poll::Ready(Err(e)) => return Err(e),
                        Poll::Pending => {
                            // Nothing to read: hold no buffer while waiting.
                            read.unread = BytesMut::new();
                            return Err(e);
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Io<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.read.unread.is_empty() {
            self.fill()?;
        }
        let unread = &mut self.read.unread;
        let n = buf.len().min(unread.len());
        buf[..n].copy_from_slice(&unread[..n]);
        unread.advance(n);
        if unread.is_empty() {
            // All taken: the buffer goes back until the next read.
            *unread = BytesMut::new();
        }
        Ok(n)
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

/// tungstenite's buffers as this socket uses them: [`FRAME_BUFFER`] to
/// read into, and no write buffer (it writes only pongs and the close
/// handshake, each at once; the gateway's frames are ours).
fn own_buffers(config: WebSocketConfig) -> WebSocketConfig {
    config.read_buffer_size(FRAME_BUFFER).write_buffer_size(0)
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
    read: ReadAhead,
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
    /// (read by hyper with it) first. Reads take up to `read_chunk` bytes
    /// from the stream at once. `None` for a stream that is not a plain TCP
    /// stream (the gateway serves no other).
    pub(crate) fn upgraded(
        upgraded: Upgraded,
        config: WebSocketConfig,
        read_chunk: usize,
        mut budget: ReadBudget,
    ) -> Option<Self> {
        let parts = upgraded.downcast::<TokioIo<TcpStream>>().ok()?;
        let early = parts.read_buf;
        // What came early counts against the budget as any read does.
        if budget.allowed(early.len()).ok()? < early.len() {
            return None;
        }
        budget.spend(early.len());
        let config = Some(own_buffers(config));
        let ws = if early.is_empty() {
            WebSocketContext::new(Role::Server, config)
        } else {
            WebSocketContext::from_partially_read(early.to_vec(), Role::Server, config)
        };
        Some(Self::new(parts.io.into_inner(), ws, read_chunk, budget))
    }

    fn new(tcp: TcpStream, ws: WebSocketContext, read_chunk: usize, budget: ReadBudget) -> Self {
        Self {
            tcp,
            ws,
            read: ReadAhead {
                unread: BytesMut::new(),
                chunk: u32::try_from(read_chunk.max(1)).unwrap_or(u32::MAX),
                budget,
            },
            broken: false,
        }
    }

    /// A socket on a stream with no HTTP before it (tests).
    #[cfg(test)]
    fn on_tcp(tcp: TcpStream, read_chunk: usize, budget: ReadBudget) -> Self {
        let config = own_buffers(WebSocketConfig::default());
        let ws = WebSocketContext::new(Role::Server, Some(config));
        Self::new(tcp, ws, read_chunk, budget)
    }

    /// The socket authenticated: it may send what its limits allow.
    pub(crate) fn lift_budget(&mut self) {
        self.read.budget.lift();
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
            read: &mut self.read,
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
        // What tungstenite holds first. Cancelled halfway, it keeps the
        // rest and writes it before anything of ours next time.
        if let Err(e) = poll_fn(|cx| self.poll_flush(cx)).await {
            self.broken = true;
            return Err(e);
        }
        // Broken until the whole batch is written.
        self.broken = true;
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

    /// A server socket and a client's tungstenite stream on one TCP pair.
    async fn pair(
        read_chunk: usize,
        budget: ReadBudget,
    ) -> (Socket, tokio_tungstenite::WebSocketStream<TcpStream>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let client = tokio_tungstenite::WebSocketStream::from_raw_socket(
            client.unwrap(),
            Role::Client,
            None,
        )
        .await;
        (
            Socket::on_tcp(server.unwrap().0, read_chunk, budget),
            client,
        )
    }

    #[tokio::test]
    async fn frames_of_any_size_read_through_small_reads_and_an_idle_socket_holds_no_buffer() {
        use futures_util::{SinkExt, StreamExt};
        for chunk in [7, 256, 2048, 65_536] {
            let (mut server, mut client) = pair(chunk, ReadBudget::UNLIMITED).await;
            let sizes = [0usize, 1, 125, 126, 255, 256, 257, 4000, 70_000];
            for n in sizes {
                client
                    .send(Message::Text("t".repeat(n).into()))
                    .await
                    .unwrap();
                client
                    .send(Message::Ping(vec![n as u8].into()))
                    .await
                    .unwrap();
            }
            for n in sizes {
                let got = server.next().await.unwrap().unwrap();
                assert_eq!(got, Message::Text("t".repeat(n).into()), "chunk {chunk}");
                let ping = server.next().await.unwrap().unwrap();
                assert_eq!(ping, Message::Ping(vec![n as u8].into()));
            }
            // Everything read: the read buffer is given back.
            assert_eq!(server.read.unread.capacity(), 0, "chunk {chunk}");
            // The pongs tungstenite queued, then frames of ours, arrive
            // whole and in order.
            let mut batch = Batch::default();
            batch.text("after the pongs".into());
            batch.ping();
            server.write(&batch).await.unwrap();
            for n in sizes {
                let pong = client.next().await.unwrap().unwrap();
                assert_eq!(pong, Message::Pong(vec![n as u8].into()), "chunk {chunk}");
            }
            let text = client.next().await.unwrap().unwrap();
            assert_eq!(text, Message::Text("after the pongs".into()));
            assert!(matches!(client.next().await, Some(Ok(Message::Ping(_)))));
            // The client's close (after its pong to our ping, if it sent
            // one), which tungstenite answers.
            client.close(None).await.unwrap();
            let mut close = server.next().await.unwrap().unwrap();
            if let Message::Pong(_) = close {
                close = server.next().await.unwrap().unwrap();
            }
            assert!(matches!(close, Message::Close(_)), "{close:?}");
            server.finish().await.unwrap();
            assert!(matches!(client.next().await, Some(Ok(Message::Close(_)))));
        }
    }

    #[tokio::test]
    async fn a_socket_reads_no_more_than_its_budget() {
        use futures_util::SinkExt;
        let (mut server, mut client) = pair(2048, ReadBudget::of(1_000)).await;
        // One frame within the budget is read.
        client
            .send(Message::Text("a".repeat(500).into()))
            .await
            .unwrap();
        assert!(matches!(server.next().await, Some(Ok(Message::Text(_)))));
        // A frame past what is left fails the read; nothing past it is
        // taken from the stream.
        client
            .send(Message::Text("b".repeat(5_000).into()))
            .await
            .unwrap();
        let err = server.next().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("before authenticating"), "{err}");
        assert!(server.read.unread.len() <= 1_000);
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
