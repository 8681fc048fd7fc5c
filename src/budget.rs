//! Bytes a socket may send before it has said who it is. The WebSocket
//! library buffers a frame whole before anyone sees it, up to its hard cap:
//! a socket that announces a large frame before authenticating, sends part
//! of it and waits, would hold that much until the auth timeout. A socket
//! that upgraded without a token gets a budget of bytes read (a
//! `authenticate` frame fits it many times over); past it, reads fail and
//! the socket is closed. Authenticating lifts it.
//!
//! Counted after each read, not before (no `unsafe` to cut a read short):
//! a read may overshoot by what one read takes, and the next one fails.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a socket waiting to authenticate may send, in all: an
/// `authenticate` frame (16 KiB of token and its envelope), a read's
/// worth beyond it, and pings. A frame announced larger than the token
/// limit and held back costs at most this.
pub(crate) const BEFORE_AUTH: usize = 20 * 1024;

/// A connection's read budget; clones share it. Unlimited unless armed.
#[derive(Debug, Clone)]
pub(crate) struct ReadBudget(Arc<AtomicUsize>);

impl ReadBudget {
    pub(crate) fn unlimited() -> Self {
        Self(Arc::new(AtomicUsize::new(usize::MAX)))
    }

    /// From now on, at most `bytes` more may be read.
    pub(crate) fn arm(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Release);
    }

    /// No limit any more (the socket authenticated).
    pub(crate) fn lift(&self) {
        self.0.store(usize::MAX, Ordering::Release);
    }

    /// What is left: `usize::MAX` when unlimited.
    fn left(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    /// Count `n` bytes read (while armed).
    fn spend(&self, n: usize) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                (left != usize::MAX).then(|| left.saturating_sub(n))
            });
    }
}

/// A stream whose reads draw on a [`ReadBudget`].
#[derive(Debug)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: ReadBudget,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budget: ReadBudget) -> Self {
        Self { inner, budget }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let left = self.budget.left();
        if left == 0 {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "more sent before authenticating than a token needs",
            )));
        }
        if left == usize::MAX {
            // Unlimited (every authenticated socket): nothing to count.
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_ready() {
            self.budget.spend(buf.filled().len() - before);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn an_armed_budget_ends_reads_and_a_lifted_one_does_not() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let budget = ReadBudget::unlimited();
        let mut r = Budgeted::new(a, budget.clone());
        b.write_all(&[7; 100]).await.unwrap();
        let mut buf = [0u8; 100];
        r.read_exact(&mut buf).await.unwrap();

        budget.arm(150);
        b.write_all(&[7; 100]).await.unwrap();
        r.read_exact(&mut buf).await.unwrap();
        b.write_all(&[7; 100]).await.unwrap();
        // 50 left: this read may overshoot it, the next one fails.
        let _ = r.read(&mut buf).await.unwrap();
        b.write_all(&[7; 100]).await.unwrap();
        let err = r.read_exact(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted);

        budget.lift();
        b.write_all(&[7; 100]).await.unwrap();
        assert!(r.read(&mut buf).await.unwrap() > 0, "lifted: reads again");
    }
}
