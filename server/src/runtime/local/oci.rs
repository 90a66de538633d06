//! The OCI runtime spec (`config.json`) of a sandbox or build container: procd as PID 1 at `/procd/bin/procd`,
//! its config under `/config` (its socket is inherited, not mounted), own pid/mount/uts/ipc (and usually network)
//! namespaces, runc's default capability set, a seccomp denylist, a `pids` limit and the template's resources.

use std::path::Path;

use serde_json::{json, Value};
use warmpool_api::Resources;

/// Where procd and its files appear inside every container (reserved paths of the template spec).
pub const PROCD_BIN: &str = "/procd/bin/procd";
pub const CONFIG_DIR: &str = "/config";
/// Reserved for the control plane's files inside a sandbox. Nothing is mounted there: procd's socket is
/// inherited (fd 3) from a directory the sandbox cannot see.
pub const RUN_DIR: &str = "/run/warmpool";
/// Processes a sandbox may run at once.
pub const PIDS_LIMIT: i64 = 4096;

/// Host directories visible read-only in a sandbox without an image (each bound on its own: a bind mount inside a
/// lower layer would not show through the overlay). Merged-`/usr` symlinks (`/bin -> usr/bin`) live in the base
/// layer instead.
pub const HOST_SYSTEM_DIRS: [&str; 7] = ["/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/lib32"];

/// How a container's network is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace (opt-in, trusted templates).
    Host,
    /// A namespace of its own with loopback only.
    Loopback,
    /// A prepared namespace (the CNI bridge's), by path.
    Namespace(String),
}

pub struct ContainerSpec<'a> {
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub procd_bin: &'a Path,
    pub config_dir: &'a Path,
    /// Read-only host system directories to bind (none when the template has an image).
    pub host_dirs: Vec<String>,
    /// `(host dir, path inside)` read-write binds (named volumes).
    pub volumes: &'a [(std::path::PathBuf, String)],
    pub network: Network,
    pub resources: &'a Resources,
    pub cwd: &'a str,
}

fn bind(source: &Path, destination: &str, mode: &str) -> Value {
    json!({"destination": destination, "type": "bind", "source": source, "options": ["rbind", mode, "nosuid", "nodev"]})
}

pub fn config(s: &ContainerSpec) -> Value {
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}),
    ];
    for dir in &s.host_dirs {
        mounts.push(bind(Path::new(dir), dir, "ro"));
    }
    mounts.push(bind(s.procd_bin, PROCD_BIN, "ro"));
    mounts.push(bind(s.config_dir, CONFIG_DIR, "ro"));
    for (host, inside) in s.volumes {
        mounts.push(bind(host, inside, "rw"));
    }
    let mut namespaces: Vec<Value> =
        ["pid", "ipc", "uts", "mount"].iter().map(|t| json!({"type": t})).collect();
    match &s.network {
        Network::Host => {}
        Network::Loopback => namespaces.push(json!({"type": "network"})),
        Network::Namespace(path) => namespaces.push(json!({"type": "network", "path": path})),
    }
    let mut resources =
        json!({"devices": [{"allow": false, "access": "rwm"}], "pids": {"limit": PIDS_LIMIT}});
    if let Some(mb) = s.resources.memory_mb {
        resources["memory"] = json!({"limit": mb * 1024 * 1024});
    }
    if let Some(cpu) = s.resources.cpu {
        resources["cpu"] = json!({"quota": ((cpu * 100_000.0) as i64).max(1000), "period": 100_000});
    }
    // runc's default capability set (`runc spec`): nothing that lets a process leave its container.
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": [PROCD_BIN, "--config", format!("{CONFIG_DIR}/procd.json")],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": s.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps, "ambient": caps},
            "noNewPrivileges": true
        },
        "root": {"path": s.rootfs, "readonly": false},
        "hostname": s.id,
        "mounts": mounts,
        "linux": {
            "cgroupsPath": format!("/warmpool/{}", s.id),
            "resources": resources,
            "namespaces": namespaces,
            "seccomp": seccomp(),
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Syscalls a sandbox never needs and an attacker would like (module loading, mounts, namespaces, kernel keyring,
/// tracing other processes, clock and reboot), refused with EPERM; everything else is allowed. Defence in depth on
/// top of the capability set, after the denylist of Docker's default profile.
fn seccomp() -> Value {
    let denied = [
        "acct",
        "add_key",
        "bpf",
        "clock_adjtime",
        "clock_settime",
        "create_module",
        "delete_module",
        "finit_module",
        "fsconfig",
        "fsmount",
        "fsopen",
        "fspick",
        "get_kernel_syms",
        "init_module",
        "ioperm",
        "iopl",
        "kcmp",
        "kexec_file_load",
        "kexec_load",
        "keyctl",
        "lookup_dcookie",
        "mount",
        "move_mount",
        "name_to_handle_at",
        "nfsservctl",
        "open_by_handle_at",
        "open_tree",
        "perf_event_open",
        "pivot_root",
        "process_vm_readv",
        "process_vm_writev",
        "ptrace",
        "query_module",
        "quotactl",
        "reboot",
        "request_key",
        "setns",
        "settimeofday",
        "stime",
        "swapoff",
        "swapon",
        "sysfs",
        "_sysctl",
        "umount",
        "umount2",
        "unshare",
        "uselib",
        "userfaultfd",
        "ustat",
        "vm86",
        "vm86old",
    ];
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_AARCH64"],
        "syscalls": [{"names": denied.as_slice(), "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    })
}
