//! Scale benchmark of the background audit (issue 10), against a real kube-apiserver and etcd:
//! N namespaces × M Deployment-made-looking pods (default 100 × 100) written before any policy,
//! then arcguard started as its ServiceAccount with `--audit-interval 1h`. It measures the
//! audit the leader runs on taking the Lease and the one a policy edit triggers: wall time,
//! the leader's resident memory, the API requests it made (the apiserver's audit log) and the
//! report bytes written, and prints them as Markdown. `bench/audit-scale.sh` builds and runs
//! it; see BENCHMARKS.md.
//!
//! Exits 1 when an audit does not complete (or a report is written more than once per
//! namespace for one change); the peak RSS against the 64 MiB target is only reported.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::arcguard::{Arcguard, NAMESPACE};
use arcguard_e2e::cluster::{IDENTITY, repo_root, service_account_kubeconfig};
use arcguard_e2e::controlplane::{ARCGUARD_USER, ControlPlane};
use arcguard_e2e::{apply, apply_yaml, eventually, install_report_crds, namespace};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use serde_json::{Value, json};

/// The leader's peak RSS target of issue 10.
const RSS_TARGET_MIB: f64 = 64.0;
/// How often the leader's VmRSS is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The Deny policy (every namespace but arcguard's and kube-system).
const DENY_POLICY: &str = "scale-trusted-registries";
/// The Warn policy, edited in the policy-change step.
const WARN_POLICY: &str = "scale-trusted-registries-warn";
/// Registries both policies trust from the start.
const TRUSTED: [&str; 2] = ["contoso.azurecr.io", "mcr.microsoft.com/oss"];
/// The registry of the untrusted pods, which the policy change adds to the Warn policy (so
/// every namespace with an untrusted pod has a report whose content changes).
const UNTRUSTED_REGISTRY: &str = "docker.io/library";
/// The Deployments each namespace's pods belong to, in turn.
const APPS: [&str; 5] = ["checkout", "catalog", "cart", "payments", "search"];

/// The command line.
#[derive(Clone, Debug)]
struct Options {
    namespaces: usize,
    pods_per_namespace: usize,
    /// Pod creations in flight.
    concurrency: usize,
    /// One pod in this many has an untrusted image.
    bad_every: usize,
    /// How long each audit run may take to complete.
    timeout: Duration,
    /// Watched after the change-triggered run for further runs or report writes.
    quiet: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            namespaces: 100,
            pods_per_namespace: 100,
            concurrency: 32,
            bad_every: 10,
            timeout: Duration::from_secs(1200),
            quiet: Duration::from_secs(15),
        }
    }
}

/// `--help`.
const USAGE: &str = "usage: audit_scale [--namespaces N] [--pods-per-namespace M] [--concurrency C] [--bad-every K] [--timeout SECONDS] [--quiet SECONDS]

  --namespaces N          namespaces to create (default 100)
  --pods-per-namespace M  pods in each (default 100)
  --concurrency C         pod creations in flight (default 32)
  --bad-every K           one pod in K has an untrusted image (default 10)
  --timeout SECONDS       how long each audit run may take (default 1200)
  --quiet SECONDS         watched after the change-triggered run for more writes (default 15)

ARCGUARD_BIN selects the arcguard binary (default: a debug build); bench/audit-scale.sh sets it
to a release build.";

impl Options {
    /// The options from the arguments (without the program name).
    fn parse(args: impl Iterator<Item = String>) -> Result<Self> {
        let mut options = Self::default();
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            if arg == "-h" || arg == "--help" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
                None => (arg.clone(), None),
            };
            let value = match inline {
                Some(value) => value,
                None => args.next().ok_or_else(|| anyhow!("{flag} needs a value\n{USAGE}"))?,
            };
            let number = || -> Result<usize> {
                let n: usize =
                    value.parse().with_context(|| format!("{flag}: not a number: {value}"))?;
                ensure!(n > 0, "{flag} must be positive");
                Ok(n)
            };
            match flag.as_str() {
                "--namespaces" => options.namespaces = number()?,
                "--pods-per-namespace" => options.pods_per_namespace = number()?,
                "--concurrency" => options.concurrency = number()?,
                "--bad-every" => options.bad_every = number()?,
                "--timeout" => options.timeout = Duration::from_secs(number()? as u64),
                "--quiet" => options.quiet = Duration::from_secs(number()? as u64),
                _ => bail!("unknown argument {arg}\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

/// Exit 0: figures printed and the targets that must hold held; 1: an audit did not complete
/// or a report was written twice for one change; 2: bad arguments.
#[tokio::main]
async fn main() -> ExitCode {
    let options = match Options::parse(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("{error:#}");
            return ExitCode::from(2);
        }
    };
    match run(&options).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("audit_scale: FAILED: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress line on stderr (the figures go to stdout).
fn say(message: &str) {
    eprintln!("[audit_scale] {message}");
}

/// Runs the benchmark and prints its figures; `Ok(false)` when a target that must hold did not.
async fn run(options: &Options) -> Result<bool> {
    let started = Instant::now();
    let machine = Machine::now();
    say(&format!(
        "{} namespaces × {} pods, {} in flight; machine: {}",
        options.namespaces,
        options.pods_per_namespace,
        options.concurrency,
        machine.describe()
    ));

    let control_plane = ControlPlane::start().await.context("starting the control plane")?;
    let client = control_plane.client().await?;
    say(&format!(
        "control plane up in {:.1}s (folder {})",
        started.elapsed().as_secs_f64(),
        control_plane.dir().display()
    ));
    let kubeconfig = install_arcguard_prerequisites(&control_plane, &client).await?;

    // The pods first: nothing admits or audits them while they are written, as in a cluster
    // that had them before arcguard.
    let setup = create_pods(&client, options).await?;
    say(&format!(
        "{} pods in {} namespaces created in {:.1}s ({:.0}/s), {} errors retried",
        setup.pods,
        options.namespaces,
        setup.elapsed.as_secs_f64(),
        setup.pods as f64 / setup.elapsed.as_secs_f64(),
        setup.retries
    ));

    // The policies before arcguard starts: the audit it runs on taking the Lease is then the
    // full audit being measured (policies applied after would add a change-triggered run).
    apply(&client, &policy(DENY_POLICY, "Deny", &TRUSTED)).await?;
    apply(&client, &policy(WARN_POLICY, "Warn", &TRUSTED)).await?;

    let log = control_plane.dir().join("arcguard.log");
    let extra = ["--audit-interval=1h", "--log-format=json"].map(str::to_owned);
    let mut arcguard = Arcguard::new(IDENTITY, kubeconfig, log.clone(), &extra)?;
    for configuration in arcguard_e2e::webhook_configurations(&arcguard.url())? {
        apply(&client, &configuration).await.context("registering the webhooks")?;
    }
    let audit_log = control_plane.audit_log();
    let mut watch = LogWatch::new(log);
    let phase_offset = file_len(&audit_log);
    let needle = format!("--metrics-addr=127.0.0.1:{}", arcguard.metrics_port);
    // Sampling starts as soon as the process exists: the leader may begin its audit before
    // arcguard answers /healthz, which is when `start` returns.
    let sample_early = async {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(pid) = find_pid(&needle) {
                return Some((pid, Sampler::start(pid)));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    };
    let arcguard_started = Instant::now();
    let (running, sampling) = tokio::join!(arcguard.start(), sample_early);
    running?;
    let (pid, samples) = sampling.ok_or_else(|| anyhow!("arcguard's process not found"))?;

    let mut outcome = Outcome::default();
    let full = wait_for_run(&mut watch, &mut arcguard, options.timeout, None).await;
    let (_, full) = match full {
        Ok(run) => run,
        Err(error) => {
            say(&format!("{error:#}\n{}", arcguard.log_tail(60)));
            bail!("the full audit did not complete");
        }
    };
    let full = measure(
        "full audit (on taking the Lease)",
        &full,
        arcguard_started,
        watch.leader_at,
        pid,
        &samples,
        &audit_log,
        phase_offset,
        &client,
    )
    .await?;
    say(&format!(
        "full audit: {} objects in {} ms, {} reports written",
        full.objects, full.duration_ms, full.reports_written
    ));
    outcome.findings = deny_status(&client).await;

    // The policy change: the untrusted registry becomes trusted for the Warn policy, so every
    // namespace holding an untrusted pod has a report whose content changes.
    let change_offset = file_len(&audit_log);
    let runs_before = watch.done.len();
    let edited_at = now_micros();
    let edit_started = Instant::now();
    let mut registries = TRUSTED.to_vec();
    registries.push(UNTRUSTED_REGISTRY);
    let edited = policy(WARN_POLICY, "Warn", &registries);
    // Through arcguard's policies webhook now; retried while its failurePolicy settles.
    eventually(Duration::from_secs(60), || apply(&client, &edited)).await?;
    let change = wait_for_run(&mut watch, &mut arcguard, options.timeout, Some(edited_at)).await;
    let (index, change) = match change {
        Ok(run) => run,
        Err(error) => {
            say(&format!("{error:#}\n{}", arcguard.log_tail(60)));
            bail!("the change-triggered audit did not complete");
        }
    };
    let mut change = measure(
        "policy change (Warn policy edited)",
        &change,
        edit_started,
        None,
        pid,
        &samples,
        &audit_log,
        change_offset,
        &client,
    )
    .await?;
    say(&format!(
        "change-triggered audit: {} scopes, {} objects in {} ms, {} reports written",
        change.scopes, change.objects, change.duration_ms, change.reports_written
    ));
    // Runs that started before the edit and ended after it are not the change's.
    outcome.skipped_runs = index - runs_before;

    // Any further run or report write the change causes shows up in this window.
    let deadline = Instant::now() + options.quiet;
    while Instant::now() < deadline {
        watch.poll();
        ensure!(arcguard.is_running(), "arcguard exited\n{}", arcguard.log_tail(60));
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    outcome.runs_after_change = watch.done.len() - index - 1;
    let since_edit = Requests::read(&audit_log, change_offset, None)?;
    change.writes_since_change = since_edit.report_writes.clone();
    outcome.failed_runs = watch.failures.clone();

    let hwm = status_kib(pid, "VmHWM").unwrap_or_default();
    let apiserver_hwm = find_pid(&format!("--secure-port={}", control_plane.port))
        .and_then(|pid| status_kib(pid, "VmHWM"));
    samples.stop();
    arcguard.stop().await;

    let ok = print_report(
        options,
        &machine,
        &setup,
        &[&full, &change],
        &outcome,
        hwm,
        apiserver_hwm,
        started.elapsed(),
    );
    Ok(ok)
}

/// arcguard's CRDs (and the stand-ins for those it reads), the OpenReports CRDs, its namespace,
/// the shipped RBAC and a kubeconfig with a token of its ServiceAccount, as `Cluster::start`
/// sets them up, without the webhooks and sample policies (the pods come first here).
async fn install_arcguard_prerequisites(
    control_plane: &ControlPlane,
    client: &kube::Client,
) -> Result<PathBuf> {
    let crds = std::fs::read_to_string(repo_root().join("manifests/base/crds.yaml"))?;
    let mut names = apply_yaml(client, &crds).await.context("installing arcguard's CRDs")?;
    names.extend(
        apply_yaml(client, include_str!("../../manifests/stand-in-crds.yaml"))
            .await
            .context("installing the gMSA and Calico CRDs")?,
    );
    install_report_crds(client).await.context("installing the OpenReports CRDs")?;
    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let reports = ["reports.openreports.io", "clusterreports.openreports.io"];
    let all = names.iter().filter_map(|o| o.metadata.name.clone()).chain(reports.map(String::from));
    for name in all {
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(crd_api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not established within 60s"))??;
    }
    service_account_kubeconfig(control_plane, client).await
}

/// A ClusterGuardPolicy trusting `registries` in every namespace but arcguard's and
/// kube-system, as the sample policy does.
fn policy(name: &str, action: &str, registries: &[&str]) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {
            "action": action,
            "match": {"excludedNamespaces": ["kube-system", NAMESPACE]},
            "trustedRegistries": {"registries": registries}
        }
    })
}

/// What writing the pods took.
#[derive(Debug, Default)]
struct Setup {
    pods: usize,
    bad: usize,
    /// Sum of the JSON size of the pods as the apiserver returned them (managedFields
    /// included: what etcd holds).
    bytes: usize,
    /// Sum of the JSON size of the pods as written.
    sent: usize,
    retries: usize,
    elapsed: Duration,
}

/// Creates the namespaces, then every pod, `options.concurrency` at a time.
async fn create_pods(client: &kube::Client, options: &Options) -> Result<Setup> {
    let mut namespaces = Vec::with_capacity(options.namespaces);
    for _ in 0..options.namespaces {
        namespaces.push(namespace(client, "scale", &[("arcguard.io/bench", "audit-scale")]).await?);
    }
    let jobs: Vec<(String, usize)> = namespaces
        .iter()
        .flat_map(|ns| (0..options.pods_per_namespace).map(move |i| (ns.clone(), i)))
        .collect();
    let start = Instant::now();
    let progress_every = (jobs.len() / 10).max(1);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, usize, usize)> = futures::stream::iter(jobs)
        .map(|(ns, index)| {
            let client = client.clone();
            let done = &done;
            async move {
                let bad = index % options.bad_every == 0;
                let manifest = scale_pod(&ns, index, bad);
                let sent = serde_json::to_vec(&manifest)?.len();
                let pod: Pod = serde_json::from_value(manifest)?;
                let pods: Api<Pod> = Api::namespaced(client, &ns);
                let mut retries = 0;
                let created = loop {
                    match pods.create(&PostParams::default(), &pod).await {
                        Ok(created) => break created,
                        // An earlier attempt that timed out on our side may have been stored.
                        Err(kube::Error::Api(status)) if status.code == 409 && retries > 0 => {
                            break pods
                                .get(pod.metadata.name.as_deref().unwrap_or_default())
                                .await?;
                        }
                        Err(error) if retries < 5 => {
                            retries += 1;
                            say(&format!("creating a pod in {ns} failed ({error}); retrying"));
                            tokio::time::sleep(Duration::from_millis(200 * retries as u64)).await;
                        }
                        Err(error) => return Err(anyhow!(error).context(format!("pod in {ns}"))),
                    }
                };
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if n.is_multiple_of(progress_every) {
                    say(&format!("{n} pods created ({:.0}s)", start.elapsed().as_secs_f64()));
                }
                Ok::<_, anyhow::Error>((serde_json::to_vec(&created)?.len(), sent, retries))
            }
        })
        .buffer_unordered(options.concurrency)
        .try_collect()
        .await?;
    Ok(Setup {
        pods: results.len(),
        bad: (0..options.pods_per_namespace).filter(|i| i % options.bad_every == 0).count()
            * options.namespaces,
        bytes: results.iter().map(|(bytes, _, _)| bytes).sum(),
        sent: results.iter().map(|(_, sent, _)| sent).sum(),
        retries: results.iter().map(|(_, _, retries)| retries).sum(),
        elapsed: start.elapsed(),
    })
}

/// A pod as a Deployment's ReplicaSet writes it: the Deployment's labels and annotations, an
/// owner reference, an init container, the application and a log-shipping sidecar with env,
/// probes, resources and mounts, three volumes. One in `bad_every` runs an image from Docker Hub.
fn scale_pod(ns: &str, index: usize, bad: bool) -> Value {
    let app = APPS[index % APPS.len()];
    let hash = format!("{:x}", fnv(&format!("{ns}/{app}")) & 0xff_ffff_ffff);
    let name = format!("{app}-{hash}-{}", suffix(index));
    let image = if bad {
        format!("{UNTRUSTED_REGISTRY}/nginx:1.27")
    } else {
        format!("contoso.azurecr.io/shop/{app}:2.14.3")
    };
    let uid = format!("{:08x}-5eed-4a11-8c0d-{:012x}", fnv(ns) & 0xffff_ffff, fnv(&hash) >> 16);
    let resources = |cpu: &str, memory: &str| json!({"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}});
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": ns, "generateName": format!("{app}-{hash}-"),
            "labels": {
                "app.kubernetes.io/name": app,
                "app.kubernetes.io/instance": format!("{app}-prod"),
                "app.kubernetes.io/version": "2.14.3",
                "app.kubernetes.io/component": "backend",
                "app.kubernetes.io/part-of": "shop",
                "app.kubernetes.io/managed-by": "Helm",
                "helm.sh/chart": format!("{app}-2.14.3"),
                "pod-template-hash": hash,
                "team": format!("team-{}", index % 7)
            },
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": "9090",
                "prometheus.io/path": "/metrics",
                "kubectl.kubernetes.io/restartedAt": "2026-01-12T09:30:00Z",
                "checksum/config": format!("{:016x}{:016x}", fnv(app), fnv(&hash))
            },
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{app}-{hash}"),
                "uid": uid, "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "serviceAccountName": app,
            "automountServiceAccountToken": false,
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "priorityClassName": "",
            "securityContext": {
                "runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}
            },
            "terminationGracePeriodSeconds": 30,
            "initContainers": [{
                "name": "migrate",
                "image": format!("contoso.azurecr.io/shop/{app}-migrate:2.14.3"),
                "args": ["migrate", "--wait-for-db", "--timeout=120s"],
                "envFrom": [{"configMapRef": {"name": format!("{app}-config")}}],
                "resources": resources("50m", "64Mi"),
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
            }],
            "containers": [
                {
                    "name": app,
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "args": ["--config=/etc/app/config.yaml", "--listen=:8080", "--metrics=:9090"],
                    "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}
                    ],
                    "env": [
                        {"name": "APP_ENV", "value": "production"},
                        {"name": "LOG_LEVEL", "value": "info"},
                        {"name": "OTEL_SERVICE_NAME", "value": app},
                        {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.observability:4317"},
                        {"name": "DB_HOST", "value": format!("{app}-db.{ns}.svc.cluster.local")},
                        {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": format!("{app}-db"), "key": "password"}}},
                        {"name": "FEATURE_FLAGS", "valueFrom": {"configMapKeyRef": {"name": format!("{app}-config"), "key": "flags"}}},
                        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                        {"name": "GOMEMLIMIT", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "containerName": app}}}
                    ],
                    "resources": resources("250m", "512Mi"),
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "initialDelaySeconds": 10, "periodSeconds": 10},
                    "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5, "failureThreshold": 3},
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [
                        {"name": "config", "mountPath": "/etc/app", "readOnly": true},
                        {"name": "tmp", "mountPath": "/tmp"},
                        {"name": "vault-token", "mountPath": "/var/run/secrets/vault", "readOnly": true}
                    ]
                },
                {
                    "name": "log-shipper",
                    "image": "mcr.microsoft.com/oss/fluent/fluent-bit:3.1.9",
                    "args": ["--config=/fluent-bit/etc/fluent-bit.yaml"],
                    "env": [{"name": "FLUENT_ELASTICSEARCH_HOST", "value": "logs.observability"}],
                    "resources": resources("20m", "48Mi"),
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true},
                    "volumeMounts": [{"name": "tmp", "mountPath": "/var/log/app", "readOnly": true}]
                }
            ],
            "volumes": [
                {"name": "config", "configMap": {"name": format!("{app}-config")}},
                {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
                {"name": "vault-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "vault", "expirationSeconds": 3600, "path": "token"}}]}}
            ],
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "topologySpreadConstraints": [{
                "maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": app}}
            }]
        }
    })
}

/// FNV-1a: stable made-up hashes and UIDs, the same on every run.
fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The five-character suffix a ReplicaSet gives its pods.
fn suffix(index: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut n = fnv(&index.to_string());
    (0..5)
        .map(|_| {
            let c = ALPHABET[(n % ALPHABET.len() as u64) as usize];
            n /= ALPHABET.len() as u64;
            char::from(c)
        })
        .collect()
}

/// Follows arcguard's JSON log.
struct LogWatch {
    path: PathBuf,
    offset: usize,
    /// Every "background audit done" event so far.
    done: Vec<Value>,
    /// Every "background audit failed" event so far.
    failures: Vec<Value>,
    /// When the leader took the Lease (first "became leader"), µs since the epoch.
    leader_at: Option<i64>,
}

impl LogWatch {
    /// Follows `path` from its start.
    fn new(path: PathBuf) -> Self {
        Self { path, offset: 0, done: Vec::new(), failures: Vec::new(), leader_at: None }
    }

    /// Reads the complete lines written since the last poll.
    fn poll(&mut self) {
        let Ok(bytes) = std::fs::read(&self.path) else { return };
        let Some(end) = bytes[self.offset.min(bytes.len())..].iter().rposition(|b| *b == b'\n')
        else {
            return;
        };
        let end = self.offset + end + 1;
        let text = String::from_utf8_lossy(&bytes[self.offset..end]).into_owned();
        self.offset = end;
        for line in text.lines() {
            let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
            match event["message"].as_str().unwrap_or_default() {
                "background audit done" => self.done.push(event),
                "background audit failed; retrying" => {
                    say(&format!("arcguard: {line}"));
                    self.failures.push(event);
                }
                "became leader" if self.leader_at.is_none() => {
                    self.leader_at = event_micros(&event);
                }
                _ => {}
            }
        }
    }
}

/// Waits for the next "background audit done", the first that started after `after` (µs since
/// the epoch) when given; returns it and its index in `watch.done`.
async fn wait_for_run(
    watch: &mut LogWatch,
    arcguard: &mut Arcguard,
    timeout: Duration,
    after: Option<i64>,
) -> Result<(usize, Value)> {
    let start = Instant::now();
    let mut seen = watch.done.len();
    loop {
        watch.poll();
        for (index, event) in watch.done.iter().enumerate().skip(seen) {
            let duration_ms = i64::try_from(field(event, "duration_ms")).unwrap_or_default();
            let started = event_micros(event).unwrap_or_default() - 1000 * duration_ms;
            if after.is_none_or(|after| started >= after) {
                return Ok((index, event.clone()));
            }
            say("a run that started before the policy edit ended; waiting for the next");
        }
        seen = watch.done.len();
        if !arcguard.is_running() {
            bail!("arcguard exited before the audit completed");
        }
        if start.elapsed() > timeout {
            bail!("no \"background audit done\" within {timeout:?}");
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
}

/// A number field of a log event: tracing writes a `u128` (a `Duration`'s milliseconds) as a
/// JSON string.
fn field(event: &Value, name: &str) -> u64 {
    let value = &event[name];
    value.as_u64().or_else(|| value.as_str()?.parse().ok()).unwrap_or_default()
}

/// The time of a log event, µs since the epoch.
fn event_micros(event: &Value) -> Option<i64> {
    let ts: Timestamp = event["timestamp"].as_str()?.parse().ok()?;
    Some(ts.as_microsecond())
}

/// Now, µs since the epoch (the clock of the log and audit timestamps).
fn now_micros() -> i64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
}

/// The figures of one audit run.
#[derive(Debug, Default)]
struct Measured {
    label: &'static str,
    scopes: u64,
    objects: u64,
    reports_written: u64,
    duration_ms: u64,
    /// From the trigger (arcguard's start, or the policy edit) to the run's log line.
    trigger_to_done: Duration,
    /// From taking the Lease to the run's log line.
    leader_to_done: Option<Duration>,
    /// The leader's memory and CPU during the run.
    leader: Around,
    hwm_kib: u64,
    /// arcguard's requests while the run ran.
    during: Requests,
    /// arcguard's requests from the trigger to the run's end.
    since_trigger: u64,
    /// The reports stored after the run.
    stored: Stored,
    /// The sizes now of the reports written in the run.
    report_bytes_written: usize,
    /// Report writes from the trigger to the end of the quiet window (the change only).
    writes_since_change: BTreeMap<String, u64>,
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    label: &'static str,
    done: &Value,
    trigger: Instant,
    leader_at: Option<i64>,
    pid: u32,
    samples: &Sampler,
    audit_log: &Path,
    offset: usize,
    client: &kube::Client,
) -> Result<Measured> {
    let number = |name: &str| field(done, name);
    let end = event_micros(done).ok_or_else(|| anyhow!("a log line without timestamp: {done}"))?;
    let duration_ms = number("duration_ms");
    let begin = end - i64::try_from(duration_ms * 1000)?;
    let during = Requests::read(audit_log, offset, Some((begin, end)))?;
    let since_trigger = Requests::read(audit_log, offset, Some((0, end)))?.total;
    let stored = report_sizes(client).await?;
    let report_bytes_written = during
        .report_writes
        .keys()
        .map(|scope| stored.by_scope.get(scope).copied().unwrap_or_default())
        .sum();
    let leader = samples.around(begin, end);
    let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or_default());
    Ok(Measured {
        label,
        scopes: number("scopes"),
        objects: number("objects"),
        reports_written: number("reports_written"),
        duration_ms,
        trigger_to_done: trigger.elapsed(),
        leader_to_done: leader_at.map(|at| micros(end - at)),
        leader,
        hwm_kib: status_kib(pid, "VmHWM").unwrap_or_default(),
        during,
        since_trigger,
        stored,
        report_bytes_written,
        writes_since_change: BTreeMap::new(),
    })
}

/// arcguard's requests in the apiserver's audit log.
#[derive(Clone, Debug, Default)]
struct Requests {
    total: u64,
    /// By `verb group/resource[/subresource]`.
    by_call: BTreeMap<String, u64>,
    /// patch, create and update of Reports (by namespace) and ClusterReports (`(cluster)`).
    report_writes: BTreeMap<String, u64>,
}

impl Requests {
    /// The requests logged after byte `offset`, received within `window` (µs since the epoch)
    /// when given. Each request counts once (watches are logged at ResponseStarted and
    /// ResponseComplete).
    fn read(path: &Path, offset: usize, window: Option<(i64, i64)>) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes[offset.min(bytes.len())..]).into_owned();
        let mut out = Self::default();
        let mut seen = BTreeSet::new();
        for line in text.lines().filter(|l| l.ends_with('}')) {
            let Ok(event) = serde_json::from_str::<Value>(line) else { continue };
            if event["user"]["username"].as_str() != Some(ARCGUARD_USER)
                || !seen.insert(event["auditID"].as_str().unwrap_or_default().to_owned())
            {
                continue;
            }
            if let Some((begin, end)) = window {
                let received: Option<Timestamp> =
                    event["requestReceivedTimestamp"].as_str().and_then(|t| t.parse().ok());
                let received = received.map_or(0, |t| t.as_microsecond());
                if begin > received || received > end {
                    continue;
                }
            }
            let object = &event["objectRef"];
            let text = |v: &Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_owned);
            let verb = event["verb"].as_str().unwrap_or_default();
            let call = match text(&object["resource"]) {
                None => {
                    format!("{verb} (discovery) {}", event["requestURI"].as_str().unwrap_or(""))
                }
                Some(resource) => {
                    let group = text(&object["apiGroup"]).unwrap_or_else(|| "core".to_owned());
                    let sub =
                        text(&object["subresource"]).map(|s| format!("/{s}")).unwrap_or_default();
                    if group == "openreports.io"
                        && sub.is_empty()
                        && ["patch", "create", "update"].contains(&verb)
                    {
                        let scope =
                            text(&object["namespace"]).unwrap_or_else(|| "(cluster)".into());
                        *out.report_writes.entry(scope).or_default() += 1;
                    }
                    format!("{verb} {group}/{resource}{sub}")
                }
            };
            out.total += 1;
            *out.by_call.entry(call).or_default() += 1;
        }
        Ok(out)
    }

    /// The most report writes to one namespace (or the cluster scope).
    fn most_per_scope(&self) -> u64 {
        self.report_writes.values().copied().max().unwrap_or_default()
    }
}

/// The Reports and ClusterReports stored.
#[derive(Debug, Default)]
struct Stored {
    count: usize,
    /// Total JSON size as the apiserver serves them.
    bytes: usize,
    /// The same without `metadata.managedFields`: about what arcguard's applies carry.
    bytes_without_managed_fields: usize,
    /// Each one's size as served, by namespace (`(cluster)` for the ClusterReport).
    by_scope: BTreeMap<String, usize>,
}

/// Lists every Report and ClusterReport and measures them.
async fn report_sizes(client: &kube::Client) -> Result<Stored> {
    let mut stored = Stored::default();
    for (kind, plural) in [("Report", "reports"), ("ClusterReport", "clusterreports")] {
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("openreports.io", "v1alpha1", kind),
            plural,
        );
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let mut params = ListParams::default().limit(50);
        loop {
            let page = api.list(&params).await.with_context(|| format!("listing {plural}"))?;
            for object in page.items {
                let scope = object.metadata.namespace.clone().unwrap_or_else(|| "(cluster)".into());
                let size = serde_json::to_vec(&object)?.len();
                let mut bare = object;
                bare.metadata.managed_fields = None;
                stored.count += 1;
                stored.bytes += size;
                stored.bytes_without_managed_fields += serde_json::to_vec(&bare)?.len();
                *stored.by_scope.entry(scope).or_default() += size;
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(stored)
}

/// The Deny policy's `status.audit` (pass, fail, warn) as the audit wrote it.
async fn deny_status(client: &kube::Client) -> Option<(u64, u64, u64)> {
    let policies: Api<ClusterGuardPolicy> = Api::all(client.clone());
    let audit = policies.get(DENY_POLICY).await.ok()?.status?.audit?;
    Some((audit.pass, audit.fail, audit.warn))
}

/// One sample of the leader: when (µs since the epoch), VmRSS (KiB), CPU time (clock ticks).
type Sample = (i64, u64, u64);

/// The leader's VmRSS and CPU time, sampled every [`SAMPLE_EVERY`] on its own task.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What the samples say about one run.
#[derive(Debug, Default)]
struct Around {
    /// VmRSS just before the run, KiB.
    before: Option<u64>,
    /// The largest VmRSS during the run, KiB.
    peak: Option<u64>,
    /// CPU time (user and system) the process used during the run.
    cpu: Option<Duration>,
}

impl Sampler {
    /// Samples `pid` until [`Sampler::stop`] or until it exits.
    fn start(pid: u32) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::clone(&samples);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let (Some(kib), Some(ticks)) = (status_kib(pid, "VmRSS"), cpu_ticks(pid)) else {
                    return;
                };
                if let Ok(mut samples) = out.lock() {
                    samples.push((now_micros(), kib, ticks));
                }
            }
        });
        Self { samples, task }
    }

    /// The samples from `begin` to `end` (µs since the epoch), and the last one before.
    fn around(&self, begin: i64, end: i64) -> Around {
        let Ok(samples) = self.samples.lock() else { return Around::default() };
        let before = samples.iter().take_while(|(at, _, _)| *at < begin).last();
        let during: Vec<&Sample> =
            samples.iter().filter(|(at, _, _)| (begin..=end).contains(at)).collect();
        // SAFETY: sysconf only reads a configuration value.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        let cpu = before.zip(during.last()).map(|((_, _, from), (_, _, to))| {
            Duration::from_secs_f64(to.saturating_sub(*from) as f64 / hz as f64)
        });
        Around {
            before: before.map(|(_, kib, _)| *kib),
            peak: during.iter().map(|(_, kib, _)| *kib).max(),
            cpu,
        }
    }

    /// Ends the sampling.
    fn stop(&self) {
        self.task.abort();
    }
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: the fields follow its last `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// A `kB` field of `/proc/<pid>/status`.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// The process whose command line has the argument `needle` (the harness keeps the processes
/// to itself; their unique ports find them).
fn find_pid(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        (pid != me && cmdline.split(|b| *b == 0).any(|arg| arg == needle.as_bytes())).then_some(pid)
    })
}

/// The size of `path` (0 when missing): where the requests logged after now start.
fn file_len(path: &Path) -> usize {
    std::fs::metadata(path).map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX))
}

/// Where the figures were taken.
struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    load_at_start: String,
}

impl Machine {
    /// This machine, now.
    fn now() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or_default();
        Self {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            memory_gib: memory_kib / 1_048_576.0,
            load_at_start: load_average(),
        }
    }

    /// One line for the report.
    fn describe(&self) -> String {
        format!(
            "{} cores, {}, {:.0} GiB; load average at start {}",
            self.cores, self.cpu, self.memory_gib, self.load_at_start
        )
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// What happened around the runs.
#[derive(Debug, Default)]
struct Outcome {
    /// The Deny policy's (pass, fail, warn) after the full audit.
    findings: Option<(u64, u64, u64)>,
    /// Runs that ended after the edit but started before it.
    skipped_runs: usize,
    /// Runs in the quiet window after the change-triggered run.
    runs_after_change: usize,
    failed_runs: Vec<Value>,
}

/// KiB to MiB.
fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// KiB as MiB with one decimal, `n/a` when not measured.
fn opt_mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1}", mib(k)))
}

/// Bytes as KiB, or MiB from 1 MiB on.
fn kb(bytes: usize) -> String {
    let kib = bytes as f64 / 1024.0;
    if kib < 1024.0 { format!("{kib:.1} KiB") } else { format!("{:.2} MiB", kib / 1024.0) }
}

/// Prints the figures as Markdown; false when a target that must hold did not.
#[allow(clippy::too_many_arguments)]
fn print_report(
    options: &Options,
    machine: &Machine,
    setup: &Setup,
    runs: &[&Measured],
    outcome: &Outcome,
    hwm_kib: u64,
    apiserver_hwm_kib: Option<u64>,
    total: Duration,
) -> bool {
    let commit = std::process::Command::new("git")
        .args(["-C", &repo_root().display().to_string(), "describe", "--always", "--dirty"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    let today = Timestamp::now().strftime("%Y-%m-%d %H:%MZ");
    println!(
        "## Background audit at scale ({today}, commit {commit})\n\n\
         `bench/audit-scale.sh --namespaces {} --pods-per-namespace {}`\n\n\
         Machine: {}; load average at end {}.\n\
         Cluster: kube-apiserver and etcd of the e2e harness (no kubelet, scheduler or \
         controller-manager), arcguard release binary as its ServiceAccount with the shipped \
         RBAC, `--audit-interval 1h`, `--audit-max-results` default; one replica (the leader).\n",
        options.namespaces,
        options.pods_per_namespace,
        machine.describe(),
        load_average()
    );
    println!(
        "Setup: {} pods ({} with an untrusted image) in {} namespaces, written {} at a time \
         before any policy in {:.1}s ({:.0} pods/s, {} retries); average pod {} as written, {} \
         as stored (defaults, status and managedFields added). Policies: `{DENY_POLICY}` (Deny) and `{WARN_POLICY}` (Warn), \
         both trusting {}; the change adds `{UNTRUSTED_REGISTRY}` to the Warn policy.\n",
        setup.pods,
        setup.bad,
        options.namespaces,
        options.concurrency,
        setup.elapsed.as_secs_f64(),
        setup.pods as f64 / setup.elapsed.as_secs_f64(),
        setup.retries,
        kb(setup.sent / setup.pods.max(1)),
        kb(setup.bytes / setup.pods.max(1)),
        TRUSTED.map(|r| format!("`{r}`")).join(" and "),
    );
    let header: Vec<&str> = runs.iter().map(|r| r.label).collect();
    println!("| figure | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(runs.len()));
    let row = |name: &str, cell: &dyn Fn(&Measured) -> String| {
        let cells: Vec<String> = runs.iter().map(|r| cell(r)).collect();
        println!("| {name} | {} |", cells.join(" | "));
    };
    row("scopes audited (log `scopes`)", &|r| r.scopes.to_string());
    row("objects judged (log `objects`)", &|r| r.objects.to_string());
    row("audit run (log `duration_ms`)", &|r| format!("{:.1} s", r.duration_ms as f64 / 1000.0));
    row("trigger → run done (arcguard start / policy edit)", &|r| {
        format!("{:.1} s", r.trigger_to_done.as_secs_f64())
    });
    row("Lease taken → run done", &|r| {
        r.leader_to_done.map_or_else(|| "–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
    });
    row("leader RSS before the run (VmRSS, MiB)", &|r| opt_mib(r.leader.before));
    row("leader peak RSS during the run (VmRSS every 100 ms, MiB)", &|r| opt_mib(r.leader.peak));
    row("leader peak RSS since start (VmHWM, MiB)", &|r| format!("{:.1}", mib(r.hwm_kib)));
    row("leader CPU time during the run (user + system)", &|r| {
        r.leader.cpu.map_or_else(|| "n/a".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
    });
    row("API requests by arcguard during the run", &|r| r.during.total.to_string());
    row("API requests by arcguard, trigger → run done", &|r| r.since_trigger.to_string());
    row("report writes (patch/create of reports, audit log)", &|r| {
        r.during.report_writes.values().sum::<u64>().to_string()
    });
    row("most report writes in one namespace", &|r| r.during.most_per_scope().to_string());
    row("reports written (log `reports_written`)", &|r| r.reports_written.to_string());
    row("report bytes written (size of the reports written)", &|r| kb(r.report_bytes_written));
    row("reports stored after the run", &|r| r.stored.count.to_string());
    row("report bytes stored after the run (JSON as served)", &|r| kb(r.stored.bytes));
    row("the same without managedFields", &|r| kb(r.stored.bytes_without_managed_fields));
    println!(
        "\n\"During the run\": from the run's start (its log line's time less `duration_ms`) to \
         its log line; the requests are those the apiserver's audit log records for arcguard's \
         ServiceAccount, received in that span. \"Trigger → run done\" includes the audit \
         loop's wait for its next 5 s policy check. Report sizes are the reports as stored, \
         JSON as the apiserver serves them.\n"
    );

    let calls: BTreeSet<&String> = runs.iter().flat_map(|r| r.during.by_call.keys()).collect();
    println!("arcguard's requests during each run, by verb and resource (apiserver audit log):\n");
    println!("| request | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(runs.len()));
    for call in calls {
        let cells: Vec<String> = runs
            .iter()
            .map(|r| r.during.by_call.get(call).copied().unwrap_or_default().to_string())
            .collect();
        println!("| `{call}` | {} |", cells.join(" | "));
    }
    println!();

    let mut ok = true;
    let peak = runs.iter().filter_map(|r| r.leader.peak).max().unwrap_or_default().max(hwm_kib);
    let verdict = if mib(peak) <= RSS_TARGET_MIB { "within" } else { "ABOVE" };
    println!(
        "- Leader peak RSS {:.1} MiB (the larger of its VmHWM and the VmRSS sampled, over the whole run): {verdict} the {RSS_TARGET_MIB:.0} MiB target (informational).",
        mib(peak)
    );
    let change = runs.last().map(|r| &r.writes_since_change);
    let most_full = runs.first().map_or(0, |r| r.during.most_per_scope());
    let most_change = change.and_then(|w| w.values().copied().max()).unwrap_or_default();
    let over: Vec<&String> =
        change.into_iter().flatten().filter(|(_, n)| **n > 1).map(|(ns, _)| ns).collect();
    let writes_ok = most_full <= 1 && over.is_empty();
    ok &= writes_ok;
    println!(
        "- At most one report write per namespace per change: {} (full audit: at most {most_full}; policy change: at most {most_change} from the edit to {}s after its run{}).",
        if writes_ok { "yes" } else { "NO" },
        options.quiet.as_secs(),
        if over.is_empty() { String::new() } else { format!(", more than one in {over:?}") },
    );
    let bad = u64::try_from(setup.bad).unwrap_or_default();
    let pods = u64::try_from(setup.pods).unwrap_or_default();
    match outcome.findings {
        Some((pass, fail, warn)) => {
            let expected = fail == bad && pass == pods - bad;
            println!(
                "- `{DENY_POLICY}` status.audit after the full audit: {pass} pass, {fail} fail, {warn} warn ({}).",
                if expected {
                    "as expected".to_owned()
                } else {
                    format!("EXPECTED {} pass, {bad} fail", pods - bad)
                }
            );
        }
        None => println!("- `{DENY_POLICY}` has no status.audit after the full audit."),
    }
    if outcome.skipped_runs > 0 {
        println!(
            "- {} run(s) started before the policy edit and ended after it (not counted).",
            outcome.skipped_runs
        );
    }
    println!(
        "- Runs in the {}s after the change-triggered run: {}; failed runs (\"background audit failed\"): {}.",
        options.quiet.as_secs(),
        outcome.runs_after_change,
        outcome.failed_runs.len()
    );
    if let Some(kib) = apiserver_hwm_kib {
        println!("- kube-apiserver peak RSS (VmHWM): {:.0} MiB.", mib(kib));
    }
    println!("- Whole benchmark (control plane start to here): {:.1} s.", total.as_secs_f64());
    ok
}
