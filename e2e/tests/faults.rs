//! Faults: arcguard down. The webhooks' failurePolicy decides, the excluded namespaces keep
//! working, and enforcement resumes on restart without manual steps.

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::{
    Cluster, ClusterOptions, apply, denial, eventually, namespace, pod, wait_for_enforcement,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;

#[tokio::test]
async fn with_arcguard_down_the_failure_policy_decides_and_enforcement_resumes_on_restart() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = arcguard_down(&mut cluster).await;
    cluster.check(result);
}

async fn arcguard_down(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let enforced = namespace(&client, "enforced", &[]).await?;
    let opted_out = namespace(&client, "opted-out", &[("arcguard.io/ignore", "true")]).await?;
    let enforced_pods: Api<Pod> = Api::namespaced(client.clone(), &enforced);

    // A crash, not a graceful shutdown.
    cluster.arcguard.kill();
    let message = denial(
        &enforced_pods
            .create(&PostParams::default(), &pod("while-down", "contoso.azurecr.io/shop/web:1.0"))
            .await,
    );
    ensure!(
        message.contains("failed calling webhook"),
        "failurePolicy Fail refuses even a trusted pod: {message}"
    );
    for ns in [opted_out.as_str(), "kube-system"] {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let name = format!("while-down-{opted_out}");
        pods.create(&PostParams::default(), &pod(&name, "docker.io/library/nginx:1.27"))
            .await
            .map_err(|e| {
                anyhow!("excluded namespace {ns} must keep working while arcguard is down: {e}")
            })?;
    }
    // Policies cannot change while arcguard cannot check them.
    let policy = json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": "e2e-while-down"},
        "spec": {"match": {"namespaces": [enforced]}, "trustedRegistries": {"registries": ["contoso.azurecr.io"]}}
    });
    let error = format!(
        "{:#}",
        apply(&client, &policy)
            .await
            .err()
            .ok_or_else(|| anyhow!("a policy was written while arcguard was down"))?
    );
    ensure!(error.contains("failed calling webhook"), "policy write while down: {error}");
    ensure!(
        Api::<ClusterGuardPolicy>::all(client.clone()).get_opt("e2e-while-down").await?.is_none(),
        "stored anyway"
    );

    let restarted = Instant::now();
    cluster.arcguard.start().await?;
    let created = eventually(Duration::from_secs(60), || async {
        enforced_pods
            .create(
                &PostParams::default(),
                &pod("after-restart", "contoso.azurecr.io/shop/web:1.0"),
            )
            .await
            .map_err(|e| anyhow!("trusted pod after restart: {e}"))
    })
    .await?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;
    eprintln!(
        "[e2e] faults: enforcing again {:.1}s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    let labels = created.metadata.labels.unwrap_or_default();
    ensure!(
        labels.get("arcguard.io/os").map(String::as_str) == Some("linux"),
        "mutation resumed too: {labels:?}"
    );
    apply(&client, &policy).await?;
    Ok(())
}
