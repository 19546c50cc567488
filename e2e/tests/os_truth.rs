//! A pod's OS is the node's: scenarios on one shared cluster (sample policies installed) with
//! Linux and Windows Node objects created as plain API objects (no kubelet). Pods placed on a
//! node by `spec.nodeName`, bindings posted as the scheduler posts them, label flips through
//! `pods/status`, scheduling-gated pods re-pinned, host-endpoint policies, and pods that exist
//! before arcguard sees them: they stay selected by scoped policies and get labelled.

use std::time::Duration;

use anyhow::{Result, ensure};
use arcguard_e2e::{apply, calico_api, denial, eventually, namespace, shared};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

const KEY: &str = "arcguard.io/os";
/// Long enough for the labeller (a pass every 2 s in these clusters) and watch propagation.
const PROPAGATION: Duration = Duration::from_secs(60);

async fn run<F, Fut>(scenario: F)
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let cluster = shared();
    let client = cluster.client().await.expect("an admin client");
    cluster.check(scenario(client).await);
}

/// Creates a Linux node and a Windows node named after `ns`, as the kubelet labels them.
async fn nodes(client: &kube::Client, ns: &str) -> Result<(String, String)> {
    let (linux, windows) = (format!("lin-{ns}"), format!("win-{ns}"));
    apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": linux,
            "labels": {"kubernetes.io/os": "linux", "beta.kubernetes.io/os": "linux"}}}),
    )
    .await?;
    apply(
        client,
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": windows,
            "labels": {"kubernetes.io/os": "windows", "beta.kubernetes.io/os": "windows",
                       "node.kubernetes.io/windows-build": "10.0.20348"}}}),
    )
    .await?;
    Ok((linux, windows))
}

fn pod_with(name: &str, spec: Value) -> Result<Pod> {
    let mut spec = spec;
    spec["containers"] =
        json!([{"name": "app", "image": "mcr.microsoft.com/windows/servercore:ltsc2022"}]);
    Ok(serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?)
}

fn os_label(pod: &Pod) -> Option<String> {
    pod.metadata.labels.as_ref().and_then(|l| l.get(KEY).cloned())
}

/// The message every Windows pod without gMSA is denied with (sample policy windows-gmsa).
const NO_GMSA: &str = "without a gMSA credential spec";

#[tokio::test]
async fn pods_are_judged_by_the_node_they_are_placed_on_and_by_every_os_signal() {
    run(|client| async move {
        let ns = namespace(&client, "placed", &[]).await?;
        let (linux, windows) = nodes(&client, &ns).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();

        // Placed on a Windows node without any OS signal: a Windows pod, so gMSA is required.
        let message =
            denial(&pods.create(&pp, &pod_with("on-win", json!({"nodeName": windows}))?).await);
        ensure!(message.contains(NO_GMSA), "nodeName on a Windows node: {message}");
        ensure!(message.contains(&format!("node \"{windows}\"")), "names the node: {message}");
        // The deprecated beta label and the Windows-only build label pin Windows too.
        for (name, selector) in [
            ("beta", json!({"beta.kubernetes.io/os": "windows"})),
            ("build", json!({"node.kubernetes.io/windows-build": "10.0.20348"})),
        ] {
            let message = denial(
                &pods.create(&pp, &pod_with(name, json!({"nodeSelector": selector}))?).await,
            );
            ensure!(message.contains(NO_GMSA), "{name}: {message}");
        }
        // Contradictory signals: a pod that can never run.
        let contradiction = pod_with(
            "never",
            json!({"os": {"name": "linux"}, "nodeSelector": {"kubernetes.io/os": "windows"}}),
        )?;
        let message = denial(&pods.create(&pp, &contradiction).await);
        ensure!(message.contains("this pod can never run"), "contradiction: {message}");
        // A node arcguard does not know: refused, to be retried.
        let message = denial(
            &pods.create(&pp, &pod_with("nowhere", json!({"nodeName": "no-such-node"}))?).await,
        );
        ensure!(message.contains("which arcguard does not know"), "unknown node: {message}");

        // Placed on a Linux node: labelled linux, with the nodeSelector that agrees with it.
        let stored = pods.create(&pp, &pod_with("on-lin", json!({"nodeName": linux}))?).await?;
        ensure!(
            os_label(&stored).as_deref() == Some("linux"),
            "label: {:?}",
            stored.metadata.labels
        );
        let selector = stored.spec.and_then(|s| s.node_selector).unwrap_or_default();
        ensure!(
            selector.get("kubernetes.io/os").map(String::as_str) == Some("linux"),
            "nodeSelector: {selector:?}"
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_binding_must_agree_with_the_pods_os_label() {
    run(|client| async move {
        let ns = namespace(&client, "binding", &[]).await?;
        let (linux, windows) = nodes(&client, &ns).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        let stored = pods.create(&pp, &pod_with("web", json!({}))?).await?;
        ensure!(
            os_label(&stored).as_deref() == Some("linux"),
            "label: {:?}",
            stored.metadata.labels
        );

        // As the scheduler binds: POST /api/v1/namespaces/NS/pods/NAME/binding.
        let binding = |node: &str| -> Value {
            json!({"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": "web", "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
        };
        let refused = pods
            .create_subresource::<Value, Value>("binding", "web", &pp, &binding(&windows))
            .await;
        let message = denial(&refused);
        ensure!(message.contains("bind it to a Linux node"), "binding to Windows: {message}");
        ensure!(message.contains("spec.os.name: windows"), "says what to change: {message}");
        // The apiserver copies a binding's labels onto the pod: the OS label may not ride along.
        let mut labelled = binding(&linux);
        labelled["metadata"]["labels"] = json!({KEY: "windows"});
        let refused =
            pods.create_subresource::<Value, Value>("binding", "web", &pp, &labelled).await;
        let message = denial(&refused);
        ensure!(
            message.contains("remove the label from the binding"),
            "labelled binding: {message}"
        );
        pods.create_subresource::<Value, Value>("binding", "web", &pp, &binding(&linux)).await?;
        let bound = pods.get("web").await?;
        let node = bound.spec.and_then(|s| s.node_name);
        ensure!(node.as_deref() == Some(linux.as_str()), "bound to {node:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn the_os_label_cannot_be_flipped_through_pods_status() {
    run(|client| async move {
        let ns = namespace(&client, "status", &[]).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        pods.create(&PostParams::default(), &pod_with("web", json!({}))?).await?;
        let flip = json!({"metadata": {"labels": {KEY: "windows"}}});
        let refused = pods.patch_status("web", &PatchParams::default(), &Patch::Merge(&flip)).await;
        let message = denial(&refused);
        ensure!(message.contains("label arcguard.io/os"), "pods/status flip: {message}");
        // A status write that changes no label is not even sent to arcguard.
        let status =
            json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False"}]}});
        pods.patch_status("web", &PatchParams::default(), &Patch::Merge(&status)).await?;
        let label = os_label(&pods.get("web").await?);
        ensure!(label.as_deref() == Some("linux"), "label after status writes: {label:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_gated_pod_re_pinned_to_windows_is_judged_like_a_create() {
    run(|client| async move {
        let ns = namespace(&client, "gated", &[]).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        let gated = pod_with("queued", json!({"schedulingGates": [{"name": "example.com/queue"}]}))?;
        let stored = pods.create(&pp, &gated).await?;
        ensure!(os_label(&stored).as_deref() == Some("linux"), "label: {:?}", stored.metadata.labels);
        // Gated pods are not pinned: their placement may still be set by an update.
        let selector = stored.spec.and_then(|s| s.node_selector).unwrap_or_default();
        ensure!(selector.is_empty(), "nodeSelector of a gated pod: {selector:?}");

        // Re-pinned to Windows without gMSA: denied, and the message does not ask for a label
        // change that would then be admitted without gMSA.
        let repin = json!({"spec": {"nodeSelector": {"beta.kubernetes.io/os": "windows"}}});
        let refused = pods.patch("queued", &PatchParams::default(), &Patch::Strategic(&repin)).await;
        let message = denial(&refused);
        ensure!(message.contains(NO_GMSA), "re-pinned gated pod: {message}");
        ensure!(message.contains("delete the pod and create it"), "what to change: {message}");
        ensure!(!message.contains("set it to \"windows\""), "asks for a label change: {message}");
        // Setting the label as well changes nothing.
        let both = json!({"metadata": {"labels": {KEY: "windows"}},
                          "spec": {"nodeSelector": {"beta.kubernetes.io/os": "windows"}}});
        let message =
            denial(&pods.patch("queued", &PatchParams::default(), &Patch::Strategic(&both)).await);
        ensure!(message.contains(NO_GMSA), "re-pinned and relabelled: {message}");

        // A gated pod with gMSA re-pinned to Windows: admitted, and the label follows.
        let spec_name = format!("webapp-{ns}");
        apply(
            &client,
            &json!({"apiVersion": "windows.k8s.io/v1", "kind": "GMSACredentialSpec",
                "metadata": {"name": spec_name},
                "credspec": {"ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "CmsPlugins": ["ActiveDirectory"]}}),
        )
        .await?;
        apply(
            &client,
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": "use-gmsa", "namespace": ns},
                "rules": [{"apiGroups": ["windows.k8s.io"], "resources": ["gmsacredentialspecs"],
                           "verbs": ["use"], "resourceNames": [spec_name]}]}),
        )
        .await?;
        apply(
            &client,
            &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "use-gmsa", "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "use-gmsa"},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]}),
        )
        .await?;
        let with_gmsa = pod_with(
            "queued-gmsa",
            json!({"schedulingGates": [{"name": "example.com/queue"}],
                   "securityContext": {"windowsOptions": {"gmsaCredentialSpecName": spec_name}}}),
        )?;
        // The SubjectAccessReview answer may lag the RoleBinding by a moment.
        eventually(PROPAGATION, || async { Ok(pods.create(&pp, &with_gmsa).await?) }).await?;
        let repinned =
            pods.patch("queued-gmsa", &PatchParams::default(), &Patch::Strategic(&repin)).await?;
        ensure!(
            os_label(&repinned).as_deref() == Some("windows"),
            "label after re-pinning: {:?}",
            repinned.metadata.labels
        );
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn host_endpoint_policies_keep_selecting_host_endpoints() {
    run(|client| async move {
        let ns = namespace(&client, "hep", &[]).await?;
        for (group, version) in [("projectcalico.org", "v3"), ("crd.projectcalico.org", "v1")] {
            let name = format!("{ns}-{}", group.split('.').next().unwrap_or(group));
            let api =
                calico_api(&client, &format!("{group}/{version}"), "GlobalNetworkPolicy", None);
            let object: DynamicObject = serde_json::from_value(json!({
                "apiVersion": format!("{group}/{version}"), "kind": "GlobalNetworkPolicy",
                "metadata": {"name": name},
                "spec": {"selector": "has(kubernetes-host)", "types": ["Ingress"],
                         "ingress": [{"action": "Allow", "source": {"nets": ["10.0.0.0/8"]}}]}
            }))?;
            let created = api.create(&PostParams::default(), &object).await?;
            let selector = created.data["spec"]["selector"].as_str().unwrap_or_default();
            // Host endpoints carry no OS label, and `!=` holds for a missing label.
            ensure!(
                selector == "(has(kubernetes-host)) && arcguard.io/os != 'windows'",
                "{group}: {selector:?}"
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn existing_pods_stay_selected_get_labelled_and_legacy_scoping_is_migrated() {
    run(|client| async move {
        // Webhooks skip opted-out namespaces: what is written there is what a cluster held
        // before arcguard was installed.
        let ns = namespace(&client, "before", &[("arcguard.io/ignore", "true")]).await?;
        let (linux, windows) = nodes(&client, &ns).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let pp = PostParams::default();
        for (name, node) in [("old-win", &windows), ("old-lin", &linux)] {
            let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"app": "web"}},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": "example.com/app:1"}]}}))?;
            let stored = pods.create(&pp, &pod).await?;
            ensure!(os_label(&stored).is_none(), "{name} was labelled by a webhook");
        }
        let calico = calico_api(&client, "projectcalico.org/v3", "NetworkPolicy", Some(&ns));
        let legacy: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": "(app == 'web') && arcguard.io/os == 'linux'", "types": ["Ingress"]}
        }))?;
        calico.create(&pp, &legacy).await?;
        let netpols: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
        let legacy_kube: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "web"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"},
                     "matchExpressions": [{"key": KEY, "operator": "In", "values": ["linux"]}]},
                     "policyTypes": ["Ingress"]}
        }))?;
        netpols.create(&pp, &legacy_kube).await?;

        // The leader labels both pods with their node's OS.
        for (name, want) in [("old-win", "windows"), ("old-lin", "linux")] {
            eventually(PROPAGATION, || async {
                let label = os_label(&pods.get(name).await?);
                ensure!(label.as_deref() == Some(want), "{name}: {label:?}");
                Ok(())
            })
            .await?;
        }

        // arcguard now reviews the namespace: the next write of each policy brings it to the
        // scoping that keeps unlabelled pods selected.
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let opt_in = json!({"metadata": {"labels": {"arcguard.io/ignore": "false"}}});
        namespaces.patch(&ns, &PatchParams::default(), &Patch::Merge(&opt_in)).await?;
        eventually(PROPAGATION, || async {
            let touch = json!({"spec": {"order": 10}});
            let updated = calico.patch("web", &PatchParams::default(), &Patch::Merge(&touch)).await?;
            let selector = updated.data["spec"]["selector"].as_str().unwrap_or_default().to_owned();
            ensure!(selector == "(app == 'web') && arcguard.io/os != 'windows'", "{selector:?}");
            Ok(())
        })
        .await?;
        let touch = json!({"spec": {"policyTypes": ["Ingress", "Egress"]}});
        let updated = netpols.patch("web", &PatchParams::default(), &Patch::Merge(&touch)).await?;
        let expressions = updated
            .spec
            .and_then(|s| s.pod_selector)
            .and_then(|p| p.match_expressions)
            .unwrap_or_default();
        let summary: Vec<(String, String, Vec<String>)> = expressions
            .into_iter()
            .map(|e| (e.key, e.operator, e.values.unwrap_or_default()))
            .collect();
        ensure!(
            summary == [(KEY.to_owned(), "NotIn".to_owned(), vec!["windows".to_owned()])],
            "Kubernetes NetworkPolicy after an update: {summary:?}"
        );
        Ok(())
    })
    .await;
}
