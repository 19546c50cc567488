//! The arcguard binary: parses the command line, starts telemetry and runs a command.

use std::io::Read as _;
use std::process::ExitCode;

use anyhow::Context as _;
use arcguard::audit::output as audit_output;
use arcguard::cli::{
    AuditArgs, CertsAction, CertsArgs, CheckArgs, Cli, Command, LogFormat, OutputFormat,
    RegistryArgs, ServeArgs,
};
use arcguard::{certs, check, cluster, policy, serve, server};
use clap::Parser as _;

/// The process's allocator: jemalloc rather than glibc's malloc. Under load it cut server CPU
/// per denied review by about a sixth for 2–3 MiB more resident memory; its background thread
/// returns freed pages, where mimalloc kept 220 MiB (BENCHMARKS.md, "Issue 14, step 2").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The most async worker threads the server runs. tokio starts one per core it sees, and
/// the Deployment sets no CPU limit (throttling stalls webhook calls), so on a 64-core node
/// it saw 64: under 64 to 256 concurrent 2.9 MiB reviews the peak RSS of the 128 Mi
/// Deployment's configuration reached 126–140 MB, over the limit, where 4 workers kept it at
/// 90–91 MB (release build, `bench/memory.sh` with 64 CPUs reported; 2 CPUs: 74–78 MB).
/// Four workers serve far more reviews a second than the apiserver sends one replica (about
/// 30–45 µs of CPU each, BENCHMARKS.md). `TOKIO_WORKER_THREADS` overrides it.
const MAX_WORKER_THREADS: usize = 4;

/// The async worker threads: one per core seen, at most [`MAX_WORKER_THREADS`].
fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(MAX_WORKER_THREADS)
}

/// Registry access as the flags configure it: the CA file is read here.
fn registry_config(args: &RegistryArgs) -> anyhow::Result<arcguard::oci::RegistryConfig> {
    let ca_pem = match &args.registry_ca {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("reading --registry-ca {}", path.display()))?,
        ),
        None => None,
    };
    let timeout = args.registry_timeout;
    anyhow::ensure!(
        (std::time::Duration::from_millis(100)..=arcguard::oci::READ_CAP).contains(&timeout),
        "--registry-timeout {timeout:?} is outside 100ms..30s: registry reads need at least 100 ms, and a read goes on for at most 30 s; keep it below the webhooks' timeoutSeconds (5 s in manifests/)"
    );
    for host in &args.registry_plain_http {
        anyhow::ensure!(
            !host.contains("://") && !host.contains('/') && !host.is_empty(),
            "--registry-plain-http {host:?}: write the registry as images name it, host[:port], without a scheme or path"
        );
    }
    Ok(arcguard::oci::RegistryConfig {
        ca_pem,
        plain_http: args.registry_plain_http.clone(),
        deadline: timeout,
    })
}

/// Exit code for a configuration that cannot work (EX_USAGE).
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    // One TLS provider for the whole process: kube's client and the registry client (reqwest)
    // take the process default, and ring is the only one compiled in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    // `arcguard audit` fills the same caches as a replica; their watchers' retries (no RBAC to
    // list GMSACredentialSpecs, say) would bury its one line saying so under a warning a second.
    let filter = match &cli.command {
        Command::Audit(_) => {
            format!("{},kube_runtime=error,arcguard::cluster::facts=error", cli.log)
        }
        _ => cli.log.clone(),
    };
    init_tracing(cli.log_format, &filter);
    match cli.command {
        Command::Serve(args) => run_serve(args),
        Command::Check(args) => run_check(&args),
        Command::Audit(args) => run_audit(&args),
        Command::Crds => match arcguard::policy::crd::crds_yaml() {
            Ok(yaml) if output(&yaml) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(error) => {
                eprintln!("error: {error}");
                ExitCode::FAILURE
            }
        },
        Command::Certs(args) => match run_certs(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("error: {}", chain(&error));
                ExitCode::FAILURE
            }
        },
    }
}

/// An error and its causes on one line, each cause left out when the message before it
/// already says it (most library errors quote their source in their own message).
fn chain(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

fn init_tracing(format: LogFormat, filter: &str) {
    // rustls-platform-verifier logs every failed registry handshake at error level, without
    // the registry and outside the decision log's rate; the denial says it, with the flag that
    // fixes it. Named in the filter, it is logged as asked.
    let filter = if filter.contains("rustls_platform_verifier") {
        filter.to_owned()
    } else {
        format!("{filter},rustls_platform_verifier=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // No colour codes where a log collector, not a terminal, reads stderr (kubectl logs).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run_serve(args: ServeArgs) -> ExitCode {
    let limits = server::Limits {
        max_body_bytes: args.max_body_bytes,
        request_timeout: args.request_timeout,
        max_connections: args.max_connections,
        shutdown_grace: args.shutdown_grace,
        memory_budget: server::budget::budget_for(
            args.memory_limit.or_else(server::budget::cgroup_memory_limit),
        ),
        decisions_logged_per_second: args.log_decisions_per_second,
        ..server::Limits::default()
    };
    let addresses = server::Addresses { webhook: args.addr, metrics: args.metrics_addr };
    let registries = match registry_config(&args.registry) {
        Ok(registries) => {
            // The shipped webhooks wait 5 s (timeoutSeconds); a read allowed longer is cut
            // short by the apiserver, which then applies the failurePolicy.
            if registries.deadline >= std::time::Duration::from_secs(5) {
                tracing::warn!(
                    timeout = ?registries.deadline,
                    "--registry-timeout is not below the webhooks' timeoutSeconds (5 s in manifests/): the apiserver gives up on a review before a slow registry read does; keep it at 4s or less"
                );
            }
            registries
        }
        Err(error) => {
            tracing::error!("{}", chain(&error));
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // tokio's own variable, when an operator sets it, wins.
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(worker_threads());
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "failed to start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    if args.cluster {
        let identity = cluster::identity(args.pod_name.as_deref(), hostname().as_deref());
        let mut extra_ip_addresses = Vec::new();
        let mut extra_dns_names = Vec::new();
        for san in &args.cert_extra_sans {
            match san.parse::<std::net::IpAddr>() {
                Ok(ip) => extra_ip_addresses.push(ip),
                Err(_) => extra_dns_names.push(san.clone()),
            }
        }
        let defaults = cluster::certs::CertConfig::new(&args.namespace);
        // Out of range saturates, and validation then names the setting.
        let lifetime = |flag: Option<std::time::Duration>, default: time::Duration| {
            flag.map_or(default, |d| time::Duration::try_from(d).unwrap_or(time::Duration::MAX))
        };
        let certs = cluster::certs::CertConfig {
            extra_ip_addresses,
            extra_dns_names,
            ca_validity: lifetime(args.ca_validity, defaults.ca_validity),
            ca_rotate_before: lifetime(args.ca_rotate_before, defaults.ca_rotate_before),
            ca_overlap: lifetime(args.ca_overlap, defaults.ca_overlap),
            serving_validity: lifetime(args.serving_validity, defaults.serving_validity),
            serving_renew_before: lifetime(
                args.serving_renew_before,
                defaults.serving_renew_before,
            ),
            secret_name: args.cert_secret,
            service_name: args.service_name,
            validating_webhook_configuration: args.webhook_config_name.clone(),
            mutating_webhook_configuration: args.webhook_config_name,
            external: args.external_certs,
            inject_ca_bundle: args.inject_ca_bundle,
            ..defaults
        };
        let config = cluster::ClusterConfig {
            addresses,
            limits,
            shutdown_delay: args.shutdown_delay,
            identity,
            lease_name: args.lease_name,
            certs,
            label_existing_pods: args.label_existing_pods,
            label_pods_interval: args.label_pods_interval,
            audit: cluster::audit::AuditConfig {
                interval: args.audit_interval,
                max_results: args.audit_max_results,
            },
            registries,
        };
        return runtime.block_on(async {
            match cluster::start(config, shutdown_signal()).await {
                Ok(running) => {
                    let _ = running.done.await;
                    ExitCode::SUCCESS
                }
                Err(error @ cluster::ClusterError::Certificates(_)) => {
                    tracing::error!(%error, "invalid configuration");
                    ExitCode::from(EXIT_USAGE)
                }
                Err(error) => {
                    tracing::error!(%error, "arcguard could not start");
                    ExitCode::FAILURE
                }
            }
        });
    }
    if !args.policies.is_dir() {
        tracing::error!(policies = %args.policies.display(), "the policy directory does not exist");
        return ExitCode::from(EXIT_USAGE);
    }
    let config = serve::ServeConfig {
        policies: args.policies,
        addresses,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        ca_cert: args.ca_cert,
        generate_certs: !args.no_dev_certs,
        limits,
        shutdown_delay: args.shutdown_delay,
        registries,
    };
    runtime.block_on(async {
        match serve::start(config, shutdown_signal()).await {
            Ok(running) => {
                let _ = running.done.await;
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(error = %error, "arcguard could not start");
                ExitCode::FAILURE
            }
        }
    })
}

/// The host name, which is the pod name inside a pod.
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Completes on SIGTERM (what the kubelet sends) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Writes a command's output to stdout; whether it was written. A reader that went away
/// (`arcguard check … | head`) ends the output quietly, as other command-line tools do
/// (`print!` would panic); another failure (a full disk) is said and fails the command.
fn output(text: &str) -> bool {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            eprintln!("error: writing the output: {error}");
            false
        }
        _ => true,
    }
}

fn run_check(args: &CheckArgs) -> ExitCode {
    match check_inputs(args) {
        Ok((text, denied)) => {
            if !output(&text) {
                ExitCode::from(2)
            } else if denied {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(error) => {
            eprintln!("error: {}", chain(&error));
            ExitCode::from(2)
        }
    }
}

fn check_inputs(args: &CheckArgs) -> anyhow::Result<(String, bool)> {
    let loaded = policy::load::load_dir(&args.policies)
        .with_context(|| format!("failed to load policies from {}", args.policies.display()))?;
    for warning in &loaded.warnings {
        tracing::debug!("{warning}");
    }
    let mut inputs = Vec::new();
    for file in &args.files {
        let (name, text) = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("failed to read standard input")?;
            ("-".to_owned(), text)
        } else {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("failed to read {}", file.display()))?;
            (file.display().to_string(), text)
        };
        inputs.push(check::Input { name, text });
    }
    let mut facts = loaded.facts;
    let mut notes = Vec::new();
    if loaded.policies.reads_registries() {
        if args.registry {
            let each = check::registry_needs(&inputs, &loaded.policies, &facts)?;
            // `check` exports no metrics; the registry adapter counts into a throwaway set.
            let registries = arcguard::oci::Registries::new(
                &registry_config(&args.registry_access)?,
                // One process reading for one run: the pool only bounds the reads in flight.
                arcguard::memory::MemoryPool::new(
                    arcguard::oci::slots::MAX_READS * arcguard::oci::slots::READ_BYTES,
                ),
                std::sync::Arc::new(arcguard::metrics::Metrics::new()),
            )?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to start the async runtime")?;
            // One object after another, each read as the admission request of its CREATE
            // would be: its own --registry-timeout from its start and its own bound of images
            // (read together, a run's objects shared one deadline and one namespace's slots).
            // What one object read is cached for the next.
            let mut images = std::collections::BTreeMap::new();
            let mut signatures = std::collections::BTreeMap::new();
            for needs in each {
                let found = runtime.block_on(registries.lookup(
                    &needs.images,
                    &needs.signatures,
                    &[],
                    "",
                    std::time::Instant::now(),
                ));
                images.extend(found.images);
                signatures.extend(found.signatures);
            }
            facts.images = Some(images);
            facts.signatures = signatures;
        } else {
            notes.push(check::SKIPPED_REGISTRIES);
        }
    }
    let reports = check::check(&inputs, &loaded.policies, &facts)?;
    let output = match args.output {
        OutputFormat::Text => check::render_text(&reports, &notes),
        OutputFormat::Json => check::render_json(&reports, &notes),
    };
    Ok((output, check::any_denied(&reports)))
}

fn run_audit(args: &AuditArgs) -> ExitCode {
    let audited = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
        .and_then(|runtime| runtime.block_on(audit_cluster(args)));
    match audited {
        Ok(output) => {
            let written = match args.output {
                OutputFormat::Text => self::output(&audit_output::render_text(&output)),
                OutputFormat::Json => self::output(&audit_output::render_json(&output)),
            };
            if !written {
                return ExitCode::from(audit_output::EXIT_ERROR);
            }
            ExitCode::from(audit_output::exit_code(&output))
        }
        Err(error) => {
            eprintln!("error: {}", chain(&error));
            ExitCode::from(audit_output::EXIT_ERROR)
        }
    }
}

async fn audit_cluster(args: &AuditArgs) -> anyhow::Result<audit_output::AuditOutput> {
    let client = cluster::client().await?;
    let policies = match &args.policies {
        Some(dir) => {
            policy::load::load_dir(dir)
                .with_context(|| format!("failed to load policies from {}", dir.display()))?
                .policies
        }
        None => {
            let (policies, rejected) = cluster::audit::policies_in_force(&client).await?;
            for r in &rejected {
                let kept = match r.kept {
                    Some(generation) => format!("generation {generation} stays in force"),
                    None => "skipped".to_owned(),
                };
                eprintln!(
                    "warning: policy {} generation {} does not compile ({}): {kept}",
                    r.policy, r.generation, r.error
                );
            }
            policies
        }
    };
    if policies.is_empty() {
        eprintln!("warning: no policies in force: nothing to judge");
    }
    let namespaces = (!args.namespaces.is_empty()).then_some(args.namespaces.as_slice());
    let max_results = if args.max_results == 0 { usize::MAX } else { args.max_results };
    let run = cluster::audit::audit_once(client, &policies, namespaces, max_results, args.timeout)
        .await?;
    Ok(audit_output::summarise(run.scopes.iter().map(|(_, findings)| findings), run.listed))
}

fn run_certs(args: &CertsArgs) -> anyhow::Result<()> {
    if let Some(CertsAction::Revoke(revoke)) = &args.action {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        return runtime.block_on(async {
            let client = cluster::client().await?;
            let value = cluster::certs::request_revoke(client, &revoke.namespace, &revoke.secret).await?;
            println!(
                "requested revocation of {}/{} ({}={value}); the leader replaces the CA and serving certificate and removes the old CA from the webhooks",
                revoke.namespace,
                revoke.secret,
                arcguard::certs::plan::REVOKE_ANNOTATION
            );
            Ok(())
        });
    }
    let validity = time::Duration::days(i64::from(args.days));
    let bundle = certs::write_bundle(
        &args.out,
        &args.dns,
        &args.ip,
        validity,
        time::OffsetDateTime::now_utc(),
    )
    .with_context(|| format!("failed to write certificates to {}", args.out.display()))?;
    println!(
        "wrote {}, {} and {}",
        bundle.ca_cert.display(),
        bundle.cert.display(),
        bundle.key.display()
    );
    Ok(())
}
