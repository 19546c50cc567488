//! Certificate files: writing bundles atomically and the development bundle of `serve`.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use time::{Duration, OffsetDateTime};

use super::*;

/// The files [`write_bundle`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundlePaths {
    /// The CA certificate (`ca.crt`).
    pub ca_cert: PathBuf,
    /// The serving certificate (`tls.crt`).
    pub cert: PathBuf,
    /// The serving private key (`tls.key`, mode 0600).
    pub key: PathBuf,
}

impl BundlePaths {
    /// The standard file names inside `dir`.
    #[must_use]
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(TLS_CERT_FILE),
            key: dir.join(TLS_KEY_FILE),
        }
    }
}

/// Generates a new CA and a serving certificate and writes `ca.crt`, `tls.crt` and `tls.key`
/// into `dir`, creating it.
///
/// The serving certificate lives for `validity`; the CA for [`DEFAULT_CA_VALIDITY`] or
/// `validity`, whichever is longer. The CA key is not written: re-run to rotate, and update
/// the webhook's `caBundle`. Each file is replaced atomically (temp file + rename), so a reader
/// never sees a half-written file, though it may briefly see a new key with the old cert.
///
/// # Errors
///
/// When generation fails (see [`CertificateAuthority::issue_serving`]) or a directory or file
/// cannot be created or written.
pub fn write_bundle(
    dir: &Path,
    dns: &[String],
    ips: &[IpAddr],
    validity: Duration,
    now: OffsetDateTime,
) -> Result<BundlePaths, CertError> {
    let ca = CertificateAuthority::generate(
        BUNDLE_CA_COMMON_NAME,
        DEFAULT_CA_VALIDITY.max(validity),
        now,
    )?;
    let serving = ca.issue_serving(dns, ips, validity, now)?;
    create_dir(dir)?;
    let paths = BundlePaths::in_dir(dir);
    let staged = [
        stage(&paths.key, serving.key_pem.as_bytes(), KEY_FILE_MODE)?,
        stage(&paths.cert, serving.cert_pem.as_bytes(), CERT_FILE_MODE)?,
        stage(&paths.ca_cert, ca.cert_pem().as_bytes(), CERT_FILE_MODE)?,
    ];
    for file in staged {
        file.replace()?;
    }
    sync_dir(dir)?;
    Ok(paths)
}

/// What [`ensure_dev_bundle`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ensured {
    /// Certificate and key were already there and were left alone.
    Existing,
    /// A development CA and serving certificate were generated and written.
    Generated,
}

/// Makes sure a serving certificate and key exist, generating a development set if neither does.
///
/// With neither file present it writes a CA ([`DEFAULT_CA_VALIDITY`]) to `ca_path` and a
/// serving cert ([`DEFAULT_SERVING_VALIDITY`]) for `localhost`, `127.0.0.1` and `::1` to
/// `cert_path`/`key_path` (mode 0600), creating parent directories. Existing files are never
/// overwritten: with both present nothing happens; with one present, or a leftover `ca_path`,
/// it fails and names the file.
///
/// # Errors
///
/// [`CertError::IncompletePair`] or [`CertError::AlreadyExists`] as above; otherwise when a
/// file cannot be checked, created or written.
pub fn ensure_dev_bundle(
    cert_path: &Path,
    key_path: &Path,
    ca_path: &Path,
) -> Result<Ensured, CertError> {
    match (exists(cert_path)?, exists(key_path)?) {
        (true, true) => return Ok(Ensured::Existing),
        (true, false) => {
            return Err(CertError::IncompletePair {
                present: cert_path.to_path_buf(),
                missing: key_path.to_path_buf(),
            });
        }
        (false, true) => {
            return Err(CertError::IncompletePair {
                present: key_path.to_path_buf(),
                missing: cert_path.to_path_buf(),
            });
        }
        (false, false) => {}
    }
    if exists(ca_path)? {
        return Err(CertError::AlreadyExists { path: ca_path.to_path_buf() });
    }

    let now = OffsetDateTime::now_utc();
    let ca = CertificateAuthority::generate(DEV_CA_COMMON_NAME, DEFAULT_CA_VALIDITY, now)?;
    let serving = ca.issue_serving(
        &[DEV_DNS_NAME.to_owned()],
        &DEV_IP_ADDRESSES,
        DEFAULT_SERVING_VALIDITY,
        now,
    )?;
    for path in [key_path, cert_path, ca_path] {
        if let Some(parent) = non_empty_parent(path) {
            create_dir(parent)?;
        }
    }
    let staged = [
        stage(key_path, serving.key_pem.as_bytes(), KEY_FILE_MODE)?,
        stage(cert_path, serving.cert_pem.as_bytes(), CERT_FILE_MODE)?,
        stage(ca_path, ca.cert_pem().as_bytes(), CERT_FILE_MODE)?,
    ];
    let mut created: Vec<PathBuf> = Vec::with_capacity(staged.len());
    for file in staged {
        let dest = file.dest.clone();
        if let Err(err) = file.create_new() {
            // Leave no half-set behind: it would make the next start fail as an incomplete pair.
            for path in &created {
                let _ = fs::remove_file(path);
            }
            return Err(err);
        }
        created.push(dest);
    }
    for path in &created {
        if let Some(parent) = non_empty_parent(path) {
            sync_dir(parent)?;
        }
    }
    Ok(Ensured::Generated)
}

/// `path.parent()`, or `None` for a bare file name (the current directory).
fn non_empty_parent(path: &Path) -> Option<&Path> {
    path.parent().filter(|parent| !parent.as_os_str().is_empty())
}

/// Whether `path` exists, distinguishing "no" from "cannot tell".
fn exists(path: &Path) -> Result<bool, CertError> {
    path.try_exists().map_err(|source| CertError::Stat { path: path.to_path_buf(), source })
}

/// Creates `dir` and its parents.
fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir)
        .map_err(|source| CertError::CreateDir { path: dir.to_path_buf(), source })
}

/// Makes completed renames durable.
fn sync_dir(dir: &Path) -> Result<(), CertError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| CertError::Write { path: dir.to_path_buf(), source })?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Distinguishes temp files of concurrent writers in one process.
static STAGE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// File contents written and synced to a temp file beside `dest`; removed on drop unless moved
/// into place.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
}

/// Writes `contents` to a new temp file in `dest`'s directory with `mode` (on unix).
fn stage(dest: &Path, contents: &[u8], mode: u32) -> Result<Staged, CertError> {
    let write_error = |source| CertError::Write { path: dest.to_path_buf(), source };
    let file_name = dest.file_name().ok_or_else(|| {
        write_error(io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        STAGE_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = dest.with_file_name(tmp_name);

    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_error)?;
    let staged = Staged { tmp, dest: dest.to_path_buf() };
    file.write_all(contents).and_then(|()| file.sync_all()).map_err(write_error)?;
    Ok(staged)
}

impl Staged {
    /// Moves the file into place, replacing any existing file atomically.
    fn replace(self) -> Result<(), CertError> {
        fs::rename(&self.tmp, &self.dest)
            .map_err(|source| CertError::Write { path: self.dest.clone(), source })
    }

    /// Moves the file into place only if nothing is there; hard-linking makes the check and
    /// the creation one atomic step, unlike a rename.
    fn create_new(self) -> Result<(), CertError> {
        match fs::hard_link(&self.tmp, &self.dest) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                Err(CertError::AlreadyExists { path: self.dest.clone() })
            }
            Err(source) => Err(CertError::Write { path: self.dest.clone(), source }),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Best effort: after a rename the temp name is gone and this fails harmlessly; after a
        // hard link it removes the extra name.
        let _ = fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::test_support::*;

    // --- files ---

    #[test]
    fn write_bundle_writes_the_three_files_and_a_private_key_only_the_owner_can_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nested").join("out");
        let paths =
            write_bundle(&dir, &names(&["svc.ns.svc"]), &[], DEFAULT_SERVING_VALIDITY, t0())
                .expect("writes");
        assert_eq!(paths, BundlePaths::in_dir(&dir));
        let (_, info) = load_files(&paths.cert, &paths.key).expect("loads");
        assert_eq!(info.dns_names, names(&["svc.ns.svc"]));
        let ca_pem = fs::read(&paths.ca_cert).expect("ca.crt");
        assert!(info.verifies_with(&ca_pem).expect("checks"));
        let ca_info = CertInfo::from_pem(&ca_pem).expect("parses");
        assert_eq!(ca_info.not_after, t0() + DEFAULT_CA_VALIDITY);
        let leftovers: Vec<_> = fs::read_dir(&dir)
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode(&paths.key), 0o600);
            assert_eq!(mode(&paths.cert) & 0o022, 0, "cert is not group or world writable");
        }
    }

    #[test]
    fn write_bundle_replaces_an_existing_bundle() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let first =
            write_bundle(tmp.path(), &names(&["a"]), &[], Duration::days(1), t0()).expect("writes");
        let old_key = fs::read(&first.key).expect("key");
        write_bundle(tmp.path(), &names(&["b"]), &[], Duration::days(1), t0()).expect("rewrites");
        assert_ne!(fs::read(&first.key).expect("key"), old_key);
        let (_, info) = load_files(&first.cert, &first.key).expect("new pair matches");
        assert_eq!(info.dns_names, names(&["b"]));
    }

    #[test]
    fn ensure_dev_bundle_generates_once_and_never_overwrites() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths = BundlePaths::in_dir(&tmp.path().join("certs"));
        let first = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect("generates");
        assert_eq!(first, Ensured::Generated);
        let before: Vec<Vec<u8>> = [&paths.cert, &paths.key, &paths.ca_cert]
            .iter()
            .map(|p| fs::read(p).expect("reads"))
            .collect();

        let second = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect("keeps");
        assert_eq!(second, Ensured::Existing);
        let after: Vec<Vec<u8>> = [&paths.cert, &paths.key, &paths.ca_cert]
            .iter()
            .map(|p| fs::read(p).expect("reads"))
            .collect();
        assert_eq!(before, after);

        let (_, info) = load_files(&paths.cert, &paths.key).expect("loads");
        assert_eq!(info.dns_names, names(&[DEV_DNS_NAME]));
        assert_eq!(info.ip_addresses, DEV_IP_ADDRESSES);
        assert!(info.verifies_with(&before[2]).expect("checks"));
        let now = OffsetDateTime::now_utc();
        assert!(info.is_valid_at(now));
        assert!(info.remaining(now) <= DEFAULT_SERVING_VALIDITY);
        assert!(info.remaining(now) > DEFAULT_SERVING_VALIDITY - Duration::days(1));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn ensure_dev_bundle_names_the_missing_half_of_a_pair_and_writes_nothing() {
        for present in [TLS_CERT_FILE, TLS_KEY_FILE] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let paths = BundlePaths::in_dir(tmp.path());
            fs::write(tmp.path().join(present), b"kept").expect("writes");
            let err = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert)
                .expect_err("incomplete pair");
            let CertError::IncompletePair { present: p, missing } = &err else {
                panic!("{present}: unexpected {err}");
            };
            assert_eq!(p, &tmp.path().join(present));
            assert_ne!(missing, p);
            assert!(err.to_string().contains(&missing.display().to_string()), "{err}");
            assert!(!missing.exists(), "{present}: nothing generated");
            assert!(!paths.ca_cert.exists(), "{present}: nothing generated");
            assert_eq!(fs::read(p).expect("reads"), b"kept");
        }
    }

    #[test]
    fn ensure_dev_bundle_refuses_to_overwrite_a_leftover_ca() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let paths = BundlePaths::in_dir(tmp.path());
        fs::write(&paths.ca_cert, b"old ca").expect("writes");
        let err = ensure_dev_bundle(&paths.cert, &paths.key, &paths.ca_cert).expect_err("refuses");
        assert!(
            matches!(&err, CertError::AlreadyExists { path } if *path == paths.ca_cert),
            "{err}"
        );
        assert_eq!(fs::read(&paths.ca_cert).expect("reads"), b"old ca");
        assert!(!paths.cert.exists() && !paths.key.exists());
    }

    #[test]
    fn create_new_never_replaces_a_file_that_appeared_meanwhile() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("tls.key");
        let staged = stage(&dest, b"new", KEY_FILE_MODE).expect("stages");
        fs::write(&dest, b"raced").expect("writes");
        let err = staged.create_new().expect_err("refuses");
        assert!(matches!(err, CertError::AlreadyExists { .. }), "{err}");
        assert_eq!(fs::read(&dest).expect("reads"), b"raced");
        assert_eq!(fs::read_dir(tmp.path()).expect("lists").count(), 1, "temp file removed");
    }
}
