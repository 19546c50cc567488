//! The command line: `serve`, `check`, `audit` and `certs`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// arcguard: admission control for hybrid Linux/Windows Kubernetes clusters.
#[derive(Debug, Parser)]
#[command(name = "arcguard", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "ARCGUARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `arcguard=debug`).
    #[arg(long, global = true, env = "ARCGUARD_LOG", default_value = "info")]
    pub log: String,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
// Parsed once at start; boxing would only add noise.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Serve the admission webhooks over HTTPS, with policies from files.
    Serve(ServeArgs),
    /// Evaluate manifests against policies as the cluster would admit them (exit 1 if any is denied).
    Check(CheckArgs),
    /// Audit the objects in a cluster (KUBECONFIG) against the policies in force, once, writing
    /// nothing (exit 1 if a Deny policy fails on any).
    Audit(AuditArgs),
    /// Write a CA and a serving certificate (ca.crt, tls.crt, tls.key).
    Certs(CertsArgs),
    /// Print the CustomResourceDefinitions of ClusterGuardPolicy and GuardPolicy.
    Crds,
}

/// `arcguard serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Directory of policy files (ClusterGuardPolicy, GuardPolicy, GMSACredentialSpec).
    #[arg(long, env = "ARCGUARD_POLICIES", default_value = "policies")]
    pub policies: PathBuf,
    /// HTTPS address of the webhooks.
    #[arg(long, env = "ARCGUARD_ADDR", default_value = "127.0.0.1:8443")]
    pub addr: SocketAddr,
    /// Plain-HTTP address of /metrics and the probes.
    #[arg(long, env = "ARCGUARD_METRICS_ADDR", default_value = "127.0.0.1:9090")]
    pub metrics_addr: SocketAddr,
    /// Serving certificate (PEM chain).
    #[arg(long, env = "ARCGUARD_TLS_CERT", default_value = "certs/tls.crt")]
    pub tls_cert: PathBuf,
    /// Serving private key (PEM).
    #[arg(long, env = "ARCGUARD_TLS_KEY", default_value = "certs/tls.key")]
    pub tls_key: PathBuf,
    /// Where a generated development CA certificate is written.
    #[arg(long, env = "ARCGUARD_CA_CERT", default_value = "certs/ca.crt")]
    pub ca_cert: PathBuf,
    /// Do not generate a development CA and certificate when the certificate and key are absent.
    #[arg(long, env = "ARCGUARD_NO_DEV_CERTS")]
    pub no_dev_certs: bool,
    /// Largest accepted request body in bytes (larger requests get 413).
    #[arg(long, env = "ARCGUARD_MAX_BODY_BYTES", default_value_t = 7 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Time allowed to read a request and answer it (e.g. `10s`, `500ms`).
    #[arg(long, env = "ARCGUARD_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Connections served at once.
    #[arg(long, env = "ARCGUARD_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// The container's memory limit in bytes: webhook requests and registry reads in flight
    /// may use half of it (the rest of the requests wait briefly, then get 503; reads wait
    /// within the registry deadline). Without it, the cgroup's
    /// `memory.max` is read; without either, the budget is 512 MiB.
    #[arg(long, env = "ARCGUARD_MEMORY_LIMIT")]
    pub memory_limit: Option<u64>,
    /// Denials, warnings and Audit-policy violations logged per second at `info`; beyond that
    /// they are counted and summarised in one line per second (metrics count every request,
    /// and the kube-apiserver's audit log holds each decision). 0: summaries only.
    #[arg(long, env = "ARCGUARD_LOG_DECISIONS_PER_SECOND", default_value_t = 10)]
    pub log_decisions_per_second: u32,
    /// How imageProvenance policies reach registries.
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// On SIGTERM, time between readiness turning false and the listeners closing.
    #[arg(long, env = "ARCGUARD_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// On SIGTERM, time in-flight requests get to finish.
    #[arg(long, env = "ARCGUARD_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Cluster mode: policies from ClusterGuardPolicy/GuardPolicy resources, the serving
    /// certificate from a Secret that arcguard manages (in-cluster config or KUBECONFIG).
    #[arg(long, env = "ARCGUARD_CLUSTER")]
    pub cluster: bool,
    /// Cluster mode: arcguard's namespace (the Secret and the Lease live there).
    #[arg(long, env = "ARCGUARD_NAMESPACE", default_value = "arcguard-system")]
    pub namespace: String,
    /// Cluster mode: this replica's identity for leader election (the pod name).
    #[arg(long, env = "ARCGUARD_POD_NAME")]
    pub pod_name: Option<String>,
    /// Cluster mode: the Service in front of the webhooks (the certificate's names derive from it).
    #[arg(long, env = "ARCGUARD_SERVICE_NAME", default_value = "arcguard")]
    pub service_name: String,
    /// Cluster mode: the Secret holding the CA and the serving certificate.
    #[arg(long, env = "ARCGUARD_CERT_SECRET", default_value = "arcguard-tls")]
    pub cert_secret: String,
    /// Cluster mode: the name of arcguard's Validating- and MutatingWebhookConfiguration.
    #[arg(long, env = "ARCGUARD_WEBHOOK_CONFIG_NAME", default_value = "arcguard")]
    pub webhook_config_name: String,
    /// Cluster mode: the Lease used for leader election.
    #[arg(long, env = "ARCGUARD_LEASE_NAME", default_value = "arcguard")]
    pub lease_name: String,
    /// Cluster mode: the Secret is managed by someone else (cert-manager); never write it.
    #[arg(long, env = "ARCGUARD_EXTERNAL_CERTS")]
    pub external_certs: bool,
    /// Cluster mode: keep the webhooks' caBundle in step with the Secret's CA.
    #[arg(long, env = "ARCGUARD_INJECT_CA_BUNDLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub inject_ca_bundle: bool,
    /// Cluster mode: extra subject alternative names of the serving certificate, DNS names or
    /// IP addresses (repeatable or comma-separated), for webhooks reached by
    /// `clientConfig.url` instead of the Service (e.g. `127.0.0.1` out of cluster).
    #[arg(long = "cert-extra-san", env = "ARCGUARD_CERT_EXTRA_SANS", value_delimiter = ',')]
    pub cert_extra_sans: Vec<String>,
    /// Cluster mode: the leader labels pods that lack a true OS label (pods created before
    /// arcguard, in excluded namespaces, mirror pods) with the OS of the node they run on.
    #[arg(long, env = "ARCGUARD_LABEL_EXISTING_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub label_existing_pods: bool,
    /// Cluster mode: time between two passes of that labeller over every pod (it also runs when
    /// a replica starts leading and when a policy brings a new OS label key).
    #[arg(long, env = "ARCGUARD_LABEL_PODS_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub label_pods_interval: Duration,
    /// Cluster mode: time between two background audits of existing objects by the leader
    /// (it also audits when it starts leading, and the namespaces a policy change may reach
    /// when policies change); 0 turns the audit off.
    #[arg(long, env = "ARCGUARD_AUDIT_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub audit_interval: Duration,
    /// Cluster mode: entries listed per audit report, failures first (the report's summary
    /// counts them all); also what the audit holds in memory per namespace.
    #[arg(long, env = "ARCGUARD_AUDIT_MAX_RESULTS", default_value_t = 1000)]
    pub audit_max_results: usize,
    /// Cluster mode: lifetime of a new CA (default five years).
    #[arg(long, env = "ARCGUARD_CA_VALIDITY", value_parser = parse_duration)]
    pub ca_validity: Option<Duration>,
    /// Cluster mode: start a CA rotation this long before the CA expires (default 180 days).
    #[arg(long, env = "ARCGUARD_CA_ROTATE_BEFORE", value_parser = parse_duration)]
    pub ca_rotate_before: Option<Duration>,
    /// Cluster mode: wait between publishing the next CA and switching to it, and between the
    /// switch and dropping the old CA (default 15 minutes).
    #[arg(long, env = "ARCGUARD_CA_OVERLAP", value_parser = parse_duration)]
    pub ca_overlap: Option<Duration>,
    /// Cluster mode: lifetime of a serving certificate (default 90 days).
    #[arg(long, env = "ARCGUARD_SERVING_VALIDITY", value_parser = parse_duration)]
    pub serving_validity: Option<Duration>,
    /// Cluster mode: renew the serving certificate this long before it expires (default 30 days).
    #[arg(long, env = "ARCGUARD_SERVING_RENEW_BEFORE", value_parser = parse_duration)]
    pub serving_renew_before: Option<Duration>,
}

/// Output format of `check` and `audit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// A line per object and per finding.
    Text,
    /// A JSON document.
    Json,
}

/// `arcguard check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Directory of policy files.
    #[arg(long, env = "ARCGUARD_POLICIES", default_value = "policies")]
    pub policies: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// Read registries for imageProvenance policies; without it their checks are skipped, and
    /// the output says so.
    #[arg(long)]
    pub registry: bool,
    /// How registries are reached (with `--registry`).
    #[command(flatten)]
    pub registry_access: RegistryArgs,
    /// Manifest files (multi-document YAML or JSON, `kind: List` included); `-` reads standard input.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// How imageProvenance policies reach registries.
#[derive(Clone, Debug, Args)]
pub struct RegistryArgs {
    /// PEM CA certificates trusted for registries besides the system roots (a private
    /// registry's CA).
    #[arg(long, env = "ARCGUARD_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
    /// A registry (`host[:port]`) read over plain HTTP rather than HTTPS: development only
    /// (repeatable; comma-separated in the environment).
    #[arg(long, env = "ARCGUARD_REGISTRY_PLAIN_HTTP", value_delimiter = ',')]
    pub registry_plain_http: Vec<String>,
    /// Time a request's registry reads (its images and their signatures) may take, counted
    /// from the request's arrival; keep it below the webhooks' timeoutSeconds (5 s in manifests/), so a slow registry gets arcguard's message rather
    /// than the apiserver's timeout.
    #[arg(long, env = "ARCGUARD_REGISTRY_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub registry_timeout: Duration,
}

/// `arcguard audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Judge with the policies in this directory instead of the cluster's ClusterGuardPolicies
    /// and GuardPolicies.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Audit only this namespace (repeatable); cluster-scoped objects are always audited.
    #[arg(long = "namespace", short = 'n')]
    pub namespaces: Vec<String>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// How long to wait for the namespace, node and GMSACredentialSpec caches.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Findings shown per namespace, failures first (the totals count them all); bounds the
    /// memory the audit holds per namespace. 0: no limit.
    #[arg(long, default_value_t = 1000)]
    pub max_results: usize,
}

/// `arcguard certs`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CertsArgs {
    /// In a cluster: revoke arcguard's CA and serving certificate.
    #[command(subcommand)]
    pub action: Option<CertsAction>,
    /// Output directory.
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// DNS names of the serving certificate (repeatable).
    #[arg(long = "dns", default_value = "localhost")]
    pub dns: Vec<String>,
    /// IP addresses of the serving certificate (repeatable).
    #[arg(long = "ip", default_values_t = [IpAddr::from([127, 0, 0, 1])])]
    pub ip: Vec<IpAddr>,
    /// Validity of the serving certificate in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
}

/// `arcguard certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Replace arcguard's CA and serving certificate at once and remove the old CA from the
    /// webhooks' caBundle (annotates the Secret; the leader acts on it).
    Revoke(RevokeArgs),
}

/// `arcguard certs revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// arcguard's namespace.
    #[arg(long, env = "ARCGUARD_NAMESPACE", default_value = "arcguard-system")]
    pub namespace: String,
    /// The certificate Secret.
    #[arg(long, env = "ARCGUARD_CERT_SECRET", default_value = "arcguard-tls")]
    pub secret: String,
}

/// Parses `500ms`, `10s`, `2m`, `12h`, `90d`, or a bare number of seconds.
///
/// # Errors
/// A message naming the accepted forms.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 10s 2m, 12h or 90d"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        "d" => Ok(Duration::from_secs(n.saturating_mul(86_400))),
        _ => Err(format!("{text:?} is not a duration like 500ms, 10s, 2m, 12h or 90d")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert!(parse_duration("10w").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn audit_takes_repeated_namespaces_and_its_defaults() {
        let cli = Cli::try_parse_from(["arcguard", "audit", "-n", "shop", "--namespace", "web"])
            .expect("parses");
        let Command::Audit(args) = cli.command else { panic!("not audit: {:?}", cli.command) };
        assert_eq!(args.namespaces, ["shop", "web"]);
        assert_eq!((args.output, args.timeout), (OutputFormat::Text, Duration::from_secs(30)));
        assert_eq!(args.max_results, 1000);
        assert!(args.policies.is_none());
        let json = Cli::try_parse_from(["arcguard", "audit", "-o", "json", "--policies", "p"])
            .expect("parses");
        let Command::Audit(args) = json.command else { panic!("not audit") };
        assert_eq!(args.output, OutputFormat::Json);
        assert!(Cli::try_parse_from(["arcguard", "audit", "--output", "yaml"]).is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
