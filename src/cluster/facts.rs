//! Cluster facts for the rules: GMSACredentialSpecs, namespace labels and node OS labels from
//! watch-backed caches (credential specs the cache does not hold yet, such as one applied in
//! the same GitOps sync as the pods naming it, are listed, in one call per request, before they
//! are called missing),
//! the pod a binding names read on demand, and `use` authorizations from
//! LocalSubjectAccessReviews, cached briefly. Only what the policies that apply to a request
//! need is looked up ([`crate::policy::PolicySet::needs`]).
//!
//! API calls (for RBAC; `tests/manifests.rs` checks the manifests grant exactly these):
//! - `list windows.k8s.io/gmsacredentialspecs (cluster)`
//! - `watch windows.k8s.io/gmsacredentialspecs (cluster)`
//! - `list core/namespaces (cluster, metadata only)`
//! - `watch core/namespaces (cluster, metadata only)`
//! - `list core/nodes (cluster, metadata only)`
//! - `watch core/nodes (cluster, metadata only)`
//! - `get core/pods (namespaced: the pod a binding names)`
//! - `create authorization.k8s.io/localsubjectaccessreviews (namespaced: the pod's namespace)`
//! - `get core/secrets (namespaced: the imagePullSecrets of pods under imageProvenance)`
//! - `get core/serviceaccounts (namespaced: whose imagePullSecrets pods under imageProvenance use)`
//!
//! imagePullSecrets and service accounts are read by name, on demand, within the lookup
//! deadline, and reused [`PULL_SECRET_TTL`]: `get secrets` cluster-wide is the cost of pulling
//! private images, and it lets arcguard read any Secret it is asked for by name (it asks only
//! for those a pod under an imageProvenance policy names, and keeps only their registry
//! credentials). Clusters without private registries in imageProvenance scopes can remove
//! both grants.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::{BoxFuture, FutureExt as _, Shared};
use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, ResourceAttributes, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams, PartialObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::admission::RequestView;
use crate::admission::objects::PodTemplateSpec;
use crate::oci::cache::TtlCache;
use crate::policy::PolicySet;
use crate::pull_secrets::RegistryCredential;
use crate::rules::os;
use crate::rules::{Access, PodFact, StaticFacts};
use crate::server::FactSource;

/// How long one API call made for a request (a SubjectAccessReview, the pod a binding names)
/// may take: below the webhooks' `timeoutSeconds: 5`, so the user reads arcguard's message
/// rather than the apiserver's timeout.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(3);

/// How long an imagePullSecret's credentials, or a service account's list of them, is reused.
pub const PULL_SECRET_TTL: Duration = Duration::from_secs(30);
/// imagePullSecrets read per request, at most.
const PULL_SECRETS_MAX: usize = 16;

/// Bytes each of the imagePullSecret and service account caches holds at most, as their
/// weights estimate them: a tenant's Secrets may be up to 1 MiB each.
const PULL_SECRET_CACHE_BYTES: usize = 4 * 1024 * 1024;

/// The cache of imagePullSecrets' credentials, weighed by their text.
fn pull_secret_cache() -> TtlCache<(String, String), Vec<RegistryCredential>> {
    TtlCache::weighed(AUTHORIZATION_CACHE_LIMIT, PULL_SECRET_CACHE_BYTES, |(ns, name), found| {
        let text: usize =
            found.iter().map(|c| 96 + c.key.len() + c.username.len() + c.password.len()).sum();
        160 + ns.len() + name.len() + text
    })
}

/// The cache of service accounts' imagePullSecrets names, weighed by their text.
fn service_account_cache() -> TtlCache<(String, String), Vec<String>> {
    TtlCache::weighed(AUTHORIZATION_CACHE_LIMIT, PULL_SECRET_CACHE_BYTES, |(ns, name), names| {
        160 + ns.len() + name.len() + names.iter().map(|n| 24 + n.len()).sum::<usize>()
    })
}

/// How long a `use` authorization is reused; RBAC changes take effect within this time.
const AUTHORIZATION_TTL: Duration = Duration::from_secs(10);
/// Cached authorizations kept at most, the least reused evicted first.
const AUTHORIZATION_CACHE_LIMIT: usize = 10_000;

type AccessKey = (String, String, String);
/// A review in flight: when it was sent, and its answer for every caller waiting on it.
type InFlight = (Instant, Shared<BoxFuture<'static, Access>>);

/// Facts looked up from the cluster.
pub struct ClusterFacts {
    client: kube::Client,
    credential_specs: Store<DynamicObject>,
    credential_spec_resource: ApiResource,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    nodes: Store<PartialObjectMeta<Node>>,
    authorizations: TtlCache<AccessKey, Access>,
    /// Reviews in flight, with when they were sent: one whose callers were all cancelled is
    /// never awaited to completion, so an entry older than [`LOOKUP_DEADLINE`] is replaced
    /// rather than answering from a stale review.
    in_flight: Mutex<HashMap<AccessKey, InFlight>>,
    /// Registry credentials of imagePullSecrets by (namespace, name); empty for a Secret that
    /// is missing or of another type.
    pull_secrets: TtlCache<(String, String), Vec<RegistryCredential>>,
    /// The imagePullSecrets of service accounts by (namespace, name).
    service_accounts: TtlCache<(String, String), Vec<String>>,
}

impl std::fmt::Debug for ClusterFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFacts")
            .field("credential_specs", &self.credential_specs.len())
            .field("namespaces", &self.namespaces.len())
            .field("nodes", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// The GMSACredentialSpec resource (windows.k8s.io/v1, cluster-scoped).
pub fn credential_spec_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("windows.k8s.io", "v1", "GMSACredentialSpec"),
        "gmsacredentialspecs",
    )
}

impl ClusterFacts {
    /// Starts the caches; they fill in the background and follow every change.
    pub fn start(client: kube::Client) -> std::sync::Arc<Self> {
        let resource = credential_spec_resource();
        let specs_api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let writer = reflector::store::Writer::new(resource.clone());
        let credential_specs = writer.as_reader();
        let specs = watcher(specs_api, watcher::Config::default())
            .backoff(super::watch_backoff())
            .reflect(writer);
        tokio::spawn(drive("GMSACredentialSpec", specs));

        let (namespaces, writer) = reflector::store();
        // Metadata-only: namespace labels are all that is needed.
        let ns_api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let ns = watcher(ns_api, watcher::Config::default())
            .backoff(super::watch_backoff())
            .reflect(writer);
        tokio::spawn(drive("Namespace", ns));

        let (nodes, writer) = reflector::store();
        // Metadata-only: a node's OS label is all that is needed.
        let node_api: Api<PartialObjectMeta<Node>> = Api::all(client.clone());
        let node_stream = watcher(node_api, watcher::Config::default())
            .backoff(super::watch_backoff())
            .reflect(writer);
        tokio::spawn(drive("Node", node_stream));

        std::sync::Arc::new(Self {
            client,
            credential_specs,
            credential_spec_resource: resource,
            namespaces,
            nodes,
            authorizations: TtlCache::new(AUTHORIZATION_CACHE_LIMIT),
            in_flight: Mutex::new(HashMap::new()),
            pull_secrets: pull_secret_cache(),
            service_accounts: service_account_cache(),
        })
    }

    /// Facts calling the API through `client` with empty caches that nothing fills: for tests
    /// of what is asked of the apiserver (reviews, lists).
    #[cfg(test)]
    pub(crate) fn empty(client: kube::Client) -> Self {
        let resource = credential_spec_resource();
        Self {
            client,
            credential_specs: reflector::store::Writer::new(resource.clone()).as_reader(),
            credential_spec_resource: resource,
            namespaces: reflector::store().0,
            nodes: reflector::store().0,
            authorizations: TtlCache::new(AUTHORIZATION_CACHE_LIMIT),
            in_flight: Mutex::new(HashMap::new()),
            pull_secrets: pull_secret_cache(),
            service_accounts: service_account_cache(),
        }
    }

    /// The OS of a node as the rules read it: known, or unknown when the node is not cached or
    /// carries no OS label.
    pub fn node_os_of(&self, name: &str) -> os::NodeOs {
        match self.node_os(name) {
            Some(Some(os)) => os::NodeOs::Known(os),
            _ => os::NodeOs::Unknown,
        }
    }

    /// A namespace's labels from the cache.
    pub fn namespace_labels_of(&self, name: &str) -> Option<crate::admission::objects::Labels> {
        let namespace = self.namespaces.get(&ObjectRef::new(name))?;
        Some(namespace.metadata.labels.clone().unwrap_or_default().into_iter().collect())
    }

    /// The names of the namespaces in the cache, sorted.
    pub fn namespace_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.namespaces.state().iter().filter_map(|ns| ns.metadata.name.clone()).collect();
        names.sort();
        names
    }

    /// Completes once the namespace and node caches have been filled; a cache whose watch
    /// fails keeps retrying, and this waits for it.
    pub async fn synced(&self) {
        let _ = futures::join!(self.namespaces.wait_until_ready(), self.nodes.wait_until_ready());
    }

    /// Completes once the GMSACredentialSpec cache has been filled (never, on a cluster
    /// without the CRD).
    pub async fn credential_specs_synced(&self) {
        let _ = self.credential_specs.wait_until_ready().await;
    }

    /// Whether the node cache has been filled once.
    pub fn nodes_synced(&self) -> bool {
        futures::FutureExt::now_or_never(self.nodes.wait_until_ready()).is_some_and(|r| r.is_ok())
    }

    /// The OS of a node from the cache: `None` inside when it carries no OS label.
    fn node_os(&self, name: &str) -> Option<Option<os::Os>> {
        let node = self.nodes.get(&ObjectRef::new(name))?;
        let labels = node.metadata.labels.clone().unwrap_or_default().into_iter().collect();
        Some(os::node_os(&labels))
    }

    /// The `credspec`s of GMSACredentialSpecs the cache does not hold, by name: read from the
    /// apiserver in one list call within [`LOOKUP_DEADLINE`] (the `list` the cache's RBAC
    /// already grants), filtered to the name when there is one, so that a pod naming many
    /// missing specs costs one call, not one per name. Names that cannot be a spec's (not a DNS
    /// subdomain, so nothing can be injected into the field selector) are not looked up; what
    /// does not exist, or a failed read, is absent from the result.
    async fn uncached_credential_specs(
        &self,
        names: &[&String],
    ) -> BTreeMap<String, serde_json::Value> {
        let names: Vec<&String> = names
            .iter()
            .copied()
            .filter(|name| crate::names::check_dns_subdomain(name).is_ok())
            .collect();
        let params = match names.as_slice() {
            [] => return BTreeMap::new(),
            [name] => ListParams::default().fields(&format!("metadata.name={name}")),
            _ => ListParams::default(),
        };
        let api: Api<DynamicObject> =
            Api::all_with(self.client.clone(), &self.credential_spec_resource);
        match tokio::time::timeout(LOOKUP_DEADLINE, api.list(&params)).await {
            Ok(Ok(list)) => list
                .items
                .into_iter()
                .filter_map(|spec| {
                    let name = spec.metadata.name.as_ref()?;
                    if !names.contains(&name) {
                        return None;
                    }
                    Some((name.clone(), spec.data.get("credspec")?.clone()))
                })
                .collect(),
            Ok(Err(error)) => {
                tracing::warn!(%error, "reading GMSACredentialSpecs the cache lacks failed");
                BTreeMap::new()
            }
            Err(_) => {
                tracing::warn!("reading GMSACredentialSpecs the cache lacks timed out");
                BTreeMap::new()
            }
        }
    }

    /// The registry credentials of the imagePullSecrets `secrets` and those of
    /// `service_account`, in that order (as the ServiceAccount admission plugin appends the
    /// account's after the pod's), all read within one [`LOOKUP_DEADLINE`]. What cannot be read
    /// counts as no credential: the kubelet, too, pulls without a secret it cannot find.
    async fn pull_credentials(
        &self,
        namespace: &str,
        secrets: &std::collections::BTreeSet<String>,
        service_account: Option<&str>,
    ) -> Vec<RegistryCredential> {
        // One deadline for the service account and then its Secrets, not one each: the
        // registry reads that follow count from the request's arrival.
        let read = async {
            let mut names: Vec<String> = secrets.iter().cloned().collect();
            if let Some(account) = service_account {
                names.extend(self.service_account_pull_secrets(namespace, account).await);
            }
            let mut seen = std::collections::BTreeSet::new();
            names.retain(|name| {
                crate::names::check_dns_subdomain(name).is_ok() && seen.insert(name.clone())
            });
            names.truncate(PULL_SECRETS_MAX);
            let mut credentials: Vec<RegistryCredential> = futures::future::join_all(
                names.iter().map(|name| self.pull_secret(namespace, name)),
            )
            .await
            .into_iter()
            .flatten()
            .collect();
            // Picking a credential for each image sorts them: bounded per request.
            credentials.truncate(crate::pull_secrets::CREDENTIALS_MAX);
            credentials
        };
        tokio::time::timeout(LOOKUP_DEADLINE, read).await.unwrap_or_default()
    }

    async fn service_account_pull_secrets(&self, namespace: &str, name: &str) -> Vec<String> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(names) = self.service_accounts.get(&key) {
            return names;
        }
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let names: Vec<String> = match tokio::time::timeout(LOOKUP_DEADLINE, api.get_opt(name))
            .await
        {
            Ok(Ok(account)) => account
                .and_then(|account| account.image_pull_secrets)
                .unwrap_or_default()
                .into_iter()
                .map(|secret| secret.name)
                .collect(),
            Ok(Err(error)) => {
                tracing::warn!(%error, namespace, service_account = name, "reading a service account's imagePullSecrets failed");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        self.service_accounts.insert(key, names.clone(), PULL_SECRET_TTL);
        names
    }

    async fn pull_secret(&self, namespace: &str, name: &str) -> Vec<RegistryCredential> {
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(credentials) = self.pull_secrets.get(&key) {
            return credentials;
        }
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = match tokio::time::timeout(LOOKUP_DEADLINE, api.get_opt(name)).await {
            Ok(Ok(secret)) => secret,
            Ok(Err(error)) => {
                tracing::warn!(%error, namespace, secret = name, "reading an imagePullSecret failed");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        let credentials = secret
            .and_then(|secret| {
                let (field, legacy) = match secret.type_.as_deref() {
                    Some("kubernetes.io/dockerconfigjson") => (".dockerconfigjson", false),
                    Some("kubernetes.io/dockercfg") => (".dockercfg", true),
                    _ => return None,
                };
                let data = secret.data?.remove(field)?;
                crate::pull_secrets::parse(&data.0, legacy)
                    .map_err(|why| {
                        tracing::warn!(namespace, secret = name, "an imagePullSecret is {why}");
                    })
                    .ok()
            })
            .unwrap_or_default();
        self.pull_secrets.insert(key, credentials.clone(), PULL_SECRET_TTL);
        credentials
    }

    /// Reads the pod a binding names, within [`LOOKUP_DEADLINE`].
    async fn pod(&self, namespace: &str, name: &str) -> PodFact {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        match tokio::time::timeout(LOOKUP_DEADLINE, api.get_opt(name)).await {
            Ok(Ok(Some(pod))) => match serde_json::to_value(&pod)
                .and_then(serde_json::from_value::<PodTemplateSpec>)
            {
                Ok(template) => PodFact::Found(Box::new(template)),
                Err(error) => PodFact::Failed(format!("the pod does not decode: {error}")),
            },
            Ok(Ok(None)) => PodFact::NotFound,
            Ok(Err(error)) => PodFact::Failed(format!("reading the pod failed: {error}")),
            Err(_) => PodFact::Failed(format!(
                "reading the pod took longer than {}s",
                LOOKUP_DEADLINE.as_secs()
            )),
        }
    }

    async fn authorize(&self, namespace: &str, service_account: &str, name: &str) -> Access {
        let key = (namespace.to_owned(), service_account.to_owned(), name.to_owned());
        if let Some(access) = self.authorizations.get(&key) {
            return access;
        }
        // One review in flight per key: concurrent requests for the same pod template (a
        // Deployment scaling up) wait for the same answer instead of each sending their own.
        let shared = {
            let Ok(mut inflight) = self.in_flight.lock() else {
                return Access::Unknown("the authorization cache is unavailable".to_owned());
            };
            match inflight.get(&key) {
                Some((sent, review)) if sent.elapsed() < LOOKUP_DEADLINE => review.clone(),
                _ => {
                    let (ns, sa, spec) = key.clone();
                    let review = ask(self.client.clone(), ns, sa, spec).boxed().shared();
                    inflight.insert(key.clone(), (Instant::now(), review.clone()));
                    review
                }
            }
        };
        let access = shared.clone().await;
        if let Ok(mut inflight) = self.in_flight.lock()
            && inflight.get(&key).is_some_and(|(_, review)| review.ptr_eq(&shared))
        {
            // Only this review's entry: a newer one (this review outlived its deadline and was
            // replaced) stays for its own callers.
            inflight.remove(&key);
        }
        if !matches!(access, Access::Unknown(_)) {
            self.authorizations.insert(key, access.clone(), AUTHORIZATION_TTL);
        }
        access
    }
}

/// Asks the apiserver whether `system:serviceaccount:{namespace}:{service_account}` may `use`
/// the named GMSACredentialSpec, within [`LOOKUP_DEADLINE`].
async fn ask(
    client: kube::Client,
    namespace: String,
    service_account: String,
    name: String,
) -> Access {
    let (namespace, service_account, name) =
        (namespace.as_str(), service_account.as_str(), name.as_str());
    let review = LocalSubjectAccessReview {
        metadata: kube::api::ObjectMeta {
            namespace: Some(namespace.to_owned()),
            ..Default::default()
        },
        spec: SubjectAccessReviewSpec {
            user: Some(format!("system:serviceaccount:{namespace}:{service_account}")),
            groups: Some(vec![
                "system:serviceaccounts".to_owned(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".to_owned(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.to_owned()),
                verb: Some("use".to_owned()),
                group: Some("windows.k8s.io".to_owned()),
                resource: Some("gmsacredentialspecs".to_owned()),
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        },
        status: None,
    };
    let api: Api<LocalSubjectAccessReview> = Api::namespaced(client, namespace);
    let answer =
        tokio::time::timeout(LOOKUP_DEADLINE, api.create(&PostParams::default(), &review)).await;
    match answer {
        Ok(Ok(answer)) if answer.status.as_ref().is_some_and(|s| s.allowed) => Access::Allowed,
        Ok(Ok(answer)) => {
            let status = answer.status.unwrap_or_default();
            let why = [status.reason, status.evaluation_error]
                .into_iter()
                .flatten()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("; ");
            Access::Denied(if why.is_empty() { "no RBAC rule allows it".to_owned() } else { why })
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, namespace, service_account, name, "SubjectAccessReview failed");
            Access::Unknown(format!("the authorization check failed: {error}"))
        }
        Err(_) => {
            tracing::warn!(namespace, service_account, name, "SubjectAccessReview timed out");
            Access::Unknown(format!(
                "the authorization check took longer than {}s",
                LOOKUP_DEADLINE.as_secs()
            ))
        }
    }
}

impl FactSource for ClusterFacts {
    fn gather<'a>(
        &'a self,
        view: &'a RequestView,
        policies: &'a PolicySet,
    ) -> BoxFuture<'a, StaticFacts> {
        Box::pin(async move {
            let mut facts = StaticFacts {
                authorizations: Some(BTreeMap::new()),
                nodes: Some(BTreeMap::new()),
                pods: Some(BTreeMap::new()),
                ..StaticFacts::default()
            };
            if let Some(ns) = &view.namespace
                && let Some(meta) = self.namespaces.get(&ObjectRef::new(ns))
            {
                facts.namespace_labels.insert(
                    ns.clone(),
                    meta.metadata.labels.clone().unwrap_or_default().into_iter().collect(),
                );
            }
            let needs = policies.needs(view, &facts);
            if needs.is_empty() {
                return facts;
            }
            let resource = &self.credential_spec_resource;
            let mut uncached = Vec::new();
            for name in &needs.credential_specs {
                let key = ObjectRef::new_with(name, resource.clone());
                match self.credential_specs.get(&key) {
                    Some(spec) => {
                        if let Some(spec) = spec.data.get("credspec").cloned() {
                            facts.credential_specs.insert(name.clone(), spec);
                        }
                    }
                    None => uncached.push(name),
                }
            }
            let nodes: BTreeMap<String, Option<os::Os>> = needs
                .nodes
                .iter()
                .filter_map(|name| Some((name.clone(), self.node_os(name)?)))
                .collect();
            facts.nodes = Some(nodes);
            // The API calls run side by side, each within its deadline.
            let authorizations = futures::future::join_all(needs.authorizations.iter().map(
                |(namespace, service_account, name)| async move {
                    let access = self.authorize(namespace, service_account, name).await;
                    ((namespace.clone(), service_account.clone(), name.clone()), access)
                },
            ));
            let pod = async {
                match &needs.pod {
                    Some((namespace, name)) => {
                        Some(((namespace.clone(), name.clone()), self.pod(namespace, name).await))
                    }
                    None => None,
                }
            };
            let specs = self.uncached_credential_specs(&uncached);
            let namespace = view.namespace.clone().unwrap_or_default();
            let credentials = async {
                if needs.pull_secrets.is_empty() && needs.pull_service_account.is_none() {
                    return Vec::new();
                }
                self.pull_credentials(
                    &namespace,
                    &needs.pull_secrets,
                    needs.pull_service_account.as_deref(),
                )
                .await
            };
            let (authorizations, pod, specs, credentials) =
                futures::join!(authorizations, pod, specs, credentials);
            facts.registry_credentials = credentials;
            facts.authorizations = Some(authorizations.into_iter().collect());
            facts.pods = Some(pod.into_iter().collect());
            facts.credential_specs.extend(specs);
            facts
        })
    }
}

/// Drives a reflector stream, logging errors; the watcher retries with backoff.
async fn drive<S, T>(what: &'static str, stream: S)
where
    S: futures::Stream<Item = Result<T, watcher::Error>> + Send,
{
    futures::pin_mut!(stream);
    while let Some(event) = stream.next().await {
        if let Err(error) = event {
            tracing::warn!(%error, resource = what, "watch failed; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::future::join_all;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{Value, json};
    use tower_test::mock::{Handle, SendResponse};

    use super::*;

    type ApiServer = Handle<Request<Body>, Response<Body>>;

    /// Facts on a mock apiserver, with empty caches (only reviews are exercised).
    fn facts() -> (ClusterFacts, ApiServer) {
        let (service, server) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        (ClusterFacts::empty(client), server)
    }

    /// The next LocalSubjectAccessReview the mock apiserver receives: the credential spec it
    /// asks about, and the handle to answer it.
    async fn next_review(server: &mut ApiServer) -> (String, SendResponse<Response<Body>>) {
        let (request, send) = server.next_request().await.expect("a review is sent");
        assert_eq!(
            request.uri().path(),
            "/apis/authorization.k8s.io/v1/namespaces/shop/localsubjectaccessreviews"
        );
        let bytes = request.into_body().collect_bytes().await.expect("body");
        let body: Value = serde_json::from_slice(&bytes).expect("JSON");
        let name = body["spec"]["resourceAttributes"]["name"].as_str().unwrap_or_default();
        (name.to_owned(), send)
    }

    fn answer(send: SendResponse<Response<Body>>, allowed: bool, reason: &str) {
        let review = json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "LocalSubjectAccessReview",
            "metadata": {"namespace": "shop"},
            "spec": {},
            "status": {"allowed": allowed, "reason": reason}
        });
        let body = serde_json::to_vec(&review).expect("JSON");
        send.send_response(Response::builder().body(Body::from(body)).expect("response"));
    }

    #[tokio::test]
    async fn concurrent_requests_for_one_key_share_one_review() {
        let (facts, mut server) = facts();
        let all = join_all((0..10).map(|_| facts.authorize("shop", "web", "webapp1")));
        tokio::pin!(all);
        // One poll registers every caller (each inserts or joins before its first await).
        assert!(futures::poll!(&mut all).is_pending());
        let (name, send) = next_review(&mut server).await;
        assert_eq!(name, "webapp1");
        answer(send, true, "");
        let answers = all.await;
        assert!(answers.iter().all(|a| *a == Access::Allowed), "{answers:?}");
        assert!(server.next_request().now_or_never().is_none(), "a second review was sent");
        // Cached: no review for the next request within the TTL either.
        assert_eq!(facts.authorize("shop", "web", "webapp1").await, Access::Allowed);
        assert!(server.next_request().now_or_never().is_none());
    }

    #[tokio::test]
    async fn reviews_for_different_names_run_in_parallel_and_a_denial_says_why() {
        let (facts, mut server) = facts();
        let both = futures::future::join(
            facts.authorize("shop", "web", "webapp1"),
            facts.authorize("shop", "web", "webapp2"),
        );
        tokio::pin!(both);
        assert!(futures::poll!(&mut both).is_pending());
        // Both reviews are out before either is answered.
        let first = next_review(&mut server).await;
        let second = next_review(&mut server).await;
        let mut names = [first.0.clone(), second.0.clone()];
        names.sort();
        assert_eq!(names, ["webapp1", "webapp2"]);
        for (name, send) in [first, second] {
            if name == "webapp1" {
                answer(send, false, "RBAC: no rule grants use");
            } else {
                answer(send, true, "");
            }
        }
        let (one, two) = both.await;
        assert_eq!(one, Access::Denied("RBAC: no rule grants use".to_owned()));
        assert_eq!(two, Access::Allowed);
    }

    /// Answers the next request, which must be the list of credential specs (by `name` if
    /// any), with `items`.
    async fn answer_spec_list(server: &mut ApiServer, name: Option<&str>, items: Value) {
        let (request, send) = server.next_request().await.expect("a list is sent");
        assert_eq!(request.uri().path(), "/apis/windows.k8s.io/v1/gmsacredentialspecs");
        let query = request.uri().query().unwrap_or_default().to_owned();
        match name {
            Some(name) => {
                assert!(
                    query.contains(&format!("fieldSelector=metadata.name%3D{name}")),
                    "{query}"
                );
            }
            None => assert!(!query.contains("fieldSelector"), "{query}"),
        }
        let list = json!({
            "apiVersion": "windows.k8s.io/v1", "kind": "GMSACredentialSpecList",
            "metadata": {"resourceVersion": "7"}, "items": items,
        });
        let body = serde_json::to_vec(&list).expect("JSON");
        send.send_response(Response::builder().body(Body::from(body)).expect("response"));
    }

    #[tokio::test]
    async fn credential_specs_the_cache_lacks_are_listed_in_one_call() {
        let (facts, mut server) = facts();
        let spec = |name: &str, account: &str| {
            json!({
                "apiVersion": "windows.k8s.io/v1", "kind": "GMSACredentialSpec",
                "metadata": {"name": name}, "credspec": {"ActiveDirectoryConfig": account},
            })
        };
        let (one, gone) = ("webapp1".to_owned(), "gone".to_owned());
        let names = [&one];
        let reading = facts.uncached_credential_specs(&names);
        tokio::pin!(reading);
        assert!(futures::poll!(&mut reading).is_pending());
        answer_spec_list(&mut server, Some("webapp1"), json!([spec("webapp1", "a")])).await;
        assert_eq!(
            reading.await,
            BTreeMap::from([("webapp1".to_owned(), json!({"ActiveDirectoryConfig": "a"}))])
        );

        // Several names: one list of them all, whatever else it holds.
        let names = [&one, &gone];
        let reading = facts.uncached_credential_specs(&names);
        tokio::pin!(reading);
        assert!(futures::poll!(&mut reading).is_pending());
        answer_spec_list(&mut server, None, json!([spec("webapp1", "a"), spec("other", "b")]))
            .await;
        assert_eq!(
            reading.await,
            BTreeMap::from([("webapp1".to_owned(), json!({"ActiveDirectoryConfig": "a"}))])
        );
        assert!(server.next_request().now_or_never().is_none(), "a second list was sent");
    }

    #[tokio::test]
    async fn a_name_that_cannot_be_a_credential_spec_is_not_looked_up() {
        let (facts, mut server) = facts();
        let long = "a".repeat(254);
        for name in ["", "a,metadata.name!=b", "Upper", &long] {
            let name = name.to_owned();
            assert!(facts.uncached_credential_specs(&[&name]).await.is_empty(), "{name}");
        }
        assert!(server.next_request().now_or_never().is_none(), "a list was sent");
    }

    #[tokio::test]
    async fn an_unanswered_review_ends_at_the_deadline_and_is_not_cached() {
        let (facts, mut server) = facts();
        let asking = facts.authorize("shop", "web", "webapp1");
        tokio::pin!(asking);
        assert!(futures::poll!(&mut asking).is_pending());
        let (_, _held) = next_review(&mut server).await;
        let access = asking.await;
        assert_eq!(access, Access::Unknown("the authorization check took longer than 3s".into()));
        // Not cached: the next request asks again.
        let again = facts.authorize("shop", "web", "webapp1");
        tokio::pin!(again);
        assert!(futures::poll!(&mut again).is_pending());
        let (name, send) = next_review(&mut server).await;
        assert_eq!(name, "webapp1");
        answer(send, true, "");
        assert_eq!(again.await, Access::Allowed);
    }
}
