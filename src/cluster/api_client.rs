//! The Kubernetes API client of cluster mode: kube's client with bounded waits.
//!
//! kube's default stack retries 429, 503 and 504 answers itself, silently (its trace layer logs
//! 5xx only), honouring `Retry-After`, up to 15 times with a back-off doubling from 5 ms to
//! 1,000 s: about 160 s before the caller hears of it. A restarted apiserver can answer 429s
//! while it warms up (priority and fairness, watch caches), and a watch's initial list stuck in
//! those retries holds readiness back with nothing in the log: the likely cause of a replica
//! that stayed unready for 90 s after the apiserver it waited for came up, once in the e2e
//! suite (`faults.rs`, started without an apiserver). Every watch of arcguard already retries
//! on its own, logged, within 2 s ([`super::watch_backoff`]); calls made for a request or the
//! Lease have their own deadlines. So this client retries at most [`RETRIES`] times within a
//! second, and bounds each call's wait for the response head with [`RESPONSE_DEADLINE`].

use std::time::Duration;

use kube::client::ClientBuilder;
use kube::client::retry::RetryPolicy;
use tower::buffer::BufferLayer;
use tower::retry::RetryLayer;
use tower::timeout::TimeoutLayer;

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
/// [`READ_TIMEOUT`]. A list page's head comes only once the page is ready.
pub const RESPONSE_DEADLINE: Duration = Duration::from_secs(30);
/// Retries of a call answered 429, 503 or 504, without waiting for `Retry-After`: enough to
/// ride out a burst of priority-and-fairness rejections within a request's lookup deadline.
pub const RETRIES: u32 = 3;
/// Calls queued for the client's worker before callers wait for room.
const BUFFERED_CALLS: usize = 1024;
/// The first retry's base wait; each one after doubles it. kube's policy adds a random jitter
/// of up to twice the base, and tower's back-off caps each wait at [`RETRY_MAX_DELAY`]: the
/// three waits take 50–150, 100–300 and 200–400 ms, under a second in all.
const RETRY_MIN_DELAY: Duration = Duration::from_millis(50);
/// The longest wait between two retries.
const RETRY_MAX_DELAY: Duration = Duration::from_millis(400);

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
    // Constant, valid parameters: the error arm cannot be reached, but is not unwrapped.
    let retry = RetryPolicy::new(RETRY_MIN_DELAY, RETRY_MAX_DELAY, RETRIES, false)
        .map_err(|e| ClusterError::Client(kube::Error::Service(e.into())))?;
    let builder = ClientBuilder::try_from(config).map_err(ClusterError::Client)?;
    // A retry needs a service it can clone, which kube's boxed stack is not: the buffer (as in
    // kube's own retry example) makes one, with a worker task spawned on the current runtime.
    // The timeout is the outer layer, so it bounds the retries too.
    Ok(builder
        .with_layer(&BufferLayer::new(BUFFERED_CALLS))
        .with_layer(&RetryLayer::new(retry))
        .with_layer(&TimeoutLayer::new(response_deadline))
        .build())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response, StatusCode};
    use hyper_util::rt::TokioIo;
    use k8s_openapi::api::core::v1::Namespace;
    use kube::Api;
    use kube::api::ListParams;
    use tokio::net::TcpListener;

    use super::*;

    /// An apiserver on loopback answering every call with `status` and `Retry-After: 10` (or,
    /// for `None`, never answering), and how many calls it received.
    async fn apiserver(status: Option<StatusCode>) -> (kube::Config, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let calls = counted.clone();
                let service = hyper::service::service_fn(move |_: Request<Incoming>| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let Some(status) = status else {
                            return std::future::pending().await;
                        };
                        let body = format!(
                            r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","code":{}}}"#,
                            status.as_u16()
                        );
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .header("retry-after", "10")
                                .body(Full::new(Bytes::from(body)))
                                .expect("response"),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        let config = kube::Config::new(url.parse().expect("url"));
        (config, calls)
    }

    #[tokio::test]
    async fn answers_to_retry_later_are_retried_a_bounded_number_of_times_then_reach_the_caller() {
        for status in [
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        ] {
            let (config, calls) = apiserver(Some(status)).await;
            let client = client_from(config, RESPONSE_DEADLINE).expect("client");
            // Far below the ~160 s of kube's default retries, and the 40 s that honouring
            // `Retry-After: 10` would take.
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
        }
    }

    #[tokio::test]
    async fn a_call_the_apiserver_never_answers_fails_at_the_deadline() {
        let (config, calls) = apiserver(None).await;
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
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
