//! The metrics arcguard's alerts and dashboard query, checked against a `/metrics` text.
//! Shared by `tests/monitoring.rs` (standalone arcguard, in process) and
//! `e2e/tests/install.rs` (`arcguard serve --cluster` against a real apiserver), each of which
//! includes this file as a module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value as Json;
use serde_yaml::Value;

/// Where the monitoring component lives, from the repository root.
pub const MONITORING: &str = "manifests/components/monitoring";

/// Metrics the queries use that others export, and who does.
pub const FOREIGN: &[(&str, &str)] = &[
    ("up", "Prometheus, per scrape target"),
    (
        "apiserver_admission_webhook_rejection_count",
        "kube-apiserver (e2e/tests/install.rs reads it)",
    ),
];

/// Labels Prometheus adds to every scraped series (the ServiceMonitor's target labels).
pub const TARGET_LABELS: &[&str] =
    &["job", "namespace", "pod", "instance", "service", "endpoint", "container"];

/// The alerting rules of the PrometheusRule, as (alert, expr).
#[must_use]
pub fn alert_rules(root: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(root.join(MONITORING).join("prometheusrule.yaml"))
        .expect("prometheusrule.yaml");
    let rule: Value = serde_yaml::from_str(&text).expect("yaml");
    rule["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules").iter())
        .map(|r| {
            (
                r["alert"].as_str().expect("only alerting rules").to_owned(),
                r["expr"].as_str().expect("expr").to_owned(),
            )
        })
        .collect()
}

/// The Grafana dashboard.
#[must_use]
pub fn dashboard(root: &Path) -> Json {
    let text =
        std::fs::read_to_string(root.join(MONITORING).join("dashboard.json")).expect("dashboard");
    serde_json::from_str(&text).expect("dashboard JSON")
}

/// Every panel's (title, queries).
#[must_use]
pub fn panel_queries(dashboard: &Json) -> Vec<(String, Vec<String>)> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| {
            let title = p["title"].as_str().expect("title").to_owned();
            let exprs = p["targets"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|t| t["expr"].as_str().expect("expr").to_owned())
                .collect();
            (title, exprs)
        })
        .collect()
}

/// The metric of each `label_values(metric, label)` template variable query.
#[must_use]
pub fn variable_metrics(dashboard: &Json) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .filter_map(|v| v["query"]["query"].as_str())
        .map(|q| {
            let inner = q.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')'));
            let inner = inner.unwrap_or_else(|| panic!("unexpected variable query {q}"));
            inner.split(',').next().expect("metric").trim().to_owned()
        })
        .collect()
}

/// One use of a metric: who uses it (an alert, a panel), the metric and the labels its
/// selector names.
pub type Use = (String, String, BTreeSet<String>);

/// Every metric the alerts and the dashboard use.
#[must_use]
pub fn uses(root: &Path) -> Vec<Use> {
    let dashboard = dashboard(root);
    let mut out: Vec<Use> = Vec::new();
    for (alert, expr) in alert_rules(root) {
        out.extend(metrics_in(&expr).into_iter().map(|(m, l)| (format!("alert {alert}"), m, l)));
    }
    for (title, exprs) in panel_queries(&dashboard) {
        for expr in exprs {
            let found = metrics_in(&expr).into_iter();
            out.extend(found.map(|(m, l)| (format!("panel {title:?}"), m, l)));
        }
    }
    for metric in variable_metrics(&dashboard) {
        out.push(("dashboard variable".to_owned(), metric, BTreeSet::new()));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A PromQL scanner: enough to find metric names and the labels their selectors name

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];
const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The index after the string literal starting at `chars[i]`.
fn skip_string(chars: &[char], mut i: usize) -> usize {
    let quote = chars[i];
    i += 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Every metric name in `expr`, with the label names of its selector's matchers.
#[must_use]
pub fn metrics_in(expr: &str) -> Vec<(String, BTreeSet<String>)> {
    let chars: Vec<char> = expr.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A Grafana variable, a number or a duration.
            i += 1;
            while i < chars.len() && (is_ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c == '{' {
            // A selector without a metric name.
            i = matcher_labels(&chars, i).1;
        } else if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            if GROUPING.contains(&word.as_str()) {
                if chars.get(next) == Some(&'(') {
                    while next < chars.len() && chars[next] != ')' {
                        next += 1;
                    }
                    i = next + 1;
                }
            } else if KEYWORDS.contains(&word.as_str()) || chars.get(next) == Some(&'(') {
                // An operator, an aggregation or a function.
            } else if chars.get(next) == Some(&'{') {
                let (labels, end) = matcher_labels(&chars, next);
                found.push((word, labels));
                i = end;
            } else {
                found.push((word, BTreeSet::new()));
            }
        } else {
            i += 1;
        }
    }
    found
}

/// The label names in the selector (or sample label set) starting at `chars[open] == '{'`, and
/// the index after its `}`.
#[must_use]
pub fn matcher_labels(chars: &[char], open: usize) -> (BTreeSet<String>, usize) {
    let mut labels = BTreeSet::new();
    let mut i = open + 1;
    let mut name = String::new();
    while i < chars.len() && chars[i] != '}' {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(chars, i);
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' {
            name.push(c);
        } else if matches!(c, '=' | '!') && !name.is_empty() {
            labels.insert(std::mem::take(&mut name));
        }
        i += 1;
    }
    (labels, i + 1)
}

// ---------------------------------------------------------------------------------------------
// What a /metrics text serves

/// Each family's type, and each sample name's label names.
#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name to type (`counter`, `gauge`, `histogram`, ...).
    pub families: BTreeMap<String, String>,
    /// Sample name to the label names seen on it.
    pub samples: BTreeMap<String, BTreeSet<String>>,
}

impl Exposition {
    /// Parses a Prometheus or OpenMetrics text.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (name, kind) = (parts.next().expect("name"), parts.next().expect("type"));
                out.families.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.trim().is_empty() {
                let end = line.find(['{', ' ']).expect("a sample line");
                let labels = out.samples.entry(line[..end].to_owned()).or_default();
                if line[end..].starts_with('{') {
                    let chars: Vec<char> = line[end..].chars().collect();
                    labels.extend(matcher_labels(&chars, 0).0);
                }
            }
        }
        out
    }

    /// Whether `name` is a sample name this text serves or, for a family without samples yet,
    /// would serve (a counter's `_total`, a histogram's `_bucket`, `_sum`, `_count`).
    #[must_use]
    pub fn serves(&self, name: &str) -> bool {
        self.samples.contains_key(name)
            || self.families.iter().any(|(family, kind)| {
                let suffixes: &[&str] = match kind.as_str() {
                    "counter" => &["_total"],
                    "histogram" => &["_bucket", "_sum", "_count"],
                    _ => &[""],
                };
                suffixes.iter().any(|s| name == format!("{family}{s}"))
            })
    }
}

/// Every use whose metric `text` does not serve (unless it is in `absent_ok` or [`FOREIGN`]),
/// or whose selector names a label the served samples lack.
#[must_use]
pub fn problems(uses: &[Use], text: &str, absent_ok: &[&str]) -> Vec<String> {
    let served = Exposition::parse(text);
    let mut out = Vec::new();
    for (user, metric, labels) in uses {
        if FOREIGN.iter().any(|(name, _)| name == metric) {
            continue;
        }
        if !served.serves(metric) {
            if !absent_ok.contains(&metric.as_str()) {
                out.push(format!("{user}: {metric} is not in arcguard's /metrics"));
            }
            continue;
        }
        // The labels a selector names must be ones arcguard puts on the metric, or target
        // labels; families without samples yet have none to compare with.
        if let Some(served_labels) = served.samples.get(metric) {
            for label in labels {
                if !served_labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    out.push(format!("{user}: {metric} has no label {label} ({served_labels:?})"));
                }
            }
        }
    }
    out
}
