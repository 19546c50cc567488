//! Cluster facts for the rules: GMSACredentialSpecs and namespace labels from watch-backed
//! caches, and `use` authorizations from LocalSubjectAccessReviews, cached briefly.
//!
//! API calls (for RBAC; `tests/rbac.rs` checks the manifests grant exactly these):
//! - `list windows.k8s.io/gmsacredentialspecs (cluster)`
//! - `watch windows.k8s.io/gmsacredentialspecs (cluster)`
//! - `list core/namespaces (cluster, metadata only)`
//! - `watch core/namespaces (cluster, metadata only)`
//! - `create authorization.k8s.io/localsubjectaccessreviews (namespaced: the pod's namespace)`

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use k8s_openapi::api::authorization::v1::{
    LocalSubjectAccessReview, ResourceAttributes, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, PartialObjectMeta, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

use crate::admission::RequestView;
use crate::rules::gmsa::Gmsa;
use crate::rules::{Access, StaticFacts};
use crate::server::FactSource;

/// How long a `use` authorization is reused; RBAC changes take effect within this time.
const AUTHORIZATION_TTL: Duration = Duration::from_secs(10);
/// Cached authorizations kept at most; the cache is emptied beyond it.
const AUTHORIZATION_CACHE_LIMIT: usize = 10_000;

type AccessKey = (String, String, String);

/// Facts looked up from the cluster.
pub struct ClusterFacts {
    client: kube::Client,
    credential_specs: Store<DynamicObject>,
    credential_spec_resource: ApiResource,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    authorizations: Mutex<HashMap<AccessKey, (Instant, Access)>>,
}

impl std::fmt::Debug for ClusterFacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterFacts")
            .field("credential_specs", &self.credential_specs.len())
            .field("namespaces", &self.namespaces.len())
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
        let specs =
            watcher(specs_api, watcher::Config::default()).default_backoff().reflect(writer);
        tokio::spawn(drive("GMSACredentialSpec", specs));

        let (namespaces, writer) = reflector::store();
        // Metadata-only: namespace labels are all that is needed.
        let ns_api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        let ns = watcher(ns_api, watcher::Config::default()).default_backoff().reflect(writer);
        tokio::spawn(drive("Namespace", ns));

        std::sync::Arc::new(Self {
            client,
            credential_specs,
            credential_spec_resource: resource,
            namespaces,
            authorizations: Mutex::new(HashMap::new()),
        })
    }

    async fn authorize(&self, namespace: &str, service_account: &str, name: &str) -> Access {
        let key = (namespace.to_owned(), service_account.to_owned(), name.to_owned());
        if let Ok(cache) = self.authorizations.lock()
            && let Some((at, access)) = cache.get(&key)
            && at.elapsed() < AUTHORIZATION_TTL
        {
            return access.clone();
        }
        let access = self.ask(namespace, service_account, name).await;
        if !matches!(access, Access::Unknown(_))
            && let Ok(mut cache) = self.authorizations.lock()
        {
            if cache.len() >= AUTHORIZATION_CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (Instant::now(), access.clone()));
        }
        access
    }

    async fn ask(&self, namespace: &str, service_account: &str, name: &str) -> Access {
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
        let api: Api<LocalSubjectAccessReview> = Api::namespaced(self.client.clone(), namespace);
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => Access::Allowed,
            Ok(_) => Access::Denied,
            Err(error) => {
                tracing::warn!(%error, namespace, service_account, name, "SubjectAccessReview failed");
                Access::Unknown(format!("the authorization check failed: {error}"))
            }
        }
    }
}

impl FactSource for ClusterFacts {
    fn gather<'a>(&'a self, view: &'a RequestView) -> BoxFuture<'a, StaticFacts> {
        Box::pin(async move {
            let mut facts =
                StaticFacts { authorizations: Some(BTreeMap::new()), ..StaticFacts::default() };
            if let Some(ns) = &view.namespace
                && let Some(meta) = self.namespaces.get(&ObjectRef::new(ns))
            {
                facts.namespace_labels.insert(
                    ns.clone(),
                    meta.metadata.labels.clone().unwrap_or_default().into_iter().collect(),
                );
            }
            let names = Gmsa::credential_spec_names(view);
            if names.is_empty() {
                return facts;
            }
            let namespace = view.namespace.clone().unwrap_or_else(|| "default".to_owned());
            let service_account =
                view.pod().map(|p| p.spec.service_account().to_owned()).unwrap_or_default();
            let resource = &self.credential_spec_resource;
            let mut authorizations = BTreeMap::new();
            for name in names {
                let key = ObjectRef::new_with(&name, resource.clone());
                if let Some(spec) =
                    self.credential_specs.get(&key).and_then(|o| o.data.get("credspec").cloned())
                {
                    facts.credential_specs.insert(name.clone(), spec);
                }
                let access = self.authorize(&namespace, &service_account, &name).await;
                authorizations.insert((namespace.clone(), service_account.clone(), name), access);
            }
            facts.authorizations = Some(authorizations);
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
