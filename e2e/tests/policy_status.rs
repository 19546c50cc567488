//! Policy status as the durable record of what is enforced: a generation that got past the
//! policies webhook (here: the webhook removed, as when it was down or an older arcguard
//! admitted it) does not compile; the last good spec stays enforced, is recorded in status,
//! and a replica started after the bad edit enforces it too. The rejection is counted once
//! and recorded as an Event; fixing the spec records Enforced.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::{Cluster, ClusterOptions, apply, denial, eventually, namespace, pod};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Long enough for a watch event to reach arcguard on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(30);

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

fn policy(name: &str, ns: &str, registries: &[&str]) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1",
        "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {
            "action": "Deny",
            "match": {"namespaces": [ns]},
            "trustedRegistries": {"registries": registries}
        }
    })
}

#[tokio::test]
async fn every_replica_enforces_the_last_good_spec_recorded_in_status_after_a_bad_edit() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = last_good_spec(&mut cluster).await;
    cluster.check(result);
}

async fn last_good_spec(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "last-good", &[]).await?;
    let name = format!("e2e-{ns}");
    let good = policy(&name, &ns, &["contoso.azurecr.io/team-a"]);
    apply(&client, &good).await?;
    let policies: Api<ClusterGuardPolicy> = Api::all(client.clone());
    eventually(PROPAGATION, || async {
        let object = policies.get(&name).await?;
        // The spec as stored (the CRD's defaults filled in), not as applied.
        let stored = serde_json::to_value(&object.spec)?;
        let status = object.status.unwrap_or_default();
        ensure!(status.enforced_generation == Some(1), "generation 1 recorded: {status:?}");
        ensure!(status.enforced_spec == Some(stored), "its spec: {status:?}");
        Ok(())
    })
    .await?;

    // The policies webhook out of the way, a generation only arcguard can judge is stored.
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mut config = configs.get("arcguard").await?;
    let webhooks = config.webhooks.get_or_insert_default();
    let before = webhooks.len();
    webhooks.retain(|w| w.name != "policies.arcguard.io");
    ensure!(webhooks.len() + 1 == before, "the policies webhook was there");
    configs.replace("arcguard", &PostParams::default(), &config).await?;
    let bad = policy(&name, &ns, &["https://contoso.azurecr.io/team-b"]);
    eventually(PROPAGATION, || apply(&client, &bad)).await?;

    let rejected = eventually(PROPAGATION, || async {
        let status = policies.get(&name).await?.status.unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").cloned();
        ensure!(status.observed_generation == Some(2), "generation 2 observed: {status:?}");
        ensure!(
            ready.as_ref().is_some_and(|c| c.status == "False" && c.reason == "InvalidSpec"),
            "Ready False InvalidSpec: {status:?}"
        );
        ensure!(status.enforced_generation == Some(1), "generation 1 stays: {status:?}");
        Ok(ready.map(|c| c.message).unwrap_or_default())
    })
    .await?;
    ensure!(
        rejected.contains("spec.trustedRegistries.registries[0]")
            && rejected.contains("generation 1 stays enforced"),
        "the condition names the field and what stays: {rejected}"
    );

    // A replica started after the bad edit enforces generation 1, as the first one does.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let team_b = pod("team-b", "contoso.azurecr.io/team-b/app:1");
    let denied_by_policy = || async {
        let message = denial(&pods.create(&dry_run(), &team_b).await);
        ensure!(message.contains(&format!("[{name}]")), "team-b: {message}");
        Ok(())
    };
    eventually(PROPAGATION, denied_by_policy).await?;
    cluster.arcguard.stop().await;
    cluster.arcguard.start().await?;
    cluster.arcguard.wait_ready(Duration::from_secs(60)).await?;
    eventually(PROPAGATION, denied_by_policy).await?;

    // More events for the same rejected generation (a label: same generation) are neither
    // counted nor logged again.
    let labels = json!({"metadata": {"labels": {"touched": "yes"}}});
    policies.patch(&name, &PatchParams::default(), &Patch::Merge(&labels)).await?;
    eventually(PROPAGATION, || async {
        let labelled = policies.get(&name).await?;
        ensure!(labelled.metadata.labels.is_some_and(|l| l.contains_key("touched")));
        Ok(())
    })
    .await?;
    let failures = r#"arcguard_policy_reloads_total{result="failure"}"#;
    let counted = cluster.arcguard.metric(failures).await?;
    ensure!(counted == 1.0, "the rejected generation is counted once, not {counted}");
    let log = cluster.arcguard.log_text();
    let restarted = log.rsplit("arcguard is serving in cluster mode").next().unwrap_or_default();
    let logged = restarted
        .lines()
        .filter(|l| l.contains("policy generation rejected") && l.contains(&name))
        .count();
    ensure!(logged == 1, "the rejected generation is logged once after the restart, not {logged}");

    // The Events: a Warning for the rejection, and Normal Enforced once fixed.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let reasons = || async {
        let list = events.list(&ListParams::default()).await?;
        Ok::<_, anyhow::Error>(
            list.items
                .into_iter()
                .filter(|e| {
                    e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                        && e.reporting_controller.as_deref() == Some("arcguard")
                })
                .map(|e| {
                    let note = e.note.unwrap_or_default();
                    (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), note)
                })
                .collect::<Vec<_>>(),
        )
    };
    eventually(PROPAGATION, || async {
        let seen = reasons().await?;
        ensure!(
            seen.iter().any(|(type_, reason, note)| type_ == "Warning"
                && reason == "InvalidSpec"
                && note.contains("generation 1 stays enforced")),
            "a Warning InvalidSpec Event: {seen:?}"
        );
        Ok(())
    })
    .await?;

    let fixed = policy(&name, &ns, &["contoso.azurecr.io/team-a", "contoso.azurecr.io/team-b"]);
    apply(&client, &fixed).await?;
    eventually(PROPAGATION, || async {
        pods.create(&dry_run(), &team_b).await.map_err(|e| anyhow!("team-b after the fix: {e}"))
    })
    .await?;
    eventually(PROPAGATION, || async {
        let status = policies.get(&name).await?.status.unwrap_or_default();
        ensure!(status.enforced_generation == Some(3), "generation 3 recorded: {status:?}");
        let seen = reasons().await?;
        ensure!(
            seen.iter().any(|(type_, reason, note)| type_ == "Normal"
                && reason == "Enforced"
                && note == "generation 3 is enforced"),
            "an Enforced Event for generation 3: {seen:?}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}
