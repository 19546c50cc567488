//! File-change notifications bridged from `notify` into tokio.

use std::path::PathBuf;

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Watches paths and signals on any change; signals coalesce while one is pending.
///
/// Directories are watched rather than files, because Kubernetes Secret and ConfigMap volumes
/// replace files by swapping a `..data` symlink, which a watch on the file itself misses.
pub struct FileWatcher {
    _watcher: RecommendedWatcher,
    changes: mpsc::Receiver<()>,
}

impl FileWatcher {
    /// Starts watching; `recursive` paths include their subdirectories.
    ///
    /// # Errors
    /// The `notify` error when a path cannot be watched.
    pub fn new(paths: &[(PathBuf, bool)]) -> Result<Self, notify::Error> {
        let (tx, changes) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    // A full channel already holds a pending signal.
                    let _ = tx.try_send(());
                }
            })?;
        for (path, recursive) in paths {
            let mode =
                if *recursive { RecursiveMode::Recursive } else { RecursiveMode::NonRecursive };
            watcher.watch(path, mode)?;
        }
        Ok(Self { _watcher: watcher, changes })
    }

    /// Waits for the next change; `None` if the watcher stopped.
    pub async fn changed(&mut self) -> Option<()> {
        self.changes.recv().await
    }
}
