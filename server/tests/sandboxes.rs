//! Builds and sandboxes on the local runtime: real builds, real procd, exec, probes, logs, delete, timeouts.

use std::time::Duration;

use warmpool_api::*;

use crate::harness::*;

#[tokio::test]
async fn build_runs_steps_and_start_contract_then_sandbox_exec_and_delete() {
    let cp = TestControlPlane::start().await;
    let (t, build) = cp.ready_template("api").await;
    assert!(t.id.starts_with("tpl_") && build.id.starts_with("bld_"));
    let tags = cp.client.list_tags("api").await.unwrap();
    assert_eq!((tags[0].name.as_str(), tags[0].build_id.as_str()), ("stable", build.id.as_str()));
    let log = cp.client.build_logs(&build.id).await.unwrap();
    assert!(log.contains("step 1 of 1") && log.contains("readiness passed"), "{log}");

    let s = cp.client.create_sandbox(&cold("api:stable")).await.unwrap();
    assert_eq!(s.state, SandboxState::Running);
    assert!(s.warm_pool_checkout.is_none(), "no pool was considered");
    let r = run(
        &cp.client,
        &s.id,
        &["sh", "-c", "echo hi; cat built.txt; echo $MODE; echo ${ONLY_AT_BUILD:-unset}"],
    )
    .await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "hi\nbuilt\nwarm\nunset\n"), "{r:?}");
    if cp.client.readyz().await.unwrap()["runtime"]["namespaces"] == true {
        let r = run(&cp.client, &s.id, &["sh", "-c", "hostname; echo $$"]).await;
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines[0], s.id, "own uts namespace named after the sandbox");
        assert!(lines[1].parse::<u32>().unwrap() < 100, "own pid namespace: {r:?}");
    }
    let r = cp
        .client
        .exec(
            &s.id,
            &ExecRequest {
                command: vec!["sleep".into(), "5".into()],
                timeout_ms: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(r.timed_out);
    let r = run(&cp.client, &s.id, &["sh", "-c", "exit 7"]).await;
    assert_eq!(r.exit_code, 7);

    let ready = cp.client.probe(&s.id, ProbeKind::Readiness).await.unwrap();
    assert_eq!(ready.status, ProbeStatus::Passed);
    assert_eq!(ready.checks[0].name, "procd");
    assert_eq!(ready.checks[1].name, START_PROCESS);

    let dir = cp.dir.path().join("sandboxes").join(&s.id);
    assert!(
        cp.dir.path().join("layers/sandboxes").join(&s.id).join("upper/workspace/ready.flag").exists(),
        "what a sandbox writes lands in its own upper layer"
    );
    assert!(cp.procd_count() >= 1);
    cp.client.delete_sandbox(&s.id).await.unwrap();
    assert!(!dir.exists(), "the sandbox directory is removed");
    assert_eq!(cp.procd_count(), 0, "no procd left");
    assert_eq!(cp.client.get_sandbox(&s.id).await.unwrap_err().code(), Some("not_found"));
}

#[tokio::test]
async fn a_start_contract_that_never_passes_fails_the_build_with_the_probe_message() {
    let cp = TestControlPlane::start().await;
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": "broken",
        "start_cmd": "exec sleep infinity",
        "readiness": {"exec": {"command": ["test", "-f", "never.flag"]}, "timeout_ms": 1500}
    }))
    .unwrap();
    cp.client.create_template(&spec).await.unwrap();
    let b = cp.build("broken", &["stable"]).await;
    assert_eq!(b.status, BuildStatus::Failed);
    let error = b.error.unwrap();
    assert!(error.contains("readiness did not pass") && error.contains("never.flag"), "{error}");
    assert!(cp.client.list_tags("broken").await.unwrap().is_empty(), "tags move only to ready builds");
    let err = cp.client.create_sandbox(&cold("broken")).await.unwrap_err();
    assert_eq!(err.code(), Some("conflict"));

    let failing_step: TemplateSpec = serde_json::from_value(
        serde_json::json!({"name": "badstep", "build": {"steps": ["echo nope >&2; exit 4"]}}),
    )
    .unwrap();
    cp.client.create_template(&failing_step).await.unwrap();
    let b = cp.build("badstep", &[]).await;
    assert_eq!(b.status, BuildStatus::Failed);
    assert!(b.error.as_deref().unwrap().contains("exited with code 4"));
    assert!(cp.client.build_logs(&b.id).await.unwrap().contains("nope"));
    assert_eq!(cp.procd_count(), 0);
}

#[tokio::test]
async fn warm_processes_logs_and_probes_reach_the_api() {
    let cp = TestControlPlane::start().await;
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": "talky",
        "start_cmd": "echo started; exec sleep infinity",
        "warm_processes": [{"name": "agent", "type": "cmd", "alias": "a", "command": ["sh", "-c", "echo agent-up; pwd; exec sleep infinity"], "cwd": "/work"}]
    }))
    .unwrap();
    cp.client.create_template(&spec).await.unwrap();
    assert_eq!(cp.build("talky", &[]).await.status, BuildStatus::Ready);
    let s = cp.client.create_sandbox(&cold("talky")).await.unwrap();
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = cp.client.logs(&s.id).await.unwrap();
        if lines.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(lines.iter().any(|l| l.process == "start" && l.data == "started"), "{lines:?}");
    assert!(lines
        .iter()
        .any(|l| l.process == "agent" && l.alias.as_deref() == Some("a") && l.data == "agent-up"));
    assert!(
        lines.iter().any(|l| l.process == "agent" && l.data == "/work"),
        "an absolute cwd means what it says: {lines:?}"
    );
    let live = cp.client.probe(&s.id, ProbeKind::Liveness).await.unwrap();
    assert_eq!(live.checks.len(), 3);
    cp.client.delete_sandbox(&s.id).await.unwrap();
}

/// The log mirror is set where users set things, in the template's env: off, or lines cut shorter.
#[tokio::test]
async fn the_templates_env_sets_the_log_mirror() {
    let cp = TestControlPlane::start().await;
    for (name, env) in
        [("quiet", ("SANDBOX0_PROCESS_LOGS", "false")), ("short", ("SANDBOX0_PROCESS_LOG_MAX_BYTES", "5"))]
    {
        let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "start_cmd": "echo 0123456789; touch /tmp/said; exec sleep infinity",
            "readiness": {"exec": {"command": ["test", "-f", "/tmp/said"]}},
            "env": {env.0: env.1},
        }))
        .unwrap();
        cp.client.create_template(&spec).await.unwrap();
        assert_eq!(cp.build(name, &[]).await.status, BuildStatus::Ready);
    }
    let short = cp.client.create_sandbox(&cold("short")).await.unwrap();
    let quiet = cp.client.create_sandbox(&cold("quiet")).await.unwrap();
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = cp.client.logs(&short.id).await.unwrap();
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.iter().map(|l| l.data.as_str()).collect::<Vec<_>>(), ["01234"], "{lines:?}");
    // By now the quiet one has said its line too (its readiness needed it), but nothing was mirrored.
    assert_eq!(cp.client.logs(&quiet.id).await.unwrap(), Vec::new());
}

#[tokio::test]
async fn timeout_policy_destroys_the_sandbox() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("api").await;
    let s = cp
        .client
        .create_sandbox(&SandboxCreate {
            template: Some("api".into()),
            timeout_policy: Some(TimeoutPolicy { timeout_seconds: 1, action: TimeoutAction::Destroy }),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(s.expires_at.is_some());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cp.client.get_sandbox(&s.id).await.is_ok() {
        assert!(std::time::Instant::now() < deadline, "sandbox was not destroyed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_no_procd(cp.dir.path());
}

#[tokio::test]
async fn a_sandbox_whose_procd_dies_becomes_failed() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("api").await;
    let s = cp.client.create_sandbox(&cold("api")).await.unwrap();
    // procd (the container's PID 1) is killed from the host.
    let pid = procd_pids(cp.dir.path())[0];
    // SAFETY: kill(2) on the test's own sandbox's procd.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let got = cp.client.get_sandbox(&s.id).await.unwrap();
        if got.state == SandboxState::Failed {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
