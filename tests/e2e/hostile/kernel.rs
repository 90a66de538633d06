//! Root inside is not root outside, and the kernel's dangerous surfaces are closed: a user namespace maps the
//! sandbox's root to an unprivileged host uid, seccomp refuses namespace creation (by `clone` flags too), mounts,
//! the keyring, bpf, perf, ptrace, modules and kexec, and a symlink planted in an artifact cannot make the server
//! create anything outside the sandbox.

use std::path::Path;

use warmpool_api::*;

use super::*;

/// Calls `syscall(nr, args…)` with ctypes and prints `ok` or the errno name.
fn syscall_script(calls: &[(&str, u64, &str)]) -> String {
    let mut script = String::from(
        "import ctypes, os, errno\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n",
    );
    for (name, nr, args) in calls {
        script.push_str(&format!(
            "r = libc.syscall({nr}{args})\nif r == 0 and os.getpid() != PID: os._exit(0)\n\
             print('{name}', 'ok' if r >= 0 else errno.errorcode[ctypes.get_errno()])\n"
        ));
    }
    format!("PID = __import__('os').getpid()\n{script}")
}

#[tokio::test]
async fn root_inside_is_nobody_outside_and_the_kernel_surface_is_closed() {
    let server = TempServer::start(&[]);
    let c = tenant(&server, "tenant").await;
    let s = c.create_sandbox(&boxed(NetworkMode::Isolated)).await.unwrap();

    // uid 0 inside is 100000 outside; the host's secrets are not readable by it.
    let r = sh(&c, &s.id, "id -u; cat /proc/self/uid_map").await;
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("0"));
    assert_eq!(lines.next().unwrap().split_whitespace().collect::<Vec<_>>(), ["0", "100000", "65536"]);
    for secret in ["/etc/shadow", "/etc/gshadow"] {
        if Path::new(secret).exists() {
            let r = sh(&c, &s.id, &format!("cat {secret}")).await;
            assert_ne!(r.exit_code, 0, "{secret} is readable in a sandbox: {}", r.stdout);
        }
    }
    // What the sandbox writes is owned by the mapped uid on the host.
    sh(&c, &s.id, "echo x > /workspace/mine").await;
    let upper = server.data_dir.join("layers/sandboxes").join(&s.id).join("upper/workspace/mine");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&upper).unwrap().uid(), 100_000);

    // Namespaces by any door, mounts, keyring, bpf, perf, ptrace, modules, kexec: EPERM. clone3 says ENOSYS so C
    // libraries fall back to clone, whose namespace flags are refused. Plain clone (fork) still works.
    const NEWUSER_NEWNET_SIGCHLD: u64 = 0x1000_0000 | 0x4000_0000 | 17;
    let script = syscall_script(&[
        ("fork", 56, ", 17, 0, 0, 0, 0"),
        ("clone_newuser_newnet", 56, &format!(", {NEWUSER_NEWNET_SIGCHLD}, 0, 0, 0, 0")),
        ("clone3", 435, ", 0, 0"),
        ("unshare", 272, ", 0x10000000"),
        ("setns", 308, ", 0, 0"),
        ("mount", 165, ", b'none', b'/mnt', b'tmpfs', 0, 0"),
        ("keyctl", 250, ", 0, 0, 0, 0, 0"),
        ("add_key", 248, ", 0, 0, 0, 0, 0"),
        ("bpf", 321, ", 0, 0, 0"),
        ("perf_event_open", 298, ", 0, 0, 0, 0, 0"),
        ("ptrace", 101, ", 16, 1, 0, 0"),
        ("init_module", 175, ", 0, 0, 0"),
        ("kexec_load", 246, ", 0, 0, 0, 0"),
        ("open_by_handle_at", 304, ", 0, 0, 0"),
        // vsock is not namespaced: it would reach the hypervisor past every network rule.
        ("socket_vsock", 41, ", 40, 1, 0"),
    ]);
    let r = c
        .exec(
            &s.id,
            &ExecRequest { command: vec!["python3".into(), "-c".into(), script], ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let results: std::collections::BTreeMap<&str, &str> =
        r.stdout.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(results.get("fork"), Some(&"ok"), "{}", r.stdout);
    assert_eq!(results.get("clone3"), Some(&"ENOSYS"), "{}", r.stdout);
    for (call, result) in &results {
        if !["fork", "clone3"].contains(call) {
            assert_eq!(*result, "EPERM", "{call} was not refused: {}", r.stdout);
        }
    }
    assert_eq!(results.len(), 15, "{}", r.stdout);
    // The host sees the root filesystem without setuid files or devices (its mount point is walkable).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = mounts.lines().find(|l| l.contains(&format!(" /run/warmpool/rootfs/{} ", s.id))).unwrap();
    assert!(root.contains("nosuid") && root.contains("nodev"), "{root}");
    // All sandboxes together leave the host processes and memory of its own.
    let pid_max: u64 = std::fs::read_to_string("/proc/sys/kernel/pid_max").unwrap().trim().parse().unwrap();
    let all: u64 =
        std::fs::read_to_string("/sys/fs/cgroup/pids/warmpool/pids.max").unwrap().trim().parse().unwrap();
    assert!(all <= pid_max - 4096, "all sandboxes may take {all} of {pid_max} pids");
    // The tools a user would try.
    for script in ["unshare -Ur true", "unshare -n true", "mount -t tmpfs tmpfs /mnt", "chroot / true"] {
        assert_ne!(sh(&c, &s.id, script).await.exit_code, 0, "{script} worked in a sandbox");
    }
    c.delete_sandbox(&s.id).await.unwrap();
}

#[tokio::test]
async fn a_symlink_in_an_artifact_never_leads_the_server_outside_the_sandbox() {
    let server = TempServer::start(&[]);
    let c = tenant(&server, "tenant").await;
    let target = server.dir.path().join("created-by-the-server");
    // The build leaves a symlink to a host path; a sandbox then asks for a working directory through it.
    let mut spec = template("trap", 0.0);
    spec.build.steps = vec![format!("ln -s {} evil", target.display())];
    build(&c, &spec).await;
    let create = SandboxCreate {
        template: Some("trap:stable".into()),
        cwd: Some("/workspace/evil/sub".into()),
        ..Default::default()
    };
    // Whatever the answer, the host path must not appear: the directory is made inside the sandbox.
    let created = c.create_sandbox(&create).await;
    assert!(!target.exists(), "the server created {} on the host", target.display());
    if let Ok(s) = created {
        assert_eq!(sh(&c, &s.id, "test -d /workspace/evil/sub").await.exit_code, 0);
        c.delete_sandbox(&s.id).await.unwrap();
    }
    assert!(!target.exists(), "the server created {} on the host", target.display());
}
