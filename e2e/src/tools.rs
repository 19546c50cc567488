//! kubectl and helm as a user runs them: the pinned builds of `e2e/build-tools.sh` (kubectl of
//! the apiserver's own release), each call with the cluster's kubeconfig and caches in the
//! cluster's scratch folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{Context as _, Result, anyhow, bail};

/// The binary of `name` (`kubectl`, `helm`, `notation-sign`...): `$ARCGUARD_<NAME>` (`-` as
/// `_`), or what `e2e/build-tools.sh`
/// prints (it builds the tool on the first run and reuses it after).
///
/// # Errors
/// When the script fails or the binary is missing.
pub fn tool(name: &str) -> Result<PathBuf> {
    static FOUND: Mutex<BTreeMap<String, PathBuf>> = Mutex::new(BTreeMap::new());
    let mut found = FOUND.lock().map_err(|_| anyhow!("a tool lookup panicked"))?;
    if let Some(path) = found.get(name) {
        return Ok(path.clone());
    }
    let path = match std::env::var_os(format!("ARCGUARD_{}", name.to_uppercase().replace('-', "_")))
    {
        Some(path) => PathBuf::from(path),
        None => {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("build-tools.sh");
            let output = Command::new("bash")
                .arg(&script)
                .arg(name)
                .stderr(Stdio::inherit())
                .output()
                .with_context(|| format!("running {}", script.display()))?;
            if !output.status.success() {
                bail!("{} {name} failed ({})", script.display(), output.status);
            }
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
        }
    };
    if !path.is_file() {
        bail!("{name} is missing at {}", path.display());
    }
    eprintln!("[e2e] using {name} {}", path.display());
    found.insert(name.to_owned(), path.clone());
    Ok(path)
}

/// One command-line tool bound to a cluster.
#[derive(Clone, Debug)]
pub struct Cli {
    program: PathBuf,
    kubeconfig: PathBuf,
    env: Vec<(String, PathBuf)>,
    base_args: Vec<String>,
}

impl Cli {
    /// kubectl with `kubeconfig`, its discovery cache under `scratch`.
    ///
    /// # Errors
    /// When kubectl cannot be found or built.
    pub fn kubectl(kubeconfig: &Path, scratch: &Path) -> Result<Self> {
        Ok(Self {
            program: tool("kubectl")?,
            kubeconfig: kubeconfig.to_owned(),
            env: Vec::new(),
            base_args: vec![format!("--cache-dir={}", scratch.join("kube-cache").display())],
        })
    }

    /// helm with `kubeconfig`, its configuration, cache and data under `scratch`.
    ///
    /// # Errors
    /// When helm cannot be found or built.
    pub fn helm(kubeconfig: &Path, scratch: &Path) -> Result<Self> {
        let home = scratch.join("helm");
        Ok(Self {
            program: tool("helm")?,
            kubeconfig: kubeconfig.to_owned(),
            env: ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"]
                .iter()
                .map(|v| ((*v).to_owned(), home.join(v.to_lowercase())))
                .collect(),
            base_args: Vec::new(),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.program);
        command
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
            .env("KUBECONFIG", &self.kubeconfig)
            .args(&self.base_args)
            .args(args)
            .stdin(Stdio::null());
        for (name, value) in &self.env {
            command.env(name, value);
        }
        command
    }

    fn name(&self) -> String {
        self.program.file_name().unwrap_or_default().to_string_lossy().into_owned()
    }

    /// Runs it (from the repository root) and returns its standard output.
    ///
    /// # Errors
    /// When it fails, with its standard error.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command(args)
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !output.status.success() {
            bail!(
                "{} {} failed ({}): {}{}",
                self.name(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs it expecting a failure, and returns its standard error.
    ///
    /// # Errors
    /// When it succeeds.
    pub fn run_failing(&self, args: &[&str]) -> Result<String> {
        let output = self
            .command(args)
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if output.status.success() {
            bail!(
                "{} {} succeeded, expected a failure: {}",
                self.name(),
                args.join(" "),
                String::from_utf8_lossy(&output.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// The tool's `version` output (client only for kubectl).
    ///
    /// # Errors
    /// When it fails.
    pub fn version(&self) -> Result<String> {
        if self.name() == "kubectl" {
            self.run(&["version", "--client"])
        } else {
            self.run(&["version"])
        }
    }
}
