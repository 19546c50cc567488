//! The background audit against a real apiserver: objects that violate a policy created before
//! the policy exists show up in the namespace's OpenReports Report and in the policy's status;
//! a Warn and an Audit policy report as warn and fail with their severities; fixing an object
//! clears its entry; deleting a policy removes its entries.

use std::time::Duration;

use anyhow::{Result, anyhow, ensure};
use arcguard::policy::crd::ClusterGuardPolicy;
use arcguard_e2e::{
    Cluster, ClusterOptions, apply, eventually, install_report_crds, pods_before_policies,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

/// Full audits run this often here, so a fixed object is seen without a policy change.
const INTERVAL: &str = "--audit-interval=3s";
/// Long enough for an audit run and its writes on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(60);

#[tokio::test]
async fn existing_objects_are_audited_into_reports_and_policy_status() {
    let mut cluster =
        Cluster::start(ClusterOptions::with_args(&[INTERVAL])).await.expect("the cluster starts");
    let result = audit(&mut cluster).await;
    cluster.check(result);
}

fn policy(name: &str, ns: &str, action: &str) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {
            "action": action,
            "match": {"namespaces": [ns]},
            "trustedRegistries": {"registries": ["contoso.azurecr.io/team-a"]}
        }
    })
}

/// The (policy, object, result, severity) entries of the namespace's report, and its summary.
async fn report(
    reports: &Api<DynamicObject>,
) -> Result<(Vec<(String, String, String, String)>, Value)> {
    let report = reports.get_opt("arcguard").await?.ok_or_else(|| anyhow!("no Report yet"))?;
    let results = report.data["results"].as_array().cloned().unwrap_or_default();
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let entries = results
        .iter()
        .map(|r| {
            (
                text(&r["policy"]),
                text(&r["resources"][0]["name"]),
                text(&r["result"]),
                text(&r["severity"]),
            )
        })
        .collect();
    Ok((entries, report.data["summary"].clone()))
}

async fn audit(cluster: &mut Cluster) -> Result<()> {
    let client = cluster.client().await?;
    install_report_crds(&client).await?;
    // This cluster's own: only the scenario's policies, so its namespace's report is theirs;
    // pods written before any policy judges them.
    let ns = pods_before_policies(&client, "audited").await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let policies: Api<ClusterGuardPolicy> = Api::all(client.clone());

    let (deny, warn, audit) =
        (format!("e2e-deny-{ns}"), format!("e2e-warn-{ns}"), format!("e2e-audit-{ns}"));
    for (name, action) in [(&deny, "Deny"), (&warn, "Warn"), (&audit, "Audit")] {
        apply(&client, &policy(name, &ns, action)).await?;
    }
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("openreports.io", "v1alpha1", "Report"),
        "reports",
    );
    let reports: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let entry = |policy: &str, object: &str, result: &str, severity: &str| {
        (policy.to_owned(), object.to_owned(), result.to_owned(), severity.to_owned())
    };
    eventually(PROPAGATION, || async {
        let (entries, summary) = report(&reports).await?;
        for expected in [
            entry(&deny, "bad", "fail", "high"),
            entry(&audit, "bad", "fail", "medium"),
            entry(&warn, "bad", "warn", "low"),
            entry(&deny, "good", "pass", "high"),
        ] {
            ensure!(entries.contains(&expected), "{expected:?} in {entries:?}");
        }
        ensure!(summary["fail"].as_u64() >= Some(2), "summary {summary}");
        Ok(())
    })
    .await?;

    // Each policy's status says what the audit found, and the metric too.
    eventually(PROPAGATION, || async {
        let status = policies.get(&deny).await?.status.unwrap_or_default();
        let audit = status.audit.ok_or_else(|| anyhow!("no audit status yet"))?;
        ensure!((audit.fail, audit.pass) == (1, 1), "{audit:?}");
        ensure!(audit.last_run.is_some(), "{audit:?}");
        let metric = format!("arcguard_audit_results{{policy=\"{deny}\",result=\"fail\"}}");
        ensure!(cluster.arcguard.metric(&metric).await? == 1.0, "{metric}");
        Ok(())
    })
    .await?;

    // Fixing the object (here: deleting the bad pod) clears its entries at the next audit.
    pods.delete("bad", &DeleteParams::default().grace_period(0)).await?;
    eventually(PROPAGATION, || async {
        let (entries, _) = report(&reports).await?;
        ensure!(!entries.iter().any(|(_, object, _, _)| object == "bad"), "{entries:?}");
        Ok(())
    })
    .await?;

    // Deleting a policy removes its entries.
    policies.delete(&warn, &DeleteParams::default()).await?;
    eventually(PROPAGATION, || async {
        let (entries, _) = report(&reports).await?;
        ensure!(!entries.iter().any(|(policy, _, _, _)| *policy == warn), "{entries:?}");
        Ok(())
    })
    .await?;

    // Nothing left to report in the namespace: its report goes.
    for name in [&deny, &audit] {
        policies.delete(name, &DeleteParams::default()).await?;
    }
    eventually(PROPAGATION, || async {
        ensure!(reports.get_opt("arcguard").await?.is_none(), "the report is still there");
        Ok(())
    })
    .await?;
    Ok(())
}
