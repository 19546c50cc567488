//! `arcguard audit` against a real apiserver, as an operator runs it from a workstation: the
//! built binary with the cluster's admin kubeconfig judges pods written before a policy with the
//! cluster's policies, prints the bad one with the policy's name and exits 1; `--output json`
//! parses; once the bad pod is gone it exits 0; a namespace that does not exist exits 2.

use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use arcguard_e2e::{Cluster, ClusterOptions, apply, eventually, pods_before_policies};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use serde_json::{Value, json};

#[tokio::test]
async fn arcguard_audit_judges_existing_objects_with_the_clusters_policies() {
    // The leader's background audit off: this scenario is about the command, which writes
    // nothing and reads nothing the leader writes.
    let mut cluster = Cluster::start(ClusterOptions::with_args(&["--audit-interval=0s"]))
        .await
        .expect("the cluster starts");
    let result = audit_cli(&mut cluster).await;
    cluster.check(result);
}

/// Runs `arcguard audit ARGS` with the cluster's admin kubeconfig.
fn arcguard_audit(cluster: &Cluster, args: &[&str]) -> Result<Output> {
    let output = std::process::Command::new(arcguard_e2e::bins::arcguard_bin()?)
        .arg("audit")
        .args(args)
        .env("KUBECONFIG", &cluster.control_plane.kubeconfig)
        .output()
        .context("running arcguard audit")?;
    Ok(output)
}

/// The exit code, standard output and standard error of a run.
fn parts(output: &Output) -> (Option<i32>, String, String) {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code(), text(&output.stdout), text(&output.stderr))
}

async fn audit_cli(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    // Only the scenario's policies, so what is judged is theirs; pods written before them.
    let ns = pods_before_policies(&client, "audit-cli").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let (deny, warn) = (format!("e2e-deny-{ns}"), format!("e2e-warn-{ns}"));
    for (name, action) in [(&deny, "Deny"), (&warn, "Warn")] {
        apply(
            &client,
            &json!({
                "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
                "metadata": {"name": name},
                "spec": {
                    "action": action,
                    "match": {"namespaces": [ns]},
                    "trustedRegistries": {"registries": ["contoso.azurecr.io/team-a"]}
                }
            }),
        )
        .await?;
    }

    // Text: the bad pod fails with the Deny policy's name, the good one passes; exit 1.
    let (code, stdout, stderr) = parts(&arcguard_audit(cluster, &[])?);
    ensure!(code == Some(1), "exit {code:?}\n{stdout}{stderr}");
    let bad = format!("FAIL Pod {ns}/bad\n");
    ensure!(stdout.contains(&bad), "{bad:?} in\n{stdout}{stderr}");
    ensure!(stdout.contains(&format!("  deny: {deny}: ")), "{stdout}");
    ensure!(stdout.contains(&format!("  warn: {warn}: ")), "{stdout}");
    ensure!(
        stdout.contains("docker.io/library/nginx:1.27"),
        "the message names the image: {stdout}"
    );
    ensure!(stdout.contains(&format!("PASS Pod {ns}/good\n")), "{stdout}");
    ensure!(stdout.contains("objects judged"), "a summary line: {stdout}");

    // JSON, for the same namespace only: a document with the results and the totals.
    let (code, stdout, stderr) = parts(&arcguard_audit(cluster, &["-n", &ns, "-o", "json"])?);
    ensure!(code == Some(1), "exit {code:?}\n{stdout}{stderr}");
    let doc: Value = serde_json::from_str(&stdout).with_context(|| format!("JSON: {stdout}"))?;
    ensure!(doc["denied"] == true, "{doc}");
    ensure!(doc["totals"]["fail"] == 1 && doc["totals"]["pass"] == 1, "{doc}");
    let results = doc["results"].as_array().cloned().unwrap_or_default();
    let failed = results
        .iter()
        .find(|r| r["name"] == "bad" && r["namespace"] == ns.as_str())
        .with_context(|| format!("the bad pod in {doc}"))?;
    ensure!(failed["verdict"] == "fail", "{failed}");
    let policies_named: Vec<&Value> = failed["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["result"] != "pass")
        .map(|f| &f["policy"])
        .collect();
    ensure!(policies_named.contains(&&json!(deny)), "{failed}");

    // The bad pod gone: nothing a Deny policy fails on, exit 0 (the Warn policy's finding on
    // the good pod is none: it passes too).
    pods.delete("bad", &DeleteParams::default().grace_period(0)).await?;
    eventually(Duration::from_secs(30), || async {
        ensure!(pods.get_opt("bad").await?.is_none(), "the bad pod is still there");
        Ok(())
    })
    .await?;
    let (code, stdout, stderr) = parts(&arcguard_audit(cluster, &["--namespace", &ns])?);
    ensure!(code == Some(0), "exit {code:?}\n{stdout}{stderr}");
    ensure!(!stdout.contains("bad"), "{stdout}");
    ensure!(stdout.contains(&format!("PASS Pod {ns}/good\n")), "{stdout}");

    // Errors exit 2: a namespace that does not exist.
    let (code, stdout, stderr) = parts(&arcguard_audit(cluster, &["-n", "no-such-namespace"])?);
    ensure!(code == Some(2), "exit {code:?}\n{stdout}{stderr}");
    ensure!(stderr.contains("no-such-namespace"), "{stderr}");
    Ok(())
}
