//! Attacks on the server's channel to procd and on what procd does for the server: a sandbox that replaces or
//! redirects its procd socket, floods its log, has its procd frozen, or starts commands that should outlive their
//! caller. Each attack is tried for real and must be refused.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::time::{Duration, Instant};

use warmpool_api::*;
use warmpool_client::Client;

use super::account;
use crate::*;

/// procd's host pid for sandbox `id` (PID 1 of its container).
fn procd_pid(data: &Path, id: &str) -> i32 {
    let c = running_containers(data).into_iter().find(|c| c.id == id).expect("the sandbox's container runs");
    c.pid.expect("procd's pid") as i32
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on procd of a sandbox this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signalling {pid}");
}

/// Resident memory of a process in KiB (`VmRSS`).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many processes in sandbox `id` run exactly `cmdline` (arguments joined by spaces).
async fn running(c: &Client, id: &str, cmdline: &str) -> usize {
    let script = "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null; echo; done";
    sh(c, id, script).await.stdout.lines().filter(|l| l.trim_end() == cmdline).count()
}

/// A sandbox rewrites `/run/warmpool` (the old socket directory) into symlinks to another account's procd socket;
/// after a server restart the server still reaches each sandbox's own procd and no other. Nothing of the channel
/// is visible inside: no socket under `/run/warmpool`, none inherited by commands.
#[tokio::test]
async fn a_sandbox_cannot_replace_or_redirect_its_procd_channel() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let _cleanup = KillOnDrop(data.clone());
    let mut server = ServerProcess::start(&data, &[]);
    let (victim_token, attacker_token) =
        (account(&server, "victim").await.1, account(&server, "attacker").await.1);
    let victim_c = Client::new(&server.url, Some(victim_token.clone())).unwrap();
    let attacker_c = Client::new(&server.url, Some(attacker_token.clone())).unwrap();
    build(&victim_c, &template("box", 0.0)).await;
    build(&attacker_c, &template("box", 0.0)).await;
    let victim = victim_c.create_sandbox(&cold("box:stable")).await.unwrap();
    let attacker = attacker_c.create_sandbox(&cold("box:stable")).await.unwrap();

    let victim_socket =
        data.canonicalize().unwrap().join("sandboxes").join(&victim.id).join("run/procd.sock");
    let own_socket = data.canonicalize().unwrap().join("sandboxes").join(&attacker.id).join("run/procd.sock");
    assert!(std::fs::symlink_metadata(&own_socket).unwrap().file_type().is_socket());
    let r = sh(&attacker_c, &attacker.id, "ls -A /run/warmpool; ls -l /proc/$$/fd").await;
    assert!(!r.stdout.contains("procd.sock") && !r.stdout.contains("socket:"), "{}", r.stdout);
    let r = sh(&attacker_c, &attacker.id, &format!("test -e {}", own_socket.display())).await;
    assert_ne!(r.exit_code, 0, "the host socket is visible in the sandbox");

    // Every redirection the old layout allowed: the socket, then the whole directory, pointing at the victim's.
    let r = sh(
        &attacker_c,
        &attacker.id,
        &format!(
            "mkdir -p /run/warmpool && rm -f /run/warmpool/procd.sock && ln -s {} /run/warmpool/procd.sock",
            victim_socket.display()
        ),
    )
    .await;
    assert_eq!(r.exit_code, 0, "the sandbox may scribble on its own /run: {}", r.stderr);
    // (Where /run/warmpool is a mount point this step fails, which is fine: the first one already redirected.)
    let swap =
        format!("rm -rf /run/warmpool && ln -s {} /run/warmpool", victim_socket.parent().unwrap().display());
    sh(&attacker_c, &attacker.id, &swap).await;

    server.kill9();
    let server = ServerProcess::start(&data, &[]);
    let hostname = |c: Client, id: SandboxId| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match c.exec(&id, &ExecRequest { command: vec!["hostname".into()], ..Default::default() }).await {
                Ok(r) => return r.stdout.trim().to_string(),
                Err(e) => assert!(Instant::now() < deadline, "exec after the restart: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let attacker_c = Client::new(&server.url, Some(attacker_token)).unwrap();
    let victim_c = Client::new(&server.url, Some(victim_token)).unwrap();
    assert_eq!(hostname(attacker_c.clone(), attacker.id.clone()).await, attacker.id, "reached another procd");
    assert_eq!(hostname(victim_c.clone(), victim.id.clone()).await, victim.id);
    assert!(
        std::fs::symlink_metadata(&own_socket).unwrap().file_type().is_socket(),
        "the host socket changed"
    );
    attacker_c.delete_sandbox(&attacker.id).await.unwrap();
    victim_c.delete_sandbox(&victim.id).await.unwrap();
    wait_no_procd(&data);
}

/// A warm process writing as fast as it can: procd's log and its rotation stay near the bound, and reading the
/// logs does not grow the server.
#[tokio::test]
async fn a_log_flood_stays_bounded_and_reading_it_keeps_the_server_small() {
    const BOUND: u64 = 8 << 20;
    let server = TempServer::start(&["--sandbox-log-bytes", &BOUND.to_string()]);
    let data = server.data_dir.clone();
    let c = server.client.clone();
    let mut spec = template("flood", 0.0);
    spec.start_cmd = Some(format!("touch ready-$WARMPOOL_SANDBOX_ID; exec yes {}", "x".repeat(200)));
    build(&c, &spec).await;
    let s = c.create_sandbox(&cold("flood:stable")).await.unwrap();
    let dir = data.join("sandboxes").join(&s.id);
    let size = |name: &str| std::fs::metadata(dir.join(name)).map(|m| m.len()).unwrap_or(0);

    let started = Instant::now();
    let (mut largest, mut rotations, mut last_rotated) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(8) {
        largest = largest.max(size("procd.log") + size("procd.log.1"));
        let rotated = std::fs::metadata(dir.join("procd.log.1")).and_then(|m| m.modified()).ok();
        let stamp = rotated.map_or(0, |t| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos());
        if stamp != last_rotated {
            (rotations, last_rotated) = (rotations + 1, stamp);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("log flood: largest procd.log + procd.log.1 = {largest} bytes, {rotations} rotations in 8 s");
    assert!(rotations >= 2, "the flood never filled the log ({rotations} rotations, largest {largest})");
    // The slack is what a flood writes before a look rotates it (a busy host delays the looks).
    assert!(largest <= BOUND + BOUND / 2, "the log reached {largest} bytes (bound {BOUND})");

    let pid = server.child.id();
    let before = rss_kib(pid);
    let mut peak = before;
    for tail in [None, Some(100_000), None, Some(100_000)] {
        let lines = match tail {
            Some(n) => c.logs_tail(&s.id, n).await.unwrap(),
            None => c.logs(&s.id).await.unwrap(),
        };
        assert!(!lines.is_empty() && lines.len() <= tail.unwrap_or(1000) as usize, "{} lines", lines.len());
        assert!(lines.last().unwrap().data.starts_with("xxxx"), "{:?}", lines.last());
        peak = peak.max(rss_kib(pid));
    }
    eprintln!("server RSS: {before} KiB before 4 log reads, peak {peak} KiB");
    assert!(peak < before + 64 * 1024, "the server grew from {before} KiB to {peak} KiB reading logs");
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&data);
}

/// A ready pool sandbox whose procd is stopped (SIGSTOP) leaves `ready` within seconds and no checkout gets it.
#[tokio::test]
async fn a_frozen_procd_leaves_ready_and_is_never_handed_out() {
    let server = TempServer::start(&[]);
    let data = server.data_dir.clone();
    let c = server.client.clone();
    build(&c, &template("frozen", 0.0)).await;
    let pool = c.create_pool(&pool_spec("frozen", "frozen:stable", 2, 2)).await.unwrap();
    wait_status(&c, &pool.id, "2 ready", |s| s.ready == 2).await;
    let frozen = running_sandboxes(&data).into_iter().next().unwrap();
    signal(procd_pid(&data, &frozen), libc::SIGSTOP);
    let stopped = Instant::now();
    let status = wait_status(&c, &pool.id, "a failed sandbox", |s| s.failed >= 1).await;
    eprintln!("a frozen procd left ready after {:?}", stopped.elapsed());
    assert!(stopped.elapsed() < Duration::from_secs(15), "left ready only after {:?}", stopped.elapsed());
    assert!(status.ready <= 1, "{status:?}");
    for _ in 0..2 {
        let s = c.create_sandbox(&require(&pool.id, 60_000)).await.unwrap();
        assert_ne!(s.id, frozen, "a sandbox whose procd is frozen was handed out");
        assert_eq!(sh(&c, &s.id, "hostname").await.stdout.trim(), s.id);
        c.delete_sandbox(&s.id).await.unwrap();
    }
    c.pool_action(&pool.id, "drain").await.unwrap();
    wait_status(&c, &pool.id, "drained", |s| s.ready + s.warming + s.draining == 0).await;
    wait_no_procd(&data);
}

/// An exec on a claimed sandbox whose procd is frozen answers an error within its timeout plus the grace, and
/// the channel works again once procd does.
#[tokio::test]
async fn an_exec_on_a_frozen_procd_answers_within_its_bound() {
    let server = TempServer::start(&[]);
    let data = server.data_dir.clone();
    let c = server.client.clone();
    build(&c, &template("stuck", 0.0)).await;
    let s = c.create_sandbox(&cold("stuck:stable")).await.unwrap();
    let pid = procd_pid(&data, &s.id);
    signal(pid, libc::SIGSTOP);
    let req = ExecRequest { command: vec!["true".into()], timeout_ms: Some(2000), ..Default::default() };
    let started = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(30), c.exec(&s.id, &req)).await;
    let took = started.elapsed();
    eprintln!("exec on a frozen procd answered after {took:?}: {answer:?}");
    let err = answer.expect("the exec never answered").expect_err("a frozen procd ran a command");
    assert!(err.code().is_some(), "{err}");
    assert!(took < Duration::from_secs(2 + 5 + 3), "answered after {took:?}");
    signal(pid, libc::SIGCONT);
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.exec(&s.id, &req).await.is_err() {
        assert!(Instant::now() < deadline, "procd never answered again after SIGCONT");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&data);
}

/// A command ends when its caller goes away: dropping the HTTP request kills it in the sandbox.
#[tokio::test]
async fn an_exec_is_killed_when_its_client_disconnects() {
    let server = TempServer::start(&[]);
    let data = server.data_dir.clone();
    let c = server.client.clone();
    build(&c, &template("hangup", 0.0)).await;
    let s = c.create_sandbox(&cold("hangup:stable")).await.unwrap();
    let req = ExecRequest {
        command: vec!["sleep".into(), "987654".into()],
        timeout_ms: Some(3_600_000),
        ..Default::default()
    };
    let call = tokio::spawn({
        let (c, id) = (c.clone(), s.id.clone());
        async move { c.exec(&id, &req).await }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while running(&c, &s.id, "sleep 987654").await == 0 {
        assert!(Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    call.abort();
    let hung_up = Instant::now();
    while running(&c, &s.id, "sleep 987654").await > 0 {
        assert!(hung_up.elapsed() < Duration::from_secs(10), "the command outlived its caller");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the command was gone {:?} after its caller", hung_up.elapsed());
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&data);
}

/// `timeout_ms` over 24 h and a `tail` that is not a line count, or too many, are refused naming the field.
#[tokio::test]
async fn exec_and_log_bounds_are_refused() {
    let server = TempServer::start(&[]);
    let data = server.data_dir.clone();
    let c = server.client.clone();
    build(&c, &template("bounds", 0.0)).await;
    let s = c.create_sandbox(&cold("bounds:stable")).await.unwrap();
    let exec = |timeout_ms| ExecRequest { command: vec!["true".into()], timeout_ms, ..Default::default() };
    let err = c.exec(&s.id, &exec(Some(EXEC_TIMEOUT_MAX_MS + 1))).await.unwrap_err();
    let warmpool_client::Error::Api { status, code, details, .. } = err else { panic!("{err}") };
    assert_eq!(
        (status, code.as_str(), details["field"].as_str()),
        (400, "invalid_request", Some("timeout_ms"))
    );
    assert_eq!(c.exec(&s.id, &exec(Some(EXEC_TIMEOUT_MAX_MS))).await.unwrap().exit_code, 0);

    let http = reqwest::Client::new();
    for tail in ["abc", "100001", "-1"] {
        let r = http
            .get(format!("{}/v1/sandboxes/{}/logs?tail={tail}", server.url.trim_end_matches('/'), s.id))
            .bearer_auth(server.token())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "tail={tail}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["details"]["field"], "tail", "{body}");
    }
    c.delete_sandbox(&s.id).await.unwrap();
    wait_no_procd(&data);
}
