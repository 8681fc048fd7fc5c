//! The lane's socket: TCP (with `TCP_NODELAY`) or TLS to the broker with the
//! system's roots, split into a reader and a writer; and the reader that
//! fills a [`FrameBuf`] from it, bounded in time by the heartbeat.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::uri::{AMQPScheme, AMQPUri};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use super::LaneError;
use super::assemble::FrameBuf;
use super::codec::{FRAME_HEARTBEAT, FRAME_METHOD, closed_by_broker, decode_method};
use super::early::{EARLY_MAX, Early};

pub(super) type Reader = Pin<Box<dyn AsyncRead + Send>>;
pub(super) type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// The write half of a plain TCP connection, shared by the writer task and
/// the publishes that write directly ([`Inner::queue`]).
pub(super) struct SharedWrite(pub(super) Arc<OwnedWriteHalf>);

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

pub(super) async fn open_socket(
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
pub(super) fn tls_connector() -> Result<tokio_rustls::TlsConnector, LaneError> {
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

/// Frames off the socket: a [`FrameBuf`] filled from the reader.
pub(super) struct FrameReader {
    io: Reader,
    pub(super) buf: FrameBuf,
    /// Deliveries that came during the handshake (a consumer already set
    /// up receives while the next one is asked for), kept to be read first.
    pub(super) early: Early,
}

impl FrameReader {
    pub(super) fn new(io: Reader) -> Self {
        Self {
            io,
            buf: FrameBuf::new(),
            early: Early::new(EARLY_MAX),
        }
    }

    /// Read more from the socket; `within` bounds the wait (heartbeats).
    pub(super) async fn fill(&mut self, within: Option<Duration>) -> Result<(), LaneError> {
        let read = self.io.read_buf(self.buf.spare());
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
    pub(super) async fn method(&mut self) -> Result<(u16, AMQPClass), LaneError> {
        loop {
            while let Some(frame) = self.buf.buffered()? {
                match frame.kind {
                    FRAME_HEARTBEAT => continue,
                    FRAME_METHOD => {}
                    // The content of an early delivery.
                    other if self.early.content(other, self.buf.raw(frame)) => continue,
                    other => {
                        return Err(LaneError::new(format!(
                            "a frame of type {other} during the handshake"
                        )));
                    }
                }
                let class = decode_method(self.buf.payload(frame))?;
                if let Some(why) = closed_by_broker(&class) {
                    return Err(why);
                }
                if let AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) = &class {
                    self.early.deliver(
                        self.buf.raw(frame),
                        d.delivery_tag,
                        d.consumer_tag.as_str(),
                    );
                    continue;
                }
                self.early.method();
                return Ok((frame.channel, class));
            }
            self.fill(None).await?;
        }
    }
}
