//! `runc`, the reference OCI runtime (Debian's `runc` package), driven through its command line with its state
//! kept under the data dir (`--root`), so `runc list` names exactly this server's containers.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use super::super::RuntimeError;
use super::run_tool;

#[derive(Debug, Clone)]
pub struct Runc {
    pub root: PathBuf,
}

/// What `runc state` says of a container.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct State {
    pub pid: u32,
    pub status: String,
}

impl Runc {
    fn command(&self) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("runc");
        c.arg("--root").arg(&self.root).stdin(Stdio::null()).kill_on_drop(false);
        c
    }

    /// Whether `runc` runs on this host.
    pub fn available() -> bool {
        std::process::Command::new("runc").arg("--version").output().is_ok_and(|o| o.status.success())
    }

    /// Creates the container of `bundle` (its `config.json`) without starting procd, so its namespaces can be
    /// wired first; the container's stdout and stderr go to `log`, and `listener` becomes procd's fd 3
    /// (`--preserve-fds 1`). Returns procd's pid as the host sees it.
    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        log: &Path,
        listener: OwnedFd,
    ) -> Result<u32, RuntimeError> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(RuntimeError::io(format!("opening {}", log.display())))
        };
        // The container inherits runc's stdout and stderr: both go to the log (a pipe would stay open as long as
        // the container runs). runc's own error, if any, is the log's last line.
        let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let pid_file = bundle.join("procd.pid");
        let mut create = self.command();
        create
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(&pid_file)
            .arg("--preserve-fds")
            .arg("1")
            // No session keyring per container: every sandbox's root is the same host uid, whose key quota
            // (kernel.keys.maxkeys, 200) would stop the 200th container with EDQUOT. Sandboxes cannot use keyrings
            // anyway (seccomp refuses keyctl, add_key and request_key).
            .arg("--no-new-keyring")
            .arg(id)
            // runc would also pass systemd's socket-activation descriptors and shift procd's fd 3.
            .env_remove("LISTEN_FDS")
            .stdout(open()?)
            .stderr(open()?);
        // Every other descriptor of the server is close-on-exec, so fd 3 is the only one the container inherits.
        // SAFETY: the hook only duplicates a descriptor (see `as_fd3`).
        unsafe { create.pre_exec(warmpool_procd::as_fd3(listener.as_raw_fd())) };
        let status = create
            .status()
            .await
            .map_err(RuntimeError::io("running runc create (is the runc package installed?)"))?;
        if !status.success() {
            let text = std::fs::read(log).unwrap_or_default();
            let err = String::from_utf8_lossy(&text[(before as usize).min(text.len())..]).into_owned();
            return Err(RuntimeError::Failed(format!("runc create {id} failed: {}", err.trim())));
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| RuntimeError::Exited(format!("runc wrote no pid for container {id}")))?;
        // The container's init holds the listener now; the server connects through the socket's path.
        drop(listener);
        Ok(pid)
    }

    /// Starts procd in a created container.
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.simple(&["start", id]).await
    }

    async fn simple(&self, args: &[&str]) -> Result<(), RuntimeError> {
        let root = self.root.display().to_string();
        run_tool("runc", &[&["--root", root.as_str()], args].concat()).await
    }

    pub async fn state(&self, id: &str) -> Option<State> {
        let out = self.command().args(["state", id]).output().await.ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok()).flatten()
    }

    pub async fn kill(&self, id: &str, signal: &str) {
        let _ = self.simple(&["kill", id, signal]).await;
    }

    /// Kills whatever is left and forgets the container (idempotent).
    pub async fn delete(&self, id: &str) {
        let _ = self.simple(&["delete", "--force", id]).await;
    }

    /// Ids of this server's containers.
    pub fn list(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }
}
