//! The local runtime: every sandbox and every build is an OCI container run by `runc`, with procd as its PID 1.
//!
//! A container's root filesystem is an overlay: the build's artifact layer and the base as lower layers, its own
//! upper layer on top (see `layers`). Without a template `image` the base is the host's `/usr /bin /sbin /lib* /etc`,
//! bound read-only. Inside, the workspace is `/workspace`, absolute paths mean what they say, procd is at
//! `/procd/bin/procd` and its config under `/config`. A container has its own user namespace (root inside is the
//! unprivileged `--userns-range` start outside), pid, mount, uts, ipc and network namespaces, runc's default
//! capability set, a seccomp allowlist, a `pids` limit and the template's resources as cgroup limits (see `oci`);
//! `network.mode` is `isolated` (a bridge port behind the runtime's firewall, see `net`), `none` or `host`.
//!
//! Nothing here opens a path inside a container's root filesystem on its behalf: the working directories are
//! made by runc and procd inside the container, after its root is pivoted, so a symlink in an artifact or one the
//! sandbox wrote can never lead the server outside it.
//!
//! On the host, `<data-dir>/sandboxes/<id>/` is the container's bundle: `config.json`, `config/` (procd's config
//! and token), `run/` (procd's socket) and `procd.log` (procd's stdout and stderr, kept under
//! `--sandbox-log-bytes`: see `logs`). Its writable layer (`upper/`, `work/`) is on the disk-limited layers
//! filesystem (see `disk`). The overlay is mounted at `/run/warmpool/rootfs/<id>`: runc mounts a root onto itself
//! from inside the container's user namespace, whose root must be able to walk the path to it (the data dir is the
//! host root's alone), and sandbox ids are unique on a host. runc's state lives in `<data-dir>/runc`, so after a
//! restart `runc state` finds live containers again and the directory listing names the ones to remove.
//!
//! The server reaches procd over a Unix socket it binds itself in `run/`, which is not mounted into the container,
//! and hands to procd as an inherited descriptor (fd 3): nothing a sandbox can write is on the server's path to
//! its procd, so a sandbox cannot replace or redirect it (see `procd_listener`).

mod disk;
mod layers;
pub mod logs;
mod net;
pub mod oci;
pub mod plain;
mod runc;
mod wire;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use warmpool_api::{
    BuildId, ExecRequest, ExecResult, LogLine, NetworkMode, ProbeKind, ProbeResult, ProbeStatus, TemplateSpec,
};
use warmpool_procd::config::Listen;

use super::procd::Procd;
use super::{
    procd_env, warm_processes, working_dir, Runtime, RuntimeError, RuntimeHandle, StartPhase, StartSpec,
    Subject,
};
use crate::secrets::Secrets;
use layers::Overlay;
use net::{Net, Wiring};
use oci::{ContainerSpec, IdRange, Network};
use runc::Runc;

/// Parses a `--sandbox-allow-cidr` value.
pub fn parse_cidr(s: &str) -> Result<String, String> {
    Net::parse_cidr(s)
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_CONTROLLERS: [&str; 5] = ["memory", "cpu", "freezer", "pids", "cpuacct"];

/// What `warmpool serve` tells the local runtime.
pub struct Options {
    pub data_dir: PathBuf,
    pub procd_bin: PathBuf,
    pub max_sandboxes: usize,
    /// Host ids every container's ids map to.
    pub ids: IdRange,
    /// Ranges isolated sandboxes may reach besides the internet (`--sandbox-allow-cidr`).
    pub allow_cidrs: Vec<String>,
    /// Start sandboxes even where `disk_mb` cannot be enforced.
    pub allow_unlimited_disk: bool,
    /// The bound of each sandbox's log file and its rotation together (`--sandbox-log-bytes`).
    pub log_bytes: u64,
}

pub struct LocalRuntime {
    data_dir: PathBuf,
    ids: IdRange,
    procd_bin: PathBuf,
    max_sandboxes: usize,
    /// The bound of each sandbox's `procd.log` and its rotation together (see `logs`).
    log_bytes: u64,
    exits: mpsc::UnboundedSender<String>,
    procd: Procd,
    runc: Runc,
    net: Net,
    /// Writable layers and artifacts, bounded by `disk_mb`.
    disk: disk::Disk,
    /// The base layer without an image, and the host directories bound read-only over it.
    base: PathBuf,
    host_dirs: Vec<String>,
    /// Mount points only (procd's files, `/workspace`), laid over an image.
    base_mounts: PathBuf,
    /// Serializes image unpacking (each image is unpacked once).
    images: tokio::sync::Mutex<()>,
    /// One lock per container being launched or torn down, so a stop that arrives mid-start waits for the start
    /// to finish wiring and then undoes all of it (nothing half-made is left behind).
    busy: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The phases of starts not yet reported (see `Runtime::take_start_phases`), by container id.
    starts: std::sync::Mutex<std::collections::HashMap<String, StartTimes>>,
}

/// How long a start's phases took, filled in as they end.
#[derive(Debug, Clone, Copy)]
struct StartTimes {
    container: Duration,
    network: Duration,
    /// When the container was started (procd's phase begins).
    started: Instant,
    procd: Option<Duration>,
    readiness: Option<Duration>,
}

impl LocalRuntime {
    /// Checks that this host runs OCI containers (root, runc), prepares the base layer, the disk-limited layers
    /// filesystem (without it sandboxes are refused, unless `allow_unlimited_disk`) and the network rules. `exits`
    /// hears the id of every sandbox whose procd exits.
    pub async fn new(
        options: Options,
        exits: mpsc::UnboundedSender<String>,
        secrets: Arc<Secrets>,
    ) -> Result<Arc<LocalRuntime>, RuntimeError> {
        let Options { data_dir, procd_bin, max_sandboxes, ids, allow_cidrs, allow_unlimited_disk, log_bytes } =
            options;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(RuntimeError::Failed(
                "the local runtime runs sandboxes as OCI containers and needs root (run warmpool serve as root)"
                    .into(),
            ));
        }
        if !Runc::available() {
            return Err(RuntimeError::Failed(
                "the local runtime needs runc: install it (Debian: apt-get install runc)".into(),
            ));
        }
        let base = data_dir.join("base").join("host");
        let host_dirs = layers::host_base(&base, ids)?;
        let base_mounts = data_dir.join("base").join("mounts");
        layers::mount_points(&base_mounts, ids)?;
        sweep_stale_cgroups();
        limit_all_sandboxes();
        let net = Net { allow: allow_cidrs };
        net.prepare().await?;
        net.release_orphans(|id| !cgroup_dirs(id).is_empty()).await;
        let disk = disk::Disk::open(&data_dir, allow_unlimited_disk);
        Ok(Arc::new(LocalRuntime {
            disk,
            runc: Runc { root: data_dir.join("runc") },
            net,
            data_dir,
            ids,
            procd_bin,
            max_sandboxes,
            log_bytes,
            exits,
            procd: Procd::new(secrets),
            base,
            host_dirs,
            base_mounts,
            images: tokio::sync::Mutex::new(()),
            busy: Default::default(),
            starts: Default::default(),
        }))
    }

    /// The launch/teardown lock of container `id`.
    async fn lock(&self, id: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = self.busy.lock().expect("busy").entry(id.to_string()).or_default().clone();
        lock.lock_owned().await
    }

    /// Forgets the lock of a container that is gone (unless someone waits on it).
    fn unlock(&self, id: &str, guard: tokio::sync::OwnedMutexGuard<()>) {
        drop(guard);
        let mut busy = self.busy.lock().expect("busy");
        if busy.get(id).is_some_and(|l| Arc::strong_count(l) == 1) {
            busy.remove(id);
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("sandboxes").join(id)
    }

    fn build_dir(&self, id: &str) -> PathBuf {
        self.data_dir.join("builds").join(id)
    }

    /// A build's artifact: the upper layer of its build container.
    fn artifact(&self, build_id: &str) -> PathBuf {
        self.disk.artifact(build_id)
    }

    /// procd's socket.
    fn at(handle: &RuntimeHandle) -> Listen {
        Listen::Unix(handle.socket.clone().into())
    }

    /// The lower layers below a container's own: the build's artifact (if any), then the template's image or, without
    /// one, the host base; and the host directories to bind (none with an image).
    async fn layers(&self, spec: &StartSpec) -> Result<(Vec<PathBuf>, Vec<String>), RuntimeError> {
        // A build's start-contract check runs in its own workspace, not on its artifact.
        let artifact = match &spec.subject {
            Subject::Sandbox { build_id, .. } => Some(self.artifact(build_id)),
            Subject::Build(_) => None,
        }
        .into_iter();
        Ok(match &spec.spec.image {
            Some(image) => {
                let _unpacking = self.images.lock().await;
                let rootfs = layers::image_rootfs(&self.data_dir.join("images"), image, self.ids).await?;
                (artifact.chain([self.base_mounts.clone(), rootfs]).collect(), Vec::new())
            }
            None => (artifact.chain([self.base.clone()]).collect(), self.host_dirs.clone()),
        })
    }

    /// Mounts the container's root filesystem (its lower layers under a disk-limited writable layer), writes procd's
    /// config and the OCI spec, creates the container, wires its network, and starts it. `processes` false starts procd with no warm
    /// process (a build's steps run through exec).
    async fn launch(
        &self,
        id: &str,
        bundle: &Path,
        spec: &StartSpec,
        processes: bool,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let guard = self.lock(id).await;
        let launched = self.launch_locked(id, bundle, spec, processes).await;
        self.unlock(id, guard);
        launched
    }

    async fn launch_locked(
        &self,
        id: &str,
        bundle: &Path,
        spec: &StartSpec,
        processes: bool,
    ) -> Result<RuntimeHandle, RuntimeError> {
        let io = |what: &str| RuntimeError::io(format!("{what} for {id}"));
        let began = Instant::now();
        let (lower, host_dirs) = self.layers(spec).await?;
        let rootfs = rootfs_dir(id)?;
        let t = &spec.spec;
        let layer = self.disk.create(id, t.resources.disk_mb_or_default()).await?;
        Overlay { lower, upper: layer.upper, work: layer.work, target: rootfs.clone() }.mount(self.ids)?;
        // runc makes the working directory inside the container (and procd those of warm processes).
        let cwd = working_dir(spec);
        let warm = if processes { warm_processes(spec) } else { Vec::new() };
        let config_dir = bundle.join("config");
        std::fs::create_dir_all(&config_dir).map_err(io("creating the config directory"))?;
        let socket = run_dir(bundle, id).join("procd.sock");
        let listener = procd_listener(&socket)?;
        write_private(&config_dir.join("token"), &self.procd.token(id))?;
        let procd_config = serde_json::json!({
            // The listener this server made, inherited as fd 3 (see `procd_listener`).
            "listen": "fd://3",
            "token_file": format!("{}/token", oci::CONFIG_DIR),
            "warm_processes": warm,
            "env": procd_env(&spec.spec),
        });
        write_private(&config_dir.join("procd.json"), &procd_config.to_string())?;
        for f in ["", "token", "procd.json"] {
            layers::give(&config_dir.join(f), self.ids).map_err(io("handing over procd's config"))?;
        }
        let volumes: Vec<(PathBuf, String)> = spec
            .volumes
            .iter()
            .map(|v| (self.data_dir.join("volumes").join(&v.account_id).join(&v.name), v.mount_path.clone()))
            .collect();
        for (host, _) in &volumes {
            std::fs::create_dir_all(host).map_err(io("creating a volume"))?;
            layers::give(host, self.ids).map_err(io("handing over a volume"))?;
        }
        let (network, wiring) = match spec.network {
            NetworkMode::Host => (Network::Host, None),
            NetworkMode::None => (Network::Own, Some(Wiring::Loopback)),
            NetworkMode::Isolated => (Network::Own, Some(Wiring::Bridge)),
        };
        let config = oci::config(&ContainerSpec {
            id,
            rootfs: &rootfs,
            procd_bin: &self.procd_bin,
            config_dir: &config_dir,
            host_dirs,
            volumes: &volumes,
            network,
            ids: self.ids,
            resources: &t.resources,
            cwd: &cwd,
        });
        std::fs::write(bundle.join("config.json"), config.to_string()).map_err(io("writing config.json"))?;
        let prepared = began.elapsed();
        let pid = self.runc.create(id, bundle, &bundle.join(logs::LOG), listener.into()).await?;
        let created = began.elapsed();
        if let Some(wiring) = wiring {
            self.net.add(id, pid, wiring).await?;
        }
        let wired = began.elapsed();
        self.runc.start(id).await?;
        let total = began.elapsed();
        let network = wired - created;
        tracing::debug!(
            container = %id,
            prepare_ms = prepared.as_millis() as u64,
            create_ms = (created - prepared).as_millis() as u64,
            network_ms = network.as_millis() as u64,
            start_ms = (total - wired).as_millis() as u64,
            "Container started"
        );
        let times = StartTimes {
            container: total - network,
            network,
            started: Instant::now(),
            procd: None,
            readiness: None,
        };
        self.starts.lock().expect("starts").insert(id.to_string(), times);
        let handle = RuntimeHandle {
            id: id.to_string(),
            procd_pid: Some(pid),
            procd_started: start_ticks(pid),
            dir: bundle.display().to_string(),
            socket: socket.display().to_string(),
            has_warm_processes: !warm.is_empty(),
        };
        self.watch_exit(handle.clone());
        Ok(handle)
    }

    /// Ends the `procd` phase (at procd's first answer) or the `readiness` phase of a start (once each).
    fn start_phase_ends(&self, id: &str, phase: StartPhase) {
        let mut starts = self.starts.lock().expect("starts");
        let Some(t) = starts.get_mut(id) else { return };
        let since_start = t.started.elapsed();
        match phase {
            StartPhase::Procd if t.procd.is_none() => t.procd = Some(since_start),
            StartPhase::Readiness if t.readiness.is_none() => {
                t.readiness = Some(since_start.saturating_sub(t.procd.unwrap_or_default()))
            }
            _ => {}
        }
    }

    /// Reports the container's exit on `exits` (procd is not our child: runc started it), and keeps its log
    /// under the bound meanwhile, looking ten times as often while the log grows fast.
    fn watch_exit(&self, handle: RuntimeHandle) {
        let exits = self.exits.clone();
        let log_bytes = self.log_bytes;
        tokio::spawn(async move {
            let dir = PathBuf::from(&handle.dir);
            // The log's length after the last look (0 after a rotation).
            let mut after = 0;
            while handle_alive(&handle) {
                let (seen, rotated) = bound_log(&dir, log_bytes).await;
                let hot = seen > after + logs::HOT_GROWTH;
                after = if rotated { 0 } else { seen };
                tokio::time::sleep(Duration::from_millis(if hot { 25 } else { 250 })).await;
            }
            let _ = exits.send(handle.id);
        });
    }

    /// Stops a container for good: SIGTERM to procd (its warm processes get its grace period), SIGKILL to all of
    /// it after 6 s, then its cgroups, root filesystem mount and network. Idempotent; needs no handle.
    async fn teardown(&self, id: &str, bundle: &Path, handle: Option<&RuntimeHandle>) {
        let guard = self.lock(id).await;
        self.teardown_locked(id, bundle, handle).await;
        self.unlock(id, guard);
    }

    async fn teardown_locked(&self, id: &str, bundle: &Path, handle: Option<&RuntimeHandle>) {
        self.starts.lock().expect("starts").remove(id);
        if let Some(h) = handle {
            self.procd.forget(&Self::at(h));
        }
        if let Some(state) = self.runc.state(id).await {
            if state.status == "running" || state.status == "paused" {
                self.runc.kill(id, "TERM").await;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
                while pid_alive(state.pid) && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        self.runc.delete(id).await;
        let cgroups = cgroup_dirs(id);
        kill_cgroup(&cgroups);
        remove_cgroups(&cgroups).await;
        let rootfs = Path::new(ROOTFS_DIR).join(id);
        layers::unmount(&rootfs);
        let _ = std::fs::remove_dir(rootfs);
        self.net.remove(id).await;
        let _ = std::fs::remove_dir_all(run_dir(bundle, id));
    }
}

/// Rotates `dir/procd.log` when it passed its threshold (a `stat` first; the copy on a blocking thread).
/// Returns the log's length as seen, and whether it was rotated.
async fn bound_log(dir: &Path, bound: u64) -> (u64, bool) {
    let len = std::fs::metadata(dir.join(logs::LOG)).map_or(0, |m| m.len());
    if len <= logs::threshold(bound) {
        return (len, false);
    }
    let owned = dir.to_path_buf();
    match tokio::task::spawn_blocking(move || logs::rotate(&owned, bound)).await {
        Ok(Ok(rotated)) => (len, rotated),
        Ok(Err(e)) => {
            tracing::warn!(dir = %dir.display(), error = &e as &dyn std::error::Error, "Cannot rotate procd's log");
            (len, false)
        }
        Err(_) => (len, false),
    }
}

/// Runs a host tool to completion; a failure is an error carrying what the tool printed on stderr.
async fn run_tool(program: &str, args: &[&str]) -> Result<(), RuntimeError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(RuntimeError::io(format!(
            "running {program} (is it installed? see scripts/host-deps.sh)"
        )))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(RuntimeError::Failed(format!("{program} {} failed: {}", args.join(" "), stderr.trim())))
    }
}

/// Where container root filesystems are mounted (see the module doc).
const ROOTFS_DIR: &str = "/run/warmpool/rootfs";

/// The root filesystem mount point of container `id`, with a path every container's root can walk (0711).
fn rootfs_dir(id: &str) -> Result<PathBuf, RuntimeError> {
    use std::os::unix::fs::PermissionsExt;
    let io = || RuntimeError::io("creating the root filesystem mount point");
    let mut path = PathBuf::from("/");
    for part in ["run", "warmpool", "rootfs"] {
        path.push(part);
        match std::fs::create_dir(&path) {
            Ok(()) => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711)).map_err(io())?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io()(e)),
        }
    }
    path.push(id);
    std::fs::create_dir_all(&path).map_err(io())?;
    Ok(path)
}

/// procd's socket directory: `<bundle>/run`, or a short path under the temp dir where the bundle's path is too
/// long for a Unix socket (107 bytes). Neither is mounted into the container: only this server writes there.
fn run_dir(bundle: &Path, id: &str) -> PathBuf {
    let dir = bundle.join("run");
    if dir.as_os_str().len() < 90 {
        dir
    } else {
        std::env::temp_dir().join("warmpool-run").join(id)
    }
}

/// Binds procd's listening socket at `socket`, in a directory only this server can write (mode 0700, not a
/// symlink), for procd to inherit as fd 3 (`runc create --preserve-fds 1`). The server made the socket and
/// nothing inside the sandbox can reach its path, so after a restart the server still connects to this
/// sandbox's procd and no other.
fn procd_listener(socket: &Path) -> Result<std::os::unix::net::UnixListener, RuntimeError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = socket.parent().expect("a socket path has a directory");
    let io = |what: &str| RuntimeError::io(format!("{what} {}", dir.display()));
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io("creating"))?;
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let meta = std::fs::symlink_metadata(d).map_err(io("checking"))?;
        // SAFETY: geteuid has no preconditions.
        if !meta.is_dir() || meta.uid() != unsafe { libc::geteuid() } {
            return Err(RuntimeError::Failed(format!(
                "{} is not a directory of this server's user; refusing to put procd's socket there",
                d.display()
            )));
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io("restricting"))?;
    match std::fs::remove_file(socket) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("clearing")(e)),
        _ => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(socket).map_err(io("binding procd's socket in"))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(io("restricting"))?;
    Ok(listener)
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

/// A process's start time (clock ticks since boot): with its pid, it names the process even after pid reuse.
fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split_whitespace().nth(19)?.parse().ok()
}

/// procd is still running (same pid, same start time, not a zombie).
fn handle_alive(handle: &RuntimeHandle) -> bool {
    handle.procd_pid.is_some_and(|p| pid_alive(p) && start_ticks(p) == handle.procd_started)
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

/// Bounds what all sandboxes of this host together may take, whatever each one's own limits: the parent cgroup
/// `/warmpool` gets a `pids.max` a quarter below the kernel's `pid_max` (at least 4096 below) and a memory limit
/// a tenth below the host's memory (at least 1 GiB below), so a few fork bombs or memory hogs in sandboxes cannot
/// leave the server, its database and runc without processes or memory. Best effort: a host without these
/// controllers keeps the per-sandbox limits only.
fn limit_all_sandboxes() {
    let read_u64 = |path: &str| std::fs::read_to_string(path).ok()?.trim().parse::<u64>().ok();
    let mem_total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        let kib = m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    });
    let limits = [
        (
            "pids",
            "pids.max",
            read_u64("/proc/sys/kernel/pid_max").map(|max| max - (max / 4).max(4096).min(max / 2)),
        ),
        (
            "memory",
            "memory.limit_in_bytes",
            mem_total.map(|total| total - (total / 10).max(1 << 30).min(total / 2)),
        ),
    ];
    for (controller, file, limit) in limits {
        let Some(limit) = limit else { continue };
        let dir = Path::new(CGROUP_ROOT).join(controller).join("warmpool");
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(dir.join(file), limit.to_string()))
        {
            tracing::warn!(controller, error = %e, "Cannot bound all sandboxes together");
        }
    }
}

/// The cgroup directories of a sandbox or build that exist now: one per controller on a cgroup v1 host, the one
/// unified directory on a v2 host (whatever the host, "has a cgroup" means "still has processes or is being
/// made", which address release and teardown rely on).
fn cgroup_dirs(id: &str) -> Vec<String> {
    CGROUP_CONTROLLERS
        .iter()
        .chain([&""])
        .map(|c| Path::new(CGROUP_ROOT).join(c).join("warmpool").join(id).display().to_string())
        .filter(|d| Path::new(d).exists())
        .collect()
}

fn kill_cgroup(dirs: &[String]) {
    for dir in dirs {
        if let Ok(text) = std::fs::read_to_string(Path::new(dir).join("cgroup.procs")) {
            for pid in text.split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill(2) on a member of this sandbox's cgroup; no memory involved.
                unsafe { libc::kill(pid, libc::SIGKILL) };
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

#[async_trait::async_trait]
impl Runtime for LocalRuntime {
    fn name(&self) -> &'static str {
        "local"
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "runtime": "local",
            "isolation": "oci",
            "oci_runtime": "runc",
            "network": "bridge",
            "disk_limits": self.disk.describe(),
            "procd": self.procd_bin,
        })
    }

    async fn run_build_steps(
        &self,
        build_id: &BuildId,
        spec: &TemplateSpec,
        log: &Path,
    ) -> Result<(), RuntimeError> {
        let dir = self.build_dir(build_id);
        self.teardown(build_id, &dir, None).await;
        let _ = std::fs::remove_dir_all(&dir);
        self.disk.remove(build_id).await;
        std::fs::create_dir_all(&dir).map_err(RuntimeError::io("creating the build directory"))?;
        let start = StartSpec {
            subject: Subject::Build(build_id.clone()),
            account_id: None,
            pool_id: None,
            spec: spec.clone(),
            envs: Default::default(),
            cwd: None,
            volumes: Vec::new(),
            network: NetworkMode::Isolated,
        };
        let handle = self.launch(build_id, &dir, &start, false).await?;
        let result = async {
            self.wait_ready(&handle, Duration::from_secs(30)).await?;
            self.procd.run_steps(build_id, &Self::at(&handle), spec, log).await
        }
        .await;
        self.teardown(build_id, &dir, Some(&handle)).await;
        result
    }

    async fn seal_artifact(&self, build_id: &BuildId) -> Result<(), RuntimeError> {
        let dir = self.build_dir(build_id);
        self.disk.seal(build_id).await?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    async fn remove_artifact(&self, build_id: &BuildId) {
        let dir = self.build_dir(build_id);
        self.teardown(build_id, &dir, None).await;
        self.disk.remove(build_id).await;
        self.disk.remove_artifact(build_id).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    async fn start(&self, spec: StartSpec) -> Result<RuntimeHandle, RuntimeError> {
        let id = spec.subject.id().to_string();
        let dir = match &spec.subject {
            Subject::Build(build_id) => self.build_dir(build_id),
            Subject::Sandbox { id, .. } => {
                let dir = self.sandbox_dir(id);
                std::fs::create_dir_all(&dir).map_err(RuntimeError::io("creating the sandbox directory"))?;
                dir
            }
        };
        self.launch(&id, &dir, &spec, true).await
    }

    /// Waits on procd's readiness stream (`WatchProbe`: procd pushes every change, nothing is polled). The server
    /// bound procd's socket before the container started, so the watch is asked for at once and answered as soon
    /// as procd serves; the procd and readiness phases end at its first answer and at `passed`.
    async fn wait_ready(&self, handle: &RuntimeHandle, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let at = Self::at(handle);
        let mut last = String::from("procd has not answered yet");
        let mut exits = tokio::time::interval(Duration::from_millis(100));
        loop {
            let watch = async {
                let mut statuses = self.procd.watch_readiness(&at).await?;
                while let Some(status) = statuses.next().await {
                    self.start_phase_ends(&handle.id, StartPhase::Procd);
                    // A sandbox without warm processes is ready when procd answers.
                    if status == ProbeStatus::Passed || !handle.has_warm_processes {
                        return Ok(true);
                    }
                }
                Ok::<bool, RuntimeError>(false)
            };
            tokio::pin!(watch);
            let outcome = loop {
                tokio::select! {
                    outcome = &mut watch => break Some(outcome),
                    _ = tokio::time::sleep_until(deadline) => break None,
                    _ = exits.tick() => {
                        if !self.is_alive(handle) {
                            // The reason only: callers show the output tail beside it (`log_tail`).
                            let tail = self.log_tail(handle, 4000).await;
                            return Err(RuntimeError::Exited(super::exit_reason(&tail)));
                        }
                    }
                }
            };
            match outcome {
                Some(Ok(true)) => {
                    self.start_phase_ends(&handle.id, StartPhase::Readiness);
                    return Ok(());
                }
                // The stream ended (procd going away) or procd did not answer: the exit check decides, or a new
                // watch is asked for.
                Some(Ok(false)) => {}
                Some(Err(e)) => last = e.to_string(),
                None => {
                    // Why it is not ready, in procd's words.
                    if let Ok(Ok(r)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        self.procd.probe(&at, ProbeKind::Readiness),
                    )
                    .await
                    {
                        last = r.message;
                    }
                    return Err(RuntimeError::NotReady(format!(
                        "readiness did not pass within {timeout:?}: {last}"
                    )));
                }
            }
            if !self.is_alive(handle) {
                let tail = self.log_tail(handle, 4000).await;
                return Err(RuntimeError::Exited(super::exit_reason(&tail)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop_build(&self, handle: &RuntimeHandle) {
        self.teardown(&handle.id, Path::new(&handle.dir), Some(handle)).await;
    }

    async fn destroy(&self, id: &str, handle: Option<&RuntimeHandle>) -> Result<(), RuntimeError> {
        let dir = self.sandbox_dir(id);
        self.teardown(id, &dir, handle).await;
        self.disk.remove(id).await;
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
        self.procd.exec(&handle.id, &Self::at(handle), req, base_cwd, env).await
    }

    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        self.procd.probe(&Self::at(handle), kind).await
    }
    fn procd(&self, handle: &RuntimeHandle) -> Result<crate::runtime::procd::ProcdConn, RuntimeError> {
        self.procd.connection(&handle.id, &Self::at(handle))
    }

    async fn watch_readiness(
        &self,
        handle: &RuntimeHandle,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError> {
        self.procd.watch_readiness(&Self::at(handle)).await
    }

    async fn pause(&self, handle: &RuntimeHandle, paused: bool) -> Result<(), RuntimeError> {
        self.procd.pause(&handle.id, &Self::at(handle), paused).await
    }

    async fn logs(&self, handle: &RuntimeHandle, lines: usize) -> BoxStream<'static, LogLine> {
        logs::tail(PathBuf::from(&handle.dir), lines)
    }

    async fn log_tail(&self, handle: &RuntimeHandle, bytes: usize) -> String {
        let dir = PathBuf::from(&handle.dir);
        tokio::task::spawn_blocking(move || logs::tail_text(&dir, bytes)).await.unwrap_or_default()
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        handle_alive(handle)
    }

    fn adopt(&self, _id: &str, handle: &RuntimeHandle) -> bool {
        if !self.is_alive(handle) {
            return false;
        }
        self.watch_exit(handle.clone());
        true
    }

    fn list_sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.data_dir.join("sandboxes"))
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        // A container or a layer can outlive its directory (a crash mid-removal); runc's state root is this data
        // dir's own.
        let containers = self.runc.list().into_iter().filter(|id| id.starts_with("sbx_"));
        for id in containers.chain(self.disk.sandbox_ids()) {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    fn free_capacity(&self, running: usize) -> usize {
        self.max_sandboxes.saturating_sub(running)
    }

    fn take_start_phases(&self, id: &str) -> Vec<(StartPhase, Duration)> {
        let Some(t) = self.starts.lock().expect("starts").remove(id) else { return Vec::new() };
        let mut phases = vec![(StartPhase::Container, t.container), (StartPhase::Network, t.network)];
        phases.extend(t.procd.map(|d| (StartPhase::Procd, d)));
        phases.extend(t.readiness.map(|d| (StartPhase::Readiness, d)));
        phases
    }
}
