//! Faults: arcguard down (the webhooks' failurePolicy decides, the excluded namespaces keep
//! working, and enforcement resumes on restart without manual steps); a crashed leader (a
//! second replica takes over the certificate); the certificate Secret deleted; the webhook
//! configurations deleted and re-applied without a caBundle; the apiserver unavailable
//! mid-run and at arcguard's start; the apiserver hung (SIGSTOP) under two replicas.

use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use arcguard::cluster::leader::DEFAULT_RENEW_DEADLINE;
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::arcguard::Arcguard;
use arcguard_e2e::{
    Cluster, ClusterOptions, UNTRUSTED_MESSAGE, apply, denial, eventually, namespace, pod,
    wait_for_enforcement, webhook_configurations,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

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
    .await
    // The new leader's log says why (the cluster's diagnostics hold e2e-0's only).
    .map_err(|e| anyhow!("{e:#}\n--- e2e-1 ---\n{}", replica.log_tail(80)))?;
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

// === helpers of the scenarios below ===

const NS: &str = "arcguard-system";
const SECRET: &str = "arcguard-tls";
const TRUSTED: &str = "contoso.azurecr.io/shop/web:1.0";
const UNTRUSTED: &str = "docker.io/library/nginx:1.27";

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

/// The Secret's `ca-bundle.crt` and uid.
async fn secret_bundle(client: &kube::Client) -> Result<(Vec<u8>, String)> {
    let secret = Api::<Secret>::namespaced(client.clone(), NS).get(SECRET).await?;
    let uid = secret.metadata.uid.clone().unwrap_or_default();
    let bundle = secret
        .data
        .and_then(|mut d| d.remove("ca-bundle.crt"))
        .map(|b| b.0)
        .ok_or_else(|| anyhow!("the Secret has no ca-bundle.crt"))?;
    Ok((bundle, uid))
}

/// Waits until all three webhooks carry exactly the Secret's current bundle, and returns it.
async fn bundle_injected(client: &kube::Client) -> Result<Vec<u8>> {
    eventually(Duration::from_secs(60), || async {
        let (bundle, _) = secret_bundle(client).await?;
        let validating =
            Api::<ValidatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
        let mutating =
            Api::<MutatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
        let bundles: Vec<Option<Vec<u8>>> = validating
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| w.client_config.ca_bundle.map(|b| b.0))
            .chain(
                mutating
                    .webhooks
                    .unwrap_or_default()
                    .into_iter()
                    .map(|w| w.client_config.ca_bundle.map(|b| b.0)),
            )
            .collect();
        ensure!(
            bundles.len() == 3 && bundles.iter().all(|b| b.as_deref() == Some(bundle.as_slice())),
            "not every webhook carries the Secret's bundle yet"
        );
        Ok(bundle)
    })
    .await
}

/// A trusted pod is created (and labelled by the mutating webhook); an untrusted one is denied
/// with arcguard's message. Retries while the webhooks are not answering yet.
async fn admission_works(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let created = eventually(Duration::from_secs(60), || async {
        pods.create(&PostParams::default(), &pod(name, TRUSTED))
            .await
            .map_err(|e| anyhow!("trusted pod {name}: {e}"))
    })
    .await?;
    let labels = created.metadata.labels.unwrap_or_default();
    ensure!(
        labels.get("arcguard.io/os").map(String::as_str) == Some("linux"),
        "the mutating webhook labelled {name}: {labels:?}"
    );
    let message =
        denial(&pods.create(&dry_run(), &pod(&format!("{name}-untrusted"), UNTRUSTED)).await);
    ensure!(message.contains(UNTRUSTED_MESSAGE), "untrusted pod next to {name}: {message}");
    Ok(())
}

#[tokio::test]
async fn a_deleted_certificate_secret_is_recreated_and_its_bundle_reinjected() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = secret_deleted(&mut cluster).await;
    cluster.check(result);
}

async fn secret_deleted(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "secret-deleted", &[]).await?;
    let (old_bundle, old_uid) = secret_bundle(&client).await?;
    let deleted = Instant::now();
    Api::<Secret>::namespaced(client.clone(), NS).delete(SECRET, &DeleteParams::default()).await?;
    let new_uid = eventually(Duration::from_secs(60), || async {
        let (_, uid) = secret_bundle(&client).await?;
        ensure!(uid != old_uid, "the Secret is not re-created yet");
        Ok(uid)
    })
    .await
    .context("re-creating the deleted Secret")?;
    let bundle = bundle_injected(&client).await.context("re-injecting the new bundle")?;
    eprintln!(
        "[e2e] secret deleted: re-created (uid {new_uid}) and injected in {:.1}s; bundle {}",
        deleted.elapsed().as_secs_f64(),
        if bundle == old_bundle { "unchanged" } else { "new" }
    );
    cluster.arcguard.handshake_trusting(&bundle).await.context("serving a trusted certificate")?;
    cluster.arcguard.wait_ready(Duration::from_secs(30)).await?;
    admission_works(&client, &ns, "after-secret-deleted").await
}

#[tokio::test]
async fn deleted_and_reapplied_webhook_configurations_get_the_bundle_back_and_enforce() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = webhooks_reapplied(&mut cluster).await;
    cluster.check(result);
}

async fn webhooks_reapplied(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "webhooks-reapplied", &[]).await?;
    let validating = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone());
    validating.delete("arcguard", &DeleteParams::default()).await?;
    mutating.delete("arcguard", &DeleteParams::default()).await?;
    // Nothing enforces now: an untrusted pod goes through (dry run).
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(30), || async {
        pods.create(&dry_run(), &pod("unguarded", UNTRUSTED))
            .await
            .map_err(|e| anyhow!("untrusted pod without webhooks: {e}"))
    })
    .await?;

    // A GitOps tool re-applies them as stored in Git: no caBundle.
    let reapplied = Instant::now();
    for configuration in webhook_configurations(&cluster.arcguard.url())? {
        ensure!(!configuration.to_string().contains("caBundle"), "the manifests carry no caBundle");
        apply(&client, &configuration).await?;
    }
    let bundle = bundle_injected(&client).await.context("re-injecting into the new objects")?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;
    eprintln!(
        "[e2e] webhooks re-applied: bundle re-injected and enforcing in {:.1}s",
        reapplied.elapsed().as_secs_f64()
    );
    cluster.arcguard.handshake_trusting(&bundle).await?;
    cluster.arcguard.wait_ready(Duration::from_secs(30)).await?;
    admission_works(&client, &ns, "after-reapply").await
}

/// A ClusterGuardPolicy for `ns` only, trusting `registries`.
fn registries_policy(name: &str, ns: &str, registries: &[&str]) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {"action": "Deny", "match": {"namespaces": [ns]},
                 "trustedRegistries": {"registries": registries}}
    })
}

/// Posts an AdmissionReview for a CREATE of `pod` in `ns` straight to `arcguard`'s `/validate`
/// (trusting `bundle`), as the apiserver would, and returns the response.
async fn review(arcguard: &Arcguard, bundle: &[u8], ns: &str, pod: &Pod) -> Result<Value> {
    let mut builder = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5));
    for certificate in reqwest::Certificate::from_pem_bundle(bundle)? {
        builder = builder.add_root_certificate(certificate);
    }
    let body = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "6c1e8b3e-0000-4000-8000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod.metadata.name, "namespace": ns, "operation": "CREATE",
            "userInfo": {"username": "admin", "groups": ["system:masters"]},
            "object": pod, "dryRun": true,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    });
    let response = builder
        .build()?
        .post(format!("{}/validate", arcguard.url()))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body)?)
        .send()
        .await?;
    ensure!(response.status().is_success(), "/validate answered {}", response.status());
    let review: Value = serde_json::from_str(&response.text().await?)?;
    Ok(review["response"].clone())
}

#[tokio::test]
async fn with_the_apiserver_down_mid_run_the_last_policies_stay_enforced_and_watches_resume() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = apiserver_down_mid_run(&mut cluster).await;
    cluster.check(result);
}

/// How long the apiserver stays down. Longer than the watchers' first back-off steps, so they
/// resume from a real back-off, not a lucky first retry.
const OUTAGE: Duration = Duration::from_secs(15);

async fn apiserver_down_mid_run(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "apiserver-down", &[]).await?;
    let name = format!("e2e-{ns}");
    apply(&client, &registries_policy(&name, &ns, &["contoso.azurecr.io/team-a"])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let team_b = pod("team-b", "contoso.azurecr.io/team-b/app:1");
    eventually(Duration::from_secs(30), || async {
        let message = denial(&pods.create(&dry_run(), &team_b).await);
        ensure!(message.contains(&format!("[{name}]")), "team-b before the outage: {message}");
        Ok(())
    })
    .await?;
    let (bundle, _) = secret_bundle(&client).await?;

    // Down: arcguard keeps running, stays ready (its certificate is still valid and was
    // trusted, and it still enforces the policies it last loaded), and keeps answering.
    cluster.control_plane.stop_apiserver();
    let down = Instant::now();
    let mut reviews = 0u32;
    while down.elapsed() < OUTAGE {
        ensure!(cluster.arcguard.is_running(), "arcguard exited while the apiserver was down");
        ensure!(cluster.arcguard.is_ready().await, "arcguard turned unready during the outage");
        let response = review(&cluster.arcguard, &bundle, &ns, &team_b).await?;
        let message = response["status"]["message"].as_str().unwrap_or_default();
        ensure!(
            response["allowed"] == json!(false) && message.contains(&format!("[{name}]")),
            "the last policy set is enforced during the outage: {response}"
        );
        reviews += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    cluster.control_plane.start_apiserver().await.context("restarting the apiserver")?;
    let restarted = Instant::now();
    // Right after the restart: the apiserver may refuse while its own caches sync, but it must
    // never admit team-b.
    let client = cluster.client().await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut answers = Vec::new();
    loop {
        let result = pods.create(&dry_run(), &team_b).await;
        ensure!(result.is_err(), "team-b admitted right after the restart (before: {answers:?})");
        let message = denial(&result);
        if message.contains(&format!("[{name}]")) {
            break;
        }
        ensure!(
            restarted.elapsed() < Duration::from_secs(30),
            "no denial from arcguard after the restart: {answers:?}"
        );
        answers.push(message);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let denied_after = restarted.elapsed();

    // Watches resume: an edit made after the restart takes effect. Every wait of arcguard's
    // watch back-off, jitter included, is under 2 s (kube-runtime's default, like client-go's
    // reflector, goes to 30 s: runs took 18-40 s here before), so the edit must take effect
    // within 10 s of the restart: the 403s of the restarted apiserver's RBAC sync and its
    // watch cache for custom resources starting again are included (in one CI run on 2 busy
    // cores, the apiserver held arcguard's policy watch 5 s before answering it 410 Expired,
    // and the edit took effect at 5.7 s).
    apply(
        &client,
        &registries_policy(&name, &ns, &["contoso.azurecr.io/team-a", "contoso.azurecr.io/team-b"]),
    )
    .await?;
    eventually(Duration::from_secs(90), || async {
        pods.create(&dry_run(), &team_b).await.map_err(|e| anyhow!("team-b after the edit: {e}"))
    })
    .await?;
    let resumed = restarted.elapsed();
    eprintln!(
        "[e2e] apiserver down {:.1}s ({reviews} reviews denied during it); after the restart: denied through the apiserver at {:.1}s ({} earlier refusals), the edit took effect at {:.1}s",
        OUTAGE.as_secs_f64(),
        denied_after.as_secs_f64(),
        answers.len(),
        resumed.as_secs_f64()
    );
    ensure!(
        resumed < Duration::from_secs(10),
        "the policy watch resumed {:.1}s after the apiserver's return (target: within 10 s)",
        resumed.as_secs_f64()
    );
    ensure!(cluster.arcguard.is_ready().await, "ready after the restart");
    // The only replica could not renew its Lease through the outage; it must lead again, or
    // nobody would ever rotate the certificate or write policy status.
    eventually(Duration::from_secs(60), || async {
        let leading = cluster.arcguard.metric("arcguard_leader").await?;
        ensure!(leading == 1.0, "e2e-0 leads again after the outage (leader={leading})");
        Ok(())
    })
    .await?;
    pods.create(&PostParams::default(), &team_b).await?;
    Ok(())
}

#[tokio::test]
async fn started_without_an_apiserver_arcguard_waits_unready_then_becomes_ready_and_enforces() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = apiserver_down_at_start(&mut cluster).await;
    cluster.check(result);
}

async fn apiserver_down_at_start(cluster: &mut Cluster) -> Result<()> {
    cluster.arcguard.stop().await;
    cluster.control_plane.stop_apiserver();
    cluster.arcguard.start().await.context("arcguard starts without an apiserver")?;
    let started = Instant::now();
    while started.elapsed() < OUTAGE {
        ensure!(cluster.arcguard.is_running(), "arcguard exited without an apiserver");
        ensure!(
            !cluster.arcguard.is_ready().await,
            "arcguard is ready without having loaded policies or its certificate"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    cluster.control_plane.start_apiserver().await.context("starting the apiserver")?;
    let up = Instant::now();
    cluster.arcguard.wait_ready(Duration::from_secs(90)).await?;
    let ready_after = up.elapsed();
    let client = cluster.client().await?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;
    eprintln!(
        "[e2e] apiserver up after arcguard: ready {:.1}s, enforcing {:.1}s after the apiserver",
        ready_after.as_secs_f64(),
        up.elapsed().as_secs_f64()
    );
    ensure!(cluster.arcguard.is_running(), "still the first process");
    let ns = namespace(&client, "late-apiserver", &[]).await?;
    admission_works(&client, &ns, "after-late-apiserver").await
}

#[tokio::test]
async fn with_the_apiserver_hung_the_leader_steps_down_on_its_own_timer_and_leads_again_after() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let mut replica = cluster.arcguard.replica("e2e-1").expect("a second replica");
    let result = apiserver_hung(&mut cluster, &mut replica).await;
    // A scenario that failed mid-pause must not leave the apiserver stopped (dropping the
    // control plane would resume it too; this also lets the diagnostics below be complete).
    cluster.control_plane.resume_apiserver();
    if result.is_err() {
        eprintln!("{}", replica.log_tail(60));
    }
    cluster.check(result);
}

/// How long the apiserver stays hung: past the renew deadline (the leader must step down on
/// its own timer) and past the Lease duration (on resume the follower sees an expired Lease and
/// races the old holder for it).
const HANG: Duration = Duration::from_secs(20);
/// Slack for the step-down: the renew deadline is a local timer, `arcguard_leader` follows it
/// at the end of the timed-out round, and the samples here are paced at about 250 ms.
const STEP_DOWN_MARGIN: Duration = Duration::from_secs(2);
/// How long, after the apiserver is continued, leadership and enforcement through it may take:
/// a follower retries every 2 s, and a call in flight during the pause is answered on resume.
const RECOVERY: Duration = Duration::from_secs(15);

/// `arcguard_leader` of each replica; fails when more than one reports 1.
async fn leaders(replicas: [&Arcguard; 2]) -> Result<[bool; 2]> {
    let mut leading = [false; 2];
    for (slot, replica) in leading.iter_mut().zip(replicas) {
        *slot = replica.metric("arcguard_leader").await? == 1.0;
    }
    ensure!(leading != [true, true], "both replicas report arcguard_leader 1");
    Ok(leading)
}

/// When the Lease was last renewed and how long it was promised for, on arcguard's clock (the
/// same host's as this test's).
async fn lease_renewal(leases: &Api<Lease>) -> Result<(Option<String>, SystemTime, Duration)> {
    let spec = leases.get("arcguard").await?.spec.unwrap_or_default();
    let renewed = spec.renew_time.ok_or_else(|| anyhow!("the Lease has no renewTime"))?.0;
    let micros = u64::try_from(renewed.as_microsecond())?;
    let duration = u64::try_from(spec.lease_duration_seconds.unwrap_or_default())?;
    ensure!(duration > 0, "the Lease has no duration");
    Ok((
        spec.holder_identity,
        SystemTime::UNIX_EPOCH + Duration::from_micros(micros),
        Duration::from_secs(duration),
    ))
}

async fn apiserver_hung(cluster: &mut Cluster, replica: &mut Arcguard) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "apiserver-hung", &[]).await?;
    let name = format!("e2e-{ns}");
    apply(&client, &registries_policy(&name, &ns, &["contoso.azurecr.io/team-a"])).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let team_b = pod("team-b", "contoso.azurecr.io/team-b/app:1");
    let denied_by_policy = |response: &Value| {
        let message = response["status"]["message"].as_str().unwrap_or_default();
        response["allowed"] == json!(false) && message.contains(&format!("[{name}]"))
    };
    replica.start().await?;
    replica.wait_ready(Duration::from_secs(60)).await?;
    let (bundle, _) = secret_bundle(&client).await?;
    let replicas = [&cluster.arcguard, &*replica];
    // Both replicas enforce the scenario's policy, and e2e-0 (started first) leads.
    for arcguard in replicas {
        eventually(Duration::from_secs(30), || async {
            let response = review(arcguard, &bundle, &ns, &team_b).await?;
            ensure!(denied_by_policy(&response), "team-b before the pause: {response}");
            Ok(())
        })
        .await?;
    }
    ensure!(leaders(replicas).await? == [true, false], "e2e-0 leads, e2e-1 follows");
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);

    // Hung: connections stay open, nothing answers. The pause follows a renewal seen here at
    // once (renewals come every 5 s), so that renewal is the last one and the Lease cannot be
    // taken over before it plus the Lease duration, on any replica's clock.
    let (_, before, _) = lease_renewal(&leases).await?;
    let waiting = Instant::now();
    let (holder, renewed, lease_duration) = loop {
        let lease = lease_renewal(&leases).await?;
        if lease.1 != before {
            break lease;
        }
        ensure!(waiting.elapsed() < Duration::from_secs(15), "the leader stopped renewing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    ensure!(holder.as_deref() == Some("e2e-0"), "the Lease names the leader: {holder:?}");
    cluster.control_plane.pause_apiserver();
    let paused = Instant::now();
    let renewal_age = SystemTime::now().duration_since(renewed).unwrap_or_default();
    let takeover_possible = renewed + lease_duration;
    let mut stepped_down = None;
    let (mut samples, mut reviews) = (0u32, 0u32);
    while paused.elapsed() < HANG {
        for arcguard in [&mut cluster.arcguard, &mut *replica] {
            ensure!(arcguard.is_running(), "a replica exited while the apiserver hung");
        }
        let replicas = [&cluster.arcguard, &*replica];
        let leading = leaders(replicas).await?;
        samples += 1;
        ensure!(!leading[1], "e2e-1 leads although nothing can be written");
        match (stepped_down, leading[0]) {
            (None, false) => {
                let now = SystemTime::now();
                ensure!(
                    now < takeover_possible,
                    "e2e-0 stepped down only {:?} after the Lease could be taken over",
                    now.duration_since(takeover_possible).unwrap_or_default()
                );
                stepped_down = Some(paused.elapsed());
            }
            (Some(at), true) => bail!("e2e-0 leads again {at:?} after stepping down, while hung"),
            _ => {}
        }
        ensure!(
            stepped_down.is_some() || paused.elapsed() <= DEFAULT_RENEW_DEADLINE + STEP_DOWN_MARGIN,
            "e2e-0 still leads {:.1}s into the pause (renew deadline {DEFAULT_RENEW_DEADLINE:?})",
            paused.elapsed().as_secs_f64()
        );
        for arcguard in replicas {
            let response = review(arcguard, &bundle, &ns, &team_b).await?;
            ensure!(
                denied_by_policy(&response),
                "{} enforces the last policies while the apiserver hangs: {response}",
                arcguard.url()
            );
            reviews += 1;
            // Its certificate is still valid and trusted, and it still enforces: a hung
            // apiserver is no reason to leave the Service's endpoints.
            ensure!(arcguard.is_ready().await, "{} turned unready while hung", arcguard.url());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let stepped_down = stepped_down.ok_or_else(|| anyhow!("e2e-0 never stepped down"))?;

    cluster.control_plane.resume_apiserver();
    let resumed = Instant::now();
    let (new_leader, relead) = loop {
        let leading = leaders([&cluster.arcguard, &*replica]).await?;
        samples += 1;
        if leading != [false, false] {
            let leader = if leading[0] { "e2e-0" } else { "e2e-1" };
            let (holder, _, _) = lease_renewal(&leases).await?;
            if holder.as_deref() == Some(leader) {
                break (leader, resumed.elapsed());
            }
        }
        ensure!(
            resumed.elapsed() < RECOVERY,
            "no leader {RECOVERY:?} after the apiserver was continued (sample: {leading:?})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut refusals = Vec::new();
    let enforced = loop {
        let result = pods.create(&dry_run(), &team_b).await;
        ensure!(result.is_err(), "team-b admitted after the resume (before: {refusals:?})");
        let message = denial(&result);
        if message.contains(&format!("[{name}]")) {
            break resumed.elapsed();
        }
        ensure!(
            resumed.elapsed() < RECOVERY,
            "no denial by arcguard through the apiserver {RECOVERY:?} after the resume: {refusals:?}"
        );
        refusals.push(message);
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    // A few rounds later: never two leaders, and a leader at the end. (A leader may step
    // down again meanwhile, and rightly: a resumed apiserver working through its backlog can
    // miss a renewal's deadline on a loaded machine.)
    let settled = Instant::now();
    let mut leaderless = 0u32;
    let mut leading = [false; 2];
    while settled.elapsed() < Duration::from_secs(6) || leading == [false, false] {
        leading = leaders([&cluster.arcguard, &*replica]).await?;
        samples += 1;
        leaderless += u32::from(leading == [false, false]);
        ensure!(
            settled.elapsed() < RECOVERY,
            "no leader {RECOVERY:?} after {new_leader} first took the lead"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if leaderless > 0 {
        eprintln!(
            "[e2e] {leaderless} leaderless samples after the re-lead (a renewal missed its deadline)"
        );
    }
    eprintln!(
        "[e2e] apiserver hung {:.1}s (SIGSTOP): e2e-0 stepped down {:.1}s into the pause ({:.1}s after its last renewal; renew deadline {:.0}s, takeover possible {:.1}s after it), {reviews} reviews denied, both ready throughout; after SIGCONT: {new_leader} leads at {:.1}s, denied through the apiserver at {:.1}s ({} earlier refusals); {samples} leader samples, never two",
        HANG.as_secs_f64(),
        stepped_down.as_secs_f64(),
        (renewal_age + stepped_down).as_secs_f64(),
        DEFAULT_RENEW_DEADLINE.as_secs_f64(),
        lease_duration.as_secs_f64(),
        relead.as_secs_f64(),
        enforced.as_secs_f64(),
        refusals.len(),
    );
    Ok(())
}
