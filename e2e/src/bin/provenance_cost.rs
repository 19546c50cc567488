//! What imageProvenance costs an admission: a real registry (CNCF Distribution on loopback,
//! HTTPS with its own CA) holding images signed by the real cosign, and `arcguard serve` with
//! an imageProvenance policy requiring those signatures. Run by `bench/provenance.sh`; figures
//! in BENCHMARKS.md.
//!
//! 1. **Latency, first seen and cached.** One standalone arcguard (the sample policies, the
//!    local registry trusted, and the imageProvenance policy) is sent `--images` POST /validate
//!    reviews one after another, each for a pod whose one image it has never seen (signed,
//!    pushed beforehand): the registry is read (the manifest, the `.sig` tag, its payload) and
//!    the signature verified. Then the same reviews again: every answer from the cache. p50,
//!    p90, p99 and max of each, in milliseconds, client side (TLS included, one keep-alive
//!    connection).
//! 2. **Throughput, cached.** `bench/load.sh` for two servers, in turns: the sample policies on
//!    the realistic pod review (today's /validate), then the same review with its three images
//!    in the local registry, signed, under the sample policies plus imageProvenance with
//!    signatures (its reads are all cache hits after the first request). `RUNS` rounds (default
//!    3), each one `bench/load.sh` run of each server, today's first in odd rounds and
//!    imageProvenance's first in even ones: the two figures of a round are taken a minute
//!    apart, so a machine that slows down during the benchmark (a shared VM does) moves both,
//!    not the ratio. The summary gives medians and the median of the rounds' ratios, with
//!    min–max.
//!
//! Usage: `provenance_cost [--images N]`; the environment of `bench/load.sh` (DURATION, RUNS,
//! CONNECTIONS, PROTOCOLS, ENDPOINTS) passes through to it.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use arcguard_e2e::process::{Proc, Scratch, free_port};
use arcguard_e2e::registry::Registry;
use arcguard_e2e::signing::CosignKey;
use serde_json::{Value, json};

#[tokio::main]
async fn main() -> Result<()> {
    let mut images = 30usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--images" => images = args.next().context("--images N")?.parse()?,
            other => bail!("unknown argument {other} (--images N)"),
        }
    }
    let root = arcguard_e2e::cluster::repo_root();
    let scratch = Scratch::new("provenance-cost")?;
    let dir = scratch.path();
    let registry = Registry::start().await?;
    let key = CosignKey::generate(dir, "bench")?;
    let host = registry.host.clone();
    eprintln!("[provenance_cost] registry {host}: pushing and signing {images} images");

    // The realistic review, its images moved to the local registry (pushed and signed).
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(
        root.join("tests/fixtures/pod-create-trusted.json"),
    )?)?;
    let mut review = fixture.clone();
    let spec = &mut review["request"]["object"]["spec"];
    for group in ["initContainers", "containers", "ephemeralContainers"] {
        // `get_mut`: indexing would add the lists the pod lacks, as nulls.
        for container in spec.get_mut(group).and_then(Value::as_array_mut).into_iter().flatten() {
            let image = container["image"].as_str().unwrap_or_default().to_owned();
            let (_, path) = image.split_once('/').context("a registry host")?;
            let name = path.split(['@', ':']).next().unwrap_or(path);
            let digest =
                registry.push_index(name, "1.0", &[("linux", "amd64"), ("linux", "arm64")]).await?;
            key.sign(&registry, &format!("{host}/{name}@{digest}"))?;
            // As the mutating webhook leaves them: tags pinned to the digest checked.
            container["image"] = json!(if image.contains('@') {
                format!("{host}/{name}@{digest}")
            } else {
                format!("{host}/{name}:1.0@{digest}")
            });
        }
    }
    let review_path = dir.join("review.json");
    std::fs::write(&review_path, serde_json::to_vec(&review)?)?;
    let mut fresh = Vec::new();
    for i in 0..images {
        let name = format!("fresh/app-{i}");
        let digest = registry.push_index(&name, "1", &[("linux", "amd64")]).await?;
        key.sign(&registry, &format!("{host}/{name}@{digest}"))?;
        fresh.push((format!("{host}/{name}:1"), format!("{host}/{name}:1@{digest}")));
    }

    // The sample policies, the local registry trusted, and imageProvenance with signatures.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies)?;
    for entry in std::fs::read_dir(root.join("policies"))? {
        let entry = entry?;
        let text = std::fs::read_to_string(entry.path())?;
        let text = text.replace(
            "      - contoso.azurecr.io\n",
            &format!("      - contoso.azurecr.io\n      - {host}\n"),
        );
        std::fs::write(policies.join(entry.file_name()), text)?;
    }
    let policy = json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": "provenance"},
        "spec": {"imageProvenance": {"registries": [host],
                 "signatures": {"cosign": {"publicKeys": [key.public_pem]}}}}
    });
    std::fs::write(policies.join("provenance.json"), serde_json::to_vec_pretty(&policy)?)?;
    let serve_args = format!("--registry-ca {}", registry.ca_path.display());

    println!("## imageProvenance: first seen and cached\n");
    latency(dir, &policies, &registry.ca_path, &fixture, &fresh).await?;

    println!("\n## imageProvenance: cached throughput against today's /validate\n");
    let rounds: usize = std::env::var("RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let servers = [
        (
            "today: the sample policies",
            root.join("policies"),
            root.join("tests/fixtures/pod-create-trusted.json"),
            String::new(),
        ),
        (
            "imageProvenance with cosign signatures, cached",
            policies.clone(),
            review_path.clone(),
            serve_args.clone(),
        ),
    ];
    // (server, "h1 /validate") to requests per second, one per round.
    let mut figures: std::collections::BTreeMap<(usize, String), Vec<f64>> = Default::default();
    for round in 1..=rounds {
        // ABBA: odd rounds run today's server first, even rounds imageProvenance's, so a
        // machine that runs slower for the second of two runs (a turbo budget spent, a
        // neighbour waking up) does not favour one of them.
        let order: [usize; 2] = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for server in order {
            let (title, policies, fixture, args) = &servers[server];
            println!("### round {round} of {rounds}: {title}\n");
            let output = Command::new("bash")
                .arg(root.join("bench/load.sh"))
                .env("SKIP_BUILD", "1")
                .env("RUNS", "1")
                .env("POLICIES", policies)
                .env("FIXTURE", fixture)
                .env("SERVE_ARGS", args)
                .env(
                    "ENDPOINTS",
                    std::env::var("ENDPOINTS").unwrap_or_else(|_| "validate mutate".into()),
                )
                .stderr(std::process::Stdio::piped())
                .output()
                .context("running bench/load.sh")?;
            print!("{}", String::from_utf8_lossy(&output.stdout));
            let stderr = String::from_utf8_lossy(&output.stderr);
            eprint!("{stderr}");
            ensure!(output.status.success(), "bench/load.sh failed ({})", output.status);
            // `bench/load.sh: run 1 h1 /validate c=64: 30992.0 req/s`
            for line in stderr.lines().filter_map(|l| l.strip_prefix("bench/load.sh: run 1 ")) {
                let mut words = line.split_whitespace();
                let (Some(protocol), Some(path), Some(_), Some(rate)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    continue;
                };
                if let Ok(rate) = rate.parse::<f64>() {
                    figures.entry((server, format!("{protocol} {path}"))).or_default().push(rate);
                }
            }
        }
    }
    println!("## Summary: {rounds} rounds, each server once in each (alternating which first)\n");
    println!(
        "| protocol, path | today req/s median (min–max) | imageProvenance, cached, req/s median (min–max) | ratio, median of rounds (min–max) |"
    );
    println!("|---|---:|---:|---:|");
    let paths: std::collections::BTreeSet<&String> = figures.keys().map(|(_, p)| p).collect();
    for path in paths {
        let today = figures.get(&(0, path.clone())).cloned().unwrap_or_default();
        let with = figures.get(&(1, path.clone())).cloned().unwrap_or_default();
        let ratios: Vec<f64> = today.iter().zip(&with).map(|(t, w)| w / t * 100.0).collect();
        println!(
            "| {path} | {} | {} | {} |",
            spread(&today, 0),
            spread(&with, 0),
            spread(&ratios, 0).replace(" (", " % (").replace(')', " %)")
        );
    }
    drop(registry);
    Ok(())
}

/// `median (min–max)` of `values`, with `decimals`; `–` for none.
fn spread(values: &[f64], decimals: usize) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(min), Some(max)) => {
            let median = sorted[sorted.len() / 2];
            format!("{median:.decimals$} ({min:.decimals$}–{max:.decimals$})")
        }
        _ => "–".to_owned(),
    }
}

/// Starts a standalone arcguard on `policies` and times /validate for each of `images`
/// (first seen), then for each again (cached).
async fn latency(
    dir: &Path,
    policies: &Path,
    registry_ca: &Path,
    fixture: &Value,
    images: &[(String, String)],
) -> Result<()> {
    let bin = arcguard_e2e::bins::arcguard_bin()?;
    let certs = dir.join("certs");
    let status = Command::new(bin).args(["certs", "--out"]).arg(&certs).output()?;
    ensure!(status.status.success(), "arcguard certs failed");
    let (port, metrics) = (free_port()?, free_port()?);
    let mut command = Command::new(bin);
    command
        .args(["serve", "--no-dev-certs", "--policies"])
        .arg(policies)
        .arg(format!("--addr=127.0.0.1:{port}"))
        .arg(format!("--metrics-addr=127.0.0.1:{metrics}"))
        .arg("--tls-cert")
        .arg(certs.join("tls.crt"))
        .arg("--tls-key")
        .arg(certs.join("tls.key"))
        .arg("--registry-ca")
        .arg(registry_ca);
    let mut server = Proc::spawn("arcguard", command, &dir.join("arcguard.log"))?;
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(
            certs.join("ca.crt"),
        )?)?)
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = format!("https://127.0.0.1:{port}");
    let started = Instant::now();
    while !http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        if started.elapsed() > Duration::from_secs(20) || server.exited().is_some() {
            bail!("arcguard did not get ready\n{}", server.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let review = |image: &str| {
        let mut review = fixture.clone();
        review["request"]["object"]["spec"] =
            json!({"containers": [{"name": "app", "image": image}]});
        serde_json::to_vec(&review)
    };
    // As the apiserver calls them: /mutate with the pod as written (the tag is read, its
    // signatures verified, the digest pinned), then /validate with the pinned pod.
    let mut rows = Vec::new();
    for round in ["first seen", "cached"] {
        let (mut mutate, mut validate) = (Vec::new(), Vec::new());
        for (tag, pinned) in images {
            for (path, image, times) in
                [("mutate", tag, &mut mutate), ("validate", pinned, &mut validate)]
            {
                let body = review(image)?;
                let start = Instant::now();
                let response = http
                    .post(format!("{base}/{path}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?
                    .text()
                    .await?;
                times.push(start.elapsed());
                ensure!(
                    response.contains("\"allowed\":true"),
                    "{path} {image} was not admitted: {response}"
                );
                if path == "mutate" {
                    ensure!(response.contains("\"patch\""), "{image} was not pinned: {response}");
                }
            }
        }
        for (path, mut times) in [("/mutate (the tag)", mutate), ("/validate (pinned)", validate)] {
            times.sort();
            let at = |q: f64| {
                let index = ((times.len() as f64 - 1.0) * q).round() as usize;
                times[index].as_secs_f64() * 1e3
            };
            rows.push(format!(
                "| {round} | {path} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                times.len(),
                at(0.5),
                at(0.9),
                at(0.99),
                at(1.0)
            ));
        }
    }
    println!("| image | request, one image | requests | p50 ms | p90 ms | p99 ms | max ms |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    for row in rows {
        println!("{row}");
    }
    server.stop(Duration::from_secs(10)).await;
    Ok(())
}
