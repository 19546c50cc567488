//! Scenarios on one shared cluster: trusted registries, policies, gMSA, Calico, and the
//! certificate Secret. Each scenario works in its own namespaces, with policies scoped to them.

use anyhow::{Result, ensure};
use arcguard_e2e::{UNTRUSTED_MESSAGE, denial, namespace, pod, shared};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};

#[tokio::test]
async fn untrusted_pods_are_rejected_with_arcguards_message_and_trusted_ones_are_created() {
    let cluster = shared();
    let client = cluster.client().await.expect("client");
    cluster.check(registries_pods(client).await);
}

async fn registries_pods(client: kube::Client) -> Result<()> {
    let ns = namespace(&client, "registries", &[]).await?;
    let pods: Api<Pod> = Api::namespaced(client, &ns);
    let denied = pods
        .create(&PostParams::default(), &pod("untrusted", "docker.io/library/nginx:1.27"))
        .await;
    let message = denial(&denied);
    ensure!(message.contains(UNTRUSTED_MESSAGE), "untrusted pod: {message}");
    ensure!(message.contains("container \"app\""), "the message names the container: {message}");
    pods.create(&PostParams::default(), &pod("trusted", "contoso.azurecr.io/shop/web:1.0")).await?;
    Ok(())
}
