//! Scenarios on one shared cluster (sample policies installed): trusted registries, policy
//! lifecycle, gMSA, Calico scoping, and the certificate Secret and CA bundle. Each scenario
//! works in its own namespaces, with its own policies scoped to them, so they run in parallel.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, ensure};
use arcguard::policy::crd::{ClusterGuardPolicy, GuardPolicy};
use arcguard_e2e::{
    UNTRUSTED_MESSAGE, apply, calico_api, denial, eventually, namespace, pod, shared,
};
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{EphemeralContainer, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

/// Long enough for a watch event to reach arcguard on a loaded machine.
const PROPAGATION: Duration = Duration::from_secs(30);

fn create() -> PostParams {
    PostParams::default()
}

fn dry_run() -> PostParams {
    PostParams { dry_run: true, ..PostParams::default() }
}

async fn run<F, Fut>(scenario: F)
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let cluster = shared();
    let client = cluster.client().await.expect("an admin client");
    cluster.check(scenario(client).await);
}

// === 1. trusted registries ===

#[tokio::test]
async fn untrusted_pods_are_rejected_with_arcguards_message_and_trusted_ones_are_created() {
    run(|client| async move {
        let ns = namespace(&client, "registries", &[]).await?;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let denied = pods.create(&create(), &pod("untrusted", "docker.io/library/nginx:1.27")).await;
        let message = denial(&denied);
        ensure!(message.contains(UNTRUSTED_MESSAGE), "untrusted pod: {message}");
        ensure!(message.contains("[trusted-registries]"), "names the policy: {message}");
        ensure!(message.contains("container \"app\""), "names the container: {message}");
        // Naive prefix matching would admit this one.
        let lookalike = pod("lookalike", "contoso.azurecr.io.evil.com/shop/web:1.0");
        let message = denial(&pods.create(&create(), &lookalike).await);
        ensure!(message.contains(UNTRUSTED_MESSAGE), "look-alike registry: {message}");

        pods.create(&create(), &pod("trusted", "contoso.azurecr.io/shop/web:1.0")).await?;
        // A live pod's image can be changed: the UPDATE is enforced too.
        let patch = json!({"spec": {"containers": [{"name": "app", "image": "docker.io/library/nginx:1.27"}]}});
        let updated = pods.patch("trusted", &PatchParams::default(), &Patch::Strategic(&patch)).await;
        let message = denial(&updated);
        ensure!(message.contains(UNTRUSTED_MESSAGE), "image update: {message}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_deployment_with_an_untrusted_template_is_rejected() {
    run(|client| async move {
        let ns = namespace(&client, "deployments", &[]).await?;
        let deployments: Api<Deployment> = Api::namespaced(client, &ns);
        let deployment = |name: &str, image: &str| -> Result<Deployment> {
            Ok(serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {
                            "initContainers": [{"name": "init", "image": image}],
                            "containers": [{"name": "app", "image": "contoso.azurecr.io/shop/web:1.0"}]
                        }
                    }
                }
            }))?)
        };
        let denied = deployments.create(&create(), &deployment("bad", "quay.io/evil/init:1")?).await;
        let message = denial(&denied);
        ensure!(message.contains(UNTRUSTED_MESSAGE), "untrusted template: {message}");
        ensure!(message.contains("init container \"init\""), "names the init container: {message}");
        deployments.create(&create(), &deployment("good", "mcr.microsoft.com/oss/busybox:1")?).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn every_workload_kind_with_an_untrusted_template_is_rejected() {
    run(|client| async move {
        let ns = namespace(&client, "workloads", &[]).await?;
        let template = |image: &str| {
            json!({
                "metadata": {"labels": {"app": "w"}},
                "spec": {"restartPolicy": "Never", "containers": [{"name": "app", "image": image}]}
            })
        };
        let kinds = |image: &str| {
            let selector = json!({"matchLabels": {"app": "w"}});
            let always = {
                let mut t = template(image);
                t["spec"]["restartPolicy"] = json!("Always");
                t
            };
            [
                ("apps/v1", "ReplicaSet", json!({"selector": selector, "template": always})),
                ("apps/v1", "StatefulSet", json!({"selector": selector, "serviceName": "w", "template": always})),
                ("apps/v1", "DaemonSet", json!({"selector": selector, "template": always})),
                ("batch/v1", "Job", json!({"template": template(image)})),
                (
                    "batch/v1",
                    "CronJob",
                    json!({"schedule": "0 * * * *", "jobTemplate": {"spec": {"template": template(image)}}}),
                ),
                ("v1", "ReplicationController", json!({"selector": {"app": "w"}, "template": always})),
                ("v1", "PodTemplate", Value::Null),
            ]
        };
        for (untrusted, expect_denied) in [("quay.io/evil/app:1", true), ("contoso.azurecr.io/shop/web:1.0", false)] {
            for (api_version, kind, spec) in kinds(untrusted) {
                let name = format!("w-{}", kind.to_lowercase());
                let mut object = json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": name, "namespace": ns}});
                if kind == "PodTemplate" {
                    object["template"] = template(untrusted);
                } else {
                    object["spec"] = spec;
                }
                let result = apply(&client, &object).await;
                match (result, expect_denied) {
                    (Err(error), true) => {
                        let message = format!("{error:#}");
                        ensure!(message.contains(UNTRUSTED_MESSAGE), "{kind}: {message}");
                    }
                    (Ok(_), false) => {}
                    (Ok(_), true) => anyhow::bail!("{kind} with an untrusted template was admitted"),
                    (Err(error), false) => anyhow::bail!("{kind} with a trusted template: {error:#}"),
                }
            }
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_untrusted_ephemeral_container_is_rejected() {
    run(|client| async move {
        let ns = namespace(&client, "ephemeral", &[]).await?;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        pods.create(&create(), &pod("target", "contoso.azurecr.io/shop/web:1.0")).await?;
        let with_debugger = |pod: &Pod, name: &str, image: &str| -> Result<Pod> {
            let mut pod = pod.clone();
            let spec = pod.spec.as_mut().ok_or_else(|| anyhow!("a pod without spec"))?;
            spec.ephemeral_containers.get_or_insert_default().push(serde_json::from_value::<
                EphemeralContainer,
            >(json!({
                "name": name, "image": image, "targetContainerName": "app"
            }))?);
            Ok(pod)
        };
        let current = pods.get("target").await?;
        let untrusted = with_debugger(&current, "debug", "docker.io/library/busybox:1.36")?;
        let denied = pods.replace_ephemeral_containers("target", &create(), &untrusted).await;
        let message = denial(&denied);
        ensure!(message.contains(UNTRUSTED_MESSAGE), "untrusted ephemeral container: {message}");
        ensure!(message.contains("\"debug\""), "names the ephemeral container: {message}");
        // The subresource is admitted when the image is trusted (`kubectl debug` keeps working).
        let trusted = with_debugger(&current, "debug", "mcr.microsoft.com/oss/busybox:1.36")?;
        let stored = pods.replace_ephemeral_containers("target", &create(), &trusted).await?;
        let count = stored.spec.and_then(|s| s.ephemeral_containers).map_or(0, |e| e.len());
        ensure!(count == 1, "the trusted ephemeral container is stored ({count})");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn excluded_namespaces_are_not_enforced() {
    run(|client| async move {
        let opted_out = namespace(&client, "opted-out", &[("arcguard.io/ignore", "true")]).await?;
        for ns in [opted_out.as_str(), "kube-system"] {
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let name = format!("untrusted-{}", opted_out.replace("opted-out-", ""));
            pods.create(&create(), &pod(&name, "docker.io/library/nginx:1.27"))
                .await
                .with_context(|| format!("an untrusted pod in {ns} is admitted"))?;
        }
        Ok(())
    })
    .await;
}

// === 2. policies ===

fn registries_policy(name: &str, ns: &str, action: &str, registries: &[&str]) -> Value {
    json!({
        "apiVersion": "arcguard.io/v1alpha1",
        "kind": "ClusterGuardPolicy",
        "metadata": {"name": name},
        "spec": {
            "action": action,
            "match": {"namespaces": [ns]},
            "trustedRegistries": {"registries": registries}
        }
    })
}

/// Waits until the policy's status says Ready=True for its current generation.
async fn ready_for_current_generation(client: &kube::Client, name: &str) -> Result<i64> {
    let policies: Api<ClusterGuardPolicy> = Api::all(client.clone());
    eventually(PROPAGATION, || async {
        let policy = policies.get(name).await?;
        let generation = policy.metadata.generation.unwrap_or_default();
        let status = policy.status.clone().unwrap_or_default();
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
        ensure!(
            status.observed_generation == Some(generation)
                && ready.is_some_and(
                    |c| c.status == "True" && c.observed_generation == Some(generation)
                ),
            "policy {name} generation {generation}: status {status:?}"
        );
        Ok(generation)
    })
    .await
}

#[tokio::test]
async fn editing_a_policy_takes_effect_without_restart_and_its_status_follows_the_generation() {
    run(|client| async move {
        let ns = namespace(&client, "policy-edit", &[]).await?;
        let name = format!("e2e-{ns}");
        apply(&client, &registries_policy(&name, &ns, "Deny", &["contoso.azurecr.io/team-a"]))
            .await?;
        let first = ready_for_current_generation(&client, &name).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let team_b = pod("team-b", "contoso.azurecr.io/team-b/app:1");
        eventually(PROPAGATION, || async {
            let message = denial(&pods.create(&dry_run(), &team_b).await);
            ensure!(message.contains(&format!("[{name}]")), "team-b before the edit: {message}");
            Ok(())
        })
        .await?;

        apply(
            &client,
            &registries_policy(
                &name,
                &ns,
                "Deny",
                &["contoso.azurecr.io/team-a", "contoso.azurecr.io/team-b"],
            ),
        )
        .await?;
        eventually(PROPAGATION, || async {
            pods.create(&dry_run(), &team_b)
                .await
                .map_err(|e| anyhow!("team-b after the edit: {e}"))
        })
        .await?;
        let second = ready_for_current_generation(&client, &name).await?;
        ensure!(second > first, "the edit made a new generation ({first} -> {second})");
        pods.create(&create(), &team_b).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn an_invalid_policy_is_refused_with_a_message_naming_the_field() {
    run(|client| async move {
        // Semantics only arcguard knows: refused by its policies webhook.
        let scheme = registries_policy(
            "e2e-invalid-scheme",
            "nowhere",
            "Deny",
            &["https://contoso.azurecr.io"],
        );
        let error = format!(
            "{:#}",
            apply(&client, &scheme)
                .await
                .err()
                .ok_or_else(|| anyhow!("a registry with a URL scheme was accepted"))?
        );
        ensure!(error.contains("spec.trustedRegistries.registries[0]"), "names the field: {error}");
        ensure!(error.contains("URL scheme"), "says what is wrong: {error}");

        // Structure: refused by the CRD schema and its CEL rule, arcguard or not.
        let mut two_blocks =
            registries_policy("e2e-invalid-blocks", "nowhere", "Deny", &["contoso.azurecr.io"]);
        two_blocks["spec"]["gmsa"] = json!({"requireForWindows": true});
        let error = format!(
            "{:#}",
            apply(&client, &two_blocks)
                .await
                .err()
                .ok_or_else(|| anyhow!("two rule blocks were accepted"))?
        );
        ensure!(error.contains("exactly one rule block"), "CEL rule: {error}");
        let bad_action =
            registries_policy("e2e-invalid-action", "nowhere", "Block", &["contoso.azurecr.io"]);
        let error = format!(
            "{:#}",
            apply(&client, &bad_action)
                .await
                .err()
                .ok_or_else(|| anyhow!("action Block was accepted"))?
        );
        ensure!(error.contains("spec.action"), "schema names the field: {error}");

        let policies: Api<ClusterGuardPolicy> = Api::all(client);
        for name in ["e2e-invalid-scheme", "e2e-invalid-blocks", "e2e-invalid-action"] {
            ensure!(policies.get_opt(name).await?.is_none(), "{name} was stored");
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_warn_policy_admits_with_a_warning_to_the_client() {
    run(|client| async move {
        let ns = namespace(&client, "policy-warn", &[]).await?;
        // A namespaced GuardPolicy this time: it applies to its own namespace only.
        let name = "warn-team-a".to_owned();
        apply(
            &client,
            &json!({
                "apiVersion": "arcguard.io/v1alpha1", "kind": "GuardPolicy",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"action": "Warn", "trustedRegistries": {"registries": ["contoso.azurecr.io/team-a"]}}
            }),
        )
        .await?;
        let body = serde_json::to_vec(&pod("warned", "contoso.azurecr.io/team-z/app:1"))?;
        let post = |dry_run: bool| {
            let query = if dry_run { "?dryRun=All" } else { "" };
            http::Request::post(format!("/api/v1/namespaces/{ns}/pods{query}"))
                .header("content-type", "application/json")
                .body(kube::client::Body::from(body.clone()))
        };
        let warnings = |response: &http::Response<kube::client::Body>| -> Vec<String> {
            response
                .headers()
                .get_all("warning")
                .iter()
                .filter_map(|v| v.to_str().ok().map(str::to_owned))
                .collect()
        };
        eventually(PROPAGATION, || async {
            let response = client.send(post(true)?).await?;
            let found = warnings(&response);
            ensure!(
                found.iter().any(|w| w.contains(&name)),
                "no warning from {name} yet: {found:?}"
            );
            Ok(())
        })
        .await?;
        let response = client.send(post(false)?).await?;
        let status = response.status();
        let found = warnings(&response);
        ensure!(status == http::StatusCode::CREATED, "a Warn policy admits the pod: {status}");
        let warning = found
            .iter()
            .find(|w| w.contains(&name))
            .ok_or_else(|| anyhow!("no warning: {found:?}"))?;
        ensure!(warning.contains("team-z/app"), "the warning says what is wrong: {warning}");
        let policies: Api<GuardPolicy> = Api::namespaced(client.clone(), &ns);
        eventually(PROPAGATION, || async {
            let status = policies.get(&name).await?.status.unwrap_or_default();
            let ready = status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True");
            ensure!(ready && status.observed_generation == Some(1), "GuardPolicy status: {status:?}");
            Ok(())
        })
        .await?;
        // Other namespaces are not its business.
        let elsewhere = namespace(&client, "policy-warn-elsewhere", &[]).await?;
        let post = http::Request::post(format!("/api/v1/namespaces/{elsewhere}/pods?dryRun=All"))
            .header("content-type", "application/json")
            .body(kube::client::Body::from(body.clone()))?;
        let found = warnings(&client.send(post).await?);
        ensure!(found.is_empty(), "a GuardPolicy warned outside its namespace: {found:?}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn the_sample_policies_are_ready() {
    run(|client| async move {
        for name in ["trusted-registries", "windows-gmsa", "calico-linux-only"] {
            ready_for_current_generation(&client, name).await?;
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_namespace_selector_policy_follows_namespace_labels() {
    run(|client| async move {
        let team = namespace(&client, "selector-team", &[]).await?;
        let label = format!("e2e-team-{team}");
        let labelled = namespace(&client, "selector-in", &[(label.as_str(), "a")]).await?;
        let unlabelled = namespace(&client, "selector-out", &[]).await?;
        let name = format!("e2e-{team}");
        apply(
            &client,
            &json!({
                "apiVersion": "arcguard.io/v1alpha1", "kind": "ClusterGuardPolicy",
                "metadata": {"name": name},
                "spec": {
                    "match": {"namespaceSelector": {"matchLabels": {label.as_str(): "a"}}},
                    "trustedRegistries": {"registries": ["contoso.azurecr.io/team-a"]}
                }
            }),
        )
        .await?;
        ready_for_current_generation(&client, &name).await?;
        let team_b = pod("team-b", "contoso.azurecr.io/team-b/app:1");
        let denied_in = |ns: String| {
            let client = client.clone();
            let team_b = team_b.clone();
            let name = name.clone();
            async move {
                let message =
                    denial(&Api::<Pod>::namespaced(client, &ns).create(&dry_run(), &team_b).await);
                ensure!(message.contains(&format!("[{name}]")), "in {ns}: {message}");
                Ok(())
            }
        };
        eventually(PROPAGATION, || denied_in(labelled.clone())).await?;
        let outside =
            Api::<Pod>::namespaced(client.clone(), &unlabelled).create(&dry_run(), &team_b).await;
        ensure!(
            outside.is_ok(),
            "a namespace without the label is not selected: {}",
            denial(&outside)
        );

        // Labelling a namespace brings it under the policy.
        let patch = json!({"metadata": {"labels": {label.as_str(): "a"}}});
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .patch(&unlabelled, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        eventually(PROPAGATION, || denied_in(unlabelled.clone())).await?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn deleting_a_policy_stops_its_enforcement() {
    run(|client| async move {
        let ns = namespace(&client, "policy-delete", &[]).await?;
        let name = format!("e2e-{ns}");
        apply(&client, &registries_policy(&name, &ns, "Deny", &["contoso.azurecr.io/team-a"]))
            .await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let team_c = pod("team-c", "contoso.azurecr.io/team-c/app:1");
        eventually(PROPAGATION, || async {
            let message = denial(&pods.create(&dry_run(), &team_c).await);
            ensure!(
                message.contains(&format!("[{name}]")),
                "team-c while the policy exists: {message}"
            );
            Ok(())
        })
        .await?;
        Api::<ClusterGuardPolicy>::all(client.clone())
            .delete(&name, &DeleteParams::default())
            .await?;
        eventually(PROPAGATION, || async {
            pods.create(&dry_run(), &team_c)
                .await
                .map_err(|e| anyhow!("team-c after deletion: {e}"))
        })
        .await?;
        Ok(())
    })
    .await;
}

// === 3. gMSA ===

fn credspec(name: &str, account: &str) -> Value {
    json!({
        "apiVersion": "windows.k8s.io/v1",
        "kind": "GMSACredentialSpec",
        "metadata": {"name": name},
        "credspec": {
            "ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [
                {"Name": account, "Scope": "CONTOSO"},
                {"Name": account, "Scope": "contoso.com"}
            ]},
            "CmsPlugins": ["ActiveDirectory"],
            "DomainJoinConfig": {
                "DnsName": "contoso.com", "DnsTreeName": "contoso.com",
                "Guid": "244818ae-87ac-4fcd-92ec-e79e5252348a", "MachineAccountName": account,
                "NetBiosName": "CONTOSO", "Sid": "S-1-5-21-2126449477-2524075714-3094792973"
            }
        }
    })
}

fn windows_pod(name: &str, windows_options: Value) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "os": {"name": "windows"},
            "nodeSelector": {"kubernetes.io/os": "windows"},
            "securityContext": {"windowsOptions": windows_options},
            "containers": [{"name": "app", "image": "mcr.microsoft.com/windows/servercore:ltsc2022"}]
        }
    }))?)
}

#[tokio::test]
async fn windows_pods_need_a_credential_spec_their_service_account_may_use() {
    run(|client| async move {
        let ns = namespace(&client, "gmsa", &[]).await?;
        let spec_name = format!("webapp-{ns}");
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

        let message = denial(&pods.create(&create(), &windows_pod("none", json!({}))?).await);
        ensure!(message.contains("without a gMSA credential spec"), "no credential spec: {message}");

        // The pod names the credential spec the moment it is created, as a GitOps sync applying
        // both does: before arcguard's cache has seen it, arcguard reads it from the apiserver
        // rather than calling it missing.
        let stored_spec = apply(&client, &credspec(&spec_name, "WebApp1")).await?;
        let named = windows_pod("named", json!({"gmsaCredentialSpecName": spec_name}))?;
        let message = denial(&pods.create(&create(), &named).await);
        ensure!(message.contains(&format!("service account {ns}/default may not use")), "no RBAC: {message}");

        let grant = [
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": format!("use-{spec_name}")},
                "rules": [{"apiGroups": ["windows.k8s.io"], "resources": ["gmsacredentialspecs"],
                           "resourceNames": [spec_name], "verbs": ["use"]}]
            }),
            json!({
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": format!("use-{spec_name}"), "namespace": ns},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("use-{spec_name}")},
                "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]
            }),
        ];
        for object in &grant {
            apply(&client, object).await?;
        }
        // arcguard caches access reviews briefly (10 s).
        let created = eventually(PROPAGATION, || async {
            pods.create(&create(), &named).await.map_err(|e| anyhow!("after the RoleBinding: {e}"))
        })
        .await?;
        let inlined = created
            .spec
            .as_ref()
            .and_then(|s| s.security_context.as_ref())
            .and_then(|c| c.windows_options.as_ref())
            .and_then(|w| w.gmsa_credential_spec.as_deref())
            .ok_or_else(|| anyhow!("the stored pod has no inlined credential spec"))?;
        let inlined: Value = serde_json::from_str(inlined).context("the inlined content is JSON")?;
        ensure!(inlined == stored_spec.data["credspec"], "inlined content equals the GMSACredentialSpec: {inlined}");
        let labels = created.metadata.labels.unwrap_or_default();
        ensure!(labels.get("arcguard.io/os").map(String::as_str) == Some("windows"), "OS label: {labels:?}");

        let other = credspec(&spec_name, "SomeoneElse")["credspec"].to_string();
        let mismatched = windows_pod(
            "mismatched",
            json!({"gmsaCredentialSpecName": spec_name, "gmsaCredentialSpec": other}),
        )?;
        let message = denial(&pods.create(&create(), &mismatched).await);
        ensure!(message.contains("differs from GMSACredentialSpec"), "mismatched content: {message}");
        Ok(())
    })
    .await;
}

// === 4. Calico ===

/// The scoping clause: pods labelled Windows drop out; unlabelled pods and host endpoints stay.
const LINUX_CLAUSE: &str = "arcguard.io/os != 'windows'";

#[tokio::test]
async fn pods_get_the_os_label() {
    run(|client| async move {
        let ns = namespace(&client, "os-label", &[]).await?;
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        // A user-set label cannot falsify the OS: it is judged, not rewritten.
        let mut lying = pod("lying", "contoso.azurecr.io/shop/web:1.0");
        lying.metadata.labels = Some([("arcguard.io/os".to_owned(), "windows".to_owned())].into());
        let message = denial(&pods.create(&create(), &lying).await);
        ensure!(message.contains("this pod runs on linux"), "false label: {message}");
        let linux = pod("linux", "contoso.azurecr.io/shop/web:1.0");
        let stored = pods.create(&create(), &linux).await?;
        let labels = stored.metadata.labels.unwrap_or_default();
        ensure!(
            labels.get("arcguard.io/os").map(String::as_str) == Some("linux"),
            "labels: {labels:?}"
        );
        // Nothing pinned it: it is pinned to Linux, so the label stays true wherever it lands.
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
async fn calico_policies_carry_the_linux_clause_exactly_once_after_create_and_update() {
    run(|client| async move {
        let ns = namespace(&client, "calico", &[]).await?;
        for (api_version, kind, namespaced) in [
            ("projectcalico.org/v3", "NetworkPolicy", true),
            ("crd.projectcalico.org/v1", "NetworkPolicy", true),
            ("projectcalico.org/v3", "GlobalNetworkPolicy", false),
            ("crd.projectcalico.org/v1", "GlobalNetworkPolicy", false),
        ] {
            let name = format!("web-{ns}");
            let mut object = json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"name": name},
                "spec": {"selector": "app == 'web'", "types": ["Ingress"],
                         "ingress": [{"action": "Allow", "source": {"selector": "app == 'lb'"}}]}
            });
            if namespaced {
                object["metadata"]["namespace"] = json!(ns);
            }
            let api = calico_api(&client, api_version, kind, namespaced.then_some(ns.as_str()));
            let what = format!("{api_version} {kind}");
            let created = api
                .create(&create(), &serde_json::from_value(object.clone())?)
                .await
                .with_context(|| what.clone())?;
            let selector = created.data["spec"]["selector"].as_str().unwrap_or_default().to_owned();
            ensure!(
                selector.matches(LINUX_CLAUSE).count() == 1,
                "{what} after create: {selector:?}"
            );
            ensure!(
                selector.contains("app == 'web'"),
                "{what} keeps the author's selector: {selector:?}"
            );

            // An update that sends the stored selector back, and one that rewrites it.
            let patch = json!({"spec": {"order": 100, "selector": selector}});
            let updated = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            let selector = updated.data["spec"]["selector"].as_str().unwrap_or_default().to_owned();
            ensure!(
                selector.matches(LINUX_CLAUSE).count() == 1,
                "{what} after an update: {selector:?}"
            );
            let patch = json!({"spec": {"selector": "app == 'api'"}});
            let updated = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
            let selector = updated.data["spec"]["selector"].as_str().unwrap_or_default().to_owned();
            ensure!(
                selector.matches(LINUX_CLAUSE).count() == 1 && selector.contains("app == 'api'"),
                "{what} after rewriting the selector: {selector:?}"
            );
        }
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kubernetes_network_policies_select_linux_pods_only() {
    run(|client| async move {
        let ns = namespace(&client, "netpol", &[]).await?;
        let policies: Api<NetworkPolicy> = Api::namespaced(client, &ns);
        let policy: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "deny-all"},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))?;
        let linux_expressions = |policy: &NetworkPolicy| -> usize {
            policy
                .spec
                .as_ref()
                .and_then(|s| s.pod_selector.as_ref())
                .and_then(|p| p.match_expressions.as_ref())
                .map_or(0, |e| {
                    e.iter()
                        .filter(|r| {
                            r.key == "arcguard.io/os"
                                && r.operator == "NotIn"
                                && r.values.as_deref() == Some(&["windows".to_owned()][..])
                        })
                        .count()
                })
        };
        let created = policies.create(&create(), &policy).await?;
        ensure!(linux_expressions(&created) == 1, "after create: {:?}", created.spec);
        let patch = json!({"spec": {"policyTypes": ["Ingress", "Egress"]}});
        let updated =
            policies.patch("deny-all", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        ensure!(linux_expressions(&updated) == 1, "after update: {:?}", updated.spec);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn a_calico_policy_targeting_windows_pods_is_rejected() {
    run(|client| async move {
        let ns = namespace(&client, "calico-windows", &[]).await?;
        let api = calico_api(&client, "projectcalico.org/v3", "NetworkPolicy", Some(&ns));
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
            "metadata": {"name": "windows-only", "namespace": ns},
            "spec": {"selector": "arcguard.io/os == 'windows'", "types": ["Ingress"]}
        }))?;
        let message = denial(&api.create(&create(), &object).await);
        ensure!(message.contains("arcguard denied"), "a policy for Windows pods: {message}");
        ensure!(message.contains("[calico-linux-only]"), "names the policy: {message}");
        Ok(())
    })
    .await;
}

// === 5. certificates (read-only here; rotation and revocation have their own clusters) ===

#[tokio::test]
async fn arcguard_creates_its_secret_and_the_webhooks_ca_bundle() {
    run(|client| async move {
        let secret = Api::<Secret>::namespaced(client.clone(), "arcguard-system")
            .get("arcguard-tls")
            .await?;
        ensure!(secret.type_.as_deref() == Some("kubernetes.io/tls"), "type {:?}", secret.type_);
        let data = secret.data.unwrap_or_default();
        for key in ["ca.crt", "ca.key", "tls.crt", "tls.key", "ca-bundle.crt"] {
            ensure!(data.contains_key(key), "the Secret lacks {key}");
        }
        let bundle = &data["ca-bundle.crt"].0;
        let serving = arcguard::certs::CertInfo::from_pem(&data["tls.crt"].0)?;
        ensure!(serving.is_issued_by_any(bundle), "the serving certificate chains to the bundle");
        ensure!(
            serving.dns_names.iter().any(|n| n == "arcguard.arcguard-system.svc"),
            "{serving:?}"
        );
        ensure!(
            serving.ip_addresses.contains(&std::net::IpAddr::from([127, 0, 0, 1])),
            "{serving:?}"
        );

        let validating =
            Api::<ValidatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
        let mutating =
            Api::<MutatingWebhookConfiguration>::all(client.clone()).get("arcguard").await?;
        let mut bundles: Vec<(String, Option<Vec<u8>>)> = Vec::new();
        for webhook in validating.webhooks.unwrap_or_default() {
            bundles.push((webhook.name, webhook.client_config.ca_bundle.map(|b| b.0)));
        }
        for webhook in mutating.webhooks.unwrap_or_default() {
            bundles.push((webhook.name, webhook.client_config.ca_bundle.map(|b| b.0)));
        }
        ensure!(
            bundles.len() == 3,
            "three webhooks: {:?}",
            bundles.iter().map(|b| &b.0).collect::<Vec<_>>()
        );
        let lease =
            Api::<Lease>::namespaced(client.clone(), "arcguard-system").get("arcguard").await?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        ensure!(holder.as_deref() == Some("e2e-0"), "the Lease is held by arcguard: {holder:?}");
        let leader = shared().arcguard.metric("arcguard_leader").await?;
        ensure!((leader - 1.0).abs() < f64::EPSILON, "arcguard_leader {leader}");
        for (name, ca_bundle) in bundles {
            ensure!(
                ca_bundle.as_ref() == Some(bundle),
                "webhook {name} carries the Secret's bundle"
            );
        }
        Ok(())
    })
    .await;
}
