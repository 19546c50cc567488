//! The memory budget: request bodies in flight (and what is decoded from them) are bounded, so
//! no load, hostile or not, can push arcguard past its container's memory limit.
//!
//! Anyone who may create pods in one namespace can make the apiserver send reviews of nearly
//! 3 MiB each (its request size limit), as many at once as they like; buffered together they
//! would exceed a 128 Mi container limit and get every replica OOM-killed, which stops pod
//! creation in the whole cluster. Each request is charged before its body is read: twice its
//! `Content-Length` (the body, plus the decoded view and the response built from it), or the
//! body limit when it is sent without a length. A request that does not fit waits up to
//! [`Budget::wait`] for others to finish, then gets 503 with a message saying why; the server
//! itself never runs out of memory.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// The share of the container's memory limit that requests in flight may use; the rest is the
/// process's baseline (caches, policies, TLS) and allocator slack.
pub const LIMIT_SHARE: f64 = 0.5;

/// The in-flight budget when no memory limit is known: 512 MiB.
pub const UNLIMITED_BUDGET: usize = 512 * 1024 * 1024;

/// The in-flight budget for a container memory limit of `limit` bytes (`None`: no limit known).
pub fn budget_for(limit: Option<u64>) -> usize {
    match limit {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        // A limit is far below 2^52 bytes, and the share is in (0, 1).
        Some(limit) => ((limit as f64) * LIMIT_SHARE) as usize,
        None => UNLIMITED_BUDGET,
    }
}

/// The memory limit of the cgroup this process runs in (cgroup v2 `memory.max`), if any.
pub fn cgroup_memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// Bytes per permit: the budget is counted in KiB so that any budget fits a semaphore.
const UNIT: usize = 1024;

/// The budget shared by every webhook request of one server.
#[derive(Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    /// The whole budget, in units.
    total: u32,
    /// How long a request waits for room before it is refused.
    wait: Duration,
    /// The body limit: what a request without `Content-Length` is charged.
    max_body_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Budget {
    /// A budget of `bytes` in flight.
    pub fn new(bytes: usize, max_body_bytes: usize, wait: Duration, metrics: Arc<Metrics>) -> Self {
        let total = u32::try_from((bytes / UNIT).max(1)).unwrap_or(u32::MAX);
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
            wait,
            max_body_bytes,
            metrics,
        }
    }

    /// What a request is charged, in units: twice its body, at least one unit, at most the
    /// whole budget (so that any single request the body limit allows can run alone).
    fn charge(&self, content_length: Option<usize>) -> u32 {
        let body = content_length.unwrap_or(self.max_body_bytes).min(self.max_body_bytes);
        let units = (body.saturating_mul(2)).div_ceil(UNIT).max(1);
        u32::try_from(units).unwrap_or(u32::MAX).min(self.total)
    }
}

/// Admits a webhook request once its charge fits the budget, and holds it until the response
/// is built; answers 503 when it does not fit within the wait.
pub async fn admit(State(budget): State<Arc<Budget>>, request: Request, next: Next) -> Response {
    let content_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let charge = budget.charge(content_length);
    let acquire = budget.permits.clone().acquire_many_owned(charge);
    let Ok(Ok(permit)) = tokio::time::timeout(budget.wait, acquire).await else {
        budget.metrics.record_budget_rejection();
        let mib = |units: u32| f64::from(units) * UNIT as f64 / (1024.0 * 1024.0);
        let message = format!(
            "arcguard is at its memory budget ({:.0} MiB of request bodies in flight, from its \
             container's memory limit) and could not take this {:.1} MiB request within {}s; \
             retry\n",
            mib(budget.total),
            mib(charge) / 2.0,
            budget.wait.as_secs_f64()
        );
        return (StatusCode::SERVICE_UNAVAILABLE, message).into_response();
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_half_the_limit_and_requests_are_charged_twice_their_body() {
        assert_eq!(budget_for(Some(128 * 1024 * 1024)), 64 * 1024 * 1024);
        assert_eq!(budget_for(None), UNLIMITED_BUDGET);
        let budget = Budget::new(
            10 * 1024 * 1024,
            7 * 1024 * 1024,
            Duration::ZERO,
            Arc::new(Metrics::new()),
        );
        assert_eq!(budget.total, 10 * 1024);
        assert_eq!(budget.charge(Some(0)), 1);
        assert_eq!(budget.charge(Some(1)), 1);
        assert_eq!(budget.charge(Some(1024 * 1024)), 2048);
        // Without a length: the body limit, capped at the whole budget.
        assert_eq!(budget.charge(None), 10 * 1024);
        assert_eq!(budget.charge(Some(usize::MAX)), 10 * 1024);
    }
}
