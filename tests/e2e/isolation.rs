//! Isolation of the local runtime, asserted by running hostile commands inside sandboxes: a tenant cannot read the
//! data dir, the admin token, the database or other sandboxes, cannot see host processes, cannot reach the control
//! plane on the host's loopback, cannot write the host's system directories, cannot mount or unshare; and a
//! sandbox's limits are cgroup limits.

use std::path::Path;

use warmpool_api::*;
use warmpool_client::Client;

use crate::*;

/// A tenant (second account) with a built template; an admin allowed it host networking (`network_modes`).
async fn tenant(server: &ServerProcess) -> Client {
    let acc = server
        .client
        .create_account(&AccountCreate {
            name: "tenant".into(),
            allow_host_network: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let tok = server.client.create_token(&TokenCreate { account_id: acc.id, name: None }).await.unwrap();
    let c = Client::new(&server.url, Some(tok.token)).unwrap();
    let mut spec = template("box", 0.0);
    spec.resources = Resources { memory_mb: Some(256), cpu: Some(0.5), ..Default::default() };
    build(&c, &spec).await;
    c
}

fn create(network: Option<NetworkMode>) -> SandboxCreate {
    SandboxCreate {
        template: Some("box:stable".into()),
        network: network.map(|mode| NetworkPolicy { mode }),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_hostile_tenant_sees_nothing_of_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let server = ServerProcess::start(&data, &[]);
    // The admin's sandbox, which the tenant must not be able to read.
    build(&server.client, &template("admin", 0.0)).await;
    let mine = server.client.create_sandbox(&cold("admin:stable")).await.unwrap();
    sh(&server.client, &mine.id, "echo secret > /workspace/admin-only").await;
    let c = tenant(&server).await;
    let s = c.create_sandbox(&create(None)).await.unwrap();

    let data_dir = data.canonicalize().unwrap();
    for path in [
        data_dir.join("admin.token"),
        data_dir.join("warmpool.db"),
        data_dir.join("secret.key"),
        data_dir.join("layers/sandboxes").join(&mine.id).join("upper/workspace/admin-only"),
    ] {
        let r = sh(&c, &s.id, &format!("cat {}", path.display())).await;
        assert_ne!(r.exit_code, 0, "{} is readable from a sandbox: {}", path.display(), r.stdout);
    }
    let r = sh(&c, &s.id, &format!("ls {}", data_dir.display())).await;
    assert_ne!(r.exit_code, 0, "the data dir is visible: {}", r.stdout);
    // Host processes are invisible: procd is PID 1 and the few processes are the sandbox's own.
    let r = sh(&c, &s.id, "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'").await;
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next().map(str::trim), Some("/procd/bin/procd --config /config/procd.json"));
    let count: usize = lines.next().unwrap().trim().parse().unwrap();
    assert!(count < 10, "{count} processes visible");
    // The control plane listens on the host's loopback: out of reach, directly and through the gateway.
    let port = server.url.rsplit(':').next().unwrap().trim_end_matches('/');
    for host in ["127.0.0.1", GATEWAY] {
        let r = sh(
            &c,
            &s.id,
            &format!("python3 -c \"import socket; socket.create_connection(('{host}', {port}), 2)\""),
        )
        .await;
        assert_ne!(r.exit_code, 0, "the control plane is reachable at {host}:{port}");
    }
    // Read-only system directories; no mounts, no new namespaces (capabilities and seccomp).
    for (script, what) in [
        ("touch /usr/owned", "writing /usr"),
        ("touch /etc/owned", "writing /etc"),
        ("mount -t tmpfs tmpfs /mnt", "mounting"),
        ("unshare -U true", "unsharing a user namespace"),
        ("hostname evil", "changing the hostname"),
    ] {
        let r = sh(&c, &s.id, script).await;
        assert_ne!(r.exit_code, 0, "{what} worked in a sandbox");
    }
    assert_eq!(sh(&c, &s.id, "hostname").await.stdout.trim(), s.id, "the hostname is the sandbox id");
    // Limits are cgroup limits.
    let cgroup = Path::new("/sys/fs/cgroup");
    let memory =
        std::fs::read_to_string(cgroup.join("memory/warmpool").join(&s.id).join("memory.limit_in_bytes"))
            .unwrap();
    assert_eq!(memory.trim(), (256u64 << 20).to_string());
    let pids = std::fs::read_to_string(cgroup.join("pids/warmpool").join(&s.id).join("pids.max")).unwrap();
    assert_eq!(pids.trim(), "4096");
    let quota =
        std::fs::read_to_string(cgroup.join("cpu/warmpool").join(&s.id).join("cpu.cfs_quota_us")).unwrap();
    assert_eq!(quota.trim(), "50000");
    c.delete_sandbox(&s.id).await.unwrap();
    server.client.delete_sandbox(&mine.id).await.unwrap();
    wait_no_procd(&data);
}
