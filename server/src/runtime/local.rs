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

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use warmpool_api::{
    ExecRequest, ExecResult, LogLine, ProbeKind, ProbeResult, ProbeSpec, ProbeStatus, ProcessType,
    TemplateSpec, WarmProcessSpec, EXEC_OUTPUT_LIMIT, START_PROCESS,
};
use warmpool_procd::config::Listen;
use warmpool_procd::convert;
use warmpool_procd::proto::procd_client::ProcdClient;
use warmpool_procd::proto::{self, exec_event};

use super::{Runtime, RuntimeError, StartSpec};
use crate::secrets::Secrets;
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
    secrets: Arc<Secrets>,
}

impl LocalRuntime {
    /// `exits` hears the id of every sandbox whose procd exits.
    pub fn new(
        data_dir: PathBuf,
        procd_bin: PathBuf,
        isolation: Isolation,
        max_sandboxes: usize,
        exits: mpsc::UnboundedSender<String>,
        secrets: Arc<Secrets>,
    ) -> Arc<LocalRuntime> {
        Arc::new(LocalRuntime {
            data_dir,
            procd_bin,
            isolation,
            max_sandboxes,
            exits,
            clients: Default::default(),
            secrets,
        })
    }

    /// A call to procd with the sandbox's token.
    fn authorized<T>(&self, handle: &RuntimeHandle, message: T) -> tonic::Request<T> {
        warmpool_procd::authorized(message, Some(&self.secrets.procd_token(&handle.id)))
    }

    /// SIGTERM to procd (its warm processes get its grace period), SIGKILL after 6 s, then every process left in
    /// the sandbox's cgroups and every process whose command line names `dir`, then the cgroups themselves.
    async fn kill_everything(&self, id: &str, dir: &Path, handle: Option<&RuntimeHandle>) {
        let dir_text = format!("{}/", dir.display());
        if let Some(handle) = handle {
            self.clients.lock().expect("clients").remove(&handle.socket);
            let procd = match (handle.procd_pid, handle.child_pid) {
                (Some(p), _) => Some(p),
                (None, Some(wrapper)) if self.isolation.namespaces => find_child(wrapper).await,
                (None, wrapper) => wrapper,
            };
            if let Some(pid) = procd.filter(|p| pid_alive(*p) && is_procd_of(*p, &dir_text)) {
                signal(pid, libc::SIGTERM);
                let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
                while pid_alive(pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        // Whatever is left: procd whose pid was never recorded, the `unshare` wrapper, stragglers.
        for pid in processes_naming(&dir_text) {
            signal(pid, libc::SIGKILL);
        }
        let cgroups = cgroup_dirs(id);
        kill_cgroup(&cgroups);
        remove_cgroups(&cgroups).await;
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
        let token_path = dir.join("procd.token");
        write_private(&token_path, &self.secrets.procd_token(id))?;
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
            id: id.to_string(),
            procd_pid,
            child_pid: Some(child_pid),
            dir: dir.display().to_string(),
            socket: socket.display().to_string(),
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

/// The cgroup directories of a sandbox or build that exist now.
fn cgroup_dirs(id: &str) -> Vec<String> {
    CGROUP_CONTROLLERS
        .iter()
        .map(|c| Path::new(CGROUP_ROOT).join(c).join("warmpool").join(id).display().to_string())
        .filter(|d| Path::new(d).exists())
        .collect()
}

/// Pids (other than ours) whose command line names `dir`: procd and its `unshare` wrapper carry
/// `--config <dir>/procd.json`.
fn processes_naming(dir: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id() && is_procd_of(*pid, dir))
        .collect()
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

fn unreachable(status: tonic::Status) -> RuntimeError {
    RuntimeError::Unreachable(status.message().to_string())
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

    async fn stop_build(&self, handle: &RuntimeHandle) {
        self.kill_everything(&handle.id, Path::new(&handle.dir), Some(handle)).await;
        let _ = std::fs::remove_file(&handle.socket);
    }

    async fn destroy(&self, id: &str, handle: Option<&RuntimeHandle>) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(id);
        self.kill_everything(id, &dir, handle).await;
        let socket = handle.map(|h| PathBuf::from(&h.socket)).unwrap_or_else(|| socket_path(&dir, id));
        let _ = std::fs::remove_file(socket);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(RuntimeError::Io { context: format!("removing {}", dir.display()), source: e })
            }
            _ => Ok(()),
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
        let msg = proto::ExecRequest {
            command: req.command,
            cwd: cwd.display().to_string(),
            env: full_env.into_iter().collect(),
            timeout_ms: req.timeout_ms.unwrap_or(60_000),
            stdin: req.stdin.unwrap_or_default().into_bytes(),
        };
        let mut client = self.client(handle)?;
        let mut events = client.exec(self.authorized(handle, msg)).await.map_err(exec_error)?.into_inner();
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let mut exit = None;
        while let Some(event) = events.message().await.map_err(unreachable)? {
            match event.event {
                Some(exec_event::Event::Output(o)) => {
                    let buf = match convert::stream_from_proto(o.stream) {
                        Some(warmpool_procd::output::StreamName::Stderr) => &mut stderr,
                        _ => &mut stdout,
                    };
                    // procd already cuts each stream; this only guards the server's memory.
                    let room = EXEC_OUTPUT_LIMIT.saturating_sub(buf.len());
                    buf.extend_from_slice(&o.data[..o.data.len().min(room)]);
                }
                Some(exec_event::Event::Exit(e)) => exit = Some(e),
                None => {}
            }
        }
        let exit =
            exit.ok_or_else(|| RuntimeError::Unreachable("procd ended the exec without an exit".into()))?;
        Ok(ExecResult {
            exit_code: exit.exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stdout_truncated: exit.stdout_truncated,
            stderr_truncated: exit.stderr_truncated,
            duration_ms: exit.duration_ms,
            timed_out: exit.timed_out,
        })
    }

    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        let mut client = self.client(handle)?;
        let msg = proto::ProbeRequest { kind: convert::kind_to_proto(kind).into() };
        let r = client.probe(msg).await.map_err(unreachable)?;
        Ok(convert::probe_result_from_proto(r.into_inner()))
    }

    async fn watch_readiness(
        &self,
        handle: &RuntimeHandle,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError> {
        let mut client = self.client(handle)?;
        let msg = proto::ProbeRequest { kind: convert::kind_to_proto(ProbeKind::Readiness).into() };
        let stream = client.watch_probe(msg).await.map_err(unreachable)?.into_inner();
        Ok(stream
            .take_while(|r| std::future::ready(r.is_ok()))
            .filter_map(|r| std::future::ready(r.ok().map(|r| convert::probe_result_from_proto(r).status)))
            .boxed())
    }

    async fn pause(&self, handle: &RuntimeHandle, paused: bool) -> Result<(), RuntimeError> {
        let mut client = self.client(handle)?;
        client.pause(self.authorized(handle, proto::PauseRequest { paused })).await.map_err(unreachable)?;
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

    fn list_sandboxes(&self) -> Vec<String> {
        // Only this data dir's: cgroups are host-wide and may belong to another server on this host (a cgroup
        // left without its directory is swept once empty, see `sweep_stale_cgroups`).
        std::fs::read_dir(self.data_dir.join("sandboxes"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default()
    }

    fn free_capacity(&self, running: usize) -> usize {
        self.max_sandboxes.saturating_sub(running)
    }
}

/// A command that cannot start is the caller's mistake, named by the field procd reports.
fn exec_error(status: tonic::Status) -> RuntimeError {
    let field = status.metadata().get(convert::FIELD_METADATA).and_then(|v| v.to_str().ok());
    match (status.code(), field) {
        (tonic::Code::InvalidArgument, Some("cwd")) => {
            RuntimeError::Invalid { field: "cwd", message: status.message().to_string() }
        }
        (tonic::Code::InvalidArgument, Some(_)) => {
            RuntimeError::Invalid { field: "command", message: status.message().to_string() }
        }
        _ => unreachable(status),
    }
}
