//! arcguard: a Kubernetes admission controller for hybrid Linux/Windows clusters.
//!
//! It enforces trusted registries, gMSA for Windows pods and Calico policy scoped to Linux.
//! Start at [`admission::review`], the pure pipeline from an AdmissionReview to its response;
//! [`policy`] holds the policy API and its evaluation, [`rules`] the three rules, and
//! [`server`] the HTTPS shell around them.

pub mod admission;
pub mod certs;
pub mod manifest;
pub mod policy;
pub mod rules;
