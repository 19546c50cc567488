//! The Kubernetes API client of cluster mode: kube's client with bounded waits.
//!
//! kube's default stack retries 429, 503 and 504 answers itself, silently (its trace layer logs
//! 5xx only), honouring `Retry-After`, up to 15 times with a back-off doubling from 5 ms to
//! 1,000 s plus a jitter of up to twice that: 164 s at the least, about 330 s on average, before
//! the caller hears of it. A restarted apiserver answers 429s while it warms up (priority and
//! fairness; watch caches, which a v1.36 apiserver loads before it serves a list from them), and
//! a watch's initial list stuck in those retries holds readiness back with nothing in the log:
//! the likely cause of a replica that stayed unready for 90 s after the apiserver it waited for
//! came up, once in the e2e suite (`faults.rs`, started without an apiserver). Every watch of
//! arcguard already retries on its own, logged, within 2 s ([`super::watch_backoff`]); calls
//! made for a request or the Lease have their own deadlines. So this client retries at most
//! [`RETRIES`] times, each after a short back-off or the answer's `Retry-After` up to
//! [`RETRY_AFTER_MAX`] ([`BoundedRetry`]), and bounds each call's wait for its response head,
//! retries included, with [`RESPONSE_DEADLINE`].

use std::time::Duration;

use http::{Request, Response, StatusCode, header};
use kube::client::{Body, ClientBuilder};
use tower::BoxError;
use tower::buffer::{Buffer, BufferLayer};
use tower::retry::{Policy, Retry, RetryLayer};
use tower::timeout::{Timeout, TimeoutLayer};
use tower::util::rng::{HasherRng, Rng as _};

use super::ClusterError;

/// How long a TCP connection and TLS handshake to the apiserver may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection to the apiserver may stay silent while a response is read: above the
/// 290 s a watch may stay quiet (kube-runtime's watch timeout).
pub const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one call, its retries included, may wait for the apiserver's response head: half
/// the apiserver's own 60 s limit on a call that is not a watch (`--request-timeout`), so a
/// hung apiserver fails the call, and the caller retries, well before the apiserver would
/// give up. A watch's head comes at once; its events stream after it, bounded by
/// [`READ_TIMEOUT`]. A list page's head comes only once the page is ready; reading a body
/// after its head is bounded by [`READ_TIMEOUT`] and the caller's own deadline.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(30);
/// Retries of a call answered 429, 503 or 504 (nothing was done; the apiserver asks to be
/// called again).
pub const RETRIES: u32 = 3;
/// The longest `Retry-After` honoured: priority and fairness asks for 1 s, a loading watch
/// cache for one to a few; a longer wait is the caller's to decide, after it hears of it.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(1);
/// The first retry's base back-off; each one after doubles it, up to [`RETRY_MAX_BACKOFF`].
const RETRY_MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The longest back-off between two tries.
const RETRY_MAX_BACKOFF: Duration = Duration::from_millis(400);
/// Calls queued for the client's worker before callers wait for room.
const BUFFERED_CALLS: usize = 1024;

/// The Kubernetes client of cluster mode (in-cluster configuration or KUBECONFIG), with the
/// bounds in the module doc.
///
/// # Errors
/// [`ClusterError::Client`] when no configuration can be found or used.
pub async fn client() -> Result<kube::Client, ClusterError> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Client(kube::Error::InferConfig(e)))?;
    client_from(config, RESPONSE_DEADLINE)
}

/// A client for `config` with arcguard's timeouts and retries, waiting at most
/// `response_deadline` for each call's response head. Call it within a Tokio runtime: the
/// client's worker task is spawned on it.
///
/// # Errors
/// [`ClusterError::Client`] when the configuration cannot be used (its TLS settings).
pub fn client_from(
    mut config: kube::Config,
    response_deadline: Duration,
) -> Result<kube::Client, ClusterError> {
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    config.default_retry = false;
    let builder = ClientBuilder::try_from(config).map_err(ClusterError::Client)?;
    Ok(bounded(builder, response_deadline).build())
}

/// kube's service stack, whose calls complete as futures `F`, under arcguard's retries and
/// deadline ([`bounded`]).
type Bounded<F> = Timeout<Retry<BoundedRetry, Buffer<Request<Body>, F>>>;

/// kube's service stack `S` with arcguard's retries under a deadline of `response_deadline`.
/// The timeout is the outer layer, so it bounds the retries and their waits too. A retry needs
/// a service it can clone, which kube's boxed stack is not: the buffer (as in kube's own retry
/// example) makes one, with a worker task spawned on the current runtime.
fn bounded<S>(
    builder: ClientBuilder<S>,
    response_deadline: Duration,
) -> ClientBuilder<Bounded<S::Future>>
where
    S: tower::Service<Request<Body>> + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send + Sync,
{
    builder
        .with_layer(&BufferLayer::new(BUFFERED_CALLS))
        .with_layer(&RetryLayer::new(BoundedRetry::default()))
        .with_layer(&TimeoutLayer::new(response_deadline))
}

/// arcguard's retry policy: a call answered 429, 503 or 504 is tried again at most [`RETRIES`]
/// times, after [`retry_wait`]; any other answer or error goes to the caller. Each retry is
/// logged at `debug` with the answer's status.
#[derive(Clone, Debug, Default)]
pub struct BoundedRetry {
    /// Retries made so far for this call (tower clones the policy for every call).
    attempt: u32,
}

impl<Res> Policy<Request<Body>, Response<Res>, BoxError> for BoundedRetry {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut Request<Body>,
        result: &mut Result<Response<Res>, BoxError>,
    ) -> Option<Self::Future> {
        let Ok(response) = result else { return None };
        let status = response.status();
        let retryable = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::GATEWAY_TIMEOUT
        );
        if !retryable || self.attempt >= RETRIES {
            return None;
        }
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // A fresh generator for every wait: a policy cloned for each call would otherwise give
        // every call answered at the same moment the same waits, and retry them together.
        let wait = retry_wait(self.attempt, retry_after, HasherRng::new().next_f64());
        self.attempt += 1;
        tracing::debug!(%status, attempt = self.attempt, method = %request.method(), path = request.uri().path(), ?wait, "the apiserver asked to be called again; retrying");
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, request: &Request<Body>) -> Option<Request<Body>> {
        // Only bodies held whole can be sent again (kube's are, except a watch's).
        let body = request.body().try_clone()?;
        let mut copy = Request::new(body);
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}

/// The wait before retry number `attempt` (from 0): a back-off of 50 ms doubling per retry up
/// to 400 ms, plus a `jitter` share (0 to 1) of it again, at most 400 ms in all; or the
/// answer's `Retry-After` when that is longer, up to [`RETRY_AFTER_MAX`]. So three retries
/// wait 50–100, 100–200 and 200–400 ms, or about 1 s each when asked to.
pub fn retry_wait(attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let base = RETRY_MIN_BACKOFF.saturating_mul(1 << attempt.min(16)).min(RETRY_MAX_BACKOFF);
    let backoff = (base + base.mul_f64(jitter.clamp(0.0, 1.0))).min(RETRY_MAX_BACKOFF);
    retry_after.map_or(backoff, |asked| backoff.max(asked.min(RETRY_AFTER_MAX)))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper_util::rt::TokioIo;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;
    use kube::api::ListParams;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    /// A Status answer with `code` and `Retry-After: 10`.
    fn status_answer<B: From<Bytes>>(code: StatusCode) -> Response<B> {
        let body = format!(
            r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","code":{}}}"#,
            code.as_u16()
        );
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .header("retry-after", "10")
            .body(B::from(Bytes::from(body)))
            .expect("response")
    }

    /// An apiserver on loopback answering every call with `status` (or, for `None`, never
    /// answering); how many calls it received, and a notice at each.
    async fn apiserver(
        status: Option<StatusCode>,
    ) -> (kube::Config, Arc<AtomicUsize>, Arc<Notify>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let (calls, received) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
        let (counted, notified) = (calls.clone(), received.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (calls, received) = (counted.clone(), notified.clone());
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    received.notify_one();
                    async move {
                        let Some(status) = status else {
                            return std::future::pending().await;
                        };
                        Ok::<_, Infallible>(status_answer::<Full<Bytes>>(status))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        (kube::Config::new(url.parse().expect("url")), calls, received)
    }

    #[tokio::test]
    async fn answers_to_call_again_are_retried_a_bounded_number_of_times_then_reach_the_caller() {
        let statuses = [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ];
        futures::future::join_all(statuses.map(|status| async move {
            let (config, calls, _) = apiserver(Some(status)).await;
            let client = client_from(config, RESPONSE_DEADLINE).expect("client");
            // With kube's default retries (at least 164 s, and 10 s a retry as asked) the
            // caller would not hear of it within this guard; here it does after about 3 s.
            let listed = tokio::time::timeout(
                Duration::from_secs(20),
                Api::<Namespace>::all(client).list(&ListParams::default()),
            )
            .await
            .unwrap_or_else(|_| panic!("{status}: the caller hears of it"));
            match listed {
                Err(kube::Error::Api(answer)) => assert_eq!(answer.code, status.as_u16()),
                other => panic!("{status}: expected the apiserver's answer, got {other:?}"),
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1 + RETRIES as usize, "{status}");
        }))
        .await;
    }

    #[tokio::test]
    async fn other_answers_are_not_retried() {
        for status in
            [StatusCode::FORBIDDEN, StatusCode::NOT_FOUND, StatusCode::INTERNAL_SERVER_ERROR]
        {
            let (config, calls, _) = apiserver(Some(status)).await;
            let client = client_from(config, RESPONSE_DEADLINE).expect("client");
            let listed = Api::<Namespace>::all(client).list(&ListParams::default()).await;
            assert!(
                matches!(listed, Err(kube::Error::Api(ref a)) if a.code == status.as_u16()),
                "{listed:?}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{status}");
        }
    }

    #[tokio::test]
    async fn a_call_the_apiserver_never_answers_fails_at_the_deadline() {
        let (config, calls, received) = apiserver(None).await;
        let client = client_from(config, Duration::from_millis(300)).expect("client");
        let listed = tokio::time::timeout(
            Duration::from_secs(20),
            Api::<Namespace>::all(client).list(&ListParams::default()),
        )
        .await
        .expect("the deadline, not the read timeout, ends the call");
        match listed {
            Err(kube::Error::Service(error)) => {
                assert!(error.is::<tower::timeout::error::Elapsed>(), "{error}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        received.notified().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    /// The deadline is outside the retries: a call answered 429 after 200 ms, again and
    /// again, fails at a 500 ms deadline rather than after four tries of 200 ms each.
    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_the_retries_and_their_waits() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client =
            bounded(ClientBuilder::new(service, "default"), Duration::from_millis(500)).build();
        let started = tokio::time::Instant::now();
        tokio::spawn(async move {
            while let Some((_, send)) = handle.next_request().await {
                tokio::time::sleep(Duration::from_millis(200)).await;
                send.send_response(status_answer(StatusCode::TOO_MANY_REQUESTS));
            }
        });
        let listed = Api::<Namespace>::all(client).list(&ListParams::default()).await;
        match listed {
            Err(kube::Error::Service(error)) => {
                assert!(error.is::<tower::timeout::error::Elapsed>(), "{error}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert_eq!(started.elapsed(), Duration::from_millis(500), "paused clock");
    }

    #[test]
    fn retry_waits_back_off_and_honour_a_short_retry_after() {
        let ms = Duration::from_millis;
        for (attempt, retry_after, jitter, wait) in [
            (0, None, 0.0, ms(50)),
            (0, None, 1.0, ms(100)),
            (1, None, 0.5, ms(150)),
            (2, None, 0.0, ms(200)),
            (2, None, 1.0, ms(400)),
            (3, None, 1.0, ms(400)),
            (40, None, 0.0, ms(400)),
            (0, None, 7.0, ms(100)),
            (0, None, -1.0, ms(50)),
            (0, Some(Duration::ZERO), 0.0, ms(50)),
            (0, Some(Duration::from_secs(1)), 0.0, ms(1000)),
            (2, Some(Duration::from_secs(10)), 1.0, ms(1000)),
            (2, Some(Duration::from_secs(u64::MAX)), 0.0, ms(1000)),
        ] {
            assert_eq!(
                retry_wait(attempt, retry_after, jitter),
                wait,
                "{attempt} {retry_after:?} {jitter}"
            );
        }
    }
}
