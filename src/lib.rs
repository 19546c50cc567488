//! arcguard: a Kubernetes admission controller for hybrid Linux/Windows clusters.
//!
//! It enforces trusted registries, gMSA for Windows pods, Calico policy scoped to Linux and
//! image provenance (served by the registry, for the pod's platform, pinned by digest).
//! Start at [`pipeline::review`], the pure pipeline from an AdmissionReview to its response;
//! [`policy`] holds the policy API and its evaluation, [`rules`] the rules, [`server`] the
//! HTTPS shell around them, [`oci`] the registry adapter and [`serve`] the standalone wiring.

pub mod admission;
pub mod audit;
pub mod certs;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod image;
pub mod manifest;
pub mod memory;
pub mod metrics;
pub mod names;
pub mod oci;
pub mod pipeline;
pub mod policy;
pub mod pull_secrets;
pub mod rules;
pub mod serve;
pub mod server;
pub mod signature;
pub mod text;
pub mod watch;
