//! The TLS accept loop: bounded connections, handshake, header and write-stall timeouts, HTTP/2
//! keep-alive pings and idle timeout, and a drain that tells clients to move before the
//! listener closes.
//!
//! Why a drain: the kube-apiserver pools keep-alive connections to a webhook Service and has no
//! retry for a request that fails on one. From the moment a replica starts shutting down
//! (readiness false, before `--shutdown-delay`), every connection is told to go: HTTP/1.1
//! responses carry `Connection: close` and HTTP/2 connections get a GOAWAY, while requests are
//! still answered. By the time the listener closes, no client holds a pooled connection to it.
//! hyper-util's `GracefulShutdown` only signals when the listener closes, and its connection
//! trait is sealed, so the per-connection loop below drives `graceful_shutdown` itself.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;

use super::Limits;
use super::batching::Batching;

/// Serves `app` over TLS on `listener` until `shutdown` completes, then lets in-flight
/// requests finish within `limits.shutdown_grace`. Once `draining` turns true, every
/// connection, open or new, is told to close after what it has in flight.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    limits: Limits,
    mut draining: watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = TlsAcceptor::from(tls);
    let slots = limits.connection_slots();
    let connections = Arc::new(Semaphore::new(slots));
    let clients = Clients::new(limits.connections_per_client());
    // Every connection task holds a sender: when all are dropped, every connection is closed.
    let (open_tx, mut open_rx) = mpsc::channel::<()>(1);
    let (leave_tx, leave_rx) = watch::channel(*draining.borrow());
    let (close_tx, close_rx) = watch::channel(false);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // What one HTTP/1.1 connection buffers: request heads are small, bodies are read as
        // the handler asks for them.
        .max_buf_size(H1_BUFFER);
    builder
        .http2()
        .timer(TokioTimer::new())
        // What one HTTP/2 connection buffers before the handlers read it: flow control keeps a
        // peer from sending more than these windows (a body is read as it arrives, charged to
        // the memory budget, so the windows reopen at once for a well-behaved client).
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .adaptive_window(false)
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(H2_MAX_HEADER_LIST)
        // A peer that stops answering PINGs (gone without a FIN) is dropped.
        .keep_alive_interval(Some(limits.keep_alive_interval))
        .keep_alive_timeout(limits.keep_alive_timeout);
    // A connection that negotiated h2 by ALPN is served as HTTP/2 from its first byte, so a
    // drain can send it a GOAWAY at once instead of cancelling protocol detection.
    let h2_builder = Arc::new(builder.clone().http2_only());
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            changed = draining.changed(), if !*leave_tx.borrow() => {
                if changed.is_err() || *draining.borrow() {
                    let _ = leave_tx.send(true);
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(%error, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, limit = slots, "connection limit reached; closing new connection");
            continue;
        };
        let Some(client) = clients.enter(peer.ip()) else {
            tracing::warn!(%peer, limit = clients.limit, "connection limit per client reached; closing new connection");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        let (builder, h2_builder) = (builder.clone(), h2_builder.clone());
        let open = open_tx.clone();
        let leave = leave_rx.clone();
        let close = close_rx.clone();
        let limits = limits.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _client = client;
            let _open = open;
            let handshake = acceptor.accept(stream);
            let tls = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
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
            // The negotiated protocol decides how the connection is told to leave.
            let http2 = tls.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
            let activity = Arc::new(Activity::new());
            let service = Tracked {
                inner: TowerToHyperService::new(app),
                activity: activity.clone(),
                leave: leave.clone(),
            };
            // Over HTTP/2, concurrent streams' answers leave in one write (see batching).
            let tls = Batching::new(tls, http2);
            let tls = StallGuard::new(tls, limits.header_timeout, limits.request_timeout);
            let builder = if http2 { &h2_builder } else { &builder };
            let connection = builder.serve_connection(TokioIo::new(tls), service);
            let signals = Signals { leave, close, http2 };
            drive(connection, signals, &activity, &limits, peer).await;
        });
    }
    let _ = leave_tx.send(true);
    let _ = close_tx.send(true);
    drop(listener);
    drop(open_tx);
    let closed = open_rx.recv();
    if tokio::time::timeout(limits.shutdown_grace, closed).await.is_err() {
        tracing::warn!(grace = ?limits.shutdown_grace, "in-flight requests did not finish within the shutdown grace period");
    }
}

/// The HTTP/2 flow-control window of one stream: a stalled stream buffers at most this.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
/// The HTTP/2 flow-control window of one connection: its streams together buffer at most this.
const H2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// Streams one HTTP/2 connection may have open; the apiserver opens another connection for
/// more.
const H2_MAX_STREAMS: u32 = 32;
/// Response bytes buffered per HTTP/2 stream (the response itself is charged to the budget).
const H2_SEND_BUFFER: usize = 64 * 1024;
/// The largest header block of an HTTP/2 request.
const H2_MAX_HEADER_LIST: u32 = 64 * 1024;
/// The read buffer of one HTTP/1.1 connection, and so the largest request head.
const H1_BUFFER: usize = 64 * 1024;

/// Connections per client IP.
struct Clients {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One connection of a client; counted until dropped.
struct ClientSlot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Clients {
    fn new(limit: usize) -> Self {
        Self { open: Arc::new(Mutex::new(HashMap::new())), limit }
    }

    /// A slot for one more connection from `ip`, unless it already holds `limit`.
    fn enter(&self, ip: IpAddr) -> Option<ClientSlot> {
        let mut open = self.open.lock().ok()?;
        let count = open.entry(ip).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot { open: self.open.clone(), ip })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Ok(mut open) = self.open.lock()
            && let Some(count) = open.get_mut(&self.ip)
        {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// What tells one connection to go.
struct Signals {
    /// True from the start of the shutdown delay.
    leave: watch::Receiver<bool>,
    /// True once the listener has closed.
    close: watch::Receiver<bool>,
    /// Whether the connection speaks HTTP/2 (negotiated by ALPN).
    http2: bool,
}

/// Runs one connection until it ends, and asks it to close after what it has in flight:
/// - an HTTP/2 connection as soon as the server drains (a GOAWAY, which the client answers by
///   opening a new connection for its next request: no request is lost);
/// - an HTTP/1.1 connection through its responses: while draining, each carries
///   `Connection: close` (see [`Tracked`]), and idle ones close once the listener has;
/// - any connection with no request in flight for `idle_timeout`.
///
/// A connection that has not closed `request_timeout` after being asked to (an HTTP/2 peer that
/// never acknowledges the PING of the graceful close, say) is dropped.
async fn drive<C>(
    connection: C,
    mut signals: Signals,
    activity: &Activity,
    limits: &Limits,
    peer: std::net::SocketAddr,
) where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulClose,
{
    tokio::pin!(connection);
    let idle_timeout = limits.idle_timeout;
    // Set once the connection has been asked to close.
    let mut deadline: Option<Instant> = None;
    let leave_now =
        |signals: &Signals| *signals.close.borrow() || (signals.http2 && *signals.leave.borrow());
    let close = |connection: Pin<&mut C>, deadline: &mut Option<Instant>| {
        connection.close_gracefully();
        *deadline = Some(Instant::now() + limits.request_timeout);
    };
    if leave_now(&signals) {
        close(connection.as_mut(), &mut deadline);
    }
    loop {
        let closing = deadline.is_some();
        let forced = deadline.unwrap_or_else(Instant::now);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(forced), if closing => {
                tracing::debug!(%peer, "dropping a connection that did not close when asked");
                return;
            }
            _ = signals.leave.changed(), if !closing && signals.http2 => {
                if leave_now(&signals) {
                    close(connection.as_mut(), &mut deadline);
                }
            }
            _ = signals.close.changed(), if !closing => {
                if leave_now(&signals) {
                    close(connection.as_mut(), &mut deadline);
                }
            }
            () = activity.idle_for(idle_timeout), if !closing => {
                tracing::debug!(%peer, ?idle_timeout, "closing an idle connection");
                close(connection.as_mut(), &mut deadline);
            }
        }
    }
}

/// A connection that can be asked to finish what it has in flight and close.
trait GracefulClose {
    /// Starts the graceful close.
    fn close_gracefully(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulClose for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn close_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Requests in flight on one connection, and when the last one ended.
struct Activity {
    state: Mutex<(usize, Instant)>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self { state: Mutex::new((0, Instant::now())), changed: Notify::new() }
    }

    fn update(&self, delta: isize) {
        if let Ok(mut state) = self.state.lock() {
            state.0 = state.0.saturating_add_signed(delta);
            state.1 = Instant::now();
        }
        // This wakes the connection's task at each request's start and end. Reading the state
        // only when the timer fires instead saved about 35 µs of CPU a call at a trickle, but
        // cost a third of HTTP/2 throughput under load (BENCHMARKS.md, "Issue 14, step 4").
        self.changed.notify_waiters();
    }

    /// Completes once no request has been in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let changed = self.changed.notified();
            let (active, since) = self.state.lock().map(|s| *s).unwrap_or((0, Instant::now()));
            if active == 0 {
                tokio::select! {
                    () = tokio::time::sleep_until(since + timeout) => {
                        let now = self.state.lock().map(|s| *s).unwrap_or((0, since));
                        if now == (0, since) {
                            return;
                        }
                    }
                    () = changed => {}
                }
            } else {
                changed.await;
            }
        }
    }
}

/// The connection's service: counts requests in flight (for the idle timeout) and, while the
/// server drains, marks HTTP/1.1 responses `Connection: close`, which hyper honours by closing
/// the connection once the response is written.
#[derive(Clone)]
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    leave: watch::Receiver<bool>,
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.update(-1);
    }
}

impl<S, B> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        self.activity.update(1);
        let in_flight = InFlight(self.activity.clone());
        let http1 = request.version() < http::Version::HTTP_2;
        let leave = self.leave.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await;
            if http1
                && *leave.borrow()
                && let Ok(response) = &mut response
            {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            drop(in_flight);
            response
        })
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
