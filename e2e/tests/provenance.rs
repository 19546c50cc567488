//! imageProvenance against a real OCI registry: CNCF Distribution on loopback over HTTPS with
//! its own CA (given to arcguard with `--registry-ca`), images and multi-platform indexes
//! pushed through the distribution API. The cluster's sample policies are removed first (the
//! registry is not a trusted one, and Windows pods here carry no gMSA).

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use arcguard_e2e::registry::Registry;
use arcguard_e2e::{Cluster, ClusterOptions, apply, denial, eventually, namespace};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

/// Long enough for a policy to reach arcguard's watch on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(60);

#[tokio::test]
async fn image_provenance_against_a_real_registry() {
    let registry = Registry::start().await.expect("the registry starts");
    let ca = format!("--registry-ca={}", registry.ca_path.display());
    let cluster =
        Cluster::start(ClusterOptions::with_args(&[&ca])).await.expect("the cluster starts");
    let result = scenarios(&cluster, &registry)
        .await
        .map_err(|e| anyhow!("{e:#}\n\nregistry log:\n{}", registry.log_tail(30)));
    cluster.check(result);
}

fn policy(name: &str, ns: &str, block: Value) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {"action": "Deny", "match": {"namespaces": [ns]}, "imageProvenance": block}
    })
}

fn pod_json(name: &str, image: &str, spec: &Value) -> Value {
    let mut spec = spec.clone();
    spec["containers"] = json!([{"name": "app", "image": image}]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
}

fn pod(name: &str, image: &str, spec: &Value) -> Result<Pod> {
    Ok(serde_json::from_value(pod_json(name, image, spec))?)
}

fn image_of(pod: &Pod) -> String {
    pod.spec.as_ref().and_then(|s| s.containers[0].image.clone()).unwrap_or_default()
}

async fn scenarios(cluster: &Cluster, registry: &Registry) -> Result<()> {
    let client = cluster.client().await?;
    remove_sample_policies(&client).await?;

    let host = &registry.host;
    let app =
        registry.push_index("team/app", "1", &[("linux", "amd64"), ("linux", "arm64")]).await?;
    let win = registry.push_image("team/win", "1", ("windows", "amd64"), "v1").await?;
    // Nothing listens on this port: its registry cannot be read.
    let dead = format!("127.0.0.1:{}", arcguard_e2e::process::free_port()?);

    let ns = namespace(&client, "provenance", &[]).await?;
    apply(&client, &policy("provenance", &ns, json!({"registries": [format!("{host}/team")]})))
        .await?;
    apply(&client, &policy("down-deny", &ns, json!({"registries": [format!("{dead}/deny")]})))
        .await?;
    apply(
        &client,
        &policy(
            "down-warn",
            &ns,
            json!({"registries": [format!("{dead}/warn")], "onRegistryError": "Warn"}),
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let linux = json!({});
    let windows = json!({"os": {"name": "windows"}});

    // The policies are in force once an image the registry lacks is denied.
    let missing = format!("{host}/team/missing:1");
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    eventually(PROPAGATION, || async {
        let result = pods.create(&dry_run, &pod("probe", &missing, &linux)?).await;
        let message = denial(&result);
        ensure!(
            message.contains("which its registry does not serve")
                && message.contains("MANIFEST_UNKNOWN"),
            "the missing image was answered with: {message}"
        );
        Ok(())
    })
    .await
    .context("the imageProvenance policies did not take effect")?;

    // A Linux pod with a multi-platform tag is admitted, pinned to the index's digest.
    let created = pods
        .create(&PostParams::default(), &pod("linux-app", &format!("{host}/team/app:1"), &linux)?)
        .await?;
    ensure!(
        image_of(&created) == format!("{host}/team/app:1@{app}"),
        "the stored image is {}, not pinned to {app}",
        image_of(&created)
    );

    // A Windows pod with a Linux-only image is denied, naming the platforms the image has.
    let result = pods
        .create(&PostParams::default(), &pod("win-app", &format!("{host}/team/app:1"), &windows)?)
        .await;
    let message = denial(&result);
    ensure!(
        message.contains("has no windows platform (it has linux/amd64, linux/arm64)")
            && message.contains("this pod runs on windows nodes (spec.os.name"),
        "Windows pod with a Linux-only image: {message}"
    );

    // A Windows pod with a Windows image is admitted and pinned to its manifest's digest; a
    // Linux pod with it is denied.
    let created = pods
        .create(&PostParams::default(), &pod("win-win", &format!("{host}/team/win:1"), &windows)?)
        .await?;
    ensure!(
        image_of(&created) == format!("{host}/team/win:1@{win}"),
        "stored {}",
        image_of(&created)
    );
    let result = pods
        .create(&PostParams::default(), &pod("linux-win", &format!("{host}/team/win:1"), &linux)?)
        .await;
    let message = denial(&result);
    ensure!(
        message.contains("has no linux platform (it has windows/amd64)"),
        "Linux pod with a Windows image: {message}"
    );

    // The tag moves: the pod admitted before keeps the digest that was checked, and a pod
    // pinned to that digest is still admitted (it is still served).
    let moved = registry.push_index("team/app", "1", &[("linux", "amd64")]).await?;
    ensure!(moved != app, "the tag did not move");
    let kept = pods.get("linux-app").await?;
    ensure!(image_of(&kept) == format!("{host}/team/app:1@{app}"), "stored {}", image_of(&kept));
    pods.create(&PostParams::default(), &pod("pinned", &format!("{host}/team/app@{app}"), &linux)?)
        .await
        .context("a pod pinned to the checked digest")?;
    // A digest the registry never served is denied.
    let unknown = format!("{host}/team/app@sha256:{}", "0".repeat(64));
    let message =
        denial(&pods.create(&PostParams::default(), &pod("unknown", &unknown, &linux)?).await);
    ensure!(message.contains("which its registry does not serve"), "unknown digest: {message}");

    // Templates are checked but left as written (GitOps sees no drift).
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": format!("{host}/team/win:1")}]}}}
    }))?;
    let message = denial(&deployments.create(&PostParams::default(), &deployment).await);
    ensure!(
        message.contains("has no linux platform"),
        "Deployment of a Windows image on Linux: {message}"
    );
    let mut fixed = deployment.clone();
    if let Some(spec) = fixed.spec.template.spec.as_mut() {
        spec.containers[0].image = Some(format!("{host}/team/app:1"));
    }
    let created = deployments.create(&PostParams::default(), &fixed).await?;
    let stored =
        created.spec.template.spec.and_then(|s| s.containers[0].image.clone()).unwrap_or_default();
    ensure!(stored == format!("{host}/team/app:1"), "the template was rewritten to {stored}");

    // A registry that cannot be read: denied under onRegistryError Deny ...
    let message = denial(
        &pods
            .create(&PostParams::default(), &pod("down", &format!("{dead}/deny/app:1"), &linux)?)
            .await,
    );
    ensure!(
        message.contains("whose registry could not be read"),
        "unreachable registry, Deny: {message}"
    );
    // ... admitted with a warning under Warn, and left unpinned.
    let request = http::Request::post(format!("/api/v1/namespaces/{ns}/pods"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&pod_json("warned", &format!("{dead}/warn/app:1"), &linux))?)?;
    let response = client.send(request.map(kube::client::Body::from)).await?;
    ensure!(
        response.status().as_u16() == 201,
        "unreachable registry, Warn: HTTP {}",
        response.status()
    );
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .filter_map(|w| w.to_str().ok().map(str::to_owned))
        .collect();
    ensure!(
        warnings.iter().any(|w| w.contains("admitted unchecked: onRegistryError is Warn")),
        "no warning for the unread registry: {warnings:?}"
    );
    let warned = pods.get("warned").await?;
    ensure!(image_of(&warned) == format!("{dead}/warn/app:1"), "stored {}", image_of(&warned));
    Ok(())
}

#[tokio::test]
async fn signatures_made_by_cosign_and_notation_are_verified() {
    let registry = Registry::start().await.expect("the registry starts");
    let ca = format!("--registry-ca={}", registry.ca_path.display());
    let cluster =
        Cluster::start(ClusterOptions::with_args(&[&ca])).await.expect("the cluster starts");
    let result = signatures(&cluster, &registry)
        .await
        .map_err(|e| anyhow!("{e:#}\n\nregistry log:\n{}", registry.log_tail(30)));
    cluster.check(result);
}

async fn signatures(cluster: &Cluster, registry: &Registry) -> Result<()> {
    use arcguard_e2e::signing::{CosignKey, IDENTITY, NotationPki};
    let client = cluster.client().await?;
    remove_sample_policies(&client).await?;
    let keys = arcguard_e2e::process::Scratch::new("signing")?;
    let trusted = CosignKey::generate(keys.path(), "trusted")?;
    let other = CosignKey::generate(keys.path(), "other")?;
    let pki = NotationPki::generate(keys.path(), "notation")?;
    let signer = pki.leaf("signer", time::Duration::days(1))?;

    let host = &registry.host;
    let image = |repository: &str, digest: &str| format!("{host}/signed/{repository}@{digest}");
    let linux = [("linux", "amd64")];
    let by_cosign = registry.push_index("signed/cosign", "1", &linux).await?;
    trusted.sign(registry, &image("cosign", &by_cosign))?;
    let by_notation = registry.push_index("signed/notation", "1", &linux).await?;
    signer.sign(registry, &image("notation", &by_notation))?;
    let by_cose = registry.push_index("signed/cose", "1", &linux).await?;
    signer.sign_with(registry, &image("cose", &by_cose), "cose")?;
    let unsigned = registry.push_index("signed/unsigned", "1", &linux).await?;
    let wrong_key = registry.push_index("signed/wrong-key", "1", &linux).await?;
    other.sign(registry, &image("wrong-key", &wrong_key))?;
    // A signature made for one image, copied onto another's signature tag.
    let replayed = registry.push_index("signed/replayed", "1", &linux).await?;
    let sig_tag = |digest: &str| format!("{}.sig", digest.replacen(':', "-", 1));
    registry
        .copy(("signed/cosign", &sig_tag(&by_cosign)), ("signed/replayed", &sig_tag(&replayed)))
        .await?;
    // notation-go checks the chain when signing: a leaf that expires seconds later.
    let expiring = registry.push_index("signed/expiring", "1", &linux).await?;
    let short = pki.leaf("short-lived", time::Duration::seconds(30))?;
    short.sign(registry, &image("expiring", &expiring))?;

    let ns = namespace(&client, "signatures", &[]).await?;
    apply(
        &client,
        &policy(
            "signatures",
            &ns,
            json!({"registries": [format!("{host}/signed")], "signatures": {
                "cosign": {"publicKeys": [trusted.public_pem]},
                "notation": {"trustStore": [pki.root_pem], "trustedIdentities": [IDENTITY]},
            }}),
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let linux_spec = json!({});
    let create = |name: &str, image: &str| {
        let pod = pod(name, image, &linux_spec);
        let pods = pods.clone();
        async move { pods.create(&PostParams::default(), &pod?).await.map_err(anyhow::Error::from) }
    };

    // In force once an unsigned image is denied, naming what was looked for.
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    eventually(PROPAGATION, || async {
        let result = pods
            .create(&dry_run, &pod("probe", &format!("{host}/signed/unsigned:1"), &linux_spec)?)
            .await;
        let message = denial(&result);
        ensure!(
            message.contains("which has no signature this policy trusts")
                && message.contains(&format!("cosign: no signature (no tag {})", sig_tag(&unsigned)))
                && message.contains("Notation: no signature (no referrer of type application/vnd.cncf.notary.signature)"),
            "the unsigned image was answered with: {message}"
        );
        Ok(())
    })
    .await
    .context("the signature policy did not take effect")?;
    // Signed by a certificate that expires seconds later: admitted while it is valid (and
    // denied once it has expired, below).
    create("expiring", &image("expiring", &expiring))
        .await
        .context("signed by a valid certificate")?;

    // Signed by cosign and by Notation (JWS and COSE envelopes, found through the referrers
    // tag schema): admitted and pinned to the digest that was verified.
    let created = create("cosign", &format!("{host}/signed/cosign:1")).await?;
    ensure!(
        image_of(&created) == format!("{host}/signed/cosign:1@{by_cosign}"),
        "stored {}",
        image_of(&created)
    );
    let created = create("notation", &format!("{host}/signed/notation:1")).await?;
    ensure!(
        image_of(&created) == format!("{host}/signed/notation:1@{by_notation}"),
        "stored {}",
        image_of(&created)
    );

    let created = create("cose", &format!("{host}/signed/cose:1")).await?;
    ensure!(
        image_of(&created) == format!("{host}/signed/cose:1@{by_cose}"),
        "stored {}",
        image_of(&created)
    );

    // Signed by a key the policy does not list.
    let message = denial(
        &pods
            .create(
                &PostParams::default(),
                &pod("wrong-key", &format!("{host}/signed/wrong-key:1"), &linux_spec)?,
            )
            .await,
    );
    ensure!(
        message.contains("signed by none of the policy's cosign public keys"),
        "wrong key: {message}"
    );
    // Another image's signature under this image's signature tag.
    let message = denial(
        &pods
            .create(
                &PostParams::default(),
                &pod("replayed", &format!("{host}/signed/replayed:1"), &linux_spec)?,
            )
            .await,
    );
    ensure!(
        message.contains(&format!("the signature is for {by_cosign}, not for this image's digest")),
        "replayed signature: {message}"
    );

    // The tag moves to an unsigned index: the admitted pod keeps the verified digest, the
    // verified digest is still admitted, and the new one is denied.
    let moved = registry
        .push_index("signed/cosign", "1", &[("linux", "arm64"), ("linux", "amd64")])
        .await?;
    let kept = pods.get("cosign").await?;
    ensure!(
        image_of(&kept) == format!("{host}/signed/cosign:1@{by_cosign}"),
        "stored {}",
        image_of(&kept)
    );
    create("verified-digest", &image("cosign", &by_cosign)).await.context("the verified digest")?;
    let message = denial(
        &pods
            .create(&PostParams::default(), &pod("moved", &image("cosign", &moved), &linux_spec)?)
            .await,
    );
    ensure!(
        message.contains("which has no signature this policy trusts"),
        "the moved tag's digest: {message}"
    );

    eventually(Duration::from_secs(60), || async {
        let result = pods
            .create(&dry_run, &pod("expired", &image("expiring", &expiring), &linux_spec)?)
            .await;
        let message = denial(&result);
        ensure!(
            message
                .contains("certificate \"CN=short-lived, C=US, ST=WA, O=arcguard e2e\" expired at"),
            "after the leaf expired: {message}"
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Deletes the sample ClusterGuardPolicies: the test registry is not a trusted one, and
/// Windows pods here carry no gMSA.
async fn remove_sample_policies(client: &kube::Client) -> Result<()> {
    let policies = Api::<DynamicObject>::all_with(
        client.clone(),
        &ApiResource::from_gvk(&GroupVersionKind::gvk(
            "arcguard.io",
            "v1alpha1",
            "ClusterGuardPolicy",
        )),
    );
    for sample in policies.list(&ListParams::default()).await? {
        if let Some(name) = sample.metadata.name.as_deref() {
            policies.delete(name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn private_images_are_read_with_image_pull_secrets() {
    let registry = Registry::start_private().await.expect("the private registry starts");
    let ca = format!("--registry-ca={}", registry.ca_path.display());
    let cluster =
        Cluster::start(ClusterOptions::with_args(&[&ca])).await.expect("the cluster starts");
    let result = private(&cluster, &registry)
        .await
        .map_err(|e| anyhow!("{e:#}\n\nregistry log:\n{}", registry.log_tail(30)));
    cluster.check(result);
}

#[tokio::test]
async fn private_images_behind_a_token_service_are_read_with_image_pull_secrets() {
    let registry = Registry::start_token().await.expect("the registry and its token service start");
    let ca = format!("--registry-ca={}", registry.ca_path.display());
    let cluster =
        Cluster::start(ClusterOptions::with_args(&[&ca])).await.expect("the cluster starts");
    let result = async {
        private(&cluster, &registry).await?;
        // arcguard asked the token service for a pull of the one repository, and nothing
        // more; with the imagePullSecret's user, or without a credential.
        let service = registry.token_service.as_ref().context("a token registry")?;
        let asked = service.asked();
        ensure!(!asked.is_empty(), "arcguard never asked the token service");
        for request in &asked {
            ensure!(
                request.scopes == ["repository:private/app:pull"],
                "asked for {:?}",
                request.scopes
            );
        }
        let user = service.user().0;
        ensure!(
            asked.iter().any(|r| r.user.as_deref() == Some(user.as_str()))
                && asked.iter().any(|r| r.user.is_none()),
            "asked with and without the secret: {asked:?}"
        );
        Ok(())
    }
    .await
    .map_err(|e: anyhow::Error| anyhow!("{e:#}\n\nregistry log:\n{}", registry.log_tail(30)));
    cluster.check(result);
}

async fn private(cluster: &Cluster, registry: &Registry) -> Result<()> {
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    let client = cluster.client().await?;
    remove_sample_policies(&client).await?;
    let host = &registry.host;
    let digest = registry.push_image("private/app", "1", ("linux", "amd64"), "private").await?;
    let image = format!("{host}/private/app:1");
    let ns = namespace(&client, "private", &[]).await?;
    let other = namespace(&client, "private", &[]).await?;
    apply(
        &client,
        &json!({
            "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
            "metadata": {"name": "private"},
            "spec": {"match": {"namespaces": [ns, other]},
                     "imageProvenance": {"registries": [format!("{host}/private")]}}
        }),
    )
    .await?;
    let config = registry.docker_config().context("a private registry has credentials")?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "pull"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config},
    }))?;
    Api::<Secret>::namespaced(client.clone(), &ns).create(&PostParams::default(), &secret).await?;
    let account: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "puller"}, "imagePullSecrets": [{"name": "pull"}]}),
    )?;
    Api::<ServiceAccount>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &account)
        .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

    // Without credentials the registry refuses the pull, and so does arcguard.
    let dry_run = PostParams { dry_run: true, ..PostParams::default() };
    eventually(PROPAGATION, || async {
        let message = denial(&pods.create(&dry_run, &pod("anonymous", &image, &json!({}))?).await);
        ensure!(
            message.contains("the registry refused an anonymous pull"),
            "a private image without imagePullSecrets: {message}"
        );
        Ok(())
    })
    .await
    .context("the private-registry policy did not take effect")?;

    // With the pod's imagePullSecret, and through its service account's.
    let created = pods
        .create(
            &PostParams::default(),
            &pod("with-secret", &image, &json!({"imagePullSecrets": [{"name": "pull"}]}))?,
        )
        .await?;
    ensure!(image_of(&created) == format!("{image}@{digest}"), "stored {}", image_of(&created));
    let created = pods
        .create(
            &PostParams::default(),
            &pod("with-account", &image, &json!({"serviceAccountName": "puller"}))?,
        )
        .await?;
    ensure!(image_of(&created) == format!("{image}@{digest}"), "stored {}", image_of(&created));

    // What one namespace's credentials read is never answered to another without them.
    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), &other);
    let message = denial(
        &elsewhere
            .create(
                &PostParams::default(),
                &pod("borrowed", &image, &json!({"imagePullSecrets": [{"name": "pull"}]}))?,
            )
            .await,
    );
    ensure!(
        message.contains("the registry refused an anonymous pull"),
        "another namespace: {message}"
    );
    Ok(())
}
