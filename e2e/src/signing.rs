//! Signing images with the real tools, as users do: cosign (`generate-key-pair`, `sign --key`
//! without a transparency log) and Notation through notation-go (`notation-sign`, built by
//! `e2e/build-tools.sh`), with a test PKI made here (a root CA and code-signing leaves).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::OffsetDateTime;

use crate::registry::Registry;
use crate::tools::tool;

/// Runs a signing tool; its output on failure.
fn run(mut command: Command, what: &str) -> Result<String> {
    let output = command.output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A cosign key pair made by `cosign generate-key-pair` (empty password).
#[derive(Debug)]
pub struct CosignKey {
    /// `<prefix>.key`, encrypted as cosign writes it.
    pub key: PathBuf,
    /// The PEM public key (`<prefix>.pub`).
    pub public_pem: String,
}

impl CosignKey {
    /// Generates a key pair in `dir` named `prefix`.
    ///
    /// # Errors
    /// When cosign cannot be built or fails.
    pub fn generate(dir: &Path, prefix: &str) -> Result<Self> {
        let mut command = Command::new(tool("cosign")?);
        command
            .current_dir(dir)
            .args(["generate-key-pair", "--output-key-prefix", prefix])
            .env("COSIGN_PASSWORD", "");
        run(command, "cosign generate-key-pair")?;
        Ok(Self {
            key: dir.join(format!("{prefix}.key")),
            public_pem: std::fs::read_to_string(dir.join(format!("{prefix}.pub")))?,
        })
    }

    /// Signs `image` (`host/repository@digest`) in `registry`: the signature goes to the
    /// `sha256-<hex>.sig` tag; no transparency log.
    ///
    /// # Errors
    /// When cosign fails.
    pub fn sign(&self, registry: &Registry, image: &str) -> Result<()> {
        let mut command = Command::new(tool("cosign")?);
        command
            .args(["sign", "--yes", "--tlog-upload=false", "--key"])
            .arg(&self.key)
            .arg("--registry-cacert")
            .arg(&registry.ca_path)
            .arg(image)
            .env("COSIGN_PASSWORD", "")
            // No home-directory state shared between runs.
            .env("COSIGN_EXPERIMENTAL", "0")
            .env("SIGSTORE_NO_CACHE", "1");
        run(command, &format!("cosign sign {image}"))?;
        Ok(())
    }
}

/// A root CA and code-signing leaves under it, written as Notation reads them.
#[derive(Debug)]
pub struct NotationPki {
    /// The root certificate (PEM): the trust store.
    pub root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
}

/// A leaf's key and chain files.
#[derive(Debug)]
pub struct NotationSigner {
    key: PathBuf,
    chain: PathBuf,
}

/// The subject every test leaf has: C, ST and O, as a Notation trusted identity needs.
pub const IDENTITY: &str = "x509.subject: C=US, ST=WA, O=arcguard e2e";

impl NotationPki {
    /// A new root CA, its files in `dir`.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn generate(dir: &Path, name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("root key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CountryName, "US");
        params.distinguished_name.push(DnType::StateOrProvinceName, "WA");
        params.distinguished_name.push(DnType::OrganizationName, "arcguard e2e");
        params.distinguished_name.push(DnType::CommonName, format!("{name} root"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(2);
        let cert = params.self_signed(&key).context("root certificate")?;
        Ok(Self { root_pem: cert.pem(), issuer: Issuer::new(params, key), dir: dir.to_path_buf() })
    }

    /// A code-signing leaf named `name`, valid from five minutes ago for `lifetime`.
    ///
    /// # Errors
    /// When key generation or signing fails.
    pub fn leaf(&self, name: &str, lifetime: time::Duration) -> Result<NotationSigner> {
        let key = KeyPair::generate().context("leaf key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CountryName, "US");
        params.distinguished_name.push(DnType::StateOrProvinceName, "WA");
        params.distinguished_name.push(DnType::OrganizationName, "arcguard e2e");
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + lifetime;
        let cert = params.signed_by(&key, &self.issuer).context("leaf certificate")?;
        let signer = NotationSigner {
            key: self.dir.join(format!("{name}.key")),
            chain: self.dir.join(format!("{name}.chain.pem")),
        };
        std::fs::write(&signer.key, key.serialize_pem())?;
        std::fs::write(&signer.chain, format!("{}{}", cert.pem(), self.root_pem))?;
        Ok(signer)
    }
}

impl NotationSigner {
    /// Signs `image` (`host/repository@digest`) with a JWS envelope (`notation sign`'s
    /// default); returns the signature manifest's digest.
    ///
    /// # Errors
    /// When notation-sign fails.
    pub fn sign(&self, registry: &Registry, image: &str) -> Result<String> {
        self.sign_with(registry, image, "jws")
    }

    /// Signs `image` as [`NotationSigner::sign`] does, with a `jws` or `cose` envelope.
    ///
    /// # Errors
    /// When notation-sign fails.
    pub fn sign_with(&self, registry: &Registry, image: &str, envelope: &str) -> Result<String> {
        let mut command = Command::new(tool("notation-sign")?);
        command
            .args(["-envelope", envelope])
            .arg("-key")
            .arg(&self.key)
            .arg("-chain")
            .arg(&self.chain)
            .arg("-ca")
            .arg(&registry.ca_path)
            .arg(image);
        Ok(run(command, &format!("notation-sign {image}"))?.trim().to_owned())
    }
}
