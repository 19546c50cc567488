//! gmsa: Windows pods carry a gMSA credential spec that exists, that their service account
//! may use, and whose content is inlined on admission.

pub mod content;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::os::{self, NodeOs, Os};
use super::{Access, FactNeeds, Facts, FieldError, Findings, Mutation, PodLookup};
use crate::admission::objects::{ContainerList, PodSpec, WindowsOptions};
use crate::admission::view::{BindingView, Kind, RequestView, Subject};

/// The `gmsa` rule block.
#[derive(Clone, Debug, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GmsaSpec {
    /// Every container of a Windows pod must be covered by a credential spec name, at pod or
    /// container level.
    #[serde(default = "default_true")]
    pub require_for_windows: bool,
    /// The mutating webhook inlines the named GMSACredentialSpec's content where it is absent.
    #[serde(default = "default_true")]
    pub resolve_credential_specs: bool,
    /// The pod's service account must be allowed to `use` the named GMSACredentialSpec
    /// (checked with a SubjectAccessReview; cluster mode only).
    #[serde(default = "default_true")]
    pub authorize_service_account: bool,
    /// If set, only these GMSACredentialSpec names may be used.
    #[serde(default)]
    pub allowed_credential_specs: Vec<String>,
}

impl Default for GmsaSpec {
    fn default() -> Self {
        Self {
            require_for_windows: true,
            resolve_credential_specs: true,
            authorize_service_account: true,
            allowed_credential_specs: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A compiled `gmsa` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Gmsa {
    spec: GmsaSpec,
}

/// One place a pod spec can configure gMSA: the pod level or one container.
struct Site<'a> {
    /// `pod-level securityContext` or `container "app"`.
    description: String,
    /// JSON pointer of this site's `windowsOptions`, relative to the object.
    pointer: String,
    /// Identity across an UPDATE: `None` for the pod level.
    container: Option<(ContainerList, &'a str)>,
    options: Option<&'a WindowsOptions>,
}

impl Site<'_> {
    fn name(&self) -> Option<&str> {
        self.options?.gmsa_credential_spec_name.as_deref().filter(|n| !n.is_empty())
    }

    /// The inlined content; an empty string is content too (the upstream webhook and the
    /// apiserver's validation both reject it), never filled in.
    fn content(&self) -> Option<&str> {
        self.options?.gmsa_credential_spec.as_deref()
    }
}

fn sites<'a>(spec: &'a PodSpec, spec_pointer: &str) -> Vec<Site<'a>> {
    let mut sites = vec![Site {
        description: "the pod-level securityContext".to_owned(),
        pointer: format!("{spec_pointer}/securityContext/windowsOptions"),
        container: None,
        options: spec.windows_options(),
    }];
    for c in spec.all_containers() {
        sites.push(Site {
            description: format!("{} {:?}", c.list.noun(), c.container.name),
            pointer: format!("{spec_pointer}{}/securityContext/windowsOptions", c.pointer()),
            container: Some((c.list, c.container.name.as_str())),
            options: c.container.windows_options(),
        });
    }
    sites
}

/// gMSA settings of a site, compared across an UPDATE.
fn settings(options: Option<&WindowsOptions>) -> (Option<&str>, Option<&str>) {
    let name =
        options.and_then(|o| o.gmsa_credential_spec_name.as_deref()).filter(|n| !n.is_empty());
    let content = options.and_then(|o| o.gmsa_credential_spec.as_deref());
    (name, content)
}

impl Gmsa {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &GmsaSpec) -> Result<Self, FieldError> {
        for (i, name) in spec.allowed_credential_specs.iter().enumerate() {
            if let Err(why) = crate::names::check_dns_subdomain(name) {
                return Err(FieldError::new(
                    format!("allowedCredentialSpecs[{i}]"),
                    format!(
                        "{name:?} is not a GMSACredentialSpec name (a lowercase DNS subdomain): {why}"
                    ),
                ));
            }
        }
        Ok(Self { spec: spec.clone() })
    }

    /// Whether the service account must be authorized to `use` the spec.
    pub fn authorizes_service_accounts(&self) -> bool {
        self.spec.authorize_service_account
    }

    /// Adds what the rule needs to judge the object under review: the credential specs it
    /// names and, when `authorizeServiceAccount` is on, the `use` checks for its service account.
    pub fn needs(&self, view: &RequestView, needs: &mut FactNeeds) {
        let Some(pod) = view.pod().filter(|p| uses_gmsa(&p.spec)) else { return };
        if view.kind == Kind::PodStatus {
            return;
        }
        let pointer = pod.spec_pointer();
        let namespace = view.namespace.as_deref().unwrap_or("default");
        let service_account = pod.spec.service_account();
        for name in sites(&pod.spec, &pointer).iter().filter_map(Site::name) {
            needs.credential_specs.insert(name.to_owned());
            if self.spec.authorize_service_account {
                needs.authorizations.insert((
                    namespace.to_owned(),
                    service_account.to_owned(),
                    name.to_owned(),
                ));
            }
        }
    }

    /// Violations of the rule by the object under review.
    ///
    /// On an UPDATE of a live pod only what the UPDATE adds is checked (new ephemeral
    /// containers), plus that existing gMSA settings did not change: a pod admitted earlier must
    /// stay updatable (labels, finalizers) even if its credential spec has gone since. The
    /// exception is a scheduling-gated pod whose update changes its OS (a new nodeSelector or
    /// affinity): it is judged as if it were being created. A `pods/status` write cannot change
    /// the spec and is not judged. A binding to a Windows node is judged against the pod it binds.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        let mut findings = Findings::default();
        let Some(pod) = view.pod() else {
            if let Subject::Binding(binding) = &view.subject {
                findings.violations.extend(self.validate_binding(view, binding, facts));
            }
            return findings;
        };
        if view.kind == Kind::PodStatus {
            return findings;
        }
        let node_os = |node: &str| facts.node_os(node);
        let resolved = os::resolve(&pod.spec, &node_os);
        let old = pod.old.as_deref().filter(|_| view.kind.is_pod());
        let repinned = old.is_some_and(|old| {
            old.spec.is_gated() && os::resolve(&old.spec, &node_os).os() != resolved.os()
        });
        let as_create = old.is_none() || repinned;
        if as_create && let Some(problem) = resolved.problem() {
            findings.violations.push(problem);
            return findings;
        }
        // Most pods are Linux pods without gMSA: nothing to check, nothing to allocate.
        let old_uses_gmsa = old.is_some_and(|old| uses_gmsa(&old.spec));
        if !uses_gmsa(&pod.spec) && !old_uses_gmsa && !resolved.is_windows() {
            return findings;
        }
        let spec_pointer = pod.spec_pointer();
        let sites = sites(&pod.spec, &spec_pointer);
        let is_new = |site: &Site<'_>| match (old, site.container) {
            _ if as_create => true,
            (None, _) => true,
            (Some(_), None) => false,
            (Some(old), Some((list, name))) => old.spec.container(list, name).is_none(),
        };
        if let Some(old) = old {
            self.check_unchanged(&sites, &old.spec, &mut findings.violations);
        }
        let namespace = view.namespace.as_deref().unwrap_or("default");
        let service_account = pod.spec.service_account();
        let pod_level_name = sites.first().and_then(Site::name);
        let mut uncovered = Vec::new();
        for site in sites.iter().filter(|s| is_new(s)) {
            let v = &mut findings.violations;
            match (site.name(), site.content()) {
                (None, Some(_)) => v.push(format!(
                    "{} sets windowsOptions.gmsaCredentialSpec without gmsaCredentialSpecName; name the GMSACredentialSpec instead of inlining its content",
                    site.description
                )),
                (Some(name), content) => {
                    self.check_name(site, name, content, namespace, service_account, facts, v);
                }
                (None, None) => {}
            }
            if site.container.is_some() && site.name().is_none() && pod_level_name.is_none() {
                uncovered.push(site.description.clone());
            }
            if site.options.and_then(|o| o.host_process) == Some(true) && site.name().is_some() {
                findings.advisories.push(format!(
                    "{} is a hostProcess container with a gMSA credential spec: host process containers run as a host account and the gMSA identity may not apply",
                    site.description
                ));
            }
        }
        if self.spec.require_for_windows && resolved.is_windows() && !uncovered.is_empty() {
            let by = match &resolved {
                os::PodOs::Pinned { by, .. } => by.as_str(),
                _ => "its signals",
            };
            findings.violations.push(if repinned {
                // The securityContext of a pod cannot change after creation: only a new pod
                // can carry gMSA, so asking for a label or selector change would mislead.
                format!(
                    "this update pins the pod to Windows ({by}), but it runs {} without a gMSA credential spec, and a pod's securityContext cannot change after creation; delete the pod and create it with securityContext.windowsOptions.gmsaCredentialSpecName naming a GMSACredentialSpec that service account {service_account:?} may use",
                    uncovered.join(", ")
                )
            } else {
                format!(
                    "this Windows pod ({by}) runs {} without a gMSA credential spec; set securityContext.windowsOptions.gmsaCredentialSpecName in the pod spec (for every container) or in each container, naming a GMSACredentialSpec that service account {service_account:?} may use",
                    uncovered.join(", ")
                )
            });
        }
        findings
    }

    /// A binding of a pod to a Windows node: the pod must carry what a Windows pod needs.
    fn validate_binding(
        &self,
        view: &RequestView,
        binding: &BindingView,
        facts: &dyn Facts,
    ) -> Option<String> {
        if !self.spec.require_for_windows {
            return None;
        }
        let node = &binding.node;
        let pod_name = view.display_name();
        match facts.node_os(node) {
            NodeOs::NotChecked | NodeOs::Known(Os::Linux) => return None,
            NodeOs::Unknown => {
                return Some(format!(
                    "node {node:?} is not known to arcguard (yet), so whether pod {pod_name} may run there without gMSA cannot be checked; the binding is retried once the node is registered"
                ));
            }
            NodeOs::Known(Os::Windows) => {}
        }
        let namespace = view.namespace.as_deref().unwrap_or_default();
        let pod = match facts.pod(namespace, &view.name) {
            PodLookup::NotChecked | PodLookup::NotFound => return None,
            PodLookup::Failed(why) => {
                return Some(format!(
                    "pod {pod_name} could not be read to check its gMSA settings before binding it to Windows node {node:?}: {why}; retry"
                ));
            }
            PodLookup::Found(pod) => pod,
        };
        let sites = sites(&pod.spec, "/spec");
        if sites.first().and_then(Site::name).is_some() {
            return None;
        }
        let uncovered: Vec<&str> = sites
            .iter()
            .filter(|s| s.container.is_some() && s.name().is_none())
            .map(|s| s.description.as_str())
            .collect();
        (!uncovered.is_empty()).then(|| {
            format!(
                "binding pod {pod_name} to Windows node {node:?} would run {} without a gMSA credential spec; delete the pod and create it with spec.os.name: windows and securityContext.windowsOptions.gmsaCredentialSpecName naming a GMSACredentialSpec that service account {:?} may use",
                uncovered.join(", "),
                pod.spec.service_account()
            )
        })
    }

    #[allow(clippy::too_many_arguments)] // One call site; the arguments are the check's inputs.
    fn check_name(
        &self,
        site: &Site<'_>,
        name: &str,
        content: Option<&str>,
        namespace: &str,
        service_account: &str,
        facts: &dyn Facts,
        violations: &mut Vec<String>,
    ) {
        let at = &site.description;
        let allowed = &self.spec.allowed_credential_specs;
        if !allowed.is_empty() && !allowed.iter().any(|a| a == name) {
            violations.push(format!(
                "{at} names GMSACredentialSpec {name:?}, which is not allowed; use one of: {}",
                allowed.join(", ")
            ));
            return;
        }
        let Some(credspec) = facts.credential_spec(name) else {
            violations.push(format!(
                "{at} names GMSACredentialSpec {name:?}, which does not exist; create it or name an existing one"
            ));
            return;
        };
        if self.spec.authorize_service_account {
            match facts.may_use_credential_spec(namespace, service_account, name) {
                Access::Allowed | Access::NotChecked => {}
                Access::Denied(answer) => violations.push(format!(
                    "service account {namespace}/{service_account} may not use GMSACredentialSpec {name:?} (named by {at}; the SubjectAccessReview answered: {answer}); bind it to a role granting verb \"use\" on gmsacredentialspecs.windows.k8s.io with resourceNames [{name:?}]"
                )),
                Access::Unknown(reason) => violations.push(format!(
                    "could not check whether service account {namespace}/{service_account} may use GMSACredentialSpec {name:?}: {reason}; retry"
                )),
            }
        }
        if let Some(content) = content {
            if content.is_empty() {
                violations.push(format!(
                    "{at} sets windowsOptions.gmsaCredentialSpec to an empty string; remove it and let arcguard inline GMSACredentialSpec {name:?}"
                ));
            } else if !self::content::matches(content, credspec) {
                violations.push(format!(
                    "{at} inlines gMSA credential spec content that differs from GMSACredentialSpec {name:?}; remove windowsOptions.gmsaCredentialSpec and let arcguard inline it"
                ));
            }
        }
    }

    fn check_unchanged(&self, sites: &[Site<'_>], old: &PodSpec, violations: &mut Vec<String>) {
        for site in sites {
            let before = match site.container {
                None => settings(old.windows_options()),
                Some((list, name)) => match old.container(list, name) {
                    Some(c) => settings(c.windows_options()),
                    None => continue,
                },
            };
            let after = settings(site.options);
            if before != after {
                violations.push(format!(
                    "gMSA settings of {} cannot change on update (gmsaCredentialSpecName {:?} -> {:?}); delete and recreate the pod instead",
                    site.description,
                    before.0.unwrap_or(""),
                    after.0.unwrap_or("")
                ));
            }
        }
    }

    /// The changes this rule makes to the object under review: for a live pod, inline the
    /// content of every named credential spec that has none (never overwriting content).
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        if !self.spec.resolve_credential_specs
            || !view.kind.is_pod()
            || view.kind == Kind::PodStatus
        {
            return Vec::new();
        }
        let Some(pod) = view.pod() else { return Vec::new() };
        if !uses_gmsa(&pod.spec) {
            return Vec::new();
        }
        let spec_pointer = pod.spec_pointer();
        let old = pod.old.as_deref();
        sites(&pod.spec, &spec_pointer)
            .into_iter()
            .filter(|site| match (old, site.container) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(old), Some((list, name))) => old.spec.container(list, name).is_none(),
            })
            .filter(|site| site.content().is_none())
            .filter_map(|site| {
                let credspec = facts.credential_spec(site.name()?)?;
                Some(Mutation::InlineCredentialSpec {
                    windows_options_pointer: site.pointer,
                    // As the cluster stores it and the upstream webhook would inline it.
                    content: content::to_go_json(credspec),
                })
            })
            .collect()
    }
}

/// Whether any `windowsOptions` of the spec names or inlines a credential spec.
fn uses_gmsa(spec: &PodSpec) -> bool {
    let sets = |o: Option<&WindowsOptions>| {
        o.is_some_and(|o| o.gmsa_credential_spec_name.is_some() || o.gmsa_credential_spec.is_some())
    };
    sets(spec.windows_options())
        || spec.all_containers().any(|c| sets(c.container.windows_options()))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::admission::review::Operation;
    use crate::admission::view::Kind;
    use crate::rules::{Facts, StaticFacts};

    fn credspec() -> Value {
        json!({"ActiveDirectoryConfig": {"GroupManagedServiceAccounts": [{"Name": "WebApp1", "Scope": "CONTOSO"}]}, "CmsPlugins": ["ActiveDirectory"], "Version": 1})
    }

    /// Facts with spec `webapp1`, which only service account `web` in `apps` may use.
    struct ClusterFacts(StaticFacts);

    impl Facts for ClusterFacts {
        fn credential_spec(&self, name: &str) -> Option<&Value> {
            self.0.credential_spec(name)
        }
        fn may_use_credential_spec(&self, ns: &str, sa: &str, name: &str) -> Access {
            match (ns, sa, name) {
                ("apps", "web", "webapp1") => Access::Allowed,
                ("apps", "broken", _) => Access::Unknown("apiserver unavailable".into()),
                _ => Access::Denied("no RBAC rule allows it".to_owned()),
            }
        }
        fn namespace_labels(&self, _: &str) -> Option<&crate::admission::objects::Labels> {
            None
        }
        fn node_os(&self, node: &str) -> crate::rules::os::NodeOs {
            self.0.node_os(node)
        }
        fn pod(&self, namespace: &str, name: &str) -> crate::rules::PodLookup<'_> {
            self.0.pod(namespace, name)
        }
        fn image(&self, key: &str) -> crate::rules::provenance::ImageLookup<'_> {
            self.0.image(key)
        }
        fn signature(
            &self,
            key: &str,
            trust: crate::signature::TrustId,
        ) -> Option<&crate::signature::SignatureVerdict> {
            self.0.signature(key, trust)
        }
    }

    fn facts() -> ClusterFacts {
        ClusterFacts(StaticFacts {
            credential_specs: BTreeMap::from([("webapp1".to_owned(), credspec())]),
            ..StaticFacts::default()
        })
    }

    fn rule() -> Gmsa {
        Gmsa::compile(&GmsaSpec::default()).expect("default spec compiles")
    }

    fn pod_view(kind: Kind, object: Value, old: Option<Value>) -> RequestView {
        let raw = RawValue::from_string(object.to_string()).expect("json");
        let old_raw = old.map(|o| RawValue::from_string(o.to_string()).expect("json"));
        let op = if old_raw.is_some() { Operation::Update } else { Operation::Create };
        RequestView::build(kind, op, Some("apps".into()), &raw, old_raw.as_deref()).expect("view")
    }

    fn windows_pod(sa: &str, pod_opts: Value, container_opts: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "apps"}, "spec": {
            "os": {"name": "windows"}, "serviceAccountName": sa,
            "securityContext": {"windowsOptions": pod_opts},
            "containers": [{"name": "app", "image": "x", "securityContext": {"windowsOptions": container_opts}}],
            "initContainers": [{"name": "init", "image": "x"}]}})
    }

    #[test]
    fn validation_table() {
        let content = credspec().to_string();
        let cases: Vec<(&str, Value, Vec<&str>)> = vec![
            (
                "pod-level name covers every container",
                windows_pod("web", json!({"gmsaCredentialSpecName": "webapp1"}), json!({})),
                vec![],
            ),
            (
                "uncovered windows pod",
                windows_pod("web", json!({}), json!({})),
                vec!["without a gMSA credential spec"],
            ),
            (
                "container-level only leaves init container uncovered",
                windows_pod("web", json!({}), json!({"gmsaCredentialSpecName": "webapp1"})),
                vec!["init container \"init\""],
            ),
            (
                "unknown spec",
                windows_pod("web", json!({"gmsaCredentialSpecName": "nope"}), json!({})),
                vec!["does not exist"],
            ),
            (
                "service account may not use",
                windows_pod("other", json!({"gmsaCredentialSpecName": "webapp1"}), json!({})),
                vec!["may not use GMSACredentialSpec \"webapp1\""],
            ),
            (
                "authorization unknown fails closed",
                windows_pod("broken", json!({"gmsaCredentialSpecName": "webapp1"}), json!({})),
                vec!["could not check"],
            ),
            (
                "matching inlined content",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": content}),
                    json!({}),
                ),
                vec![],
            ),
            (
                "mismatched inlined content",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": "{\"x\":1}"}),
                    json!({}),
                ),
                vec!["differs from"],
            ),
            (
                "inlined content equal as Go values",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": "{\"CmsPlugins\": [\"ActiveDirectory\"], \"ActiveDirectoryConfig\": {\"GroupManagedServiceAccounts\": [{\"Scope\": \"CONTOSO\", \"Name\": \"WebApp1\"}]}, \"Version\": 1.0}"}),
                    json!({}),
                ),
                vec![],
            ),
            (
                "empty inlined content",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": ""}),
                    json!({}),
                ),
                vec!["empty string"],
            ),
            (
                "empty inlined content without a name",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1"}),
                    json!({"gmsaCredentialSpec": ""}),
                ),
                vec!["without gmsaCredentialSpecName"],
            ),
            (
                "content without a name",
                windows_pod(
                    "web",
                    json!({"gmsaCredentialSpecName": "webapp1"}),
                    json!({"gmsaCredentialSpec": content}),
                ),
                vec!["without gmsaCredentialSpecName"],
            ),
            (
                "linux pod without gmsa",
                json!({"spec": {"containers": [{"name": "a", "image": "x"}]}}),
                vec![],
            ),
            (
                "linux pod naming a missing spec",
                json!({"spec": {"serviceAccountName": "web", "securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "nope"}}, "containers": [{"name": "a"}]}}),
                vec!["does not exist"],
            ),
        ];
        for (name, pod, want) in cases {
            let findings = rule().validate(&pod_view(Kind::Pod, pod, None), &facts());
            assert_eq!(findings.violations.len(), want.len(), "{name}: {:?}", findings.violations);
            for (got, want) in findings.violations.iter().zip(want) {
                assert!(got.contains(want), "{name}: {got:?} should contain {want:?}");
            }
        }
    }

    #[test]
    fn allow_list_and_requirement_switches() {
        let strict = Gmsa::compile(&GmsaSpec {
            allowed_credential_specs: vec!["other".into()],
            ..GmsaSpec::default()
        })
        .expect("valid");
        let pod = windows_pod("web", json!({"gmsaCredentialSpecName": "webapp1"}), json!({}));
        let findings = strict.validate(&pod_view(Kind::Pod, pod, None), &facts());
        assert!(findings.violations[0].contains("not allowed; use one of: other"), "{findings:?}");

        let lax = Gmsa::compile(&GmsaSpec { require_for_windows: false, ..GmsaSpec::default() })
            .expect("valid");
        let pod = windows_pod("web", json!({}), json!({}));
        assert!(lax.validate(&pod_view(Kind::Pod, pod, None), &facts()).violations.is_empty());

        let unauthorized =
            Gmsa::compile(&GmsaSpec { authorize_service_account: false, ..GmsaSpec::default() })
                .expect("valid");
        let pod = windows_pod("other", json!({"gmsaCredentialSpecName": "webapp1"}), json!({}));
        assert!(
            unauthorized.validate(&pod_view(Kind::Pod, pod, None), &facts()).violations.is_empty()
        );
    }

    #[test]
    fn update_may_not_change_gmsa_but_may_change_other_fields() {
        let old = windows_pod("web", json!({"gmsaCredentialSpecName": "webapp1"}), json!({}));
        let mut relabelled = old.clone();
        relabelled["metadata"]["labels"] = json!({"a": "b"});
        let view = pod_view(Kind::Pod, relabelled, Some(old.clone()));
        // The spec has gone since creation: an unrelated update still passes.
        assert!(rule().validate(&view, &StaticFacts::default()).violations.is_empty());

        let changed = windows_pod("web", json!({"gmsaCredentialSpecName": "webapp2"}), json!({}));
        let findings = rule().validate(&pod_view(Kind::Pod, changed, Some(old.clone())), &facts());
        assert!(
            findings.violations.iter().any(|v| v.contains("cannot change on update")),
            "{findings:?}"
        );

        let mut with_debug = old.clone();
        with_debug["spec"]["ephemeralContainers"] = json!([{"name": "debug", "image": "x", "securityContext": {"windowsOptions": {"gmsaCredentialSpecName": "nope"}}}]);
        let findings = rule()
            .validate(&pod_view(Kind::PodEphemeralContainers, with_debug, Some(old)), &facts());
        assert_eq!(findings.violations.len(), 1, "{findings:?}");
        assert!(findings.violations[0].contains("ephemeral container \"debug\""), "{findings:?}");
    }

    #[test]
    fn templates_are_validated_but_never_mutated() {
        let deployment = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {
            "nodeSelector": {"kubernetes.io/os": "windows"}, "containers": [{"name": "app", "image": "x"}]}}}});
        let view = pod_view(Kind::Deployment, deployment, None);
        assert_eq!(rule().validate(&view, &facts()).violations.len(), 1);
        assert!(rule().mutate(&view, &facts()).is_empty());
    }

    #[test]
    fn mutation_inlines_missing_content_only() {
        let content = credspec().to_string();
        let pod = windows_pod(
            "web",
            json!({"gmsaCredentialSpecName": "webapp1"}),
            json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": content}),
        );
        let mutations = rule().mutate(&pod_view(Kind::Pod, pod, None), &facts());
        assert_eq!(
            mutations,
            vec![Mutation::InlineCredentialSpec {
                windows_options_pointer: "/spec/securityContext/windowsOptions".into(),
                content: content::to_go_json(&credspec()),
            }]
        );
        // An empty string is content: never filled in (validation denies it).
        let empty = windows_pod(
            "web",
            json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": ""}),
            json!({"gmsaCredentialSpecName": "webapp1", "gmsaCredentialSpec": content}),
        );
        assert!(rule().mutate(&pod_view(Kind::Pod, empty, None), &facts()).is_empty());
        let unknown = windows_pod("web", json!({"gmsaCredentialSpecName": "nope"}), json!({}));
        assert!(rule().mutate(&pod_view(Kind::Pod, unknown, None), &facts()).is_empty());
        let off =
            Gmsa::compile(&GmsaSpec { resolve_credential_specs: false, ..GmsaSpec::default() })
                .expect("valid");
        let pod = windows_pod("web", json!({"gmsaCredentialSpecName": "webapp1"}), json!({}));
        assert!(off.mutate(&pod_view(Kind::Pod, pod, None), &facts()).is_empty());
    }

    #[test]
    fn inlined_content_then_validates() {
        let pod = windows_pod("web", json!({}), json!({"gmsaCredentialSpecName": "webapp1"}));
        let mut pod_with_init_covered = pod.clone();
        pod_with_init_covered["spec"]["initContainers"][0]["securityContext"] =
            json!({"windowsOptions": {"gmsaCredentialSpecName": "webapp1"}});
        let view = pod_view(Kind::Pod, pod_with_init_covered.clone(), None);
        let mutations: std::collections::BTreeSet<_> =
            rule().mutate(&view, &facts()).into_iter().collect();
        assert_eq!(mutations.len(), 2);
        let mut patched = pod_with_init_covered;
        crate::pipeline::patch::apply(&mut patched, &mutations);
        let view = pod_view(Kind::Pod, patched, None);
        assert_eq!(rule().validate(&view, &facts()), Findings::default());
    }

    #[test]
    fn host_process_with_gmsa_is_an_advisory() {
        let pod = windows_pod(
            "web",
            json!({"gmsaCredentialSpecName": "webapp1"}),
            json!({"gmsaCredentialSpecName": "webapp1", "hostProcess": true}),
        );
        let findings = rule().validate(&pod_view(Kind::Pod, pod, None), &facts());
        assert!(findings.violations.is_empty());
        assert_eq!(findings.advisories.len(), 1);
    }

    #[test]
    fn allow_list_entries_must_be_names() {
        let err = Gmsa::compile(&GmsaSpec {
            allowed_credential_specs: vec!["Bad_Name".into()],
            ..GmsaSpec::default()
        })
        .expect_err("invalid name");
        assert_eq!(err.field, "allowedCredentialSpecs[0]");
    }
}
