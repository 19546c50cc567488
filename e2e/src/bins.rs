//! The binaries under test: kube-apiserver and etcd (built from source by
//! `e2e/build-controlplane.sh`, cached outside the repository) and arcguard (built by cargo).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context as _, Result, anyhow, bail};

/// The folder holding `kube-apiserver` and `etcd`: `$ARCGUARD_CONTROLPLANE_DIR`, or what
/// `e2e/build-controlplane.sh` prints (it builds them on the first run and reuses them after).
///
/// # Errors
/// When the script fails or the binaries are missing.
pub fn controlplane_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find_controlplane().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("{e}"))
}

fn find_controlplane() -> Result<PathBuf> {
    let dir = match std::env::var_os("ARCGUARD_CONTROLPLANE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-controlplane.sh");
            let output = Command::new("bash")
                .arg(&script)
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !output.status.success() {
                bail!("{} failed ({})", script.display(), output.status);
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or_default().trim())
        }
    };
    for binary in ["kube-apiserver", "etcd"] {
        if !dir.join(binary).is_file() {
            bail!("{} is missing in {}", binary, dir.display());
        }
    }
    Ok(dir)
}

/// The arcguard binary: `$ARCGUARD_BIN`, or `cargo build -p arcguard --bin arcguard` (a no-op
/// when it is up to date), so the suite never tests a stale binary.
///
/// # Errors
/// When the build fails.
pub fn arcguard_bin() -> Result<&'static Path> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build_arcguard().map_err(|e| format!("{e:#}")))
        .as_deref()
        .map_err(|e| anyhow!("{e}"))
}

fn build_arcguard() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("ARCGUARD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut command = Command::new(cargo);
    // What cargo sets for the test process would leak into the build (ring's build script
    // tracks CARGO_MANIFEST_DIR) and rebuild half the tree on every run.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&name.as_ref())
        {
            command.env_remove(name.as_ref());
        }
    }
    let output = command
        .current_dir(&root)
        .args([
            "build",
            "--locked",
            "-p",
            "arcguard",
            "--bin",
            "arcguard",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build -p arcguard")?;
    if !output.status.success() {
        bail!("cargo build -p arcguard failed ({})", output.status);
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|message| message["target"]["name"] == "arcguard")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo build did not report the arcguard executable"))
}
