//! The serving certificate through a real apiserver: CA rotation under load, revocation,
//! re-injection of a reset CA bundle, and readiness following the served certificate. Each
//! scenario has its own cluster: they make arcguard's certificate change under everyone.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use arcguard::certs::{CertificateAuthority, bundle_contains};
use arcguard_e2e::{
    Cluster, ClusterOptions, UNTRUSTED_MESSAGE, denial, eventually, namespace, pod,
    wait_for_enforcement,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::Mutex;

const NS: &str = "arcguard-system";
const SECRET: &str = "arcguard-tls";

async fn secret_data(client: &kube::Client, key: &str) -> Result<Vec<u8>> {
    let secret = Api::<Secret>::namespaced(client.clone(), NS).get(SECRET).await?;
    secret
        .data
        .and_then(|mut d| d.remove(key))
        .map(|b| b.0)
        .ok_or_else(|| anyhow!("the Secret has no {key}"))
}

/// Every webhook's caBundle (validating first), `None` where unset.
async fn published_bundles(client: &kube::Client) -> Result<Vec<Option<Vec<u8>>>> {
    let validating =
        Api::<ValidatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
    let mutating = Api::<MutatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
    let mut bundles: Vec<Option<Vec<u8>>> = validating
        .webhooks
        .unwrap_or_default()
        .into_iter()
        .map(|w| w.client_config.ca_bundle.map(|b| b.0))
        .collect();
    bundles.extend(
        mutating
            .webhooks
            .unwrap_or_default()
            .into_iter()
            .map(|w| w.client_config.ca_bundle.map(|b| b.0)),
    );
    Ok(bundles)
}

/// Waits until every webhook carries exactly `bundle`.
async fn bundle_published(client: &kube::Client, bundle: &[u8]) -> Result<()> {
    eventually(Duration::from_secs(30), || async {
        let bundles = published_bundles(client).await?;
        ensure!(
            bundles.len() == 3 && bundles.iter().all(|b| b.as_deref() == Some(bundle)),
            "not every webhook carries the Secret's bundle yet"
        );
        Ok(())
    })
    .await
}

// === rotation ===

/// What the load generator saw.
#[derive(Debug, Default)]
struct Load {
    admissions: u64,
    failures: Vec<String>,
}

/// Keeps creating trusted pods (which must be admitted) and dry-running untrusted ones (which
/// arcguard must deny: proof that the webhook, not a failure, answered) until `stop`.
async fn generate_load(
    client: kube::Client,
    ns: String,
    worker: usize,
    stop: Arc<AtomicBool>,
    load: Arc<Mutex<Load>>,
) {
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let trusted = pods
            .create(
                &PostParams::default(),
                &pod(&format!("load-{worker}-{n}"), "contoso.azurecr.io/shop/web:1.0"),
            )
            .await;
        let untrusted = pods
            .create(
                &dry_run,
                &pod(&format!("untrusted-{worker}-{n}"), "docker.io/library/nginx:1.27"),
            )
            .await;
        let mut load = load.lock().await;
        load.admissions += 2;
        if let Err(error) = trusted {
            load.failures.push(format!("trusted pod load-{worker}-{n}: {error}"));
        }
        let message = denial(&untrusted);
        if !message.contains(UNTRUSTED_MESSAGE) {
            load.failures.push(format!("untrusted pod {worker}-{n}: {message}"));
        }
    }
}

#[tokio::test]
async fn a_forced_ca_rotation_under_load_ends_with_zero_failed_admissions() {
    // A 40 s CA starts rotating 10 s after it is made: a CA switch about every 12 s.
    let options = ClusterOptions::with_args(&[
        "--ca-validity=40s",
        "--ca-rotate-before=30s",
        "--ca-overlap=6s",
    ]);
    let cluster = Cluster::start(options).await.expect("the cluster starts");
    let result = rotation_under_load(&cluster).await;
    cluster.check(result);
}

async fn rotation_under_load(cluster: &Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let ns = namespace(&client, "rotation", &[]).await?;
    let first_ca = secret_data(&client, "ca.crt").await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Mutex::new(Load::default()));
    let workers: Vec<_> = (0..2)
        .map(|worker| {
            tokio::spawn(generate_load(
                client.clone(),
                ns.clone(),
                worker,
                stop.clone(),
                load.clone(),
            ))
        })
        .collect();

    // Watch the CA change while the load runs; readiness must hold throughout.
    let mut cas = vec![first_ca.clone()];
    let mut not_ready = 0;
    let started = Instant::now();
    while cas.len() < 4 && started.elapsed() < Duration::from_secs(150) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ca = secret_data(&client, "ca.crt").await?;
        if cas.last() != Some(&ca) {
            cas.push(ca);
        }
        if !cluster.arcguard.is_ready().await {
            not_ready += 1;
        }
    }
    // Keep the load on through the last switch's overlap, until the old CA has left the bundle.
    let current = cas.last().cloned().unwrap_or_default();
    let previous = cas.get(cas.len().saturating_sub(2)).cloned().unwrap_or_default();
    let dropped = eventually(Duration::from_secs(30), || async {
        let bundle = secret_data(&client, "ca-bundle.crt").await?;
        ensure!(!bundle_contains(&bundle, &previous), "the previous CA is still in the bundle");
        ensure!(bundle_contains(&bundle, &current), "the current CA is not in the bundle");
        Ok(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await?;
    }
    dropped?;
    let load = load.lock().await;
    let switches = cas.len() - 1;
    eprintln!(
        "[e2e] rotation: {switches} CA switches in {:.0}s, {} admissions, {} failed, readiness false in {not_ready} samples",
        started.elapsed().as_secs_f64(),
        load.admissions,
        load.failures.len()
    );
    ensure!(switches >= 3, "only {switches} CA switches within the time allowed");
    ensure!(
        load.failures.is_empty(),
        "{} of {} admissions failed during {switches} CA rotations; first: {:?}",
        load.failures.len(),
        load.admissions,
        load.failures.iter().take(5).collect::<Vec<_>>()
    );
    ensure!(load.admissions >= 40, "too little load to prove anything: {}", load.admissions);
    ensure!(not_ready == 0, "readiness dropped in {not_ready} samples during rotation");
    let counted = cluster
        .arcguard
        .metric("arcguard_certificate_rotations_total{reason=\"ca-switched\"}")
        .await?;
    ensure!(counted >= 3.0, "ca-switched rotations counted: {counted}");
    // Its own injections during a rotation are not a fight with another writer (which backs
    // off, up to minutes, and would stall the rotation).
    let fights = cluster.arcguard.log_text().matches("keeps being reset by someone else").count();
    ensure!(fights == 0, "arcguard took its own rotation injections for a fight {fights} times");
    let bundles = published_bundles(&client).await?;
    ensure!(
        bundles.iter().all(|b| b.as_deref().is_some_and(|b| !bundle_contains(b, &first_ca))),
        "the first CA is gone from every webhook"
    );
    Ok(())
}

// === revocation and re-injection ===

#[tokio::test]
async fn a_reset_ca_bundle_is_reinjected_and_revocation_replaces_the_ca_everywhere() {
    let cluster = Cluster::start(ClusterOptions::default()).await.expect("the cluster starts");
    let result = revocation(&cluster).await;
    cluster.check(result);
}

async fn revocation(cluster: &Cluster) -> Result<()> {
    let client = cluster.client().await?;
    let bundle = secret_data(&client, "ca-bundle.crt").await?;

    // Someone (a GitOps sync, a careless apply) resets a webhook's caBundle.
    let foreign = CertificateAuthority::generate(
        "someone else's CA",
        time::Duration::days(1),
        OffsetDateTime::now_utc(),
    )?;
    let patch = json!([{"op": "replace", "path": "/webhooks/0/clientConfig/caBundle",
                        "value": ByteString(foreign.cert_pem().as_bytes().to_vec())}]);
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .patch(
            "arcguard",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch)?),
        )
        .await?;
    bundle_published(&client, &bundle).await.context("re-injection after a reset")?;
    wait_for_enforcement(&client, Duration::from_secs(30)).await?;

    // Revocation through the CLI, as an operator would do it.
    let old_ca = secret_data(&client, "ca.crt").await?;
    let output = std::process::Command::new(arcguard_e2e::bins::arcguard_bin()?)
        .args(["certs", "revoke", "--namespace", NS])
        .env("KUBECONFIG", &cluster.control_plane.kubeconfig)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "arcguard certs revoke: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(stdout.contains("requested revocation"), "{stdout}");
    let revoked_at = Instant::now();

    let new_bundle = eventually(Duration::from_secs(30), || async {
        let ca = secret_data(&client, "ca.crt").await?;
        ensure!(ca != old_ca, "the CA is not replaced yet");
        let bundle = secret_data(&client, "ca-bundle.crt").await?;
        ensure!(
            !bundle_contains(&bundle, &old_ca),
            "the revoked CA is still in the Secret's bundle"
        );
        let serving = arcguard::certs::CertInfo::from_pem(secret_data(&client, "tls.crt").await?)?;
        ensure!(serving.verifies_with(&ca)?, "the serving certificate is not from the new CA");
        Ok(bundle)
    })
    .await?;
    bundle_published(&client, &new_bundle).await.context("the new bundle in every webhook")?;
    for published in published_bundles(&client).await?.into_iter().flatten() {
        ensure!(!bundle_contains(&published, &old_ca), "a webhook still trusts the revoked CA");
    }
    let secret = Api::<Secret>::namespaced(client.clone(), NS).get(SECRET).await?;
    let annotations = secret.metadata.annotations.unwrap_or_default();
    ensure!(
        annotations.contains_key("arcguard.io/revoke")
            && annotations.get("arcguard.io/revoke")
                == annotations.get("arcguard.io/revoke-handled"),
        "the request is marked handled: {annotations:?}"
    );
    wait_for_enforcement(&client, Duration::from_secs(60))
        .await
        .context("enforcement after revocation")?;
    eprintln!(
        "[e2e] revocation: enforcing with the new CA {:.1}s after the request",
        revoked_at.elapsed().as_secs_f64()
    );
    let counted =
        cluster.arcguard.metric("arcguard_certificate_rotations_total{reason=\"revoked\"}").await?;
    ensure!(counted >= 1.0, "revocations counted: {counted}");
    Ok(())
}

// === readiness ===

fn tls_secret(ca: &CertificateAuthority, not_after_offset: time::Duration) -> Result<Secret> {
    let now = OffsetDateTime::now_utc();
    let issued_at = now + not_after_offset - time::Duration::days(1);
    let serving = ca.issue_serving(
        &["arcguard.arcguard-system.svc".to_owned()],
        &[std::net::IpAddr::from([127, 0, 0, 1])],
        time::Duration::days(1),
        issued_at,
    )?;
    Ok(serde_json::from_value(json!({
        "metadata": {"name": SECRET, "namespace": NS},
        "type": "kubernetes.io/tls",
        "stringData": {"ca.crt": ca.cert_pem(), "tls.crt": serving.cert_pem, "tls.key": serving.key_pem}
    }))?)
}

async fn ready_for(cluster: &Cluster, want: bool, within: Duration) -> Result<()> {
    let started = Instant::now();
    while cluster.arcguard.is_ready().await != want {
        if started.elapsed() > within {
            bail!("arcguard readiness did not become {want} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn readiness_follows_the_served_certificate() {
    // cert-manager style: arcguard never writes the Secret, only serves it and injects ca.crt.
    let options =
        ClusterOptions { ready: false, ..ClusterOptions::with_args(&["--external-certs"]) };
    let cluster = Cluster::start(options).await.expect("the cluster starts");
    let result = readiness(&cluster).await;
    cluster.check(result);
}

async fn readiness(cluster: &Cluster) -> Result<()> {
    let client = cluster.client().await?;
    // No Secret: nothing to serve. Sampled for a few seconds: it must not turn ready.
    for _ in 0..10 {
        ensure!(!cluster.arcguard.is_ready().await, "ready without a certificate");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let ca = CertificateAuthority::generate(
        "e2e external CA",
        time::Duration::days(30),
        OffsetDateTime::now_utc(),
    )?;
    let valid = tls_secret(&ca, time::Duration::days(1))?;
    secrets.create(&PostParams::default(), &valid).await?;
    ready_for(cluster, true, Duration::from_secs(30)).await.context("after the Secret appeared")?;
    bundle_published(&client, ca.cert_pem().as_bytes())
        .await
        .context("the external CA injected")?;
    cluster.install_sample_policies(&client).await?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;

    served_certificate_is_trusted(cluster, &ca).await.context("the valid certificate")?;

    // An expired certificate in the Secret: served to new connections, and not ready. (The
    // apiserver keeps its open connections, so admission itself may go on for a while.)
    let expired = tls_secret(&ca, -time::Duration::days(1))?;
    secrets
        .replace(
            SECRET,
            &PostParams::default(),
            &Secret { metadata: secrets.get(SECRET).await?.metadata, ..expired },
        )
        .await?;
    ready_for(cluster, false, Duration::from_secs(30))
        .await
        .context("after the certificate expired")?;
    let error = served_certificate_is_trusted(cluster, &ca)
        .await
        .err()
        .ok_or_else(|| anyhow!("the expired certificate was accepted"))?;
    ensure!(
        format!("{error:?}").to_lowercase().contains("expired"),
        "a new handshake gets the expired certificate: {error:?}"
    );

    // A valid one again: ready, and enforcing.
    let renewed = tls_secret(&ca, time::Duration::days(1))?;
    secrets
        .replace(
            SECRET,
            &PostParams::default(),
            &Secret { metadata: secrets.get(SECRET).await?.metadata, ..renewed },
        )
        .await?;
    ready_for(cluster, true, Duration::from_secs(30)).await.context("after renewal")?;
    served_certificate_is_trusted(cluster, &ca).await.context("the renewed certificate")?;
    wait_for_enforcement(&client, Duration::from_secs(60)).await?;
    Ok(())
}

async fn served_certificate_is_trusted(cluster: &Cluster, ca: &CertificateAuthority) -> Result<()> {
    cluster.arcguard.handshake_trusting(ca.cert_pem().as_bytes()).await
}
