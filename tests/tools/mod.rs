//! The pinned command-line tools some tests run (kubectl, helm, promtool), built from source by
//! `e2e/build-tools.sh` into a version-keyed cache outside the repository.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether `name` runs from PATH.
fn on_path(name: &str) -> bool {
    Command::new(name).arg("version").arg("--client").output().is_ok()
}

/// The binary of `name` (`kubectl`, `helm`, `promtool`): `$ARCGUARD_<NAME>` when set, else the
/// one `e2e/build-tools.sh` built; for kubectl outside CI, the one on PATH as a fallback. None
/// (with a note on stderr) when it is not built, so a developer's `cargo test` skips what needs
/// it; in CI (`CI` set) a missing tool fails instead, since `.ci/run` builds every tool first.
///
/// # Panics
/// When `$ARCGUARD_<NAME>` names no file, the build script cannot run, or CI lacks the tool.
pub fn tool(name: &str) -> Option<PathBuf> {
    let variable = format!("ARCGUARD_{}", name.to_uppercase());
    if let Some(path) = std::env::var_os(&variable) {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "{variable}={} is not a file", path.display());
        return Some(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("e2e/build-tools.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(["--path", name])
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if path.is_file() {
        return Some(path);
    }
    let hint = format!("build it with `bash e2e/build-tools.sh {name}` or set {variable}");
    if name == "kubectl" && std::env::var_os("CI").is_none() && on_path(name) {
        eprintln!("note: the pinned kubectl is not built; using the kubectl on PATH ({hint})");
        return Some(PathBuf::from(name));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is missing at {} in CI: .ci/run must build the tools first ({hint})",
        path.display()
    );
    eprintln!(
        "note: {name} is not built ({}); skipping the checks that run it: {hint}",
        path.display()
    );
    None
}
