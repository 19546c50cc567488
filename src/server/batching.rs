//! Response batching over HTTP/2: the answers of concurrent streams leave in one TLS write.
//!
//! h2 (0.4, `codec/framed_write.rs`) copies a DATA frame into its 16 KiB write buffer only when
//! the frame's payload is below a threshold: 256 bytes when the connection's I/O takes
//! vectored writes, 1,024 bytes when it does not. A larger frame is "chained": written on its
//! own and followed by a flush before the next frame is taken. A denial (its message) or a
//! mutation (its patch) is larger than 256 bytes, so under load every such answer cost its own
//! TLS record, `writev` and flush, where allowed answers (150 bytes) ready at once left in one:
//! over HTTP/2 at 64 streams, /mutate and denials cost 5–14 µs more server CPU per request
//! than they do batched (BENCHMARKS.md, "Issue 14, step 4").
//!
//! So the connection's I/O reports that it does not take vectored writes ([`Unvectored`]),
//! and webhook answers are sent as DATA frames below 1,024 bytes ([`Frames`]): every frame is
//! copied into h2's buffer, and one write carries what all streams have ready. Over HTTP/1.1,
//! hyper then copies a response's head and body into one buffer and writes it at once, as it
//! did with a vectored write.
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

/// The largest DATA frame payload [`Frames`] yields: one byte below h2's threshold for
/// copying a frame into its write buffer when the I/O is not vectored (1,024 bytes).
pub const FRAME_MAX: usize = 1023;

/// A response body sent in frames of at most [`FRAME_MAX`] bytes; its exact length is known
/// (HTTP/1.1 answers carry `Content-Length`). Splitting does not copy.
#[derive(Debug)]
pub struct Frames {
    rest: Bytes,
}

impl Frames {
    /// The body `bytes`, to be sent in frames of at most [`FRAME_MAX`] bytes.
    #[must_use]
    pub fn new(bytes: impl Into<Bytes>) -> Self {
        Self { rest: bytes.into() }
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
        let len = this.rest.len().min(FRAME_MAX);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.rest.len() as u64)
    }
}

/// A connection's I/O that reports it does not take vectored writes, so that h2 copies every
/// DATA frame of [`FRAME_MAX`] bytes or less into its write buffer; reads and writes pass
/// through unchanged.
#[derive(Debug)]
pub struct Unvectored<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for Unvectored<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Unvectored<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
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

    use super::{FRAME_MAX, Frames, Unvectored};

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
    /// [`Unvectored`] or not, with each answer in [`Frames`] or in one piece.
    async fn writes_for(unvectored: bool, framed: bool) -> usize {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let writes = Arc::new(AtomicUsize::new(0));
        let io = CountingIo { inner: server_io, vectored: true, writes: writes.clone() };
        let serving = if unvectored { serve(Unvectored(io), framed) } else { serve(io, framed) };
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
    async fn concurrent_answers_above_256_bytes_leave_together_only_unvectored_and_in_frames() {
        // (Unvectored, Frames, whether the answers leave together)
        let cases = [
            // As served: every frame is copied into h2's buffer; a handful of writes carry
            // the settings and all the answers.
            (true, true, true),
            // A 1,200-byte frame is over h2's 1,024-byte threshold: written and flushed alone.
            (true, false, false),
            // Frames of 1,023 bytes are over the 256-byte threshold of vectored I/O.
            (false, true, false),
        ];
        for (unvectored, framed, together) in cases {
            let writes = writes_for(unvectored, framed).await;
            if together {
                assert!(writes <= STREAMS / 2, "{writes} writes for {STREAMS} answers");
            } else {
                assert!(writes >= STREAMS, "{writes} writes for {STREAMS} answers");
            }
        }
    }

    #[tokio::test]
    async fn bodies_are_split_into_frames_below_the_threshold_and_keep_their_length() {
        // (body length, frame lengths)
        let cases: [(usize, &[usize]); 5] = [
            (0, &[]),
            (1, &[1]),
            (FRAME_MAX, &[FRAME_MAX]),
            (FRAME_MAX + 1, &[FRAME_MAX, 1]),
            (2 * FRAME_MAX + 5, &[FRAME_MAX, FRAME_MAX, 5]),
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
