//! Installing arcguard as a user would, with the real tools against the real apiserver: once
//! with `kubectl apply -k manifests/`, once with `helm install charts/arcguard`. Everything is
//! installed but a running Deployment (there is no kubelet): arcguard runs as a local process
//! with a token of the ServiceAccount the install created, so it has exactly the installed RBAC,
//! and the webhooks the install registered call it (their clientConfig pointed at its URL: a
//! kustomize patch, or the chart's `webhooks.url`). Then the documented uninstall order.
//!
//! Both scenarios run an admission load (a trusted pod created, dry-run, every 50 ms in
//! `default`, which arcguard inspects) from before the install until after the uninstall: the
//! webhooks are installed failing open, so nothing fails while nothing answers; arcguard's
//! leader sets them to `Fail` once it is ready (the time is printed), enforcement then starts;
//! and the uninstall in the documented order (webhooks first) fails nothing either.

#[path = "../../tests/monitoring/queries.rs"]
mod queries;

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use arcguard_e2e::UNTRUSTED_MESSAGE;
use arcguard_e2e::arcguard::{Arcguard, NAMESPACE};
use arcguard_e2e::cluster::repo_root;
use arcguard_e2e::controlplane::ControlPlane;
use arcguard_e2e::eventually;
use arcguard_e2e::failure_policy::{failure_policies, wait_for_failure_policy};
use arcguard_e2e::load::{Load, Report, TRUSTED_IMAGE};
use arcguard_e2e::tools::Cli;
use serde_json::Value;

/// Time between two requests of the admission load that runs through install and uninstall.
const LOAD_INTERVAL: Duration = Duration::from_millis(50);

/// The scenario's control plane, arcguard (not started) and tools.
struct Setup {
    // Dropped first: arcguard stops before the control plane.
    arcguard: Arcguard,
    control_plane: ControlPlane,
    kubectl: Cli,
}

impl Setup {
    async fn start() -> Result<Self> {
        let control_plane = ControlPlane::start().await.context("starting the control plane")?;
        let kubectl = Cli::kubectl(&control_plane.kubeconfig, control_plane.dir())?;
        eprintln!("[e2e] {}", kubectl.version()?.lines().next().unwrap_or_default());
        // What a cluster with Windows gMSA and Calico has before arcguard: the sample gMSA
        // policy needs the GMSACredentialSpec CRD for arcguard to be ready.
        kubectl.run(&["apply", "-f", "e2e/manifests/stand-in-crds.yaml"])?;
        let arcguard = Arcguard::new(
            "install-0",
            control_plane.dir().join("arcguard.kubeconfig"),
            control_plane.dir().join("arcguard.log"),
            &[],
        )?;
        Ok(Self { arcguard, control_plane, kubectl })
    }

    fn diagnostics(&self) -> String {
        format!("{}{}", self.arcguard.log_tail(60), self.control_plane.diagnostics(30))
    }

    fn check(&self, result: Result<()>) {
        if let Err(error) = result {
            panic!("{error:#}\n\n{}", self.diagnostics());
        }
    }

    /// Starts arcguard with a token of the installed ServiceAccount, waits until it is ready
    /// (its certificate in the installed webhooks' caBundle) and then until its leader has set
    /// every webhook's failurePolicy to the annotated Fail. Returns both times from the start.
    async fn start_arcguard(&mut self) -> Result<(Duration, Duration)> {
        let token = self.kubectl.run(&[
            "create",
            "token",
            "arcguard",
            "--namespace",
            NAMESPACE,
            "--duration=24h",
        ])?;
        let kubeconfig = self.control_plane.dir().join("arcguard.kubeconfig");
        self.control_plane.write_token_kubeconfig(&kubeconfig, token.trim())?;
        let started = std::time::Instant::now();
        self.arcguard.start().await?;
        self.arcguard.wait_ready(Duration::from_secs(90)).await?;
        let ready = started.elapsed();
        let client = self.control_plane.client().await?;
        wait_for_failure_policy(&client, "Fail", Duration::from_secs(30)).await?;
        Ok((ready, started.elapsed()))
    }

    /// A base kustomization over `manifests/` in the scratch folder whose only change is the
    /// webhooks' clientConfig: arcguard's URL. `components` are added from
    /// `manifests/components`.
    fn overlay(&self, name: &str, components: &[&str]) -> Result<String> {
        let dir = self.control_plane.dir().join(name);
        std::fs::create_dir_all(&dir)?;
        let dir = std::fs::canonicalize(dir)?;
        let root = std::fs::canonicalize(repo_root())?;
        let up = "../".repeat(dir.components().count().saturating_sub(1));
        let from = |p: &Path| format!("{up}{}", p.strip_prefix("/").unwrap_or(p).display());
        let mut patches = String::new();
        for (kind, hooks) in [
            ("ValidatingWebhookConfiguration", &["/validate", "/validate"][..]),
            ("MutatingWebhookConfiguration", &["/mutate"][..]),
        ] {
            patches.push_str(&format!(
                "  - target: {{kind: {kind}, name: arcguard}}\n    patch: |-\n"
            ));
            for (i, path) in hooks.iter().enumerate() {
                patches.push_str(&format!(
                    "      - {{op: replace, path: /webhooks/{i}/clientConfig, value: {{url: \"{}{path}\"}}}}\n",
                    self.arcguard.url()
                ));
            }
        }
        let yaml = format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\ncomponents:\n{}patches:\n{patches}",
            from(&root.join("manifests")),
            components
                .iter()
                .map(|c| format!("  - {}\n", from(&root.join("manifests/components").join(c))))
                .collect::<String>(),
        );
        std::fs::write(dir.join("kustomization.yaml"), yaml)?;
        Ok(dir.display().to_string())
    }
}

/// What every install must have created, checked with kubectl.
fn check_installed(kubectl: &Cli) -> Result<()> {
    kubectl.run(&[
        "wait",
        "--for=condition=Established",
        "crd/clusterguardpolicies.arcguard.io",
        "crd/guardpolicies.arcguard.io",
        "--timeout=60s",
    ])?;
    for object in [
        "serviceaccount/arcguard",
        "role/arcguard",
        "rolebinding/arcguard",
        "deployment/arcguard",
        "poddisruptionbudget/arcguard",
        "service/arcguard",
    ] {
        kubectl.run(&["get", "--namespace", NAMESPACE, object, "-o", "name"])?;
    }
    for object in [
        "clusterrole/arcguard",
        "clusterrolebinding/arcguard",
        "validatingwebhookconfiguration/arcguard",
        "mutatingwebhookconfiguration/arcguard",
    ] {
        kubectl.run(&["get", object, "-o", "name"])?;
    }
    let deployment: Value = serde_json::from_str(&kubectl.run(&[
        "get",
        "--namespace",
        NAMESPACE,
        "deployment/arcguard",
        "-o",
        "json",
    ])?)?;
    ensure!(deployment["spec"]["replicas"] == 2, "{}", deployment["spec"]);
    // The installed RBAC, as the apiserver evaluates it for arcguard's ServiceAccount.
    let account = format!("--as=system:serviceaccount:{NAMESPACE}:arcguard");
    for (verb, resource, namespace, expected) in [
        ("watch", "clusterguardpolicies.arcguard.io", "", "yes"),
        ("patch", "guardpolicies.arcguard.io --subresource=status", "", "yes"),
        ("create", "clusterguardpolicies.arcguard.io", "", "no"),
        ("patch", "pods", "default", "yes"),
        ("delete", "pods", "default", "no"),
        ("update", "secrets/arcguard-tls", NAMESPACE, "yes"),
        // imageProvenance reads the imagePullSecrets pods name, by name only (rule 16).
        ("get", "secrets/other", "default", "yes"),
        ("list", "secrets", "default", "no"),
        ("watch", "secrets", "default", "no"),
        ("update", "secrets/other", NAMESPACE, "no"),
        ("patch", "validatingwebhookconfigurations/arcguard", "", "yes"),
        ("patch", "validatingwebhookconfigurations/other", "", "no"),
        ("update", "leases.coordination.k8s.io/arcguard", NAMESPACE, "yes"),
    ] {
        let mut args = vec!["auth", "can-i", verb];
        args.extend(resource.split(' '));
        args.push(account.as_str());
        if !namespace.is_empty() {
            args.extend(["--namespace", namespace]);
        }
        let answer = match kubectl.run(&args) {
            Ok(out) => out,
            // `no` exits 1 with the answer on stdout.
            Err(error) => error.to_string(),
        };
        let said = if answer.contains("yes") { "yes" } else { "no" };
        ensure!(said == expected, "can arcguard {verb} {resource} in {namespace:?}: {answer}");
    }
    Ok(())
}

/// Every field of both policy CRDs (from `manifests/base/crds.yaml`) with its description.
fn crd_fields() -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(repo_root().join("manifests/base/crds.yaml"))?;
    let mut out = Vec::new();
    fn walk(schema: &Value, at: &str, out: &mut Vec<(String, String)>) {
        for (name, field) in schema["properties"].as_object().into_iter().flatten() {
            let path = format!("{at}.{name}");
            if let Some(description) = field["description"].as_str() {
                out.push((path.clone(), description.to_owned()));
            }
            walk(field, &path, out);
            walk(&field["items"], &path, out);
        }
    }
    for document in serde_yaml::Deserializer::from_str(&text) {
        let crd: Value = serde::Deserialize::deserialize(document)?;
        if crd.is_null() {
            continue;
        }
        let plural = crd["spec"]["names"]["plural"].as_str().ok_or_else(|| anyhow!("plural"))?;
        for version in crd["spec"]["versions"].as_array().into_iter().flatten() {
            walk(&version["schema"]["openAPIV3Schema"], plural, &mut out);
        }
    }
    Ok(out)
}

/// `kubectl explain` of every ClusterGuardPolicy and GuardPolicy field shows its description.
fn check_explain(kubectl: &Cli) -> Result<usize> {
    let fields = crd_fields()?;
    ensure!(fields.len() >= 60, "only {} fields", fields.len());
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let problems: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = fields
            .chunks(fields.len().div_ceil(4))
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .filter_map(|(path, description)| match kubectl.run(&["explain", path]) {
                            Ok(out) if words(&out).contains(&words(description)) => None,
                            Ok(out) => Some(format!("{path}: {description:?} not in\n{out}")),
                            Err(error) => Some(format!("{path}: {error}")),
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_default()).collect()
    });
    ensure!(problems.is_empty(), "kubectl explain:\n{}", problems.join("\n"));
    Ok(fields.len())
}

/// arcguard, as installed, enforces: an untrusted pod is refused through kubectl.
fn check_enforcing(kubectl: &Cli) -> Result<()> {
    let stderr = kubectl.run_failing(&[
        "run",
        "probe",
        "--namespace=default",
        "--image=docker.io/library/busybox:1",
        "--dry-run=server",
    ])?;
    ensure!(stderr.contains(UNTRUSTED_MESSAGE), "{stderr}");
    Ok(())
}

/// Both webhook configurations still carry the caBundle arcguard injected.
fn check_ca_bundle(kubectl: &Cli) -> Result<()> {
    for kind in ["validatingwebhookconfiguration", "mutatingwebhookconfiguration"] {
        let bundle = kubectl.run(&[
            "get",
            &format!("{kind}/arcguard"),
            "-o",
            "jsonpath={.webhooks[*].clientConfig.caBundle}",
        ])?;
        let bundles: Vec<_> = bundle.split_whitespace().collect();
        ensure!(!bundles.is_empty() && bundles.iter().all(|b| b.len() > 100), "{kind}: {bundle:?}");
    }
    Ok(())
}

/// Every webhook of both configurations has `policy` now.
async fn check_failure_policy(client: &kube::Client, policy: &str) -> Result<()> {
    let policies = failure_policies(client).await?;
    ensure!(policies.len() == 3 && policies.iter().all(|p| p == policy), "{policies:?}");
    Ok(())
}

/// How many times arcguard's leader has set the webhooks' failurePolicy, from its log.
fn failure_policy_writes(arcguard: &Arcguard) -> usize {
    arcguard.log_text().matches("set the annotated failurePolicy").count()
}

/// After a re-apply of the manifests (which say `Ignore`): every webhook is `Fail` again within
/// seconds; prints how long that took and how often the leader had to set it back (`writes`
/// counted before the re-apply).
async fn after_reapply(
    client: &kube::Client,
    arcguard: &Arcguard,
    writes: usize,
    what: &str,
) -> Result<()> {
    let again = wait_for_failure_policy(client, "Fail", Duration::from_secs(10)).await?;
    eprintln!(
        "[e2e] after {what}: all Fail within {} ms; the leader set it back in {} configuration(s) so far",
        again.as_millis(),
        failure_policy_writes(arcguard).saturating_sub(writes)
    );
    Ok(())
}

/// The load's report, failing on any failed request.
fn check_no_failures(load: Load, what: &str) -> Result<Report> {
    let report = load.stop()?;
    eprintln!("[e2e] {what}: admission load {report}");
    ensure!(report.requests >= 50, "too few requests to tell: {report}");
    ensure!(report.failures.is_empty(), "requests failed during {what}: {report}");
    Ok(report)
}

/// The alerts' and the dashboard's metrics, against `arcguard serve --cluster`'s /metrics.
async fn check_metrics(arcguard: &Arcguard) -> Result<()> {
    let text = arcguard.metrics().await?;
    let uses = queries::uses(&repo_root());
    let problems = queries::problems(&uses, &text, &[]);
    ensure!(problems.is_empty(), "{}\n/metrics:\n{text}", problems.join("\n"));
    Ok(())
}

#[tokio::test]
async fn kubectl_apply_k_installs_arcguard_which_then_enforces_and_uninstalls_in_order() {
    let mut setup = Setup::start().await.expect("the control plane starts");
    let result = kustomize_install(&mut setup).await;
    setup.check(result);
}

async fn kustomize_install(setup: &mut Setup) -> Result<()> {
    let kubectl = setup.kubectl.clone();
    let client = setup.control_plane.client().await?;
    let load = Load::start(&setup.control_plane.kubeconfig, "default", LOAD_INTERVAL);
    let applied = kubectl.run(&["apply", "-k", "manifests/"])?;
    ensure!(applied.lines().count() >= 13, "{applied}");
    check_installed(&kubectl)?;
    let explained = check_explain(&kubectl)?;
    eprintln!("[e2e] kubectl explain described {explained} policy fields");
    check_failure_policy(&client, "Ignore").await?;

    // The webhooks at arcguard's URL, before arcguard runs: nothing answers, they fail open,
    // and the apiserver counts the calls that failed open.
    let url_only = setup.overlay("url-only", &[])?;
    kubectl.run(&["apply", "-k", &url_only])?;
    let image = format!("--image={TRUSTED_IMAGE}");
    kubectl.run(&["run", "probe", "--namespace=default", &image, "--dry-run=server"])?;
    let apiserver_metrics = kubectl.run(&["get", "--raw", "/metrics"])?;
    ensure!(
        apiserver_metrics.lines().any(|l| {
            l.starts_with("apiserver_admission_webhook_fail_open_count{")
                && l.contains(r#".arcguard.io""#)
        }),
        "the apiserver did not count the webhook calls that failed open"
    );

    let before = load.requests();
    let (ready, fail) = setup.start_arcguard().await?;
    eprintln!(
        "[e2e] kubectl install: {before} requests before arcguard started; ready {} ms after its start, failurePolicy Fail {} ms after its start",
        ready.as_millis(),
        fail.as_millis()
    );
    // The sample policies through arcguard's own policies webhook (kubectl apply of the whole
    // tree again: the injected caBundle must survive it; failurePolicy, which the manifests
    // set to Ignore, is set back by the leader).
    let with_policies = setup.overlay("with-policies", &["policies"])?;
    let writes = failure_policy_writes(&setup.arcguard);
    eventually(Duration::from_secs(30), || async { kubectl.run(&["apply", "-k", &with_policies]) })
        .await?;
    after_reapply(&client, &setup.arcguard, writes, "kubectl apply -k").await?;
    let policies = kubectl.run(&["get", "clusterguardpolicies", "-o", "name"])?;
    ensure!(policies.lines().count() == 3, "{policies}");
    check_ca_bundle(&kubectl)?;
    eventually(Duration::from_secs(30), || async { check_enforcing(&kubectl) }).await?;
    let writes = failure_policy_writes(&setup.arcguard);
    kubectl.run(&["apply", "--server-side", "--force-conflicts", "-k", &with_policies])?;
    let what = "kubectl apply --server-side --force-conflicts -k";
    after_reapply(&client, &setup.arcguard, writes, what).await?;
    check_ca_bundle(&kubectl)?;
    check_metrics(&setup.arcguard).await?;

    // Uninstall as manifests/README.md says: the webhook configurations first.
    kubectl.run(&["delete", "validatingwebhookconfiguration", "arcguard"])?;
    kubectl.run(&["delete", "mutatingwebhookconfiguration", "arcguard"])?;
    // Nothing enforces any more, and nothing fails closed.
    kubectl.run(&["run", "probe", "--namespace=default", "--image=nginx", "--dry-run=server"])?;
    setup.arcguard.stop().await;
    // No controller-manager here to finish the namespace's deletion: do not wait for it.
    kubectl.run(&["delete", "-k", "manifests/", "--wait=false", "--ignore-not-found"])?;
    eventually(Duration::from_secs(30), || async {
        let left = kubectl.run(&["get", "crd", "-o", "name"])?;
        ensure!(!left.contains("arcguard.io"), "CRDs left: {left}");
        Ok(())
    })
    .await?;
    let left = kubectl.run(&["get", "clusterrole,clusterrolebinding", "-o", "name"])?;
    ensure!(!left.lines().any(|l| l.ends_with("/arcguard")), "{left}");
    check_no_failures(load, "kubectl install and uninstall")?;
    Ok(())
}

#[tokio::test]
async fn helm_install_installs_arcguard_which_then_enforces_and_uninstalls_in_order() {
    let mut setup = Setup::start().await.expect("the control plane starts");
    let result = helm_install(&mut setup).await;
    setup.check(result);
}

async fn helm_install(setup: &mut Setup) -> Result<()> {
    let kubectl = setup.kubectl.clone();
    let helm = Cli::helm(&setup.control_plane.kubeconfig, setup.control_plane.dir())?;
    eprintln!("[e2e] {}", helm.version()?.trim());
    let client = setup.control_plane.client().await?;
    let load = Load::start(&setup.control_plane.kubeconfig, "default", LOAD_INTERVAL);
    let url = format!("webhooks.url={}", setup.arcguard.url());
    let installed = helm.run(&[
        "install",
        "arcguard",
        "charts/arcguard",
        "--namespace",
        NAMESPACE,
        "--create-namespace",
        "--set",
        &url,
    ])?;
    ensure!(installed.contains("STATUS: deployed"), "{installed}");
    check_installed(&kubectl)?;
    // Spot checks; the kustomize scenario explains every field of the same CRDs.
    for field in
        ["clusterguardpolicies.spec.trustedRegistries.registries", "guardpolicies.spec.match"]
    {
        let out = kubectl.run(&["explain", field])?;
        ensure!(out.contains("DESCRIPTION"), "{out}");
    }
    // Installed failing open while nothing answers.
    check_failure_policy(&client, "Ignore").await?;
    let image = format!("--image={TRUSTED_IMAGE}");
    kubectl.run(&["run", "probe", "--namespace=default", &image, "--dry-run=server"])?;

    let before = load.requests();
    let (ready, fail) = setup.start_arcguard().await?;
    eprintln!(
        "[e2e] helm install: {before} requests before arcguard started; ready {} ms after its start, failurePolicy Fail {} ms after its start",
        ready.as_millis(),
        fail.as_millis()
    );
    // The samples once arcguard is Ready, as the chart's NOTES say; caBundle survives the upgrade.
    let writes = failure_policy_writes(&setup.arcguard);
    let upgraded = helm.run(&[
        "upgrade",
        "arcguard",
        "charts/arcguard",
        "--namespace",
        NAMESPACE,
        "--reuse-values",
        "--set",
        "policies.samples=true",
    ])?;
    ensure!(upgraded.contains("STATUS: deployed"), "{upgraded}");
    after_reapply(&client, &setup.arcguard, writes, "helm upgrade").await?;
    let policies = kubectl.run(&["get", "clusterguardpolicies", "-o", "name"])?;
    ensure!(policies.lines().count() == 3, "{policies}");
    check_ca_bundle(&kubectl)?;
    eventually(Duration::from_secs(30), || async { check_enforcing(&kubectl) }).await?;
    eventually(Duration::from_secs(30), || async {
        ensure!(setup.arcguard.is_ready().await, "arcguard not ready after the upgrade");
        Ok(())
    })
    .await?;

    // Uninstall as the chart's NOTES say: the webhook configurations first, then the release.
    kubectl.run(&[
        "delete",
        "validatingwebhookconfiguration,mutatingwebhookconfiguration",
        "arcguard",
    ])?;
    kubectl.run(&["run", "probe", "--namespace=default", "--image=nginx", "--dry-run=server"])?;
    setup.arcguard.stop().await;
    let uninstalled = helm.run(&["uninstall", "arcguard", "--namespace", NAMESPACE])?;
    ensure!(uninstalled.contains("uninstalled"), "{uninstalled}");
    let left = kubectl.run(&[
        "get",
        "clusterrole,clusterrolebinding,deployment,service",
        "-A",
        "-o",
        "name",
    ])?;
    ensure!(!left.lines().any(|l| l.ends_with("/arcguard")), "{left}");
    // The CRDs stay (helm.sh/resource-policy: keep); the release's sample policies went.
    kubectl.run(&[
        "get",
        "crd",
        "clusterguardpolicies.arcguard.io",
        "guardpolicies.arcguard.io",
    ])?;
    let policies = kubectl.run(&["get", "clusterguardpolicies", "-o", "name"])?;
    ensure!(policies.trim().is_empty(), "{policies}");
    check_no_failures(load, "helm install and uninstall")?;
    Ok(())
}
