//! The failurePolicy of arcguard's webhooks as the apiserver holds it: installed `Ignore`, set
//! to the annotated `Fail` by arcguard's leader once it is ready (src/cluster/webhooks.rs).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use kube::api::Api;

/// The name of both configurations.
const NAME: &str = "arcguard";

/// Every webhook's failurePolicy (`-` when unset) in the Validating- then the
/// MutatingWebhookConfiguration, in order; empty when neither exists.
///
/// # Errors
/// The apiserver's answer.
pub async fn failure_policies(client: &kube::Client) -> Result<Vec<String>> {
    let unset = || "-".to_owned();
    let mut out = Vec::new();
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    if let Some(config) = validating.get_opt(NAME).await? {
        out.extend(
            config
                .webhooks
                .iter()
                .flatten()
                .map(|w| w.failure_policy.clone().unwrap_or_else(unset)),
        );
    }
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
    if let Some(config) = mutating.get_opt(NAME).await? {
        out.extend(
            config
                .webhooks
                .iter()
                .flatten()
                .map(|w| w.failure_policy.clone().unwrap_or_else(unset)),
        );
    }
    Ok(out)
}

/// Polls (every 50 ms) until every webhook of both configurations has `policy`, and returns
/// how long that took.
///
/// # Errors
/// After `timeout`, with the policies last seen.
pub async fn wait_for_failure_policy(
    client: &kube::Client,
    policy: &str,
    timeout: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let seen = failure_policies(client).await;
        if let Ok(policies) = &seen
            && !policies.is_empty()
            && policies.iter().all(|p| p == policy)
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            bail!("the webhooks' failurePolicy is not {policy} after {timeout:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
