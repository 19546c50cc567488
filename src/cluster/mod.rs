//! Cluster mode: policies from custom resources, facts from watch-backed caches, and the
//! controller that manages arcguard's own serving certificate.

pub mod certs;
pub mod facts;
pub mod leader;
pub mod policies;
