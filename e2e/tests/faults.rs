//! Faults: arcguard down (the webhooks' failurePolicy decides, the excluded namespaces keep
//! working, and enforcement resumes on restart without manual steps), and a crashed leader
//! (a second replica takes over the certificate).

use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, ensure};
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::arcguard::Arcguard;
use arcguard_e2e::{
    Cluster, ClusterOptions, apply, denial, eventually, namespace, pod, wait_for_enforcement,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
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

#[tokio::test]
async fn a_crashed_leader_is_replaced_and_the_new_leader_manages_the_certificate() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let mut replica = cluster.arcguard.replica("e2e-1").expect("a second replica");
    let result = failover(&mut cluster, &mut replica).await;
    if result.is_err() {
        eprintln!("{}", replica.log_tail(60));
    }
    cluster.check(result);
}

async fn failover(cluster: &mut Cluster, replica: &mut Arcguard) -> Result<()> {
    let client = cluster.client().await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "arcguard-system");
    let data = |secret: &Secret, key: &str| -> Vec<u8> {
        secret.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone()).unwrap_or_default()
    };
    replica.start().await?;
    replica.wait_ready(Duration::from_secs(60)).await?;
    ensure!(cluster.arcguard.metric("arcguard_leader").await? == 1.0, "e2e-0 leads");
    ensure!(replica.metric("arcguard_leader").await? == 0.0, "e2e-1 follows");
    let bundle = data(&secrets.get("arcguard-tls").await?, "ca-bundle.crt");
    replica
        .handshake_trusting(&bundle)
        .await
        .map_err(|e| anyhow!("the follower serves the Secret's certificate: {e:#}"))?;

    // The leader crashes without releasing the Lease: the follower takes over when it expires.
    cluster.arcguard.kill();
    let crashed = Instant::now();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "arcguard-system");
    eventually(Duration::from_secs(45), || async {
        let holder = leases.get("arcguard").await?.spec.and_then(|s| s.holder_identity);
        let leading = replica.metric("arcguard_leader").await?;
        ensure!(
            holder.as_deref() == Some("e2e-1") && leading == 1.0,
            "holder {holder:?}, e2e-1 leader={leading}"
        );
        Ok(())
    })
    .await?;
    eprintln!(
        "[e2e] failover: e2e-1 leads {:.1}s after the leader crashed",
        crashed.elapsed().as_secs_f64()
    );

    // Only a leader acts on a revocation request: the new one must.
    let old_ca = data(&secrets.get("arcguard-tls").await?, "ca.crt");
    let patch = json!({"metadata": {"annotations": {"arcguard.io/revoke": "failover"}}});
    secrets.patch("arcguard-tls", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let new_bundle = eventually(Duration::from_secs(30), || async {
        let secret = secrets.get("arcguard-tls").await?;
        let handled = secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("arcguard.io/revoke-handled"))
            .cloned();
        ensure!(
            handled.as_deref() == Some("failover") && data(&secret, "ca.crt") != old_ca,
            "revocation not handled yet ({handled:?})"
        );
        Ok(data(&secret, "ca-bundle.crt"))
    })
    .await?;
    eventually(Duration::from_secs(30), || replica.handshake_trusting(&new_bundle))
        .await
        .map_err(|e| anyhow!("the new leader serves the new certificate: {e:#}"))?;

    // The old leader comes back as a follower, serving the new certificate; the webhooks (which
    // call e2e-0) trust it through the bundle the new leader injected.
    cluster.arcguard.start().await?;
    cluster.arcguard.wait_ready(Duration::from_secs(60)).await?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;
    ensure!(
        cluster.arcguard.metric("arcguard_leader").await? == 0.0,
        "e2e-0 follows after its restart"
    );
    ensure!(replica.metric("arcguard_leader").await? == 1.0, "e2e-1 still leads");
    Ok(())
}
