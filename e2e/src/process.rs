//! Child processes and scratch folders that never outlive the test run.
//!
//! Three layers, so nothing is left behind however a run ends:
//! - [`Proc`] and [`Scratch`] clean up on drop (a failing test unwinds through them);
//! - what is still registered when the test binary exits (a shared cluster held in a
//!   `static`, which is never dropped) is killed and removed by an `atexit` handler;
//! - every child is spawned from one long-lived thread with `PR_SET_PDEATHSIG`, so the kernel
//!   kills it when the test binary dies for any reason (Ctrl-C, SIGKILL, a crash), and in its
//!   own process group, so stopping it stops whatever it started. Scratch folders of dead runs
//!   are removed by the next run (and by the trap in `.ci/run`).

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once, OnceLock, mpsc};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow};

/// Process groups and folders still to clean up when the binary exits.
struct Registry {
    groups: Vec<i32>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry { groups: Vec::new(), dirs: Vec::new() });

extern "C" fn clean_up_at_exit() {
    let Ok(mut registry) = REGISTRY.lock() else { return };
    for group in registry.groups.drain(..) {
        // SAFETY: kill(2) with a negative pid signals a process group we created.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    for dir in registry.dirs.drain(..) {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn install_exit_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registers a plain extern "C" function without captured state.
        unsafe { libc::atexit(clean_up_at_exit) };
    });
}

fn register_group(pid: i32) {
    install_exit_handler();
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.groups.push(pid);
    }
}

fn deregister_group(pid: i32) {
    if let Ok(mut registry) = REGISTRY.lock() {
        registry.groups.retain(|g| *g != pid);
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// The thread every child is spawned from. PR_SET_PDEATHSIG fires when the *thread* that
/// forked exits, so spawning from a test's own thread would kill a shared cluster when that
/// test ends; this thread lives as long as the process.
fn spawner() -> Result<&'static mpsc::Sender<SpawnJob>> {
    static SPAWNER: OnceLock<std::result::Result<mpsc::Sender<SpawnJob>, String>> = OnceLock::new();
    SPAWNER
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<SpawnJob>();
            std::thread::Builder::new()
                .name("e2e-spawner".to_owned())
                .spawn(move || {
                    for (mut command, reply) in rx {
                        let _ = reply.send(command.spawn());
                    }
                })
                .map(|_| tx)
                .map_err(|e| format!("failed to start the spawner thread: {e}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// A child process in its own process group, killed (with its group) when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    done: Option<ExitStatus>,
    /// Stopped with SIGSTOP and not continued yet.
    paused: bool,
}

impl Proc {
    /// Starts `command` with stdout and stderr appended to `log`.
    ///
    /// # Errors
    /// When the log cannot be created or the program cannot be started.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("creating {}", log.display()))?;
        command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        command.process_group(0);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()?.send((command, reply_tx)).map_err(|_| anyhow!("the spawner thread is gone"))?;
        let child = reply_rx
            .recv()
            .map_err(|_| anyhow!("the spawner thread is gone"))?
            .with_context(|| format!("starting {name}"))?;
        register_group(pid_of(&child));
        Ok(Self { name: name.to_owned(), child, log: log.to_owned(), done: None, paused: false })
    }

    /// The process id (and process group id).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    #[must_use]
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.done.is_none() {
            self.done = self.child.try_wait().ok().flatten();
            if self.done.is_some() {
                deregister_group(pid_of(&self.child));
            }
        }
        self.done
    }

    /// Stops the group with SIGSTOP: the process hangs (its sockets stay open, nothing is
    /// answered) until [`Proc::resume`]; stopping or dropping it resumes it first.
    pub fn pause(&mut self) {
        if self.exited().is_none() {
            self.signal(libc::SIGSTOP);
            self.paused = true;
        }
    }

    /// Continues a paused group with SIGCONT; does nothing when it is not paused.
    pub fn resume(&mut self) {
        if self.paused {
            self.signal(libc::SIGCONT);
            self.paused = false;
        }
    }

    /// Sends SIGTERM to the group and waits up to `grace` before SIGKILL.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            self.signal(libc::SIGTERM);
            // A stopped process only handles SIGTERM once continued.
            self.resume();
            let deadline = tokio::time::Instant::now() + grace;
            while self.exited().is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if self.exited().is_none() {
            self.kill_now();
        }
        self.done
    }

    /// Kills the group with SIGKILL at once (a crash, not a shutdown).
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            self.kill_now();
        }
    }

    /// The last `lines` lines of the log.
    #[must_use]
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let start = all.len().saturating_sub(lines);
        format!(
            "--- last {} lines of {} ({}) ---\n{}\n",
            all.len() - start,
            self.name,
            self.log.display(),
            all[start..].join("\n")
        )
    }

    fn signal(&self, signal: i32) {
        // SAFETY: signals the process group this struct owns.
        unsafe { libc::kill(-pid_of(&self.child), signal) };
    }

    fn kill_now(&mut self) {
        // SIGKILL ends a stopped process too; the SIGCONT leaves no group member stopped.
        self.signal(libc::SIGKILL);
        self.resume();
        self.done = self.child.wait().ok();
        deregister_group(pid_of(&self.child));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill_now();
        }
    }
}

fn pid_of(child: &Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

/// A scratch folder under `$ARCGUARD_E2E_TMP` (default `$TMPDIR/arcguard-e2e`), removed on drop
/// and at exit; `ARCGUARD_E2E_KEEP=1` keeps it for debugging.
#[derive(Debug)]
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    /// Creates `<root>/<pid>-<prefix>-XXXX`, first removing folders of runs that are gone.
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn new(prefix: &str) -> Result<Self> {
        let root = std::env::var_os("ARCGUARD_E2E_TMP")
            .map_or_else(|| std::env::temp_dir().join("arcguard-e2e"), PathBuf::from);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        if !keep() {
            remove_stale(&root);
        }
        let path = tempfile::Builder::new()
            .prefix(&format!("{}-{prefix}-", std::process::id()))
            .tempdir_in(&root)
            .with_context(|| format!("creating a folder in {}", root.display()))?
            .keep();
        if !keep() {
            install_exit_handler();
            if let Ok(mut registry) = REGISTRY.lock() {
                registry.dirs.push(path.clone());
            }
        }
        Ok(Self { path })
    }

    /// The folder.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if keep() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
        if let Ok(mut registry) = REGISTRY.lock() {
            registry.dirs.retain(|d| d != &self.path);
        }
    }
}

fn keep() -> bool {
    std::env::var_os("ARCGUARD_E2E_KEEP").is_some_and(|v| !v.is_empty() && v != "0")
}

/// Removes `<root>/<pid>-*` folders whose process no longer exists.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) =
            name.to_str().and_then(|n| n.split('-').next()).and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the caller binds it soon after).
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> Result<u16> {
    // Never the same port twice in one run: clusters start in parallel.
    static HANDED_OUT: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    for _ in 0..100 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
        let port = listener.local_addr()?.port();
        let mut handed_out = HANDED_OUT.lock().map_err(|_| anyhow!("port registry poisoned"))?;
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return Ok(port);
        }
    }
    Err(anyhow!("no unused free port found"))
}
