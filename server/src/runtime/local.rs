//! The local runtime: each sandbox is `<data-dir>/sandboxes/<id>/` holding `root/` (a copy of the build artifact),
//! procd's config, socket, token and log, plus one `procd` process that owns it. Where the host allows, procd runs
//! as PID 1 of new pid, mount and uts namespaces (through `unshare`) and inside per-sandbox cgroup v1 directories
//! that carry the template's `resources`; otherwise it is a plain process. Paths inside a sandbox (`cwd`, volume
//! mount paths) are rooted at its `root/`.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tonic::transport::Channel;
use warmpool_api::{
    ExecRequest, ExecResult, LogLine, ProbeCheckResult, ProbeKind, ProbeResult, ProbeSpec, ProbeStatus,
    ProcessType, TemplateSpec, WarmProcessSpec, START_PROCESS,
};
use warmpool_procd::config::Listen;
use warmpool_procd::proto::procd_client::ProcdClient;

use super::{Runtime, RuntimeError, StartSpec};
use crate::store::RuntimeHandle;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_CONTROLLERS: [&str; 3] = ["memory", "cpu", "freezer"];

/// What this host lets the runtime use.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Isolation {
    pub namespaces: bool,
    pub cgroups: bool,
}

impl Isolation {
    /// Probes the host: can we `unshare` pid/mount/uts namespaces, and write cgroup v1 controllers?
    pub fn detect() -> Isolation {
        let namespaces = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--uts", "--mount-proc", "true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let cgroups = CGROUP_CONTROLLERS.iter().all(|c| {
            let dir = Path::new(CGROUP_ROOT).join(c).join("warmpool");
            std::fs::create_dir_all(&dir).is_ok() && dir.join("cgroup.procs").exists()
        });
        if cgroups {
            sweep_stale_cgroups();
        }
        Isolation { namespaces, cgroups }
    }

    pub fn none() -> Isolation {
        Isolation { namespaces: false, cgroups: false }
    }
}

pub struct LocalRuntime {
    data_dir: PathBuf,
    procd_bin: PathBuf,
    isolation: Isolation,
    max_sandboxes: usize,
    exits: mpsc::UnboundedSender<String>,
    clients: Mutex<HashMap<String, ProcdClient<Channel>>>,
}

impl LocalRuntime {
    /// `exits` hears the id of every sandbox whose procd exits.
    pub fn new(
        data_dir: PathBuf,
        procd_bin: PathBuf,
        isolation: Isolation,
        max_sandboxes: usize,
        exits: mpsc::UnboundedSender<String>,
    ) -> Arc<LocalRuntime> {
        Arc::new(LocalRuntime {
            data_dir,
            procd_bin,
            isolation,
            max_sandboxes,
            exits,
            clients: Default::default(),
        })
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    fn client(&self, handle: &RuntimeHandle) -> Result<ProcdClient<Channel>, RuntimeError> {
        let mut clients = self.clients.lock().expect("clients");
        if let Some(c) = clients.get(&handle.socket) {
            return Ok(c.clone());
        }
        let client = warmpool_procd::connect(&Listen::Unix(handle.socket.clone().into()))
            .map_err(|e| RuntimeError::Unreachable(e.to_string()))?;
        clients.insert(handle.socket.clone(), client.clone());
        Ok(client)
    }

    /// The procd config for a sandbox rooted at `root`.
    fn procd_config(&self, id: &str, root: &Path, spec: &StartSpec) -> (Vec<WarmProcessSpec>, bool) {
        let t = &spec.spec;
        let base_cwd = inside(root, spec.cwd.as_deref().or(t.cwd.as_deref()));
        let mut env: BTreeMap<String, String> = t.env.clone();
        env.extend(spec.envs.clone());
        env.insert("WARMPOOL_SANDBOX_ID".into(), id.into());
        env.insert("WARMPOOL_SANDBOX_ROOT".into(), root.display().to_string());
        let mut processes = Vec::new();
        if let Some(cmd) = &t.start_cmd {
            let readiness = t.readiness.clone().map(|r| ProbeSpec {
                // In a template, readiness.timeout_ms bounds the whole start; each check gets at most 1 s of it.
                timeout_ms: Some(r.timeout_ms.unwrap_or(1000).min(1000)),
                ..r
            });
            processes.push(WarmProcessSpec {
                name: Some(START_PROCESS.into()),
                process_type: ProcessType::Cmd,
                command: Some(vec!["/bin/sh".into(), "-c".into(), cmd.clone()]),
                cwd: Some(base_cwd.display().to_string()),
                env: env.clone(),
                probes: readiness
                    .map(|r| warmpool_api::ProbeSet { readiness: Some(r), ..Default::default() }),
                ..Default::default()
            });
        }
        for p in &t.warm_processes {
            let mut p = p.clone();
            let cwd = match &p.cwd {
                Some(c) => inside(root, Some(c)),
                None => base_cwd.clone(),
            };
            let _ = std::fs::create_dir_all(&cwd);
            p.cwd = Some(cwd.display().to_string());
            let mut penv = env.clone();
            penv.extend(p.env.clone());
            p.env = penv;
            processes.push(p);
        }
        let has = !processes.is_empty();
        (processes, has)
    }

    async fn spawn_procd(
        &self,
        id: &str,
        dir: &Path,
        root: &Path,
        spec: &StartSpec,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let t = &spec.spec;
        let _ = std::fs::create_dir_all(inside(root, spec.cwd.as_deref().or(t.cwd.as_deref())));
        for (host, mount) in &spec.volumes {
            let target = inside(root, Some(mount));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(RuntimeError::io("creating volume mount point"))?;
            }
            std::fs::create_dir_all(host).map_err(RuntimeError::io("creating volume"))?;
            let _ = std::fs::remove_file(&target);
            std::os::unix::fs::symlink(host, &target).map_err(RuntimeError::io("linking volume"))?;
        }
        let (warm, has_warm_processes) = self.procd_config(id, root, spec);
        let socket = socket_path(dir, id);
        let token = random_token();
        let token_path = dir.join("procd.token");
        write_private(&token_path, &token)?;
        let config = serde_json::json!({
            "listen": format!("unix://{}", socket.display()),
            "token_file": token_path,
            "warm_processes": warm,
        });
        let config_path = dir.join("procd.json");
        write_private(&config_path, &serde_json::to_string_pretty(&config).expect("json"))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("procd.log"))
            .map_err(RuntimeError::io("opening procd.log"))?;

        let cgroups = if self.isolation.cgroups { make_cgroups(id, &t.resources) } else { Vec::new() };
        let procs_files: Vec<std::fs::File> = cgroups
            .iter()
            .filter_map(|d| {
                std::fs::OpenOptions::new().write(true).open(Path::new(d).join("cgroup.procs")).ok()
            })
            .collect();
        let procs_fds: Vec<i32> = procs_files.iter().map(|f| f.as_raw_fd()).collect();

        let mut cmd = if self.isolation.namespaces {
            let mut c = tokio::process::Command::new("unshare");
            c.args(["--pid", "--fork", "--mount", "--uts", "--mount-proc", "--kill-child=SIGTERM"]);
            if spec.private_network {
                c.arg("--net");
            }
            c.arg(&self.procd_bin);
            c.env("WARMPOOL_HOSTNAME", id);
            c
        } else {
            tokio::process::Command::new(&self.procd_bin)
        };
        cmd.arg("--config")
            .arg(&config_path)
            .current_dir(root)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(RuntimeError::io("procd.log"))?)
            .stderr(log)
            .kill_on_drop(false);
        // SAFETY: the closure only calls write(2) on descriptors opened before the fork; no allocation.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &procs_fds {
                    libc::write(*fd, b"0".as_ptr().cast(), 1);
                }
                Ok(())
            });
        }
        let mut child =
            cmd.spawn().map_err(RuntimeError::io(format!("starting {}", self.procd_bin.display())))?;
        drop(procs_files);
        let child_pid = child.id().unwrap_or(0);
        let procd_pid = if self.isolation.namespaces {
            let found = find_child(child_pid).await;
            if found.is_none() {
                tracing::warn!(
                    sandbox = id,
                    wrapper = child_pid,
                    "Cannot find procd under unshare; watching the wrapper"
                );
            }
            found
        } else {
            Some(child_pid)
        };
        let exits = self.exits.clone();
        let sandbox = id.to_string();
        let watched_dir = dir.display().to_string();
        tokio::spawn(async move {
            let _ = child.wait().await;
            // The wrapper can go first; report the exit once procd itself is gone too.
            for _ in 0..200 {
                if !procd_pid.is_some_and(|p| pid_alive(p) && is_procd_of(p, &watched_dir)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = exits.send(sandbox);
        });
        Ok(RuntimeHandle {
            procd_pid,
            child_pid: Some(child_pid),
            dir: dir.display().to_string(),
            socket: socket.display().to_string(),
            token,
            cgroups,
            has_warm_processes,
        })
    }
}

/// A path inside the sandbox rooted at `root`: absolute paths are taken relative to it.
fn inside(root: &Path, path: Option<&str>) -> PathBuf {
    match path {
        None => root.to_path_buf(),
        Some(p) => root.join(p.trim_start_matches('/')),
    }
}

/// Unix socket paths are limited to 107 bytes; fall back to the temp dir for deep data dirs.
fn socket_path(dir: &Path, id: &str) -> PathBuf {
    let p = dir.join("procd.sock");
    if p.as_os_str().len() < 100 {
        p
    } else {
        std::env::temp_dir().join(format!("warmpool-{id}.sock"))
    }
}

fn random_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn write_private(path: &Path, text: &str) -> Result<(), RuntimeError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(RuntimeError::io(format!("writing {}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(RuntimeError::io(format!("writing {}", path.display())))
}

fn make_cgroups(id: &str, resources: &warmpool_api::Resources) -> Vec<String> {
    let mut dirs = Vec::new();
    for controller in CGROUP_CONTROLLERS {
        let dir = Path::new(CGROUP_ROOT).join(controller).join("warmpool").join(id);
        if std::fs::create_dir_all(&dir).is_err() {
            continue;
        }
        let limit = match controller {
            "memory" => {
                resources.memory_mb.map(|mb| ("memory.limit_in_bytes", (mb * 1024 * 1024).to_string()))
            }
            "cpu" => resources
                .cpu
                .map(|cpu| ("cpu.cfs_quota_us", ((cpu * 100_000.0) as u64).max(1000).to_string())),
            _ => None,
        };
        if let Some((file, value)) = limit {
            if let Err(e) = std::fs::write(dir.join(file), value) {
                tracing::warn!(
                    sandbox = id,
                    controller,
                    error = &e as &dyn std::error::Error,
                    "Cannot set cgroup limit"
                );
            }
        }
        dirs.push(dir.display().to_string());
    }
    dirs
}

/// The pid of `parent`'s first child (procd under `unshare --fork`).
async fn find_child(parent: u32) -> Option<u32> {
    for _ in 0..1000 {
        let text =
            std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
        if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
            return Some(pid);
        }
        if !pid_alive(parent) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

/// procd, or the `unshare` wrapper that lives exactly as long as it, is still running.
fn handle_alive(handle: &RuntimeHandle) -> bool {
    [handle.procd_pid, handle.child_pid]
        .into_iter()
        .flatten()
        .any(|p| pid_alive(p) && is_procd_of(p, &handle.dir))
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    pid > 0 && unsafe { libc::kill(pid as i32, 0) } == 0 && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Whether `pid` is the procd of the sandbox directory `dir` (guards against pid reuse).
fn is_procd_of(pid: u32, dir: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(dir))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) on a pid we verified belongs to the sandbox; no memory involved.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

/// Removes sandbox cgroups left empty by processes that were reaped only after their sandbox stopped (rmdir fails
/// on a cgroup that still has members, so live sandboxes are untouched; the age check spares one being created
/// right now by another server on this host).
fn sweep_stale_cgroups() {
    let stale = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(60)))
    };
    for controller in CGROUP_CONTROLLERS {
        let parent = Path::new(CGROUP_ROOT).join(controller).join("warmpool");
        for entry in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if (name.starts_with("sbx_") || name.starts_with("bld_")) && stale(&entry.path()) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
}

fn kill_cgroup(dirs: &[String]) {
    for dir in dirs {
        if let Ok(text) = std::fs::read_to_string(Path::new(dir).join("cgroup.procs")) {
            for pid in text.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

async fn remove_cgroups(dirs: &[String]) {
    for dir in dirs {
        for _ in 0..50 {
            if std::fs::remove_dir(dir).is_ok() || !Path::new(dir).exists() {
                break;
            }
            kill_cgroup(std::slice::from_ref(dir));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), RuntimeError> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .map_err(RuntimeError::io("running cp"))?;
    if status.success() {
        Ok(())
    } else {
        Err(RuntimeError::Build(format!("copying {} failed ({status})", from.display())))
    }
}

fn probe_from_proto(r: warmpool_procd::proto::ProbeResult) -> ProbeResult {
    let status = |s: &str| match s {
        "passed" => ProbeStatus::Passed,
        "suspended" => ProbeStatus::Suspended,
        _ => ProbeStatus::Failed,
    };
    ProbeResult {
        kind: r.kind.parse().unwrap_or(ProbeKind::Readiness),
        status: status(&r.status),
        reason: r.reason,
        message: r.message,
        checks: r
            .checks
            .into_iter()
            .map(|c| ProbeCheckResult {
                name: c.name,
                target: c.target,
                status: status(&c.status),
                reason: c.reason,
                message: c.message,
            })
            .collect(),
    }
}

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "runtime": "local",
            "isolation": if self.isolation.namespaces { "namespaces" } else { "process" },
            "namespaces": self.isolation.namespaces,
            "cgroups": self.isolation.cgroups,
            "procd": self.procd_bin,
        })
    }

    fn volume_dir(&self, account_id: &str, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(account_id).join(name)
    }

    async fn run_build_steps(
        &self,
        build_id: &str,
        spec: &TemplateSpec,
        log: &Path,
    ) -> Result<PathBuf, RuntimeError> {
        use std::io::Write;
        let dir = self.data_dir.join("builds").join(build_id);
        let root = dir.join("root");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(RuntimeError::io("creating build directory"))?;
        let cwd = inside(&root, spec.cwd.as_deref());
        std::fs::create_dir_all(&cwd).map_err(RuntimeError::io("creating build cwd"))?;
        let mut log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(RuntimeError::io("opening build log"))?;
        for (i, step) in spec.build.steps.iter().enumerate() {
            let _ = writeln!(log_file, "==> step {} of {}: {step}", i + 1, spec.build.steps.len());
            let status = tokio::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(step)
                .current_dir(&cwd)
                .envs(&spec.build.env)
                .env("WARMPOOL_BUILD_ID", build_id)
                .env("WARMPOOL_SANDBOX_ROOT", &root)
                .stdin(std::process::Stdio::null())
                .stdout(log_file.try_clone().map_err(RuntimeError::io("build log"))?)
                .stderr(log_file.try_clone().map_err(RuntimeError::io("build log"))?)
                .status()
                .await
                .map_err(RuntimeError::io("running build step"))?;
            if !status.success() {
                let code = status.code().map(|c| c.to_string()).unwrap_or_else(|| status.to_string());
                return Err(RuntimeError::Build(format!(
                    "build step {} ({step:?}) exited with code {code}",
                    i + 1
                )));
            }
        }
        Ok(root)
    }

    async fn seal_artifact(&self, build_id: &str, dir: PathBuf) -> Result<PathBuf, RuntimeError> {
        let artifact = self.artifact(build_id);
        std::fs::create_dir_all(artifact.parent().expect("artifacts dir"))
            .map_err(RuntimeError::io("artifacts dir"))?;
        let _ = std::fs::remove_dir_all(&artifact);
        std::fs::rename(&dir, &artifact).map_err(RuntimeError::io("sealing artifact"))?;
        let _ = std::fs::remove_dir_all(self.data_dir.join("builds").join(build_id).join("run"));
        Ok(artifact)
    }

    fn artifact(&self, build_id: &str) -> PathBuf {
        self.data_dir.join("artifacts").join(build_id)
    }

    async fn remove_artifact(&self, build_id: &str) {
        let _ = std::fs::remove_dir_all(self.artifact(build_id));
        let _ = std::fs::remove_dir_all(self.data_dir.join("builds").join(build_id));
    }

    async fn start(&self, spec: StartSpec) -> Result<RuntimeHandle, RuntimeError> {
        let id = spec.sandbox_id.clone();
        let dir = self.sandbox_dir(&id);
        let root = dir.join("root");
        std::fs::create_dir_all(&root).map_err(RuntimeError::io("creating sandbox directory"))?;
        if let Some(artifact) = &spec.artifact {
            copy_tree(artifact, &root)?;
        }
        self.spawn_procd(&id, &dir, &root, &spec).await
    }

    async fn start_in(
        &self,
        id: &str,
        root: PathBuf,
        spec: StartSpec,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let dir = root.parent().expect("build dir").join("run");
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("creating build run directory"))?;
        self.spawn_procd(id, &dir, &root, &spec).await
    }

    async fn wait_ready(&self, handle: &RuntimeHandle, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("procd has not answered yet");
        loop {
            if !self.is_alive(handle) {
                let tail = self.log_tail(handle, 2000);
                let tail = if tail.trim().is_empty() { "(procd printed nothing)".to_string() } else { tail };
                return Err(RuntimeError::Exited(tail));
            }
            if Path::new(&handle.socket).exists() {
                match self.probe(handle, ProbeKind::Readiness).await {
                    Ok(r) if r.status == ProbeStatus::Passed => return Ok(()),
                    Ok(_) if !handle.has_warm_processes => return Ok(()),
                    Ok(r) => last = r.message,
                    Err(e) => last = e.to_string(),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::NotReady(format!(
                    "readiness did not pass within {timeout:?}: {last}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(&self, _id: &str, handle: &RuntimeHandle, remove_dir: bool) {
        self.clients.lock().expect("clients").remove(&handle.socket);
        let procd = match (handle.procd_pid, handle.child_pid) {
            (Some(p), _) => Some(p),
            (None, Some(wrapper)) if self.isolation.namespaces => find_child(wrapper).await,
            (None, wrapper) => wrapper,
        };
        if let Some(pid) = procd.filter(|p| pid_alive(*p) && is_procd_of(*p, &handle.dir)) {
            signal(pid, libc::SIGTERM);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
            while pid_alive(pid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if pid_alive(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        if let Some(wrapper) = handle.child_pid.filter(|p| pid_alive(*p) && is_procd_of(*p, &handle.dir)) {
            signal(wrapper, libc::SIGKILL);
        }
        kill_cgroup(&handle.cgroups);
        remove_cgroups(&handle.cgroups).await;
        let _ = std::fs::remove_file(&handle.socket);
        if remove_dir && !handle.dir.is_empty() {
            let _ = std::fs::remove_dir_all(&handle.dir);
        }
    }

    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
        base_cwd: Option<&str>,
        env: BTreeMap<String, String>,
    ) -> Result<ExecResult, RuntimeError> {
        let root = Path::new(&handle.dir).join("root");
        let base = inside(&root, base_cwd);
        let cwd = match req.cwd.as_deref() {
            Some(c) if c.starts_with('/') => inside(&root, Some(c)),
            Some(c) => base.join(c),
            None => base,
        };
        let mut full_env = env;
        full_env.extend(req.env.unwrap_or_default());
        let msg = warmpool_procd::proto::ExecRequest {
            command: req.command,
            cwd: cwd.display().to_string(),
            env: full_env.into_iter().collect(),
            timeout_ms: req.timeout_ms.unwrap_or(60_000),
            stdin: req.stdin.unwrap_or_default().into_bytes(),
        };
        let mut client = self.client(handle)?;
        let r = client
            .exec(warmpool_procd::authorized(msg, Some(&handle.token)))
            .await
            .map_err(|s| RuntimeError::Unreachable(s.message().to_string()))?
            .into_inner();
        Ok(ExecResult {
            exit_code: r.exit_code,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            duration_ms: r.duration_ms,
            timed_out: r.timed_out,
        })
    }

    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        let mut client = self.client(handle)?;
        let msg = warmpool_procd::proto::ProbeRequest { kind: kind.as_str().into() };
        let r = client.probe(msg).await.map_err(|s| RuntimeError::Unreachable(s.message().to_string()))?;
        Ok(probe_from_proto(r.into_inner()))
    }

    async fn pause(&self, handle: &RuntimeHandle, paused: bool) -> Result<(), RuntimeError> {
        let mut client = self.client(handle)?;
        let msg = warmpool_procd::proto::PauseRequest { paused };
        client
            .pause(warmpool_procd::authorized(msg, Some(&handle.token)))
            .await
            .map_err(|s| RuntimeError::Unreachable(s.message().to_string()))?;
        Ok(())
    }

    fn logs(&self, handle: &RuntimeHandle) -> Vec<LogLine> {
        self.log_tail(handle, 1 << 20)
            .lines()
            .filter_map(|l| serde_json::from_str::<LogLine>(l).ok())
            .collect()
    }

    fn log_tail(&self, handle: &RuntimeHandle, bytes: usize) -> String {
        let data = std::fs::read(Path::new(&handle.dir).join("procd.log")).unwrap_or_default();
        let start = data.len().saturating_sub(bytes);
        let text = String::from_utf8_lossy(&data[start..]).into_owned();
        // Start at a whole line.
        match (start > 0, text.find('\n')) {
            (true, Some(i)) => text[i + 1..].to_string(),
            _ => text,
        }
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        handle_alive(handle)
    }

    fn adopt(&self, id: &str, handle: &RuntimeHandle) -> bool {
        if !self.is_alive(handle) {
            return false;
        }
        let handle = handle.clone();
        let exits = self.exits.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let alive = handle.procd_pid.is_some_and(|p| pid_alive(p) && is_procd_of(p, &handle.dir));
                if !alive {
                    let _ = exits.send(id);
                    return;
                }
            }
        });
        true
    }

    fn sandbox_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.data_dir.join("sandboxes"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default()
    }

    async fn remove_unknown(&self, id: &str) {
        let dir = self.sandbox_dir(id);
        let dir_text = dir.display().to_string();
        // Any process whose command line names this directory is a leftover of it.
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for pid in rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
                if pid != std::process::id() && is_procd_of(pid, &format!("{dir_text}/")) {
                    signal(pid, libc::SIGKILL);
                }
            }
        }
        let cgroups: Vec<String> = CGROUP_CONTROLLERS
            .iter()
            .map(|c| Path::new(CGROUP_ROOT).join(c).join("warmpool").join(id).display().to_string())
            .filter(|d| Path::new(d).exists())
            .collect();
        kill_cgroup(&cgroups);
        remove_cgroups(&cgroups).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn free_capacity(&self, running: usize) -> usize {
        self.max_sandboxes.saturating_sub(running)
    }
}
