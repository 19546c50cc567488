//! The TLS accept loop: bounded connections, handshake, header and write-stall timeouts,
//! graceful drain.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use super::Limits;

/// Serves `app` over TLS on `listener` until `shutdown` completes, then lets in-flight
/// requests finish within `limits.shutdown_grace`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    builder.http2().timer(TokioTimer::new()).max_concurrent_streams(256);
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "connection limit reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let handshake_timeout = limits.handshake_timeout;
        let header_timeout = limits.header_timeout;
        let write_stall = limits.request_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let service = TowerToHyperService::new(app);
            let tls = StallGuard::new(tls, header_timeout, write_stall);
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(grace = ?limits.shutdown_grace, "in-flight requests did not finish within the shutdown grace period");
    }
}

/// What an HTTP/2 client sends first; any other first bytes mean HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Closes connections whose client stalls them where hyper has no timer of its own.
///
/// - Reads fail once the header timeout passes before the protocol (HTTP/1 or HTTP/2) can be
///   told from the first bytes: hyper times out HTTP/1 headers only once the protocol is known,
///   so a client that completed the handshake and then sent nothing (or part of the HTTP/2
///   preface) would hold its connection slot forever.
/// - Writes fail once they have made no progress for the write-stall timeout: the request
///   timeout ends when the handler returns, so a client that never reads its response would
///   hold its slot, and the response, forever.
struct StallGuard<S> {
    inner: S,
    /// Bytes of the HTTP/2 preface matched so far.
    matched: usize,
    /// `None` once the protocol is known.
    detection: Option<Pin<Box<Sleep>>>,
    write_stall: Duration,
    /// Armed while a write is pending; disarmed by any progress.
    stall_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    fn new(inner: S, header_timeout: Duration, write_stall: Duration) -> Self {
        Self {
            inner,
            matched: 0,
            detection: Some(Box::pin(tokio::time::sleep(header_timeout))),
            write_stall,
            stall_deadline: None,
        }
    }

    /// Passes a ready write through; on a pending one, fails once it has been stalled too long.
    fn write_progress<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stall_deadline = None;
            return poll;
        }
        let write_stall = self.write_stall;
        let stalled =
            self.stall_deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(write_stall)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stall_deadline = None;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading its response",
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.detection.is_some() {
                    let read = &buf.filled()[before..];
                    let rest = &H2_PREFACE[this.matched..];
                    // End of stream, a byte off the preface (HTTP/1), or the whole preface.
                    let known = read.is_empty()
                        || read.iter().zip(rest).any(|(got, want)| got != want)
                        || read.len() >= rest.len();
                    if known {
                        this.detection = None;
                    } else {
                        this.matched += read.len();
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                let expired = this
                    .detection
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.detection = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request started before the header timeout",
                )))
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.write_progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.write_progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.write_progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.write_progress(cx, poll)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{H2_PREFACE, StallGuard};

    /// Long enough that a test never hits the timeout it does not exercise.
    const NEVER: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn reads_fail_only_while_the_protocol_is_still_unknown_at_the_deadline() {
        let deadline = Duration::from_millis(20);
        let mut h2_then_frames = H2_PREFACE.to_vec();
        h2_then_frames.extend_from_slice(b"\0\0");
        // (first bytes sent, whether reading fails once the deadline has passed)
        let cases: [(&[u8], bool); 6] = [
            (b"", true),
            (&H2_PREFACE[..16], true),
            (b"P", true),
            (b"POST /validate", false),
            (H2_PREFACE, false),
            (&h2_then_frames, false),
        ];
        for (sent, times_out) in cases {
            let (mut client, server) = tokio::io::duplex(1024);
            client.write_all(sent).await.expect("write");
            let mut server = StallGuard::new(server, deadline, NEVER);
            let mut buf = vec![0u8; 64];
            let mut received = 0;
            // Well past the deadline: a read still pending by then was not failed by it.
            let outcome = tokio::time::timeout(deadline * 10, async {
                loop {
                    match server.read(&mut buf).await {
                        Ok(n) => received += n,
                        Err(error) => return error.kind(),
                    }
                }
            })
            .await;
            assert_eq!(received, sent.len(), "{sent:?}");
            assert_eq!(outcome.ok(), times_out.then_some(std::io::ErrorKind::TimedOut), "{sent:?}");
            drop(client);
        }
    }

    #[tokio::test]
    async fn writes_fail_only_when_the_client_stops_reading_for_the_stall_timeout() {
        let stall = Duration::from_millis(200);
        // (whether the client reads, whether writing fails)
        for (client_reads, times_out) in [(false, true), (true, false)] {
            let (mut client, server) = tokio::io::duplex(64);
            let mut server = StallGuard::new(server, NEVER, stall);
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; 64];
                let mut received = 0;
                // 64 bytes at a time: every read lets a pending write progress.
                while client_reads && received < 4096 {
                    received += client.read(&mut buf).await.expect("read");
                }
                (client, received)
            });
            let written = server.write_all(&[b'x'; 4096]).await;
            assert_eq!(written.is_err(), times_out, "client reads: {client_reads}: {written:?}");
            if let Err(error) = written {
                assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
            }
            let (_client, received) = reader.await.expect("reader");
            assert_eq!(received, if client_reads { 4096 } else { 0 });
        }
    }
}
