//! Test support for the end-to-end tests of the server, the GitHub Action and the Terraform provider (three users,
//! hence a crate): start the real `warmpool serve` binary on an ephemeral port, hand back a typed client, and find
//! or kill the procd processes of a data dir so no test leaks sandboxes.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmpool_client::Client;

/// A binary of the workspace, next to the running test (`target/<profile>/`); built if a narrow `cargo test`
/// skipped it.
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    if !path.exists() {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--workspace", "--bins", "--examples"])
            .status()
            .expect("cargo build");
        assert!(
            status.success() && path.exists(),
            "{} is missing: run cargo build --workspace --bins",
            path.display()
        );
    }
    path
}

/// A `warmpool serve` process on a data dir.
pub struct ServerProcess {
    pub child: Child,
    pub url: String,
    pub data_dir: PathBuf,
    pub client: Client,
}

impl ServerProcess {
    /// Starts the server on `127.0.0.1:0` and reads the address it bound from its first line (no port races).
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> ServerProcess {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let mut child = Command::new(sibling_bin("warmpool"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .arg("--procd")
            .arg(sibling_bin("procd"))
            .args(extra_args)
            .env("WARMPOOL_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warmpool serve");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = data_dir.with_extension("server.log");
        std::thread::spawn(move || {
            let mut out = std::fs::OpenOptions::new().create(true).append(true).open(log).ok();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("serving on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
                if let Some(f) = out.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("the server did not report its address");
        let token =
            std::fs::read_to_string(data_dir.join("admin.token")).expect("admin token").trim().to_string();
        let client = Client::new(&url, Some(token)).expect("client");
        ServerProcess { child, url, data_dir: data_dir.to_path_buf(), client }
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin.token")).expect("admin token").trim().to_string()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Pids (not zombies) of procd processes, and their `unshare` wrappers, running a config under `dir`.
pub fn procs_mentioning(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            let cmd =
                String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default())
                    .into_owned();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'));
            !zombie && cmd.contains(&needle) && cmd.contains("procd.json")
        })
        .collect()
}

/// SIGKILLs every procd under `dir` (a pid namespace dies with its PID 1), then everything left in their cgroups,
/// and removes the cgroups once their members are gone (a cgroup cannot be removed before its last member is
/// reaped, which takes a moment after SIGKILL).
pub fn kill_all_under(dir: &Path) {
    for pid in procs_mentioning(dir) {
        // SAFETY: kill(2) on pids whose command line names this test's directory.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let mut cgroups = Vec::new();
    for sandboxes in
        [dir.join("sandboxes"), dir.join("data/sandboxes"), dir.join("builds"), dir.join("data/builds")]
    {
        for e in std::fs::read_dir(sandboxes).into_iter().flatten().flatten() {
            for c in ["memory", "cpu", "freezer", "pids"] {
                let cgroup = Path::new("/sys/fs/cgroup").join(c).join("warmpool").join(e.file_name());
                if cgroup.exists() {
                    cgroups.push(cgroup);
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cgroups.is_empty() && Instant::now() < deadline {
        cgroups.retain(|cgroup| {
            let members = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in members.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a member of this test's sandbox cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::fs::remove_dir(cgroup).is_err() && cgroup.exists()
        });
        if !cgroups.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until no procd runs under `dir`; on timeout names the ones left.
pub fn wait_no_procd(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !procs_mentioning(dir).is_empty() {
        if Instant::now() > deadline {
            let left: Vec<String> = procs_mentioning(dir)
                .iter()
                .map(|p| {
                    String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default())
                        .replace('\0', " ")
                })
                .collect();
            panic!("procd processes left: {left:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every procd of a directory when dropped (also when a test panics).
pub struct KillOnDrop(pub PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill_all_under(&self.0);
    }
}

/// Polls `cond` until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "{what} did not happen within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
