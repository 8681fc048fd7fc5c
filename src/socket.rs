//! One client's WebSocket on its TCP stream, read by the one task that
//! serves it, and written by that task between the frames producers write
//! themselves (the stream lives in the session's outbox, whose lock orders
//! every writer: see `outbox`).
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
//! land inside one of our frames: it writes through the outbox, which
//! first finishes a frame a producer left half written and keeps producers
//! off until the connection's next batch; its pending output is flushed
//! before each batch of ours; and a batch that failed or was left half
//! written (its write timed out) breaks the stream for good: every later
//! write fails at once, and producers only queue.
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
use std::io::{self, Read, Write};
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{
    CloseFrame, Role, WebSocketConfig, WebSocketContext,
};
use tokio_tungstenite::tungstenite::{Error, Message, Utf8Bytes};

use crate::budget::ReadBudget;
use crate::frame::Batch;
use crate::outbox::{self, Outbox};

/// tungstenite's own buffer, which every socket keeps: the most it takes
/// from our read buffer at once. A larger frame grows it to the frame's
/// size, and it may keep that capacity afterwards (the memory a socket
/// that sent large frames holds, as before).
pub(crate) const FRAME_BUFFER: usize = 256;

/// The stream as tungstenite sees it during one poll: the task's context
/// handed down, `WouldBlock` for `Pending`.
struct Io<'a, 'b> {
    outbox: &'a Outbox,
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
        let Some(stream) = self.outbox.stream() else {
            return Err(io::ErrorKind::NotConnected.into());
        };
        let allowed = read.budget.allowed(read.chunk as usize)?;
        read.unread.reserve(allowed);
        loop {
            match stream.try_read_buf(&mut (&mut read.unread).limit(allowed)) {
                Ok(n) => {
                    read.budget.spend(n);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match stream.poll_read_ready(self.cx) {
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
        // Between frames: the outbox finishes a frame a producer left half
        // written first, and keeps producers off until tungstenite's flush.
        match self.outbox.poll_write_own(self.cx, buf) {
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
    /// The session's outbox, which holds the stream (producers write to
    /// it too, as its pen allows).
    outbox: Outbox,
    ws: WebSocketContext,
    read: ReadAhead,
    /// A write of ours failed or was left half done (the stream may be
    /// mid-frame): nothing more is written, and the pen is never put down.
    broken: bool,
}

impl Drop for Socket {
    /// The connection is over: its stream is shut now, not when the last
    /// clone of the outbox that holds it goes (a fan-out's or a replay's
    /// may live a moment longer).
    fn drop(&mut self) {
        if let Some(stream) = self.outbox.stream() {
            let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Both);
        }
    }
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field(
                "peer",
                &self.outbox.stream().and_then(|s| s.peer_addr().ok()),
            )
            .field("broken", &self.broken)
            .finish()
    }
}

impl Socket {
    /// The WebSocket of a connection hyper upgraded: its TCP stream back
    /// from hyper, in the outbox `outbox` makes of it, and what the client
    /// sent after its upgrade request (read by hyper with it) first. Reads
    /// take up to `read_chunk` bytes from the stream at once. `None` for a
    /// stream that is not a plain TCP stream (the gateway serves no other).
    pub(crate) fn upgraded(
        upgraded: Upgraded,
        config: WebSocketConfig,
        read_chunk: usize,
        mut budget: ReadBudget,
        outbox: impl FnOnce(TcpStream) -> Outbox,
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
        let outbox = outbox(parts.io.into_inner());
        Some(Self::new(outbox, ws, read_chunk, budget))
    }

    fn new(outbox: Outbox, ws: WebSocketContext, read_chunk: usize, budget: ReadBudget) -> Self {
        Self {
            outbox,
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
        Self::new(Outbox::on_stream(tcp, 64, 1 << 20), ws, read_chunk, budget)
    }

    /// The session's outbox, which holds this socket's stream.
    pub(crate) fn outbox(&self) -> &Outbox {
        &self.outbox
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
            outbox: &self.outbox,
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

    /// Write `batch`, taken from the outbox (whose pen the connection holds
    /// from then on), and whatever tungstenite holds (a pong): tungstenite's
    /// bytes first, as one of its frames may be half written, unless the
    /// batch starts with the rest of a frame already half written (then
    /// nothing of tungstenite's is, and it goes after). Then the pen is put
    /// down, tungstenite owing nothing. Failed, or cancelled halfway (a
    /// timeout), the socket is broken: nothing more is written, by anyone.
    pub(crate) async fn write(&mut self, batch: &Batch) -> io::Result<()> {
        if self.broken {
            return Err(broken());
        }
        let tungstenite_last = batch.starts_mid_frame();
        if !tungstenite_last {
            self.flush_tungstenite().await?;
        }
        let Some(stream) = self.outbox.stream() else {
            self.broken = true;
            return Err(io::ErrorKind::NotConnected.into());
        };
        // Broken until the whole batch is written.
        self.broken = true;
        let mut written = 0;
        poll_fn(|cx| outbox::poll_write_batch(stream, cx, batch, &mut written)).await?;
        self.broken = false;
        if tungstenite_last {
            self.flush_tungstenite().await?;
        }
        self.outbox.written();
        Ok(())
    }

    /// Write what tungstenite holds. Cancelled halfway, it keeps the rest
    /// and writes it before anything of ours next time; failed, the socket
    /// is broken.
    async fn flush_tungstenite(&mut self) -> io::Result<()> {
        let flushed = poll_fn(|cx| self.poll_flush(cx)).await;
        if flushed.is_err() {
            self.broken = true;
        }
        flushed
    }

    /// Write one text frame, through the outbox (as if queued and taken).
    pub(crate) async fn send(&mut self, text: Utf8Bytes) -> io::Result<()> {
        if self.outbox.try_push_own(text).is_err() {
            return Err(broken());
        }
        match self.outbox.pop_now() {
            Some(batch) => self.write(&batch).await,
            None => Ok(()),
        }
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

    /// A server socket and a client's stream on one TCP pair with small
    /// kernel buffers: writes are cut anywhere.
    async fn small_pair() -> (Socket, tokio_tungstenite::WebSocketStream<TcpStream>) {
        let (server, client) = crate::outbox::tests::small_tcp_pair().await;
        let client =
            tokio_tungstenite::WebSocketStream::from_raw_socket(client, Role::Client, None).await;
        let socket = Socket::on_tcp(server, 2048, ReadBudget::UNLIMITED);
        (socket, client)
    }

    #[tokio::test]
    async fn the_stream_is_shut_when_the_socket_goes_though_its_outbox_stays() {
        use futures_util::StreamExt;
        let (server, mut client) = pair(2048, ReadBudget::UNLIMITED).await;
        let outbox = server.outbox().clone();
        drop(server);
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), client.next()).await;
        assert!(
            matches!(end, Ok(None | Some(Err(_)))),
            "the client sees the stream end: {end:?}"
        );
        assert!(outbox.stream().is_some());
    }

    #[tokio::test]
    async fn a_pong_waiting_in_tungstenite_follows_a_frame_a_producer_half_wrote() {
        use futures_util::{SinkExt, StreamExt};
        let (mut server, mut client) = small_pair().await;
        let big: Utf8Bytes = "z".repeat(400_000).into();
        // A producer's frame, taken in part by the stream.
        server.outbox().try_push(big.clone()).unwrap();
        // The client pings; tungstenite reads it and holds its pong.
        client.send(Message::Ping(vec![7].into())).await.unwrap();
        let ping = server.next().await.unwrap().unwrap();
        assert_eq!(ping, Message::Ping(vec![7].into()));
        // The connection's batch starts with the rest of the frame: the
        // pong may only follow it.
        let batch = server.outbox().pop_now().unwrap();
        assert!(batch.starts_mid_frame());
        let reading = tokio::spawn(async move {
            let text = client.next().await.unwrap().unwrap();
            let pong = client.next().await.unwrap().unwrap();
            (text, pong)
        });
        server.write(&batch).await.unwrap();
        let (text, pong) = reading.await.unwrap();
        assert_eq!(text, Message::Text(big));
        assert_eq!(pong, Message::Pong(vec![7].into()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn producers_the_connection_and_pongs_share_the_stream_and_every_frame_arrives_whole() {
        // Each run interleaves differently (a race seen here once in a few
        // runs is caught in most test runs).
        for _ in 0..4 {
            share_the_stream_once().await;
        }
    }

    async fn share_the_stream_once() {
        use crate::outbox::PushError;
        use futures_util::{SinkExt, StreamExt};
        use std::time::Duration;
        const N: usize = 300;
        const ASKS: usize = 50;
        let produced = |i: usize| {
            let pad = [0, 5, 120, 126, 3_000, 65_536, 200_000][i % 7] + i;
            format!("p{i:04}{}", "x".repeat(pad))
        };
        let (mut server, client) = small_pair().await;
        let queue = server.outbox().clone();
        let (mut to_server, mut from_server) = client.split();

        // Another task offers frames as fast as the queue takes them: each
        // written straight to the stream, in part, or queued.
        let producer = tokio::spawn({
            let queue = queue.clone();
            async move {
                for i in 0..N {
                    let mut frame: Utf8Bytes = produced(i).into();
                    loop {
                        match queue.try_push_keep(frame) {
                            Ok(()) => break,
                            Err((PushError::Full, back)) => {
                                frame = back;
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err((PushError::Closed, _)) => panic!("closed at {i}"),
                        }
                    }
                }
            }
        });
        // The connection writes what it takes from the outbox, answers each
        // text with a frame of its own, and tungstenite pongs each ping.
        let connection = tokio::spawn(async move {
            let mut answered = 0;
            loop {
                tokio::select! {
                    batch = queue.pop() => match batch {
                        Some(batch) => server.write(&batch).await.unwrap(),
                        None => break,
                    },
                    msg = server.next() => match msg {
                        Some(Ok(Message::Text(ask))) => {
                            let mut own: Utf8Bytes = format!("c{answered:04}:{ask}").into();
                            while let Err((_, back)) = queue.try_push_own(own) {
                                own = back;
                                let batch = queue.pop_now().unwrap();
                                server.write(&batch).await.unwrap();
                            }
                            answered += 1;
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(_)) => {}
                        Some(Err(e)) => panic!("{e}"),
                    },
                }
            }
            server.finish().await.unwrap();
        });
        let asking = tokio::spawn(async move {
            for k in 0..ASKS {
                to_server
                    .send(Message::Ping(vec![k as u8].into()))
                    .await
                    .unwrap();
                to_server
                    .send(Message::Text(format!("ask{k}").into()))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            to_server
        });

        let (mut produced_got, mut answers, mut last_pong) = (Vec::new(), Vec::new(), None);
        while produced_got.len() < N || answers.len() < ASKS || last_pong != Some(ASKS - 1) {
            let next = tokio::time::timeout(Duration::from_secs(20), from_server.next()).await;
            match next.expect("every frame within 20 s") {
                Some(Ok(Message::Text(t))) if t.starts_with('p') => produced_got.push(t),
                Some(Ok(Message::Text(t))) => answers.push(t),
                Some(Ok(Message::Pong(p))) => {
                    // tungstenite answers the latest ping it read: in order,
                    // some skipped.
                    let k = usize::from(p[0]);
                    assert!(
                        last_pong.is_none_or(|l| k > l),
                        "pong {k} after {last_pong:?}"
                    );
                    last_pong = Some(k);
                }
                other => panic!("the client read {other:?}"),
            }
            if (produced_got.len() + answers.len()) % 16 == 0 {
                // A slow reader now and then: the stream fills.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_eq!(produced_got.len(), N);
        for (i, got) in produced_got.iter().enumerate() {
            assert!(*got == produced(i), "frame {i} arrived out of order or cut");
        }
        let want: Vec<String> = (0..ASKS).map(|k| format!("c{k:04}:ask{k}")).collect();
        assert_eq!(answers, want);

        producer.await.unwrap();
        let mut to_server = asking.await.unwrap();
        to_server.send(Message::Close(None)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), connection)
            .await
            .expect("the connection ends on the close")
            .unwrap();
    }
}
