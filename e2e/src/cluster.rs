//! A whole test cluster: control plane, CRDs, arcguard and its webhooks, ready to enforce.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::discovery::Scope;
use kube::runtime::wait::{await_condition, conditions};
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::arcguard::{Arcguard, NAMESPACE};
use crate::controlplane::ControlPlane;

/// The repository root.
#[must_use]
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The field manager of everything the suite applies.
pub const FIELD_MANAGER: &str = "arcguard-e2e";

/// The pod name of the replica the webhooks call.
pub const IDENTITY: &str = "e2e-0";

/// The part of arcguard's denial that says an image is untrusted.
pub const UNTRUSTED_MESSAGE: &str = "which is not from a trusted registry";

/// How a [`Cluster`] is set up.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Appended to arcguard's command line.
    pub arcguard_args: Vec<String>,
    /// Wait until arcguard is ready, install `manifests/components/policies` and wait until
    /// arcguard enforces them. Off: return as soon as arcguard answers `/healthz`.
    pub ready: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self { arcguard_args: Vec::new(), ready: true }
    }
}

impl ClusterOptions {
    /// The defaults with these arcguard arguments.
    #[must_use]
    pub fn with_args(args: &[&str]) -> Self {
        Self { arcguard_args: args.iter().map(|a| (*a).to_owned()).collect(), ..Self::default() }
    }
}

/// etcd, kube-apiserver and arcguard, with arcguard's webhooks registered. Dropping it stops
/// everything and removes the scratch folder.
#[derive(Debug)]
pub struct Cluster {
    /// arcguard (stopped first on drop).
    pub arcguard: Arcguard,
    /// etcd and kube-apiserver.
    pub control_plane: ControlPlane,
}

impl Cluster {
    /// Starts everything and waits until arcguard enforces.
    ///
    /// # Errors
    /// When any step fails; the message carries the relevant logs.
    pub async fn start(options: ClusterOptions) -> Result<Self> {
        let started = Instant::now();
        let control_plane = ControlPlane::start().await.context("starting the control plane")?;
        let client = control_plane.client().await?;
        let crds = std::fs::read_to_string(repo_root().join("manifests/base/crds.yaml"))?;
        let mut names = apply_yaml(&client, &crds).await.context("installing arcguard's CRDs")?;
        names.extend(
            apply_yaml(&client, include_str!("../manifests/stand-in-crds.yaml"))
                .await
                .context("installing the gMSA and Calico CRDs")?,
        );
        let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
        for name in names.iter().filter_map(|o| o.metadata.name.as_deref()) {
            tokio::time::timeout(
                Duration::from_secs(60),
                await_condition(crd_api.clone(), name, conditions::is_crd_established()),
            )
            .await
            .with_context(|| format!("CRD {name} not established within 60s"))??;
        }
        let kubeconfig = service_account_kubeconfig(&control_plane, &client).await?;
        let log = control_plane.dir().join("arcguard.log");
        let arcguard = Arcguard::new(IDENTITY, kubeconfig, log, &options.arcguard_args)?;
        for configuration in webhook_configurations(&arcguard.url())? {
            apply(&client, &configuration).await.context("registering the webhooks")?;
        }
        let mut cluster = Self { arcguard, control_plane };
        cluster.arcguard.start().await?;
        if options.ready {
            cluster.arcguard.wait_ready(Duration::from_secs(90)).await?;
            // The webhooks are applied failing open; scenarios that stop arcguard expect the
            // Fail its leader sets once ready.
            crate::failure_policy::wait_for_failure_policy(
                &client,
                "Fail",
                Duration::from_secs(30),
            )
            .await
            .map_err(|e| anyhow!("{e:#}\n{}", cluster.diagnostics()))?;
            cluster.install_sample_policies(&client).await?;
            wait_for_enforcement(&client, Duration::from_secs(60))
                .await
                .map_err(|e| anyhow!("{e:#}\n{}", cluster.diagnostics()))?;
        }
        eprintln!(
            "[e2e] cluster ready in {:.1}s: apiserver https://127.0.0.1:{}, arcguard {}, folder {}",
            started.elapsed().as_secs_f64(),
            cluster.control_plane.port,
            cluster.arcguard.url(),
            cluster.control_plane.dir().display()
        );
        Ok(cluster)
    }

    /// A new admin client (one per test: a client belongs to the runtime it first ran on).
    ///
    /// # Errors
    /// When the kubeconfig cannot be used.
    pub async fn client(&self) -> Result<kube::Client> {
        self.control_plane.client().await
    }

    /// The ends of arcguard's and the apiserver's logs, for failure messages.
    #[must_use]
    pub fn diagnostics(&self) -> String {
        format!("{}{}", self.arcguard.log_tail(80), self.control_plane.diagnostics(40))
    }

    /// Panics with the diagnostics when a scenario failed.
    pub fn check(&self, result: Result<()>) {
        if let Err(error) = result {
            panic!("{error:#}\n\n{}", self.diagnostics());
        }
    }

    /// Applies the sample policies (retrying while the fail-closed policies webhook is not
    /// reachable yet).
    ///
    /// # Errors
    /// When a policy is still refused after a minute.
    pub async fn install_sample_policies(&self, client: &kube::Client) -> Result<()> {
        let dir = repo_root().join("manifests/components/policies");
        let kustomization: Value =
            serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)?;
        let files = kustomization["resources"].as_array().cloned().unwrap_or_default();
        for file in files.iter().filter_map(Value::as_str) {
            let yaml = std::fs::read_to_string(dir.join(file))?;
            eventually(Duration::from_secs(60), || apply_yaml(client, &yaml))
                .await
                .with_context(|| format!("applying {file}"))?;
        }
        Ok(())
    }
}

/// arcguard's namespace and the shipped RBAC, and a kubeconfig for arcguard's ServiceAccount
/// (a day's token) in the control plane's folder: arcguard runs as that account, so a call the
/// RBAC does not grant fails here as it would in a cluster. Returns the kubeconfig's path.
///
/// # Errors
/// The apiserver's answer, or a file that cannot be read or written.
pub async fn service_account_kubeconfig(
    control_plane: &ControlPlane,
    client: &kube::Client,
) -> Result<PathBuf> {
    apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
    )
    .await?;
    apply_yaml(client, &std::fs::read_to_string(repo_root().join("manifests/base/rbac.yaml"))?)
        .await
        .context("installing arcguard's RBAC")?;
    let token = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create_token_request(
            "arcguard",
            &PostParams::default(),
            &serde_json::from_value(json!({"spec": {"expirationSeconds": 86400}}))?,
        )
        .await
        .context("requesting a token for arcguard's ServiceAccount")?
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| anyhow!("the TokenRequest returned no token"))?;
    let kubeconfig = control_plane.dir().join("arcguard.kubeconfig");
    control_plane.write_token_kubeconfig(&kubeconfig, &token)?;
    Ok(kubeconfig)
}

/// The cluster shared by the tests of one test binary, started on first use and stopped when
/// the binary exits. Scenarios on it use their own namespaces and policies scoped to them.
///
/// # Panics
/// When the cluster cannot be started (every test using it fails with the reason).
pub fn shared() -> &'static Cluster {
    static SHARED: OnceLock<std::result::Result<Cluster, String>> = OnceLock::new();
    let cluster = SHARED.get_or_init(|| {
        // Its own runtime on its own thread: the tests' runtimes come and go.
        std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime
                .block_on(Cluster::start(ClusterOptions::default()))
                .map_err(|e| format!("{e:#}"))
        })
        .join()
        .unwrap_or_else(|_| Err("starting the shared cluster panicked".to_owned()))
    });
    match cluster {
        Ok(cluster) => cluster,
        Err(error) => panic!("the shared cluster did not start: {error}"),
    }
}

/// arcguard's Validating- and MutatingWebhookConfiguration exactly as in
/// `manifests/base/webhooks.yaml`, except that every `clientConfig` is a URL under `base`
/// (same path as the Service reference it replaces).
///
/// # Errors
/// When the manifest cannot be read or lacks a service path.
pub fn webhook_configurations(base: &str) -> Result<Vec<Value>> {
    let yaml = std::fs::read_to_string(repo_root().join("manifests/base/webhooks.yaml"))?;
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&yaml) {
        let mut configuration = Value::deserialize(document)?;
        if configuration.is_null() {
            continue;
        }
        let webhooks = configuration["webhooks"]
            .as_array_mut()
            .ok_or_else(|| anyhow!("a webhook configuration without webhooks"))?;
        for webhook in webhooks {
            let path = webhook["clientConfig"]["service"]["path"]
                .as_str()
                .ok_or_else(|| anyhow!("webhook {} has no service path", webhook["name"]))?
                .to_owned();
            webhook["clientConfig"] = json!({"url": format!("{base}{path}")});
        }
        out.push(configuration);
    }
    if out.len() != 2 {
        bail!("expected two webhook configurations, found {}", out.len());
    }
    Ok(out)
}

/// Server-side applies one object (any kind the apiserver serves); namespaced objects without
/// a namespace go to `default`.
///
/// # Errors
/// The apiserver's answer.
pub async fn apply(client: &kube::Client, object: &Value) -> Result<DynamicObject> {
    let api_version = object["apiVersion"].as_str().ok_or_else(|| anyhow!("no apiVersion"))?;
    let kind = object["kind"].as_str().ok_or_else(|| anyhow!("no kind"))?;
    let name = object["metadata"]["name"].as_str().ok_or_else(|| anyhow!("no name"))?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("discovering {api_version} {kind}"))?;
    let api: Api<DynamicObject> = if capabilities.scope == Scope::Namespaced {
        let namespace = object["metadata"]["namespace"].as_str().unwrap_or("default");
        Api::namespaced_with(client.clone(), namespace, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    };
    api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(object))
        .await
        .with_context(|| format!("applying {kind} {name}"))
}

/// Applies every document of a YAML stream, in order.
///
/// # Errors
/// The first failure.
pub async fn apply_yaml(client: &kube::Client, yaml: &str) -> Result<Vec<DynamicObject>> {
    let mut applied = Vec::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let object = Value::deserialize(document)?;
        if !object.is_null() {
            applied.push(apply(client, &object).await?);
        }
    }
    Ok(applied)
}

/// Retries `attempt` every 250 ms until it succeeds or `timeout` passes (then its last error).
///
/// # Errors
/// The last error.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if start.elapsed() > timeout => {
                return Err(error.context(format!("still failing after {timeout:?}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Retries a dry-run create of an untrusted pod in `default` until arcguard's denial comes
/// back: then the apiserver calls arcguard and trusts its certificate.
///
/// # Errors
/// After `timeout`, with the last answer.
pub async fn wait_for_enforcement(client: &kube::Client, timeout: Duration) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let probe = pod("probe", "docker.io/library/busybox:probe");
    let params = PostParams { dry_run: true, ..PostParams::default() };
    eventually(timeout, || async {
        match pods.create(&params, &probe).await {
            Err(kube::Error::Api(status)) if status.message.contains(UNTRUSTED_MESSAGE) => Ok(()),
            Err(error) => Err(anyhow!("the probe was not answered by arcguard: {error}")),
            Ok(_) => Err(anyhow!("the untrusted probe pod was admitted")),
        }
    })
    .await
}

/// Creates a namespace `<prefix>-<n>` with `labels` and returns its name.
///
/// # Errors
/// The apiserver's answer.
pub async fn namespace(
    client: &kube::Client,
    prefix: &str,
    labels: &[(&str, &str)],
) -> Result<String> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("{prefix}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let labels: serde_json::Map<String, Value> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    let object: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &object).await?;
    Ok(name)
}

/// A Linux pod with one container.
///
/// # Panics
/// Never: the JSON is a valid Pod.
#[must_use]
pub fn pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": image}]}
    }))
    .expect("a valid pod")
}

/// The message of an apiserver error, or a description of the success that was not expected.
#[must_use]
pub fn denial<T: std::fmt::Debug>(result: &kube::Result<T>) -> String {
    match result {
        Err(kube::Error::Api(status)) => status.message.clone(),
        Err(other) => format!("(not an API error) {other}"),
        Ok(_) => "(admitted)".to_owned(),
    }
}

/// The API of a Calico kind (`projectcalico.org/v3` or `crd.projectcalico.org/v1`), in `ns`
/// or cluster-wide.
#[must_use]
pub fn calico_api(
    client: &kube::Client,
    api_version: &str,
    kind: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// Applies the OpenReports CRDs of `manifests/components/reports`, so the audit writes reports.
///
/// # Errors
/// When a file cannot be read or applied.
pub async fn install_report_crds(client: &kube::Client) -> Result<()> {
    for file in ["openreports.io_reports.yaml", "openreports.io_clusterreports.yaml"] {
        let path = repo_root().join("manifests/components/reports").join(file);
        apply_yaml(client, &std::fs::read_to_string(path)?).await?;
    }
    Ok(())
}

/// For the audit scenarios: deletes the sample policies (what is judged is then the
/// scenario's own), and writes a `bad` (untrusted image) and a `good` pod in a new namespace
/// arcguard's webhooks skip, as pods written before any policy. Returns the namespace.
///
/// # Errors
/// The apiserver's answer.
pub async fn pods_before_policies(client: &kube::Client, prefix: &str) -> Result<String> {
    let policies: kube::Api<arcguard::policy::crd::ClusterGuardPolicy> =
        kube::Api::all(client.clone());
    for sample in ["trusted-registries", "windows-gmsa", "calico-linux-only"] {
        policies.delete(sample, &kube::api::DeleteParams::default()).await?;
    }
    let ns = namespace(client, prefix, &[("arcguard.io/ignore", "true")]).await?;
    let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &ns);
    let create = kube::api::PostParams::default();
    pods.create(&create, &pod("bad", "docker.io/library/nginx:1.27")).await?;
    pods.create(&create, &pod("good", "contoso.azurecr.io/team-a/app:1")).await?;
    Ok(ns)
}
