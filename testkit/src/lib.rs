//! Test support for the end-to-end tests of the server, the GitHub Action, the Terraform provider and `tests/` (four
//! hence a crate): start the real `warmpool serve` binary on an ephemeral port, hand back a typed client, and find
//! or kill the containers of a data dir so no test leaks sandboxes, the pool helpers every suite uses, a real
//! PostgreSQL ([`postgres::Postgres`]) and a real OIDC issuer ([`oidc::TestIssuer`]).

pub mod oidc;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmpool_api::{PoolStatus, WarmPoolSpec};
use warmpool_client::Client;

/// A literal id of a test, typed: `let pool: PoolId = typed("twp_1");` (panics on a wrong prefix).
pub fn typed<T: TryFrom<String, Error = String>>(value: &str) -> T {
    T::try_from(value.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

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
            // The server saves a CLI configuration where there is none: keep it out of the user's home.
            .env("WARMPOOL_CONFIG", data_dir.join("cli-config.json"))
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

/// A `warmpool serve` on a temporary directory of its own (data in `dir/data`); dropping it kills the server and
/// removes everything it started, pass or fail. Derefs to the [`ServerProcess`].
pub struct TempServer {
    pub process: ServerProcess,
    // Dropped in this order: the procds are killed while their directory still names their cgroups.
    _cleanup: KillOnDrop,
    pub dir: tempfile::TempDir,
}

impl TempServer {
    pub fn start(extra_args: &[&str]) -> TempServer {
        let dir = tempfile::tempdir().expect("temp dir");
        let cleanup = KillOnDrop(dir.path().to_path_buf());
        let process = ServerProcess::start(&dir.path().join("data"), extra_args);
        TempServer { process, _cleanup: cleanup, dir }
    }
}

impl std::ops::Deref for TempServer {
    type Target = ServerProcess;
    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

/// runc state roots of the data dir `dir` (or of `dir/data`).
fn runc_roots(dir: &Path) -> Vec<PathBuf> {
    [dir.join("runc"), dir.join("data/runc")].into_iter().filter(|r| r.is_dir()).collect()
}

/// A container (sandbox or build) runc knows under a data dir.
#[derive(Debug, Clone)]
pub struct Container {
    /// runc's state root.
    pub root: PathBuf,
    pub id: String,
    /// procd, the container's PID 1 as the host sees it (from runc's `state.json`).
    pub pid: Option<u32>,
}

/// Every container runc knows under `dir`, running or not.
pub fn containers_under(dir: &Path) -> Vec<Container> {
    let pid_of = |state: &str| -> Option<u32> {
        let tail = state.split("\"init_process_pid\":").nth(1)?;
        tail.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
    };
    runc_roots(dir)
        .into_iter()
        .flat_map(|root| {
            std::fs::read_dir(&root).into_iter().flatten().flatten().map(move |e| {
                let id = e.file_name().to_string_lossy().into_owned();
                let state = std::fs::read_to_string(root.join(&id).join("state.json")).unwrap_or_default();
                Container { pid: pid_of(&state), root: root.clone(), id }
            })
        })
        .collect()
}

/// The containers under `dir` whose procd runs (not a zombie).
pub fn running_containers(dir: &Path) -> Vec<Container> {
    let alive = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.is_empty() && !stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'))
    };
    containers_under(dir).into_iter().filter(|c| c.pid.is_some_and(alive)).collect()
}

/// Pids of the running procd processes (PID 1 of each container) of the data dir `dir`.
pub fn procd_pids(dir: &Path) -> Vec<u32> {
    running_containers(dir).into_iter().filter_map(|c| c.pid).collect()
}

/// Releases the host-wide addresses (CNI `host-local` files, each holding its owner's id) of these sandboxes and
/// builds: a killed server never releases them.
fn release_addresses(ids: &[String]) {
    for e in std::fs::read_dir("/run/warmpool/ipam/warmpool").into_iter().flatten().flatten() {
        let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
        if owner.lines().next().is_some_and(|o| ids.iter().any(|id| id == o.trim())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Detaches the loop devices whose backing file is under `dir` (the layers image): a loop device left behind
/// keeps its image's space and slows every later loop mount on this host. After the lazy unmount a device
/// already frees itself once its filesystem is released (`mount -o loop` sets autoclear); this makes sure.
fn detach_loop_devices(dir: &Path) {
    let prefix = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    for e in std::fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let backing = std::fs::read_to_string(e.path().join("loop/backing_file")).unwrap_or_default();
        if name.starts_with("loop") && Path::new(backing.trim()).starts_with(&prefix) {
            let _ =
                Command::new("losetup").arg("-d").arg(format!("/dev/{name}")).stderr(Stdio::null()).status();
        }
    }
}

/// Removes everything the server's runtime made for `dir` that outlives a killed server: containers (runc kills
/// what runs in them), overlay mounts (under `dir` and at `/run/warmpool/rootfs/<id>`), addresses and cgroups. A
/// cgroup cannot be removed before its last member is reaped, which takes a moment after SIGKILL.
pub fn kill_all_under(dir: &Path) {
    let mut ids = Vec::new();
    for Container { root, id, .. } in containers_under(dir) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        ids.push(id);
    }
    for parent in ["sandboxes", "data/sandboxes", "builds", "data/builds"] {
        for e in std::fs::read_dir(dir.join(parent)).into_iter().flatten().flatten() {
            ids.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let prefix = dir.display().to_string();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    // A sandbox or build root whose layers live in this dir is the test's, even when its directory is gone.
    ids.extend(
        mounts
            .lines()
            .filter(|l| l.contains(&prefix))
            .filter_map(|l| l.split(' ').nth(4)?.strip_prefix("/run/warmpool/rootfs/").map(str::to_owned)),
    );
    ids.sort();
    ids.dedup();
    let roots: Vec<String> = ids.iter().map(|id| format!("/run/warmpool/rootfs/{id}")).collect();
    let mut targets: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&prefix) || roots.iter().any(|r| m == r))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for target in targets {
        let _ = Command::new("umount").arg("-l").arg(target).status();
    }
    detach_loop_devices(dir);
    for root in &roots {
        let _ = std::fs::remove_dir(root);
    }
    release_addresses(&ids);
    let mut cgroups: Vec<PathBuf> = ids
        .iter()
        .flat_map(|id| {
            ["memory", "cpu", "freezer", "pids", "cpuacct", "blkio", "devices"]
                .map(|c| Path::new("/sys/fs/cgroup").join(c).join("warmpool").join(id))
        })
        .filter(|c| c.exists())
        .collect();
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

/// Waits until no procd runs under `dir`; on timeout names the containers left.
pub fn wait_no_procd(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left: Vec<String> = running_containers(dir).into_iter().map(|c| c.id).collect();
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "containers still running: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A pool of `template` with `min`..`max` ready sandboxes.
pub fn pool_spec(name: &str, template: &str, min: u32, max: u32) -> WarmPoolSpec {
    WarmPoolSpec {
        name: name.into(),
        template: template.into(),
        min_ready: min,
        max_ready: max,
        ..Default::default()
    }
}

/// Polls a pool's status until `cond` holds; panics naming `what` after 90 s.
pub async fn wait_status(
    c: &Client,
    pool: &str,
    what: &str,
    cond: impl Fn(&PoolStatus) -> bool,
) -> PoolStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = c.pool_status(pool).await.unwrap();
        if cond(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "pool {pool} never reached {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
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

/// A kubeconfig for one cluster at `server` (a bearer token user; `namespace` as the context's default).
pub fn kubeconfig(server: &str, namespace: Option<&str>) -> String {
    let namespace = namespace.map(|n| format!(", namespace: {n}")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: '{server}'}}\n\
         contexts:\n- name: test\n  context: {{cluster: test, user: test{namespace}}}\n\
         current-context: test\nusers:\n- name: test\n  user: {{token: test}}\n"
    )
}
