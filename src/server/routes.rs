//! HTTP routes: the two webhooks and the probes on the TLS port; metrics on the plain port.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Extension, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::timeout::TimeoutLayer;

use tokio::sync::Semaphore;

use super::batching::Frames;
use super::budget::{Budget, Charge};
use super::decision_log::{self, DecisionLog, Line};
use super::{AppState, Limits};
use crate::admission::{self, ReviewError};
use crate::memory::MemoryPool;
use crate::pipeline::{self, Decision, Webhook};
use crate::rules::{Facts, RegistryLayer};

/// The router of the HTTPS port: `POST /validate`, `POST /mutate`, `GET /healthz`, `GET /readyz`.
pub fn webhook_router(state: AppState, limits: &Limits) -> Router {
    // Requests wait for room at most a fifth of the request timeout, so a refusal arrives well
    // before the apiserver gives up on the call.
    let pool = state.memory.clone().unwrap_or_else(|| MemoryPool::new(limits.request_budget()));
    let budget = Arc::new(Budget::new(
        pool,
        limits.max_body_bytes,
        limits.request_timeout / 5,
        limits.body_deadline(),
        state.metrics.clone(),
    ));
    let log = Arc::new(DecisionLog::new(limits.decisions_logged_per_second, Instant::now()));
    flush_periodically(&log);
    let webhooks = Router::new()
        .route("/validate", post(validate))
        .route("/mutate", post(mutate))
        .layer(Extension(log))
        .layer(axum::middleware::from_fn_with_state(budget, super::budget::admit));
    Router::new()
        .merge(webhooks)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limits.request_timeout))
        // A panic answers 500 for that request only; the server keeps serving.
        .layer(CatchPanicLayer::new())
        .with_state(state)
}

/// How often lines dropped by the decision log are summarised when no decision follows them.
const FLUSH_EVERY: Duration = Duration::from_secs(10);

/// Summarises dropped decision lines every [`FLUSH_EVERY`] while the router lives (outside a
/// runtime, only at the next decision).
fn flush_periodically(log: &Arc<DecisionLog>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    let log = Arc::downgrade(log);
    runtime.spawn(async move {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(log) = log.upgrade() else { return };
            if let Some(suppressed) = log.flush(Instant::now()) {
                decision_log::log_summary(&suppressed);
            }
        }
    });
}

/// The router of the metrics port: `GET /metrics`, `GET /healthz`, `GET /readyz`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn validate(
    State(state): State<AppState>,
    Extension(log): Extension<Arc<DecisionLog>>,
    charge: Option<Extension<Charge>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Webhook::Validate, state, log, charge, &headers, body).await
}

async fn mutate(
    State(state): State<AppState>,
    Extension(log): Extension<Arc<DecisionLog>>,
    charge: Option<Extension<Charge>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(Webhook::Mutate, state, log, charge, &headers, body).await
}

/// Decisions running at once on blocking threads; more wait (within the request timeout).
const DECISION_SLOTS: usize = 64;

/// Bounds the decisions running at once on blocking threads.
static DECISIONS: Semaphore = Semaphore::const_new(DECISION_SLOTS);

/// The largest body decided on the async worker that read it; larger ones go to a blocking
/// thread. Handing a request to another thread and back costs two context switches, which under
/// load was the largest share of a realistic 6 KB review's CPU (BENCHMARKS.md, issue 14).
const INLINE_MAX_BYTES: usize = 64 * 1024;

/// The most structural JSON tokens a body decided on the async worker may hold: deciding costs
/// per token (a value, a map entry), so a small body dense with tiny labels takes far longer
/// than its size suggests. The realistic 6 KB pod holds about 630 tokens and is decided in
/// about 9 µs (`cargo bench`, `pipeline/validate`); the costliest shape measured, a pod of
/// tiny labels, took 116 µs for 1,073 tokens through /mutate (release build, busy machine).
/// So this bound keeps a decision on the worker near the 100 µs tokio allows between awaits,
/// and a dense or near-limit review (up to milliseconds) never stalls the workers that serve
/// every other connection and the probes.
const INLINE_MAX_TOKENS: usize = 1024;

/// Whether a body of `len` bytes and `tokens` structural tokens (`None`: not counted) is
/// decided on the async worker rather than on a blocking thread.
fn decides_inline(len: usize, tokens: Option<usize>) -> bool {
    len <= INLINE_MAX_BYTES && tokens.is_some_and(|tokens| tokens <= INLINE_MAX_TOKENS)
}

async fn handle(
    webhook: Webhook,
    state: AppState,
    log: Arc<DecisionLog>,
    charge: Option<Extension<Charge>>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let start = Instant::now();
    if !is_json(headers) {
        state.metrics.record_invalid(webhook, start.elapsed());
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "expected content-type application/json with an admission.k8s.io/v1 AdmissionReview\n",
        )
            .into_response();
    }
    let tokens = match &charge {
        Some(Extension(charge)) => Some(charge.tokens()),
        // Outside the budget's layer nothing has counted them; a small body is cheap to count.
        None if body.len() <= INLINE_MAX_BYTES => Some(super::budget::structural_tokens(&body)),
        None => None,
    };
    if decides_inline(body.len(), tokens) {
        return decide(webhook, &state, &log, &body, start).await;
    }
    // Larger bodies are CPU work proportional to their size: they run on a blocking thread and
    // hold the request's charge until they end, even when the request has timed out meanwhile.
    let Ok(slot) = DECISIONS.acquire().await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "arcguard is shutting down\n").into_response();
    };
    let runtime = tokio::runtime::Handle::current();
    let decided = tokio::task::spawn_blocking(move || {
        let _charge = charge;
        runtime.block_on(decide(webhook, &state, &log, &body, start))
    })
    .await;
    drop(slot);
    decided.unwrap_or_else(|error| {
        tracing::error!(%error, "a decision failed");
        (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response()
    })
}

/// Decodes and decides one review; facts from the cluster are awaited between the two.
async fn decide(
    webhook: Webhook,
    state: &AppState,
    log: &DecisionLog,
    body: &[u8],
    start: Instant,
) -> Response {
    // A replica that has not loaded its policies (cluster mode, before the first full list of
    // the policy resources) would admit everything unchecked and unmutated: it answers 503,
    // and the apiserver applies the webhook's failurePolicy (Fail: the client retries).
    if !state.readiness.is_policies_loaded() {
        return (StatusCode::SERVICE_UNAVAILABLE, "arcguard has not loaded its policies yet\n")
            .into_response();
    }
    let prepared = match admission::prepare(body) {
        Ok(prepared) => prepared,
        Err(error) => return invalid(webhook, state, log, start, &error),
    };
    // The facts are gathered for the policies that apply under this snapshot, and the request
    // is decided on the same snapshot.
    let snapshot = state.snapshot.load_full();
    let gathered = match (&state.facts, &prepared.view) {
        (Some(source), Some(view)) => Some(source.gather(view, &snapshot.policies).await),
        _ => None,
    };
    let base = gathered.as_ref().unwrap_or(&snapshot.facts);
    // What registries served is layered over the other facts rather than copied into them.
    let mut registry = None;
    if let (Some(images), Some(view)) = (&state.images, &prepared.view)
        && snapshot.policies.reads_registries()
    {
        let needs = snapshot.policies.registry_needs(view, base);
        if !needs.images.is_empty() {
            registry = Some(
                images
                    .lookup(
                        &needs.images,
                        &needs.signatures,
                        &base.registry_credentials,
                        view.namespace.as_deref().unwrap_or_default(),
                        start,
                    )
                    .await,
            );
        }
    }
    let layered = registry.as_ref().map(|registry| RegistryLayer { base, registry });
    let facts: &dyn Facts = match &layered {
        Some(layered) => layered,
        None => base,
    };
    match pipeline::decide(webhook, &prepared, &snapshot.policies, facts) {
        Ok(decision) => {
            let encoded = admission::review::encode(&decision.response);
            let elapsed = start.elapsed();
            state.metrics.record_decision(webhook, &decision, elapsed);
            log_decision(webhook, &decision, elapsed, log);
            // In frames h2 batches with other streams' answers (see batching).
            let body = axum::body::Body::new(Frames::new(encoded));
            ([(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(error) => invalid(webhook, state, log, start, &error),
    }
}

fn invalid(
    webhook: Webhook,
    state: &AppState,
    log: &DecisionLog,
    start: Instant,
    error: &ReviewError,
) -> Response {
    state.metrics.record_invalid(webhook, start.elapsed());
    let error = error.to_string();
    if admitted(log, Line::Invalid, "") {
        let error = clip(&error, MAX_LOGGED_FIELD);
        tracing::warn!(webhook = webhook.as_str(), %error, "rejected invalid AdmissionReview");
    }
    (StatusCode::BAD_REQUEST, format!("{}\n", clip(&error, MAX_ANSWERED_ERROR))).into_response()
}

/// The most bytes of an invalid review's error in its HTTP 400 answer. The error quotes what
/// the request sent (apiVersion and kind, a JSON path, a value), and an answer as large as the
/// request would be memory the client chooses, held by its connection until written.
const MAX_ANSWERED_ERROR: usize = 1000;

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// The most bytes of a request-controlled field (object name, message, error) in one log
/// line: the decision log bounds lines per second, this bounds each line, so a flood of
/// reviews with megabyte names cannot write megabytes of log.
const MAX_LOGGED_FIELD: usize = 2048;

/// `text` as logged: a decision's message spans lines, and text it quotes (an image name, a
/// registry's words) must not be able to forge a line of the log ([`crate::text::clipped`]).
fn clip(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    crate::text::clipped(text, max)
}

/// Whether the decision log admits one `line` now; logs the summary due first, if any.
fn admitted(log: &DecisionLog, line: Line, namespace: &str) -> bool {
    let admit = log.admit(line, namespace, Instant::now());
    if let Some(suppressed) = &admit.summary {
        decision_log::log_summary(suppressed);
    }
    admit.log
}

/// Logs a decision: allows at `debug`; denials, warnings and Audit-policy violations at `info`
/// within the decision log's rate ([`decision_log`]).
fn log_decision(webhook: Webhook, decision: &Decision, elapsed: Duration, log: &DecisionLog) {
    let summary = &decision.summary;
    let response = &decision.response;
    let verdict = match (summary.allowed, summary.patched) {
        (false, _) => "denied",
        (true, true) => "patched",
        (true, false) => "allowed",
    };
    let duration_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
    let namespace = summary.object.split_once('/').map_or("", |(ns, _)| ns);
    let object = clip(&summary.object, MAX_LOGGED_FIELD / 4);
    let admit = |line: Line| admitted(log, line, namespace);
    // Allows and patches are the bulk of traffic: keep them out of the default log level.
    // The decision's line goes first, so a request's Audit violations never take its room.
    if response.allowed && response.warnings.is_empty() {
        tracing::debug!(webhook = webhook.as_str(), uid = %response.uid, kind = summary.kind, operation = summary.operation.as_str(), %object, decision = verdict, duration_us, "admission");
    } else if admit(if response.allowed { Line::Warned } else { Line::Denied }) {
        let message = response.status.as_ref().map(|s| s.message.as_str()).unwrap_or_default();
        let message = clip(message, MAX_LOGGED_FIELD);
        let warnings = format!("{:?}", response.warnings);
        let warnings = clip(&warnings, MAX_LOGGED_FIELD);
        let uid = clip(&response.uid, 64);
        tracing::info!(webhook = webhook.as_str(), %uid, kind = summary.kind, operation = summary.operation.as_str(), %object, decision = verdict, duration_us, %warnings, %message, "admission");
    }
    for audit in &summary.audits {
        if admit(Line::AuditViolation) {
            let violation = clip(audit, MAX_LOGGED_FIELD);
            let uid = clip(&response.uid, 64);
            tracing::info!(%uid, kind = summary.kind, %object, %violation, "audit policy violation");
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.readiness.is_ready_for(&state.snapshot.load().policies) {
        "ok\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], state.metrics.encode()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_sparse_bodies_are_decided_on_the_async_worker() {
        let realistic = include_bytes!("../../tests/fixtures/pod-create-trusted.json");
        let tokens = super::super::budget::structural_tokens(realistic);
        for (len, tokens, inline) in [
            (realistic.len(), Some(tokens), true),
            (INLINE_MAX_BYTES, Some(INLINE_MAX_TOKENS), true),
            (INLINE_MAX_BYTES + 1, Some(10), false),
            // 64 KiB of tiny labels: small, but dense.
            (INLINE_MAX_BYTES, Some(INLINE_MAX_TOKENS + 1), false),
            (1024, None, false),
        ] {
            assert_eq!(decides_inline(len, tokens), inline, "{len} bytes, {tokens:?} tokens");
        }
    }

    #[tokio::test]
    async fn no_review_is_decided_before_the_policies_are_loaded() {
        use tower::ServiceExt as _;
        let state = AppState::new(crate::server::Snapshot::default());
        let router = webhook_router(state.clone(), &Limits::default());
        let review = include_bytes!("../../tests/fixtures/pod-create-trusted.json");
        let post = || {
            axum::http::Request::post("/validate")
                .header(header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(&review[..]))
                .expect("request")
        };
        let before = router.clone().oneshot(post()).await.expect("answered");
        assert_eq!(before.status(), StatusCode::SERVICE_UNAVAILABLE);
        state.readiness.set_policies_loaded();
        let after = router.oneshot(post()).await.expect("answered");
        assert_eq!(after.status(), StatusCode::OK);
    }

    /// The body's frames' lengths, and the body.
    async fn frames(response: Response) -> (Vec<usize>, Vec<u8>) {
        use http_body_util::BodyExt as _;
        let mut body = response.into_body();
        let (mut lengths, mut bytes) = (Vec::new(), Vec::new());
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.expect("a frame").into_data() {
                lengths.push(data.len());
                bytes.extend_from_slice(&data);
            }
        }
        (lengths, bytes)
    }

    #[tokio::test]
    async fn answers_go_in_frames_h2_batches_and_invalid_reviews_get_a_bounded_error() {
        use super::super::batching::FRAME_MAX;
        use tower::ServiceExt as _;
        let policies = concat!(env!("CARGO_MANIFEST_DIR"), "/policies");
        let loaded = crate::policy::load::load_dir(std::path::Path::new(policies)).expect("load");
        let snapshot = crate::server::Snapshot { policies: loaded.policies, facts: loaded.facts };
        let state = AppState::new(snapshot);
        state.readiness.set_policies_loaded();
        let router = webhook_router(state, &Limits::default());
        let post = |body: Vec<u8>| {
            axum::http::Request::post("/validate")
                .header(header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(body))
                .expect("request")
        };
        // Every image from an untrusted registry: a denial of three containers, over 1 KiB.
        let realistic = include_str!("../../tests/fixtures/pod-create-trusted.json");
        let denied = realistic
            .replace("\"contoso.azurecr.io/", "\"untrusted.example.com/")
            .replace("\"mcr.microsoft.com/", "\"untrusted.example.com/");
        let response = router.clone().oneshot(post(denied.into_bytes())).await.expect("answered");
        assert_eq!(response.status(), StatusCode::OK);
        let (lengths, answer) = frames(response).await;
        let answer = String::from_utf8(answer).expect("UTF-8");
        assert!(answer.contains("\"allowed\":false"), "{answer}");
        assert!(answer.len() > FRAME_MAX, "{} bytes", answer.len());
        assert!(lengths.len() >= 2 && lengths.iter().all(|&len| len <= FRAME_MAX), "{lengths:?}");
        // A review of another apiVersion, naming a megabyte of it: the 400 quotes a bounded part.
        let huge = "v".repeat(1 << 20);
        let wrong = format!(r#"{{"apiVersion":"{huge}","kind":"AdmissionReview"}}"#);
        let response = router.oneshot(post(wrong.into_bytes())).await.expect("answered");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let (_, error) = frames(response).await;
        let error = String::from_utf8(error).expect("UTF-8");
        assert!(error.len() < MAX_ANSWERED_ERROR + 64, "{} bytes", error.len());
        assert!(error.starts_with("expected apiVersion admission.k8s.io/v1"), "{error}");
        assert!(error.contains(&format!("[{} bytes]", error_len(&huge))), "{error}");
    }

    /// The length of the WrongType error naming `api_version`, as the 400 marks a clipped one.
    fn error_len(api_version: &str) -> usize {
        ReviewError::WrongType { api_version: api_version.into(), kind: "AdmissionReview".into() }
            .to_string()
            .len()
    }

    #[test]
    fn a_request_controlled_field_is_cut_in_the_log_on_a_character_boundary() {
        assert_eq!(clip("shop/web", 64), "shop/web");
        // A quoted line break cannot start a forged log line.
        let forged = "amd64\n2026-12-01T05:43:42Z  INFO arcguard::server::routes: admission";
        assert_eq!(clip(forged, 128), forged.replace('\n', "\\n"));
        assert!(!clip(forged, 128).contains('\n'));
        let long = "é".repeat(1_000_000);
        let cut = clip(&long, MAX_LOGGED_FIELD);
        assert!(cut.len() < MAX_LOGGED_FIELD + 32, "{}", cut.len());
        assert!(cut.ends_with("… [2000000 bytes]"), "{}", &cut[cut.len() - 40..]);
    }
}
