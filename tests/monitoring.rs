//! The monitoring that ships with arcguard (`manifests/components/monitoring`, rendered by the
//! chart too): every metric an alert or a dashboard panel uses is one that arcguard's real
//! `/metrics` serves (with the labels the queries select on), the alerts pass their
//! `promtool test rules` unit tests (`tests/monitoring/alerts.test.yaml`), and every dashboard
//! query parses as PromQL.

mod common;
#[path = "monitoring/queries.rs"]
mod queries;
mod tools;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arcguard::server::Limits;
use queries::{alert_rules, dashboard, metrics_in, panel_queries};
use serde_yaml::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const MONITORING: &str = queries::MONITORING;

/// Families only `arcguard serve --cluster` writes; e2e/tests/install.rs checks the queries
/// against its /metrics, where they are present.
const CLUSTER_ONLY: &[&str] =
    &["arcguard_certificate_rotations_total", "arcguard_ca_bundle_injections_total"];

fn root() -> &'static Path {
    Path::new(ROOT)
}

#[test]
fn the_promql_scanner_finds_metric_names_and_the_labels_they_select_on() {
    let found = metrics_in(
        r#"sum by (policy) (increase(a_total{action="Audit",result=~"f.il"}[1h])) > 0 or sum by (policy) (a_total{x!="}"} unless a_total offset 1h) > 0"#,
    );
    let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a_total", "a_total", "a_total"]);
    assert_eq!(found[0].1, ["action".to_owned(), "result".to_owned()].into());
    assert_eq!(found[1].1, ["x".to_owned()].into());
    let found = metrics_in(
        r#"histogram_quantile(0.99, sum by (le) (rate(h_bucket{job=~"$job"}[$__rate_interval]))) - time() < 7 * 86400 and absent(up{job=~".*a.*"} == 1)"#,
    );
    let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["h_bucket", "up"]);
    let served = queries::Exposition::parse(
        "# TYPE a counter\n# TYPE h histogram\n# TYPE g gauge\nb_total{x=\"}\",y=\"1\"} 2\n",
    );
    assert!(served.serves("a_total") && served.serves("h_bucket") && served.serves("g"));
    assert!(!served.serves("a") && !served.serves("g_total") && !served.serves("c"));
    assert_eq!(served.samples["b_total"], ["x".to_owned(), "y".to_owned()].into());
}

// ---------------------------------------------------------------------------------------------
// arcguard's real /metrics

/// arcguard's `/metrics` after it reviewed a denied, a patched and an invalid request and
/// refused an invalid policy file.
async fn served_metrics() -> String {
    let common::Started { dir, running, stop } = common::start_server(Limits::default()).await;
    let ca = std::fs::read(dir.path().join("certs/ca.crt")).expect("ca");
    let client = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("pem"))
        .build()
        .expect("client");
    let base = format!("https://localhost:{}", running.webhook_addr.port());
    for (path, body) in [
        ("/validate", Some("pod-create-untrusted")),
        ("/mutate", Some("pod-create-trusted")),
        ("/validate", None),
    ] {
        let body = body.map_or_else(
            || b"{\"kind\": \"AdmissionReview\"}".to_vec(),
            |f| std::fs::read(format!("{ROOT}/tests/fixtures/{f}.json")).expect("fixture"),
        );
        client
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("review");
    }
    std::fs::write(
        dir.path().join("policies/broken.yaml"),
        "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {name: broken}\nspec: {}\n",
    )
    .expect("write a broken policy");
    let url = format!("http://{}/metrics", running.metrics_addr);
    let failed = r#"arcguard_policy_reloads_total{result="failure"}"#;
    // Wait for the watcher to refuse it; the deadline only bounds a failing test.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = reqwest::get(&url).await.expect("metrics").text().await.expect("text");
        if text.contains(failed) || tokio::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = stop.send(());
    let _ = running.done.await;
    text
}

#[tokio::test]
async fn every_metric_the_alerts_and_the_dashboard_use_is_one_arcguard_serves() {
    let text = served_metrics().await;
    let uses = queries::uses(root());
    assert!(uses.len() >= 20, "{uses:?}");
    let problems = queries::problems(&uses, &text, CLUSTER_ONLY);
    assert_eq!(problems, Vec::<String>::new(), "\n/metrics was:\n{text}");
    let used: BTreeSet<_> = uses.iter().map(|(_, m, _)| m.as_str()).collect();
    eprintln!("checked against /metrics: {used:?}");
}

#[test]
fn the_dashboard_shows_decisions_latency_policy_results_certificates_leader_and_audits() {
    let panels = panel_queries(&dashboard(root()));
    let shows =
        |needle: &str| panels.iter().any(|(_, exprs)| exprs.iter().any(|e| e.contains(needle)));
    for needle in [
        "sum by (decision) (rate(arcguard_admission_requests_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.9,",
        "histogram_quantile(0.99,",
        "sum by (policy, result) (rate(arcguard_policy_results_total",
        "arcguard_certificate_expiry_timestamp_seconds",
        "arcguard_leader",
        r#"action="Audit",result="fail""#,
    ] {
        assert!(shows(needle), "no panel queries {needle}");
    }
    let titles: BTreeSet<_> = panels.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(titles.len(), panels.len(), "panel titles repeat");
    let ids: BTreeSet<_> = dashboard(root())["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids.len(), panels.len(), "panel ids repeat");
}

// ---------------------------------------------------------------------------------------------
// promtool

fn promtool(dir: &Path, args: &[&str]) -> String {
    let promtool = tools::tool("promtool").expect("checked by the caller");
    let output = Command::new(&promtool)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", promtool.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// The PrometheusRule's `spec` as a Prometheus rule file in `dir`.
fn write_rule_file(dir: &Path) {
    let text =
        std::fs::read_to_string(Path::new(ROOT).join(MONITORING).join("prometheusrule.yaml"))
            .expect("prometheusrule.yaml");
    let rule: Value = serde_yaml::from_str(&text).expect("yaml");
    std::fs::write(dir.join("rules.yaml"), serde_yaml::to_string(&rule["spec"]).expect("yaml"))
        .expect("write rules.yaml");
}

#[test]
fn the_alerts_pass_their_promtool_unit_tests() {
    let Some(_) = tools::tool("promtool") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    write_rule_file(dir.path());
    std::fs::copy(
        Path::new(ROOT).join("tests/monitoring/alerts.test.yaml"),
        dir.path().join("alerts.test.yaml"),
    )
    .expect("copy the tests");
    let checked = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(dir.path(), &["test", "rules", "alerts.test.yaml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_promtool_test_that_fires_it() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("tests/monitoring/alerts.test.yaml"))
        .expect("alerts.test.yaml");
    let tests: Value = serde_yaml::from_str(&text).expect("yaml");
    let fired: BTreeSet<&str> = tests["tests"]
        .as_sequence()
        .expect("tests")
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().into_iter().flatten())
        .filter(|t| t["exp_alerts"].as_sequence().is_some_and(|a| !a.is_empty()))
        .filter_map(|t| t["alertname"].as_str())
        .collect();
    let alerts: BTreeSet<String> = alert_rules(root()).into_iter().map(|(a, _)| a).collect();
    for alert in [
        "ArcguardCertificateExpiringSoon",
        "ArcguardWebhookErrors",
        "ArcguardHighLatency",
        "ArcguardNoLeader",
        "ArcguardMemoryBudgetExhausted",
        "ArcguardWebhooksFailOpen",
        "ArcguardPolicyReloadFailing",
        "ArcguardAuditViolations",
        "ArcguardAuditStale",
        "ArcguardDown",
    ] {
        assert!(alerts.contains(alert), "no alert {alert}");
    }
    for alert in &alerts {
        assert!(fired.contains(alert.as_str()), "no promtool test expects {alert} to fire");
    }
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let Some(_) = tools::tool("promtool") else { return };
    // Each query as a recording rule, with Grafana's variables replaced by what they expand to.
    let mut rules = Vec::new();
    for (n, (title, exprs)) in panel_queries(&dashboard(root())).into_iter().enumerate() {
        for (m, expr) in exprs.into_iter().enumerate() {
            let expr = expr
                .replace("$__rate_interval", "2m")
                .replace("$__range", "6h")
                .replace("$job", ".*")
                .replace("$webhook", ".*");
            assert!(!expr.contains('$'), "{title}: an unknown variable in {expr}");
            rules.push(
                serde_json::json!({"record": format!("dashboard:panel{n}:query{m}"), "expr": expr}),
            );
        }
    }
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("dashboard.yaml"), serde_yaml::to_string(&file).expect("yaml"))
        .expect("write");
    let checked = promtool(dir.path(), &["check", "rules", "--lint=none", "dashboard.yaml"]);
    assert!(checked.contains(&format!("SUCCESS: {} rules found", rules.len())), "{checked}");
}
