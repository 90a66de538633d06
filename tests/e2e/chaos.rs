//! Chaos: claims racing scale-downs and rollouts, `kill -9` at several points of a fill, readiness lost while
//! ready, deliberate stops during warm-up, a full disk, exec limits. Each test ends by asserting nothing was lost
//! (every sandbox answered 201 is still running and answers) and nothing leaked (no procd, directory or cgroup
//! without its row).

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use warmpool_api::*;
use warmpool_client::Client;

use crate::*;

/// Deletes every sandbox and pool, then checks that no process, directory or cgroup is left.
async fn nothing_leaked(c: &Client, data: &std::path::Path) {
    for s in c.list_sandboxes().await.unwrap() {
        c.delete_sandbox(&s.id).await.unwrap();
    }
    for p in c.list_pools().await.unwrap() {
        c.delete_pool(&p.id).await.unwrap();
    }
    wait_no_procd(data);
    wait_until("sandbox directories to go", Duration::from_secs(15), || sandbox_dirs(data).is_empty());
}

/// Every sandbox a checkout returned is still the caller's, running, and runs commands.
async fn nothing_lost(c: &Client, ids: &[SandboxId]) {
    for id in ids {
        let s = c.get_sandbox(id).await.unwrap_or_else(|e| panic!("checked-out sandbox {id} is gone: {e}"));
        assert_eq!(s.state, SandboxState::Running, "{id}");
        let r =
            c.exec(id, &ExecRequest { command: vec!["true".into()], ..Default::default() }).await.unwrap();
        assert_eq!(r.exit_code, 0, "{id}");
    }
}

/// Three clients check out in `require` mode while the pool's size flips 8 ↔ 2 every second (each flip down stops
/// ready sandboxes the clients are racing for) and its resources change (a rollout) every 10 s: every sandbox
/// answered 201 survives. A flip interval shorter than a container start (0.3–0.5 s here) would stop every
/// sandbox before it is ready, leaving nothing to race for.
#[tokio::test]
async fn claims_racing_scale_downs_and_rollouts_lose_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let server = ServerProcess::start(&data, &[]);
    let c = server.client.clone();
    build(&c, &template("race", 0.0)).await;
    let pool = c.create_pool(&pool_spec("race", "race:stable", 8, 8)).await.unwrap();
    wait_status(&c, &pool.id, "8 ready", |s| s.ready == 8).await;

    // Race for at least 10 s and until 20 checkouts succeeded (how fast that happens depends on how fast the host
    // refills), at most 90 s.
    const WANTED: usize = 20;
    let started = Instant::now();
    let claimed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let racing = {
        let claimed = claimed.clone();
        move || {
            let elapsed = started.elapsed();
            elapsed < Duration::from_secs(90)
                && (elapsed < Duration::from_secs(10) || claimed.lock().unwrap().len() < WANTED)
        }
    };
    let flipper = {
        let (c, pool, racing) = (c.clone(), pool.id.clone(), racing.clone());
        tokio::spawn(async move {
            let mut round = 0u64;
            while racing() {
                let n = if round.is_multiple_of(2) { 2 } else { 8 };
                // A rollout every 10 s: a generation must have time to become ready before the next replaces it.
                let memory_mb = if (round / 10).is_multiple_of(2) { Some(256) } else { Some(512) };
                let patch = WarmPoolPatch {
                    min_ready: Some(n),
                    resources: Some(Resources { memory_mb, ..Default::default() }),
                    ..Default::default()
                };
                c.update_pool(&pool, &patch).await.unwrap();
                round += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (c, pool, claimed, racing) = (c.clone(), pool.id.clone(), claimed.clone(), racing.clone());
            tokio::spawn(async move {
                while racing() {
                    match c.create_sandbox(&require(&pool, 500)).await {
                        Ok(s) => claimed.lock().unwrap().push(s.id),
                        Err(e) => assert_eq!(e.code(), Some("warm_pool_unavailable"), "{e}"),
                    }
                }
            })
        })
        .collect();
    for t in clients {
        t.await.unwrap();
    }
    flipper.await.unwrap();
    let ids = claimed.lock().unwrap().clone();
    // Enough claims raced the flips to mean something, even on a loaded host (a cold CI run on 2 cores sees
    // 7–14 in 90 s; an idle host reaches 20 sooner).
    assert!(ids.len() >= WANTED / 4, "only {} checkouts succeeded in {:?}", ids.len(), started.elapsed());
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len(), "no sandbox was handed out twice");
    // A second later, every one of them is still there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    nothing_lost(&c, &ids).await;
    let status = c.pool_status(&pool.id).await.unwrap();
    assert_eq!(status.failed, 0, "scale-downs and rollouts are not failures: {status:?}");
    eprintln!("claims racing scale-downs and rollouts: {} checkouts, 0 lost", ids.len());
    nothing_leaked(&c, &data).await;
}

/// `kill -9` of the server at several points of a fill (just after the pool was created, while its sandboxes are
/// warming, right as they become ready): after a restart the pool converges and exactly its sandboxes run.
#[tokio::test]
async fn kill9_during_a_fill_leaks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let mut server = ServerProcess::start(&data, &[]);
    build(&server.client, &template("fill", 2.0)).await;
    let pool = server.client.create_pool(&pool_spec("fill", "fill:stable", 12, 12)).await.unwrap();
    for kill_after in [Duration::from_millis(100), Duration::from_millis(1000), Duration::from_millis(2100)] {
        tokio::time::sleep(kill_after).await;
        server.kill9();
        server = ServerProcess::start(&data, &[]);
        let status =
            wait_status(&server.client, &pool.id, "12 ready", |s| s.ready == 12 && s.warming == 0).await;
        assert_eq!(status.failed, 0, "a crash is not the sandboxes' failure: {status:?}");
        wait_until("exactly 12 sandboxes to run", Duration::from_secs(15), || {
            running_sandboxes(&data).len() == 12
        });
        let owned = server.client.list_sandboxes().await.unwrap();
        assert!(owned.is_empty(), "inventory is nobody's until checked out: {owned:?}");
        let dirs: std::collections::BTreeSet<String> = sandbox_dirs(&data).into_iter().collect();
        assert_eq!(dirs, running_sandboxes(&data), "one directory per running sandbox, no more");
        let cgroups: std::collections::BTreeSet<String> =
            cgroups_of(&sandbox_dirs(&data)).into_iter().collect();
        assert_eq!(cgroups, dirs, "each running sandbox has its cgroup");
        eprintln!("kill -9 after {kill_after:?}: converged to 12 ready, 12 procd, 12 directories");
        // Refill from scratch for the next kill point.
        server
            .client
            .update_pool(
                &pool.id,
                &WarmPoolPatch { min_ready: Some(0), max_ready: Some(12), ..Default::default() },
            )
            .await
            .unwrap();
        wait_status(&server.client, &pool.id, "empty", |s| s.ready + s.warming + s.draining == 0).await;
        wait_until("procd processes to go", Duration::from_secs(15), || procd_pids(&data).is_empty());
        server
            .client
            .update_pool(&pool.id, &WarmPoolPatch { min_ready: Some(12), ..Default::default() })
            .await
            .unwrap();
    }
    nothing_leaked(&server.client, &data).await;
}

/// A ready sandbox whose readiness stops passing leaves `ready` at once: no checkout gets it, it counts as failed,
/// and the pool refills once readiness can pass again. Readiness here is "the test's listener on the host answers"
/// (reached through the sandbox network's gateway), so the test can take it away from all sandboxes at once.
#[tokio::test]
async fn readiness_lost_while_ready_is_never_handed_out() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    // Readiness is a file the test controls: sandboxes without an image see the host's /etc, read-only (they
    // reach no host port, so a listener on the host cannot be the gate).
    let gate = Gate(Path::new("/etc").join(format!("warmpool-gate-{}", std::process::id())));
    std::fs::write(&gate.0, b"open").unwrap();
    let server = ServerProcess::start(&data, &[]);
    let c = server.client.clone();
    let mut spec = template("flaky", 0.0);
    spec.readiness = Some(
        serde_json::from_value(serde_json::json!({
            "exec": {"command": ["test", "-f", gate.0]}, "timeout_ms": 30000, "period_ms": 100
        }))
        .unwrap(),
    );
    build(&c, &spec).await;
    let pool = c.create_pool(&pool_spec("flaky", "flaky:stable", 3, 3)).await.unwrap();
    wait_status(&c, &pool.id, "3 ready", |s| s.ready == 3).await;

    std::fs::remove_file(&gate.0).unwrap();
    // A sandbox leaves `ready` first and is counted failed just after (two writes): wait for both.
    wait_status(&c, &pool.id, "no ready sandbox, 3 failed", |s| s.ready == 0 && s.failed >= 3).await;
    for _ in 0..6 {
        let err = c.create_sandbox(&require(&pool.id, 0)).await.unwrap_err();
        assert_eq!(err.code(), Some("warm_pool_unavailable"), "an unready sandbox was handed out: {err}");
    }
    std::fs::write(&gate.0, b"open").unwrap();
    c.pool_action(&pool.id, "reconcile").await.unwrap();
    wait_status(&c, &pool.id, "3 ready again", |s| s.ready == 3).await;
    let s = c.create_sandbox(&require(&pool.id, 0)).await.unwrap();
    let r = c.probe(&s.id, ProbeKind::Readiness).await.unwrap();
    assert_eq!(r.status, ProbeStatus::Passed, "{r:?}");
    nothing_leaked(&c, &data).await;
}

/// A file that is removed when the test ends, pass or fail.
struct Gate(std::path::PathBuf);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Scale-down during warm-up, drain and delete are deliberate: `failed` stays 0 and the breaker never trips.
#[tokio::test]
async fn deliberate_stops_are_not_failures() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let server = ServerProcess::start(&data, &[]);
    let c = server.client.clone();
    build(&c, &template("calm", 2.0)).await;
    let pool = c.create_pool(&pool_spec("calm", "calm:stable", 5, 5)).await.unwrap();
    wait_status(&c, &pool.id, "5 warming", |s| s.warming == 5).await;
    c.update_pool(&pool.id, &WarmPoolPatch { min_ready: Some(0), ..Default::default() }).await.unwrap();
    wait_status(&c, &pool.id, "nothing warming", |s| s.warming + s.draining == 0).await;
    c.update_pool(&pool.id, &WarmPoolPatch { min_ready: Some(5), ..Default::default() }).await.unwrap();
    let status = wait_status(&c, &pool.id, "5 ready", |s| s.ready == 5).await;
    assert_eq!(status.failed, 0, "{status:?}");
    assert!(!status.degraded_reasons.contains(&DegradedReason::ArtifactPrewarmFailed), "{status:?}");
    c.pool_action(&pool.id, "drain").await.unwrap();
    let status = wait_status(&c, &pool.id, "drained", |s| s.ready + s.warming + s.draining == 0).await;
    assert_eq!(status.failed, 0, "a drain is not a failure: {status:?}");
    nothing_leaked(&c, &data).await;
}

/// Exec: a command that cannot start names `command` or `cwd`; output over 8 MiB is cut and flagged, not lost.
#[tokio::test]
async fn exec_limits_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let server = ServerProcess::start(&data, &[]);
    let c = server.client.clone();
    build(&c, &template("exec", 0.0)).await;
    let s = c.create_sandbox(&cold("exec:stable")).await.unwrap();
    let exec = |command: &[&str], cwd: Option<&str>| ExecRequest {
        command: command.iter().map(|s| s.to_string()).collect(),
        cwd: cwd.map(Into::into),
        ..Default::default()
    };
    for (req, field) in [
        (exec(&["no-such-command"], None), "command"),
        (exec(&["./built.txt"], None), "command"),
        (exec(&["true"], Some("no/such/dir")), "cwd"),
    ] {
        let err = c.exec(&s.id, &req).await.unwrap_err();
        let warmpool_client::Error::Api { status, code, details, message } = err else { panic!("{err}") };
        assert_eq!(
            (status, code.as_str(), details["field"].as_str()),
            (400, "invalid_request", Some(field)),
            "{message}"
        );
        assert!(!message.contains(data.to_str().unwrap()), "the host path is not shown: {message}");
    }
    let r = c
        .exec(&s.id, &exec(&["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' a; echo done >&2"], None))
        .await
        .unwrap();
    assert_eq!((r.stdout.len(), r.stdout_truncated), (8 << 20, true));
    assert_eq!((r.stderr.as_str(), r.stderr_truncated, r.exit_code), ("done\n", false, 0));
    nothing_leaked(&c, &data).await;
}

/// The database file is the owner's only and holds no procd token.
#[tokio::test]
async fn secrets_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let server = ServerProcess::start(&data, &[]);
    let c = server.client.clone();
    build(&c, &template("sec", 0.0)).await;
    let s = c.create_sandbox(&cold("sec:stable")).await.unwrap();
    for file in ["warmpool.db", "admin.token", "secret.key"] {
        let mode = std::fs::metadata(data.join(file)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file}");
    }
    let token = std::fs::read_to_string(data.join("sandboxes").join(&s.id).join("config/token")).unwrap();
    let mut db = std::fs::read(data.join("warmpool.db")).unwrap();
    db.extend(std::fs::read(data.join("warmpool.db-wal")).unwrap_or_default());
    let needle = token.trim().as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle), "the procd token is stored in the database");
    nothing_leaked(&c, &data).await;
}

/// A tmpfs data dir.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status();
        assert!(ok.is_ok_and(|s| s.success()), "mounting a tmpfs needs root");
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        kill_all_under(&self.0);
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A full disk: writes answer `503 service_unavailable`, `/readyz` is 503, a delete leaves the sandbox running
/// (nothing half-done), and everything works again once space is freed, without a restart.
#[tokio::test]
async fn a_full_disk_answers_503_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let tmpfs = Tmpfs::mount(&data, "48m");
    // The data dir itself fills here (a disk too small for the sandboxes' layers filesystem).
    let server = ServerProcess::start(&data, &["--allow-unlimited-disk"]);
    let c = server.client.clone();
    build(&c, &template("disk", 0.0)).await;
    let s = c.create_sandbox(&cold("disk:stable")).await.unwrap();

    let filler = data.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "count=64"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut answered_503 = false;
    for i in 0..200 {
        match c.create_template(&template(&format!("t{i}"), 0.0)).await {
            Ok(_) => continue,
            Err(warmpool_client::Error::Api { status, code, message, .. }) => {
                assert_eq!((status, code.as_str()), (503, "service_unavailable"), "{message}");
                assert!(message.contains("disk is full"), "{message}");
                answered_503 = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(answered_503, "writes kept succeeding on a full disk");
    let readyz = reqwest::get(format!("{}/readyz", server.url)).await.unwrap();
    assert_eq!(readyz.status().as_u16(), 503);
    let err = c.delete_sandbox(&s.id).await.unwrap_err();
    assert_eq!(err.code(), Some("service_unavailable"), "{err}");
    assert_eq!(c.get_sandbox(&s.id).await.unwrap().state, SandboxState::Running, "nothing was half-done");
    let r = c.exec(&s.id, &ExecRequest { command: vec!["true".into()], ..Default::default() }).await.unwrap();
    assert_eq!(r.exit_code, 0, "procd was not stopped");

    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !reqwest::get(format!("{}/readyz", server.url)).await.unwrap().status().is_success() {
        assert!(Instant::now() < deadline, "/readyz did not recover once space was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.create_template(&template("after", 0.0)).await.unwrap();
    nothing_leaked(&c, &data).await;
    drop(server);
    drop(tmpfs);
}
