//! Loading policies and GMSACredentialSpecs from files (standalone mode and `check`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::manifest::{self, ManifestError};
use crate::rules::{Rule, StaticFacts};

use super::spec::{self, PolicySpec};
use super::{InvalidPolicy, Policy, PolicySet, Scope};

/// `apiVersion`s of GMSACredentialSpec.
const GMSA_API_VERSIONS: [&str; 2] = ["windows.k8s.io/v1", "windows.k8s.io/v1alpha1"];

/// Why a policy directory could not be loaded; the previous policy set stays in force.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The directory could not be listed.
    #[error("failed to list policy directory {path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A symlink leads back into a directory being listed: the tree has no end.
    #[error("symlink loop in the policy directory: {path} leads back to {target}; remove the link")]
    SymlinkLoop {
        /// The path that loops.
        path: PathBuf,
        /// The directory it leads back into.
        target: PathBuf,
    },
    /// A file could not be read.
    #[error("failed to read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid YAML or JSON.
    #[error("{path}: {source}")]
    Manifest {
        /// The file.
        path: String,
        /// The parse error.
        #[source]
        source: ManifestError,
    },
    /// A document is not a policy or credential spec, or lacks a required field.
    #[error("{path}: document {document}: {message}")]
    Document {
        /// The file.
        path: String,
        /// 1-based index of the object in the file.
        document: usize,
        /// What is wrong.
        message: String,
    },
    /// A policy failed to compile.
    #[error("{path}: {source}")]
    Invalid {
        /// The file.
        path: String,
        /// The policy and field.
        #[source]
        source: InvalidPolicy,
    },
    /// Two documents define the same policy or credential spec.
    #[error("{kind} {name:?} is defined twice: in {first} and in {second}")]
    Duplicate {
        /// The kind.
        kind: String,
        /// The name.
        name: String,
        /// Where it was first defined.
        first: String,
        /// Where it was defined again.
        second: String,
    },
}

/// Policies and facts read from files.
#[derive(Clone, Debug, Default)]
pub struct Loaded {
    /// The compiled policies.
    pub policies: PolicySet,
    /// GMSACredentialSpecs found beside them.
    pub facts: StaticFacts,
    /// Things the operator should know: settings that cannot apply without a cluster.
    pub warnings: Vec<String>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
struct Document {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    spec: Option<Value>,
    #[serde(default)]
    credspec: Option<Value>,
}

/// Whether a file name is one the loader reads: YAML or JSON, not hidden, not a kustomization.
fn is_policy_file(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else { return false };
    let ext_ok = [".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e));
    ext_ok && !name.starts_with('.') && !name.starts_with("kustomization.")
}

/// Lists the policy files below `dir`, recursively, sorted; hidden entries (such as the
/// `..data` folders of ConfigMap volumes) are skipped.
///
/// # Errors
/// [`LoadError::ReadDir`] when a directory cannot be listed.
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    // Each directory to list with the real paths of the directories above it on the way here:
    // symlinks are followed (ConfigMap volumes link their files), so a link back up that chain
    // would otherwise be walked forever. A directory reached twice otherwise (two links to it)
    // is listed once.
    let mut pending: Vec<(PathBuf, Vec<PathBuf>)> = vec![(dir.to_path_buf(), Vec::new())];
    let mut listed: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    while let Some((dir, above)) = pending.pop() {
        let real = std::fs::canonicalize(&dir)
            .map_err(|source| LoadError::ReadDir { path: dir.clone(), source })?;
        if above.contains(&real) {
            return Err(LoadError::SymlinkLoop { path: dir, target: real });
        }
        if !listed.insert(real.clone()) {
            continue;
        }
        let mut chain = above;
        chain.push(real);
        let entries = std::fs::read_dir(&dir)
            .map_err(|source| LoadError::ReadDir { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| LoadError::ReadDir { path: dir.clone(), source })?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            // Follows symlinks, as ConfigMap volumes link their files.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => pending.push((path, chain.clone())),
                Ok(meta) if meta.is_file() && is_policy_file(&path) => files.push(path),
                _ => {}
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Loads every policy and GMSACredentialSpec below `dir`.
///
/// # Errors
/// [`LoadError`] for the first file or document that is unreadable or invalid.
pub fn load_dir(dir: &Path) -> Result<Loaded, LoadError> {
    let mut sources = Vec::new();
    for path in policy_files(dir)? {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path)
            .map_err(|source| LoadError::Read { path: name.clone(), source })?;
        sources.push((name, text));
    }
    load_sources(&sources)
}

/// Loads policies and GMSACredentialSpecs from named texts.
///
/// # Errors
/// [`LoadError`] for the first document that is invalid.
pub fn load_sources(sources: &[(String, String)]) -> Result<Loaded, LoadError> {
    let mut policies: BTreeMap<(String, Scope), (String, Policy)> = BTreeMap::new();
    let mut specs: BTreeMap<String, (String, Value)> = BTreeMap::new();
    let mut warnings = Vec::new();
    for (path, text) in sources {
        let objects = manifest::parse(text)
            .map_err(|source| LoadError::Manifest { path: path.clone(), source })?;
        for (i, object) in objects.iter().enumerate() {
            let document = i + 1;
            let fail =
                |message: String| LoadError::Document { path: path.clone(), document, message };
            let (api_version, kind) = manifest::type_of(object);
            let doc = Document::deserialize(object).map_err(|e| fail(e.to_string()))?;
            let meta = doc.metadata.unwrap_or(Metadata { name: String::new(), namespace: None });
            if meta.name.is_empty() {
                return Err(fail(format!("{kind} has no metadata.name")));
            }
            match (api_version, kind) {
                (spec::API_VERSION, spec::CLUSTER_KIND | spec::NAMESPACED_KIND) => {
                    let scope = if kind == spec::CLUSTER_KIND {
                        Scope::Cluster
                    } else {
                        match meta.namespace.filter(|n| !n.is_empty()) {
                            Some(ns) => Scope::Namespace(ns),
                            None => {
                                return Err(fail(format!(
                                    "GuardPolicy {:?} needs metadata.namespace (use ClusterGuardPolicy for every namespace)",
                                    meta.name
                                )));
                            }
                        }
                    };
                    let spec = decode_spec(doc.spec.unwrap_or(Value::Null)).map_err(
                        |(field, message)| {
                            fail(format!("{kind} {:?}: {field}: {message}", meta.name))
                        },
                    )?;
                    let policy = Policy::compile(&meta.name, scope.clone(), &spec)
                        .map_err(|source| LoadError::Invalid { path: path.clone(), source })?;
                    warnings.extend(standalone_warnings(&policy));
                    let key = (meta.name.clone(), scope);
                    if let Some((first, _)) = policies.get(&key) {
                        return Err(LoadError::Duplicate {
                            kind: kind.to_owned(),
                            name: policy.id(),
                            first: first.clone(),
                            second: path.clone(),
                        });
                    }
                    policies.insert(key, (path.clone(), policy));
                }
                (v, "GMSACredentialSpec") if GMSA_API_VERSIONS.contains(&v) => {
                    let credspec = doc.credspec.filter(Value::is_object).ok_or_else(|| {
                        fail(format!("GMSACredentialSpec {:?} has no credspec object", meta.name))
                    })?;
                    if let Some((first, _)) = specs.get(&meta.name) {
                        return Err(LoadError::Duplicate {
                            kind: kind.to_owned(),
                            name: meta.name,
                            first: first.clone(),
                            second: path.clone(),
                        });
                    }
                    specs.insert(meta.name, (path.clone(), credspec));
                }
                _ => {
                    return Err(fail(format!(
                        "expected {} ClusterGuardPolicy or GuardPolicy, or windows.k8s.io/v1 GMSACredentialSpec; got apiVersion {api_version:?} kind {kind:?}",
                        spec::API_VERSION
                    )));
                }
            }
        }
    }
    let policies = PolicySet::new(policies.into_values().map(|(_, p)| p).collect());
    let credential_specs = specs.into_iter().map(|(name, (_, spec))| (name, spec)).collect();
    let facts = StaticFacts { credential_specs, ..StaticFacts::default() };
    Ok(Loaded { policies, facts, warnings })
}

/// The largest policy spec arcguard accepts, as JSON: far above any real policy (a thousand
/// registries fit), and small enough that the policies anyone may write (a GuardPolicy in
/// their namespace) cannot grow every replica's memory without bound: each policy is held in
/// the watch cache, compiled, and recorded in status.
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Decodes a policy spec, naming the offending field on error (`spec.trustedRegistries.registries`).
///
/// # Errors
/// `(field, message)` for the first field that does not decode.
pub fn decode_spec(spec: Value) -> Result<PolicySpec, (String, String)> {
    if spec.is_null() {
        return Err(("spec".into(), "is required".into()));
    }
    let size = serde_json::to_vec(&spec).map_or(usize::MAX, |bytes| bytes.len());
    if size > MAX_SPEC_BYTES {
        return Err((
            "spec".into(),
            format!(
                "is {size} bytes of JSON, more than the {MAX_SPEC_BYTES} a policy may hold; split it into several policies"
            ),
        ));
    }
    serde_path_to_error::deserialize::<_, PolicySpec>(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "spec".to_owned() } else { format!("spec.{path}") };
        (field, e.into_inner().to_string())
    })
}

fn standalone_warnings(policy: &Policy) -> Vec<String> {
    let mut warnings = Vec::new();
    if policy.matcher.has_namespace_selector() {
        warnings.push(format!(
            "policy {}: spec.match.namespaceSelector cannot be evaluated without a cluster; the policy applies in every namespace",
            policy.id()
        ));
    }
    if let Rule::Gmsa(gmsa) = &policy.rule
        && gmsa.authorizes_service_accounts()
    {
        warnings.push(format!(
            "policy {}: spec.gmsa.authorizeServiceAccount needs a cluster to ask; service accounts are not checked in standalone mode",
            policy.id()
        ));
    }
    warnings
}

/// For tests: ClusterGuardPolicies named and specified by `specs` (`(name, spec YAML
/// indented by two spaces)`), compiled as files are.
///
/// # Panics
/// When a policy does not compile.
#[cfg(test)]
pub(crate) fn cluster_policies(specs: &[(&str, &str)]) -> PolicySet {
    let sources: Vec<(String, String)> = specs
        .iter()
        .map(|(name, spec)| {
            let doc = format!(
                "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {{name: {name}}}\nspec:\n{spec}"
            );
            (format!("{name}.yaml"), doc)
        })
        .collect();
    load_sources(&sources).expect("valid policies").policies
}

#[cfg(test)]
mod symlink_tests {
    use super::*;

    #[test]
    fn symlink_loops_are_reported_and_shared_directories_listed_once() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("policies");
        std::fs::create_dir_all(dir.join("team/nested")).expect("mkdir");
        std::fs::write(dir.join("team/a.yaml"), "").expect("write");
        // Two links to one directory: listed once.
        std::os::unix::fs::symlink(dir.join("team"), dir.join("also-team")).expect("link");
        assert_eq!(policy_files(&dir).expect("lists").len(), 1);
        // A link back up: a loop, named.
        std::os::unix::fs::symlink(&dir, dir.join("team/nested/up")).expect("link");
        match policy_files(&dir) {
            Err(LoadError::SymlinkLoop { path, .. }) => assert!(path.ends_with("up"), "{path:?}"),
            other => panic!("expected a symlink loop, got {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Loaded, LoadError> {
        load_sources(&[("p.yaml".to_owned(), text.to_owned())])
    }

    #[test]
    fn a_spec_larger_than_the_bound_is_refused_naming_its_size() {
        let registries = |count: usize| -> Value {
            let list: Vec<String> =
                (0..count).map(|i| format!("registry-{i:05}.example.io")).collect();
            serde_json::json!({"trustedRegistries": {"registries": list}})
        };
        assert!(decode_spec(registries(1000)).is_ok(), "a thousand registries fit");
        let (field, message) = decode_spec(registries(4000)).expect_err("too large");
        assert_eq!(field, "spec");
        assert!(message.contains(&format!("more than the {MAX_SPEC_BYTES}")), "{message}");
    }

    fn policy(spec: &str) -> String {
        format!(
            "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {{name: p}}\nspec:\n{spec}"
        )
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let cases = [
            ("  action: Block\n  trustedRegistries: {registries: [a.io]}\n", "spec.action"),
            (
                "  trustedRegistries: {registries: [a.io], registry: b.io}\n",
                "spec.trustedRegistries.registry: unknown field `registry`",
            ),
            (
                "  trustedRegistries: {registries: [a.io]}\n  gmsa: {}\n",
                "found trustedRegistries and gmsa",
            ),
            ("  action: Deny\n", "found none"),
            (
                "  trustedRegistries: {registries: [a.io]}\n  extra: 1\n",
                "spec.extra: unknown field `extra`",
            ),
            (
                "  trustedRegistries: {registries: [a.io, 'https://b.io']}\n",
                "spec.trustedRegistries.registries[1]",
            ),
            ("  trustedRegistries: {registries: []}\n", "spec.trustedRegistries.registries"),
            (
                "  trustedRegistries: {registries: [a.io], requireDigest: maybe}\n",
                "spec.trustedRegistries.requireDigest",
            ),
            (
                "  match: {namespaces: [Bad_NS]}\n  trustedRegistries: {registries: [a.io]}\n",
                "spec.match.namespaces[0]",
            ),
            (
                "  match: {objectSelector: {matchExpressions: [{key: a, operator: Equals}]}}\n  gmsa: {}\n",
                "spec.match.objectSelector.matchExpressions[0].operator",
            ),
            ("  calicoLinuxOnly: {osLabelKey: 'bad key'}\n", "spec.calicoLinuxOnly.osLabelKey"),
            (
                "  calicoLinuxOnly: {scopePolicies: Sometimes}\n",
                "spec.calicoLinuxOnly.scopePolicies",
            ),
            ("  gmsa: {allowedCredentialSpecs: [Bad]}\n", "spec.gmsa.allowedCredentialSpecs[0]"),
        ];
        for (spec, field) in cases {
            let error = load(&policy(spec)).expect_err(spec).to_string();
            assert!(error.contains(field), "{spec}: {error:?} should name {field:?}");
        }
    }

    #[test]
    fn documents_that_are_not_policies_are_refused() {
        let cases = [
            (
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n",
                "got apiVersion \"v1\" kind \"ConfigMap\"",
            ),
            (
                "apiVersion: arcguard.io/v1alpha1\nkind: GuardPolicy\nmetadata: {name: x}\nspec: {gmsa: {}}\n",
                "needs metadata.namespace",
            ),
            (
                "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {}\nspec: {gmsa: {}}\n",
                "has no metadata.name",
            ),
            (
                "apiVersion: arcguard.io/v1alpha1\nkind: ClusterGuardPolicy\nmetadata: {name: x}\n",
                "spec: is required",
            ),
            (
                "apiVersion: windows.k8s.io/v1\nkind: GMSACredentialSpec\nmetadata: {name: x}\n",
                "has no credspec object",
            ),
        ];
        for (text, message) in cases {
            let error = load(text).expect_err(text).to_string();
            assert!(error.contains(message), "{error:?} should contain {message:?}");
        }
    }

    #[test]
    fn duplicates_across_files_are_refused() {
        let text = policy("  gmsa: {}\n");
        let error = load_sources(&[("a.yaml".into(), text.clone()), ("b.yaml".into(), text)])
            .expect_err("duplicate");
        assert!(error.to_string().contains("defined twice: in a.yaml and in b.yaml"), "{error}");
        // The same name in two namespaces is two policies.
        let ns = |n: &str| {
            format!(
                "apiVersion: arcguard.io/v1alpha1\nkind: GuardPolicy\nmetadata: {{name: p, namespace: {n}}}\nspec: {{gmsa: {{}}}}\n"
            )
        };
        let loaded =
            load_sources(&[("a.yaml".into(), ns("a")), ("b.yaml".into(), ns("b"))]).expect("valid");
        assert_eq!(loaded.policies.len(), 2);
    }

    #[test]
    fn standalone_limitations_are_warned_about() {
        let text = policy(
            "  match: {namespaceSelector: {matchLabels: {team: a}}}\n  gmsa: {authorizeServiceAccount: true}\n",
        );
        let loaded = load(&text).expect("valid");
        assert_eq!(loaded.warnings.len(), 2, "{:?}", loaded.warnings);
    }

    #[test]
    fn the_sample_policies_are_valid() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/policies"));
        let loaded = load_dir(dir).expect("samples load");
        let rules: Vec<_> = loaded.policies.policies().iter().map(|p| p.rule.name()).collect();
        assert_eq!(rules, ["calicoLinuxOnly", "trustedRegistries", "gmsa"]);
        assert!(loaded.facts.credential_specs.contains_key("webapp1"));
    }
}
