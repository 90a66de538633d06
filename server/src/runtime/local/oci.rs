//! The OCI runtime spec (`config.json`) of a sandbox or build container: procd as PID 1 at `/procd/bin/procd`,
//! its config under `/config`, its socket inherited, not mounted; its own user namespace (root inside is an
//! unprivileged uid outside), pid, mount, uts, ipc and (but in `host` mode) network namespaces; runc's default
//! capability set, a seccomp allowlist, a `pids` limit and the template's resources. This file is the one place
//! that decides what a container may do to the kernel.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The host's network namespace (accounts an admin allowed only).
    Host,
    /// A namespace of its own, created by runc inside the container's user namespace and wired by the runtime
    /// between `runc create` and `runc start` (loopback only, or loopback and the bridge).
    Own,
}

/// Host ids that ids 0.. inside every container map to (`--userns-range START:SIZE`, as Docker's
/// `userns-remap`): uid 0 inside is `start` outside, an unprivileged uid that owns nothing of the host's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdRange {
    pub start: u32,
    pub size: u32,
}

impl IdRange {
    pub const DEFAULT: IdRange = IdRange { start: 100_000, size: 65_536 };

    /// Parses `START:SIZE`; the range must leave the host's own ids (below 1000) alone and hold uid 65534.
    pub fn parse(s: &str) -> Result<IdRange, String> {
        let (start, size) = s.split_once(':').ok_or("expected START:SIZE, e.g. 100000:65536")?;
        let start: u32 = start.parse().map_err(|_| format!("{start:?} is not a uid"))?;
        let size: u32 = size.parse().map_err(|_| format!("{size:?} is not a count"))?;
        if start < 1000 || size < 65_536 || start.checked_add(size).is_none() {
            return Err("the range must start at 1000 or above and hold at least 65536 ids".into());
        }
        Ok(IdRange { start, size })
    }

    /// The host uid of root inside.
    pub fn root(&self) -> u32 {
        self.start
    }

    fn mappings(&self) -> Value {
        json!([{"containerID": 0, "hostID": self.start, "size": self.size}])
    }
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
    pub ids: IdRange,
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
        // sysfs can be mounted only by the owner of the network namespace: the container's own namespace is, the
        // host's is not (there the host's /sys is bound read-only, as Docker does with userns-remap).
        match s.network {
            Network::Own => {
                json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]})
            }
            Network::Host => {
                json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "ro", "nosuid", "noexec", "nodev"]})
            }
        },
        json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]}),
    ];
    for dir in &s.host_dirs {
        mounts.push(bind(Path::new(dir), dir, "ro"));
    }
    for (host, inside) in s.volumes {
        mounts.push(bind(host, inside, "rw"));
    }
    // procd and its config last: nothing a tenant mounts can cover them.
    mounts.push(bind(s.procd_bin, PROCD_BIN, "ro"));
    mounts.push(bind(s.config_dir, CONFIG_DIR, "ro"));
    let mut namespaces: Vec<Value> =
        ["user", "pid", "ipc", "uts", "mount"].iter().map(|t| json!({"type": t})).collect();
    if s.network == Network::Own {
        namespaces.push(json!({"type": "network"}));
    }
    let mut resources =
        json!({"devices": [{"allow": false, "access": "rwm"}], "pids": {"limit": PIDS_LIMIT}});
    resources["memory"] = json!({"limit": s.resources.memory_mb_or_default() * 1024 * 1024});
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
            "uidMappings": s.ids.mappings(),
            "gidMappings": s.ids.mappings(),
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

/// The seccomp filter: an allowlist with the semantics of containerd's default profile for a container without
/// `CAP_SYS_ADMIN`. Everything not listed fails with EPERM: namespaces (`unshare`, `setns`), mounts, the kernel
/// keyring, `bpf`, `perf_event_open`, `ptrace` and friends, modules, kexec, clocks, reboot, swap, `userfaultfd`.
/// `clone` is allowed only without namespace flags, and `clone3` (whose flags live in memory a filter cannot read)
/// answers ENOSYS so C libraries fall back to `clone`.
pub fn seccomp() -> Value {
    const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP) as u64;
    let personality = |value: u64| {
        json!({"names": ["personality"], "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": value, "op": "SCMP_CMP_EQ"}]})
    };
    json!({
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": libc::EPERM,
        "architectures": ARCHITECTURES,
        "syscalls": [
            {"names": ALLOWED, "action": "SCMP_ACT_ALLOW"},
            // vsock is not namespaced: it would reach the hypervisor and host listeners past every network rule.
            {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": libc::AF_VSOCK, "op": "SCMP_CMP_NE"}]},
            {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                "args": [{"index": 0, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": libc::ENOSYS},
            personality(0),
            personality(0x0008),
            personality(0x20000),
            personality(0x20008),
            personality(0xffff_ffff),
        ]
    })
}

/// The architectures the filter covers: this host's and the ones its kernel also runs (32-bit x86 and x32 on
/// x86_64, 32-bit ARM on aarch64), as Docker's profile picks them. Another architecture's syscalls can never reach
/// this kernel, and each listed one costs runc a compiled copy of the filter at every container start; a syscall
/// of an architecture not listed kills the process.
#[cfg(target_arch = "x86_64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURES: &[&str] = &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHITECTURES: &[&str] = &[];

/// Syscalls every container may make (containerd's default list, plus the calls added to the kernel since that
/// are as harmless: `close_range`, `epoll_pwait2`, `futex_waitv`, `rseq`, `pidfd_*`, `landlock_*`, …).
#[rustfmt::skip]
const ALLOWED: &[&str] = &[
    "accept", "accept4", "access", "adjtimex", "alarm", "arch_prctl", "bind", "brk", "cachestat", "capget",
    "capset", "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_getres", "clock_getres_time64",
    "clock_gettime", "clock_gettime64", "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range",
    "connect", "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait", "epoll_wait_old", "eventfd", "eventfd2",
    "execve", "execveat", "exit", "exit_group", "faccessat", "faccessat2", "fadvise64", "fadvise64_64",
    "fallocate", "fanotify_mark", "fchdir", "fchmod", "fchmodat", "fchmodat2", "fchown", "fchown32", "fchownat",
    "fcntl", "fcntl64", "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate", "ftruncate64", "futex",
    "futex_requeue", "futex_time64", "futex_wait", "futex_waitv", "futex_wake", "futimesat", "get_mempolicy",
    "get_robust_list", "get_thread_area", "getcpu", "getcwd", "getdents", "getdents64", "getegid", "getegid32",
    "geteuid", "geteuid32", "getgid", "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername",
    "getpgid", "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getrlimit", "getrusage", "getsid", "getsockname", "getsockopt", "gettid",
    "gettimeofday", "getuid", "getuid32", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "io_destroy", "io_getevents", "io_pgetevents", "io_pgetevents_time64",
    "io_setup", "io_submit", "ioctl", "ioprio_get", "ioprio_set", "ipc", "kill", "landlock_add_rule",
    "landlock_create_ruleset", "landlock_restrict_self", "lchown", "lchown32", "lgetxattr", "link", "linkat",
    "listen", "listxattr", "llistxattr", "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64",
    "madvise", "map_shadow_stack", "mbind", "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir",
    "mkdirat", "mknod", "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "modify_ldt", "mprotect",
    "mq_getsetattr", "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "mseal", "msgctl", "msgget", "msgrcv", "msgsnd", "msync",
    "munlock", "munlockall", "munmap", "nanosleep", "newfstatat", "_newselect", "open",
    "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe", "pipe2", "pkey_alloc", "pkey_free",
    "pkey_mprotect", "poll", "ppoll", "ppoll_time64", "prctl", "pread64", "preadv", "preadv2", "prlimit64",
    "process_mrelease", "pselect6", "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read", "readahead",
    "readlink", "readlinkat", "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg",
    "remap_file_pages", "removexattr", "rename", "renameat", "renameat2", "restart_syscall", "rmdir", "rseq",
    "rt_sigaction", "rt_sigpending", "rt_sigprocmask", "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend",
    "rt_sigtimedwait", "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_get_priority_max",
    "sched_get_priority_min", "sched_getaffinity", "sched_getattr", "sched_getparam", "sched_getscheduler",
    "sched_rr_get_interval", "sched_rr_get_interval_time64", "sched_setaffinity", "sched_setattr",
    "sched_setparam", "sched_setscheduler", "sched_yield", "seccomp", "select", "semctl", "semget", "semop",
    "semtimedop", "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto",
    "set_mempolicy", "set_robust_list", "set_thread_area", "set_tid_address", "setfsgid", "setfsgid32",
    "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups", "setgroups32", "setitimer", "setpgid",
    "setpriority", "setregid", "setregid32", "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid",
    "setreuid32", "setrlimit", "setsid", "setsockopt", "setuid", "setuid32", "setxattr", "shmat", "shmctl",
    "shmdt", "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask", "sigreturn", "socketpair", "splice", "stat", "stat64", "statfs", "statfs64", "statx", "symlink",
    "symlinkat", "sync", "sync_file_range", "syncfs", "sysinfo", "tee", "tgkill", "time", "timer_create",
    "timer_delete", "timer_getoverrun", "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime", "timerfd_settime64", "times",
    "tkill", "truncate", "truncate64", "ugetrlimit", "umask", "uname", "unlink", "unlinkat", "utime",
    "utimensat", "utimensat_time64", "utimes", "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write",
    "writev",
];
