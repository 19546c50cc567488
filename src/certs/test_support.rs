//! Test helpers shared by the certificate modules' tests.

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::{Duration, OffsetDateTime};

use super::{CertificateAuthority, ServingCert};

/// 2026-01-01T00:00:00Z: generation tests use a fixed clock.
pub(crate) fn t0() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid timestamp")
}

pub(crate) fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

pub(crate) fn ca(
    common_name: &str,
    validity: Duration,
    now: OffsetDateTime,
) -> CertificateAuthority {
    CertificateAuthority::generate(common_name, validity, now).expect("CA generates")
}

pub(crate) fn localhost_cert(ca: &CertificateAuthority, now: OffsetDateTime) -> ServingCert {
    ca.issue_serving(&names(&["localhost"]), &[], Duration::days(1), now).expect("issues")
}

pub(crate) fn roots(ca_pem: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("ca pem")).expect("adds");
    roots
}
