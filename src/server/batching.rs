//! Response batching over HTTP/2: the answers of concurrent streams leave in one TLS write.
//!
//! h2 (0.4, `codec/framed_write.rs`) copies a DATA frame into its 16 KiB write buffer only when
//! the frame's payload is below a threshold: 256 bytes when the connection's I/O takes
//! vectored writes, 1,024 bytes when it does not. A larger frame is "chained": its payload is
//! written from its own buffer right after what h2 has buffered, and h2 flushes the connection
//! before it takes the next frame. A denial (its message) or a mutation (its patch) is larger
//! than 256 bytes, so under load every such answer cost its own TLS record, `writev` and flush,
//! where allowed answers (150 bytes) ready at once left in one: over HTTP/2 at 64 streams,
//! /mutate and denials cost 5–14 µs more server CPU per request than they do batched
//! (BENCHMARKS.md, "Issue 14, step 4").
//!
//! So the I/O of a connection that negotiated h2 by ALPN (as the kube-apiserver does) reports
//! that it does not take vectored writes ([`Batching`]), and webhook answers up to
//! [`BATCHED_MAX`] are sent as DATA frames below 1,024 bytes ([`Frames`]): every frame is copied
//! into h2's buffer, and one write carries what all streams have ready. HTTP/1.1 connections
//! keep vectored writes: without them hyper copies each response into a write buffer that keeps
//! its largest size for the connection's life. (A client speaking HTTP/2 without ALPN is served
//! unbatched.)
//!
//! Larger answers go in [`LARGE_FRAME`] pieces rather than whole: hyper drops a response body
//! once it has taken its last piece, and with it the memory budget's charge for the answer
//! (`budget::Charged`), so an answer handed over whole would wait for a slow or stalled reader
//! uncharged (its size is the client's to choose: the answer echoes `request.uid`).
//!
//! Kept in the project: the threshold is h2's internal constant, and no crate splits a body
//! for it.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest DATA frame payload [`Frames`] yields for a batched answer: one byte below h2's
/// threshold for copying a frame into its write buffer when the I/O is not vectored (1,024
/// bytes).
pub const FRAME_MAX: usize = 1023;

/// The largest answer sent in [`FRAME_MAX`] frames: h2's write buffer (16 KiB) holds no more,
/// and a larger answer (a patch inlining credential specs, a denial of many containers) fills
/// writes by itself, so it goes in [`LARGE_FRAME`] pieces instead of as a thousand small frames
/// a MiB.
pub const BATCHED_MAX: usize = 16 * 1024;

/// The pieces of an answer larger than [`BATCHED_MAX`]: HTTP/2's default maximum frame size,
/// so hyper holds at most one piece beyond what flow control lets through.
pub const LARGE_FRAME: usize = 16 * 1024;

/// A response body of known length (HTTP/1.1 answers carry `Content-Length`), sent in frames
/// of at most [`FRAME_MAX`] bytes when it is at most [`BATCHED_MAX`] bytes long, else in
/// [`LARGE_FRAME`] pieces. Splitting does not copy.
#[derive(Debug)]
pub struct Frames {
    rest: Bytes,
    frame_max: usize,
}

impl Frames {
    /// The body `bytes`.
    #[must_use]
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        let rest = bytes.into();
        let frame_max = if rest.len() <= BATCHED_MAX { FRAME_MAX } else { LARGE_FRAME };
        Self { rest, frame_max }
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            return Poll::Ready(None);
        }
        let len = this.rest.len().min(this.frame_max);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A connection's I/O, which on an HTTP/2 connection reports that it does not take vectored
/// writes, so that h2 copies every DATA frame of [`FRAME_MAX`] bytes or less into its write
/// buffer; on HTTP/1.1 it reports what the I/O under it does. Reads and writes pass through.
#[derive(Debug)]
pub struct Batching<S> {
    inner: S,
    http2: bool,
}

impl<S> Batching<S> {
    /// `inner`, the I/O of a connection that speaks HTTP/2 (negotiated by ALPN) or not.
    pub fn new(inner: S, http2: bool) -> Self {
        Self { inner, http2 }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Batching<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Batching<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        !self.http2 && self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::io;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll};

    use axum::body::Bytes;
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Body as _;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

    use super::{BATCHED_MAX, Batching, FRAME_MAX, Frames, LARGE_FRAME};

    /// The server side of an in-memory connection: counts write calls, and takes vectored
    /// writes or not as told (as TLS does).
    struct CountingIo {
        inner: DuplexStream,
        vectored: bool,
        writes: Arc<AtomicUsize>,
    }

    impl AsyncRead for CountingIo {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingIo {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.fetch_add(1, Ordering::Relaxed);
            Pin::new(&mut this.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            this.writes.fetch_add(1, Ordering::Relaxed);
            let joined: Vec<u8> = bufs.iter().flat_map(|buf| buf.iter().copied()).collect();
            Pin::new(&mut this.inner).poll_write(cx, &joined)
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
        }
    }

    /// Answers as large as a denial of a few containers.
    const ANSWER: usize = 1_200;
    /// Requests sent at once on one HTTP/2 connection.
    const STREAMS: usize = 16;

    /// Serves one HTTP/2 connection on `io`, answering every request with [`ANSWER`] bytes,
    /// in [`Frames`] or in one piece.
    fn serve<I>(io: I, framed: bool) -> tokio::task::JoinHandle<()>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |_request| async move {
            let answer = vec![b'x'; ANSWER];
            let body = if framed {
                axum::body::Body::new(Frames::new(answer))
            } else {
                axum::body::Body::new(Full::new(Bytes::from(answer)))
            };
            Ok::<_, Infallible>(hyper::Response::new(body))
        });
        let server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        tokio::spawn(async move {
            let _ = server.serve_connection(TokioIo::new(io), service).await;
        })
    }

    /// The server's write calls while it answers [`STREAMS`] concurrent requests on one
    /// HTTP/2 connection, over I/O that takes vectored writes (as TLS does) wrapped in
    /// [`Batching`] or not, with each answer in [`Frames`] or in one piece.
    async fn writes_for(batching: bool, framed: bool) -> usize {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingIo { inner: server_io, vectored: true, writes: writes.clone() };
        let serving =
            if batching { serve(Batching::new(io, true), framed) } else { serve(io, framed) };
        let (client, connection) = h2::client::handshake(client_io).await.expect("handshake");
        let driving = tokio::spawn(connection);
        // Every request is sent before any answer is read, as the apiserver's concurrent
        // calls share a connection.
        let mut responses = Vec::new();
        for _ in 0..STREAMS {
            let mut client = client.clone().ready().await.expect("a stream");
            let request =
                hyper::Request::post("https://localhost/validate").body(()).expect("a request");
            let (response, _) = client.send_request(request, true).expect("sent");
            responses.push(response);
        }
        for response in responses {
            let mut body = response.await.expect("a response").into_body();
            let mut received = 0;
            while let Some(data) = body.data().await {
                let data = data.expect("data");
                received += data.len();
                let _ = body.flow_control().release_capacity(data.len());
            }
            assert_eq!(received, ANSWER);
        }
        let counted = writes.load(Ordering::Relaxed);
        drop(client);
        driving.abort();
        serving.abort();
        counted
    }

    #[tokio::test]
    async fn only_http2_connections_give_up_vectored_writes() {
        use tokio::io::AsyncWriteExt as _;
        // HTTP/1.1 keeps them: hyper would otherwise copy every response into a write buffer
        // that keeps its largest size for the connection's life.
        for (http2, vectored) in [(true, false), (false, true)] {
            let (_client, server) = tokio::io::duplex(64);
            let counting = CountingIo { inner: server, vectored: true, writes: Arc::default() };
            let mut connection = Batching::new(counting, http2);
            assert_eq!(connection.is_write_vectored(), vectored, "{http2}");
            // A vectored write reaches the I/O as one: all slices in one call.
            let slices = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
            let written = connection.write_vectored(&slices).await.expect("written");
            assert_eq!(written, 4, "{http2}");
        }
    }

    #[tokio::test]
    async fn concurrent_answers_above_256_bytes_leave_together_only_with_batching_and_in_frames() {
        // (Batching, Frames, whether the answers leave together)
        let cases = [
            // As served: every frame is copied into h2's buffer; a handful of writes carry
            // the settings and all the answers.
            (true, true, true),
            // A 1,200-byte frame is over h2's 1,024-byte threshold: written and flushed alone.
            (true, false, false),
            // Frames of 1,023 bytes are over the 256-byte threshold of vectored I/O.
            (false, true, false),
        ];
        for (batching, framed, together) in cases {
            let writes = writes_for(batching, framed).await;
            if together {
                assert!(writes <= STREAMS / 2, "{writes} writes for {STREAMS} answers");
            } else {
                assert!(writes >= STREAMS, "{writes} writes for {STREAMS} answers");
            }
        }
    }

    #[tokio::test]
    async fn bodies_up_to_the_batched_size_are_split_into_frames_below_the_threshold() {
        // (body length, frame lengths)
        let batched = vec![FRAME_MAX; BATCHED_MAX / FRAME_MAX]
            .into_iter()
            .chain(Some(BATCHED_MAX % FRAME_MAX))
            .collect::<Vec<_>>();
        let cases: [(usize, &[usize]); 8] = [
            (0, &[]),
            (1, &[1]),
            (FRAME_MAX, &[FRAME_MAX]),
            (FRAME_MAX + 1, &[FRAME_MAX, 1]),
            (2 * FRAME_MAX + 5, &[FRAME_MAX, FRAME_MAX, 5]),
            (BATCHED_MAX, &batched),
            // Larger answers go in large pieces, so the body (and its charge) lives until the
            // last one is taken.
            (BATCHED_MAX + 1, &[LARGE_FRAME, BATCHED_MAX + 1 - LARGE_FRAME]),
            (3 * LARGE_FRAME + 7, &[LARGE_FRAME, LARGE_FRAME, LARGE_FRAME, 7]),
        ];
        for (len, expected) in cases {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut body = Frames::new(bytes.clone());
            assert_eq!(body.size_hint().exact(), Some(len as u64), "{len}");
            assert_eq!(body.is_end_stream(), len == 0, "{len}");
            let mut lengths = Vec::new();
            let mut joined = Vec::new();
            while let Some(frame) = body.frame().await {
                let data = frame.expect("infallible").into_data().expect("a data frame");
                lengths.push(data.len());
                joined.extend_from_slice(&data);
                assert_eq!(body.size_hint().exact(), Some((len - joined.len()) as u64));
            }
            assert_eq!(lengths, expected, "{len}");
            assert_eq!(joined, bytes, "{len}");
            assert!(body.is_end_stream(), "{len}");
        }
    }
}
