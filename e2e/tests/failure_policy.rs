//! The failure policy of a webhook that calls arcguard through its Service: the leader makes
//! it fail closed only once the Service's EndpointSlices hold a ready endpoint, not as soon as
//! the leader itself is ready (the apiserver reaches a replica only through an endpoint). No
//! kubelet or endpoint controller runs here, so the EndpointSlices are written by hand, as the
//! endpoint controller would once a replica's readiness probe passes.

use std::time::Duration;

use anyhow::{Result, ensure};
use arcguard_e2e::failure_policy::failure_policies;
use arcguard_e2e::{Cluster, ClusterOptions, apply, eventually};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::Api;
use serde_json::json;

/// Long enough for a watch event to reach arcguard on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_webhook_through_the_service_fails_closed_only_once_the_service_has_a_ready_endpoint() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = through_the_service(&mut cluster).await;
    cluster.check(result);
}

fn endpoint_slice(name: &str, ready: bool) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "arcguard-system",
                     "labels": {"kubernetes.io/service-name": "arcguard"}},
        "addressType": "IPv4",
        "ports": [{"name": "https", "port": 8443, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.7"], "conditions": {"ready": ready}}],
    })
}

async fn through_the_service(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    // The mutating webhook is pointed at arcguard's Service, fail-open, as installed. (Its
    // calls cannot reach anything here: there is no kube-proxy, and Ignore admits.)
    let mutating: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let mut configuration = mutating.get("arcguard").await?;
    let webhook = configuration
        .webhooks
        .as_mut()
        .and_then(|w| w.first_mut())
        .ok_or_else(|| anyhow::anyhow!("no mutating webhook"))?;
    webhook.failure_policy = Some("Ignore".to_owned());
    let bundle = webhook.client_config.ca_bundle.clone();
    webhook.client_config = serde_json::from_value(json!({
        "service": {"namespace": "arcguard-system", "name": "arcguard", "path": "/mutate", "port": 443}
    }))?;
    webhook.client_config.ca_bundle = bundle;
    mutating.replace("arcguard", &Default::default(), &configuration).await?;

    // The leader is ready, but the Service has no endpoint: it says so and leaves Ignore.
    let waiting = "failurePolicy Fail waits until the Service has a ready endpoint";
    eventually(PROPAGATION, || async {
        ensure!(cluster.arcguard.log_text().contains(waiting), "the leader has not decided yet");
        Ok(())
    })
    .await?;
    let policies = failure_policies(&client).await?;
    ensure!(policies.last().map(String::as_str) == Some("Ignore"), "still Ignore: {policies:?}");

    // An endpoint that is not ready changes nothing: once the leader has decided on the new
    // slice (its decision counter moved), the webhook is still Ignore.
    let decisions = "arcguard_webhook_failure_policy_decisions_total";
    let before = cluster.arcguard.metric(decisions).await?;
    apply(&client, &endpoint_slice("arcguard-not-ready", false)).await?;
    eventually(PROPAGATION, || async {
        let now = cluster.arcguard.metric(decisions).await?;
        ensure!(now > before, "the leader has not decided on the slice yet ({now})");
        Ok(())
    })
    .await?;
    let policies = failure_policies(&client).await?;
    ensure!(policies.last().map(String::as_str) == Some("Ignore"), "not ready: {policies:?}");
    ensure!(
        cluster.arcguard.metric("arcguard_webhooks_fail_open").await? == 1.0,
        "the fail-open gauge counts the webhook"
    );

    // A ready endpoint: the webhook fails closed.
    apply(&client, &endpoint_slice("arcguard-ready", true)).await?;
    eventually(PROPAGATION, || async {
        let policies = failure_policies(&client).await?;
        ensure!(policies.iter().all(|p| p == "Fail"), "every webhook Fail: {policies:?}");
        Ok(())
    })
    .await?;
    eventually(PROPAGATION, || async {
        let open = cluster.arcguard.metric("arcguard_webhooks_fail_open").await?;
        ensure!(open == 0.0, "the fail-open gauge returns to 0 ({open})");
        Ok(())
    })
    .await?;
    Ok(())
}
