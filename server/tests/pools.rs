//! Warm pools end to end on the local runtime: fill and checkouts of real sandboxes, prewarm failures with their
//! real output, degraded reasons from real builds, metrics. The domain's rules (modes, leases, rollouts,
//! disable/drain, expiry, races, recovery) are tested on the simulated runtime in `domain/`.

use std::collections::HashSet;
use std::time::Duration;

use warmpool_api::*;

use crate::harness::*;

/// A template whose sandboxes take five seconds to start (its build starts at once: the build's id is bld_…), so a
/// pool cannot refill between quick requests. The readiness flag is named after the sandbox: the artifact keeps
/// the build's own flag, which must not make a sandbox ready early.
fn slow_template(name: &str) -> TemplateSpec {
    let mut spec = quick_template(name);
    spec.start_cmd = Some(
        "case $WARMPOOL_SANDBOX_ID in bld_*) ;; *) sleep 5;; esac; touch ready.$WARMPOOL_SANDBOX_ID; exec sleep infinity"
            .into(),
    );
    spec.readiness = Some(
        serde_json::from_value(serde_json::json!({
            "exec": {"command": ["sh", "-c", "test -f ready.$WARMPOOL_SANDBOX_ID"]}, "timeout_ms": 20000
        }))
        .unwrap(),
    );
    spec
}

fn checkout(pool: &str, mode: CheckoutMode, wait_ms: u64) -> SandboxCreate {
    SandboxCreate {
        warm_pool: Some(pool.into()),
        warm_pool_mode: Some(mode),
        warm_pool_wait_ms: Some(wait_ms),
        ..Default::default()
    }
}

#[tokio::test]
async fn fill_checkout_modes_and_fallbacks() {
    let cp = TestControlPlane::start().await;
    cp.client.create_template(&slow_template("api")).await.unwrap();
    assert_eq!(cp.build("api", &["stable"]).await.status, BuildStatus::Ready);
    let pool = cp.client.create_pool(&pool_spec("api", "api:stable", 3, 5)).await.unwrap();
    assert!(pool.id.starts_with("twp_"));
    assert_eq!(pool.version_policy, VersionPolicy::TrackTag, "a tagged ref tracks its tag by default");
    let status = cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    assert_eq!((status.target, status.unavailable), (3, 0));
    assert!(status.last_reconciled_at.is_some());

    let mut ids = HashSet::new();
    for _ in 0..3 {
        let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap();
        let co = s.warm_pool_checkout.clone().unwrap();
        assert_eq!(
            (co.source, co.hit, co.mode, co.id.as_str()),
            (CheckoutSource::WarmPool, true, CheckoutMode::Require, pool.id.as_str())
        );
        assert_eq!(s.state, SandboxState::Running);
        ids.insert(s.id);
    }
    assert_eq!(ids.len(), 3);

    let err = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap_err();
    let warmpool_client::Error::Api { status, code, details, .. } = err else { panic!("{err}") };
    assert_eq!(
        (status, code.as_str(), details["reason"].as_str()),
        (503, "warm_pool_unavailable", Some("no_ready_inventory"))
    );
    for id in &ids {
        let r = run(&cp.client, id, &["cat", "built.txt"]).await;
        assert_eq!(r.stdout, "built\n");
    }

    // Down to one: refills in flight beyond it are stopped, and a waiting checkout gets the next ready one.
    cp.client
        .update_pool(
            &pool.id,
            &WarmPoolPatch { min_ready: Some(1), max_ready: Some(1), ..Default::default() },
        )
        .await
        .unwrap();
    // With a wait, the refilled sandbox is handed out as soon as it is ready.
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 20_000)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert!(co.hit && co.waited_ms > 0, "{co:?}");

    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Prefer, 0)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert_eq!(
        (co.source, co.hit, co.fallback_reason),
        (CheckoutSource::Cold, false, Some(FallbackReason::NoReadyInventory))
    );
    assert_eq!(s.state, SandboxState::Running);

    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Bypass, 0)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert_eq!((co.source, co.fallback_reason), (CheckoutSource::Cold, Some(FallbackReason::Bypass)));

    // Unpoolable shapes: require fails naming the field, prefer goes cold.
    let mut req = checkout(&pool.id, CheckoutMode::Require, 0);
    req.envs = Some([("X".to_string(), "1".to_string())].into());
    let err = cp.client.create_sandbox(&req).await.unwrap_err();
    let warmpool_client::Error::Api { code, details, message, .. } = err else { panic!() };
    assert_eq!(
        (code.as_str(), details["field"].as_str(), details["reason"].as_str()),
        ("warm_pool_unavailable", Some("envs"), Some("unpoolable_shape"))
    );
    assert!(message.contains("envs"));
    req.warm_pool_mode = Some(CheckoutMode::Prefer);
    let s = cp.client.create_sandbox(&req).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::UnpoolableShape));
    let r = run(&cp.client, &s.id, &["sh", "-c", "echo $X"]).await;
    assert_eq!(r.stdout, "1\n", "envs reach the cold sandbox");
    // A desktop is unpoolable like the rest, whatever the runtime could do cold; prefer tries cold, and the
    // local runtime says it cannot.
    let mut req = checkout(&pool.id, CheckoutMode::Require, 0);
    req.desktop = Some(true);
    let err = cp.client.create_sandbox(&req).await.unwrap_err();
    let warmpool_client::Error::Api { code, details, .. } = err else { panic!() };
    assert_eq!((code.as_str(), details["field"].as_str()), ("warm_pool_unavailable", Some("desktop")));
    req.warm_pool_mode = Some(CheckoutMode::Prefer);
    let err = cp.client.create_sandbox(&req).await.unwrap_err();
    let warmpool_client::Error::Api { code, details, .. } = err else { panic!() };
    assert_eq!((code.as_str(), details["field"].as_str()), ("invalid_request", Some("desktop")));
    // Spelling out the default network keeps a request poolable.
    cp.wait_status(&pool.id, "a ready sandbox", |s| s.ready >= 1).await;
    let mut req = checkout(&pool.id, CheckoutMode::Require, 20_000);
    req.network = Some(NetworkPolicy { mode: NetworkMode::Isolated });
    let s = cp.client.create_sandbox(&req).await.unwrap();
    assert!(s.warm_pool_checkout.unwrap().hit);

    // The pool's default mode applies when the request names none.
    cp.client
        .update_pool(
            &pool.id,
            &WarmPoolPatch { checkout_policy: Some(CheckoutMode::Bypass), ..Default::default() },
        )
        .await
        .unwrap();
    let s = cp
        .client
        .create_sandbox(&SandboxCreate { warm_pool: Some("api".into()), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().mode, CheckoutMode::Bypass);

    let metrics = reqwest::get(format!("{}/metrics", cp.url)).await.unwrap().text().await.unwrap();
    // Summed over the other labels (`pool_name`, `fallback_reason`).
    let count = |mode: &str, source: &str| -> u64 {
        let labels =
            [format!("mode=\"{mode}\""), format!("pool=\"{}\"", pool.id), format!("source=\"{source}\"")];
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("warmpool_checkouts_total{") && labels.iter().all(|x| l.contains(x.as_str()))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(count("require", "warm_pool"), 5);
    assert_eq!(count("prefer", "warm_pool"), 0, "a cold start is never counted as a hit");
    assert_eq!(count("prefer", "cold"), 3, "the envs and desktop fallbacks");
    assert_eq!(count("bypass", "cold"), 2);
    assert!(metrics.contains("warmpool_pool_sandboxes{pool="));
    // Every start whole, and the local runtime's phases of it.
    for phase in ["total", "container", "network", "procd", "readiness"] {
        let needle = format!("warmpool_sandbox_start_seconds_count{{phase=\"{phase}\"}} ");
        assert!(metrics.contains(&needle), "no start time of phase {phase}");
    }
    assert!(metrics.contains("warmpool_checkout_seconds_bucket{source=\"warm_pool\""));
}

#[tokio::test]
async fn a_template_that_cannot_start_trips_artifact_prewarm_failed() {
    let cp = TestControlPlane::start().await;
    let mut spec = quick_template("flaky");
    // Starts in the build (WARMPOOL_SANDBOX_ID is the build id there), fails in every sandbox.
    spec.start_cmd = Some("case $WARMPOOL_SANDBOX_ID in bld_*) ;; *) echo cannot start here >&2; exit 1;; esac; touch ready.flag; exec sleep infinity".into());
    cp.client.create_template(&spec).await.unwrap();
    assert_eq!(cp.build("flaky", &["stable"]).await.status, BuildStatus::Ready);
    let pool = cp.client.create_pool(&pool_spec("flaky", "flaky:stable", 2, 2)).await.unwrap();
    let s = cp
        .wait_status(&pool.id, "prewarm failure", |s| {
            // Starts already in flight when it trips may still fail; wait for them to finish.
            s.degraded_reasons.contains(&DegradedReason::ArtifactPrewarmFailed) && s.warming == 0
        })
        .await;
    assert!(s.failed >= 3);
    assert!(s.last_failure_logs.as_deref().unwrap_or("").contains("cannot start here"), "{s:?}");
    // A wait stops at once, with the reason and the last failure's output, instead of running into its timeout.
    let started = std::time::Instant::now();
    let err = cp.client.wait_pool_ready(&pool.id, 2, Duration::from_secs(300), |_| {}).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
    let text = err.to_string();
    assert!(text.contains("artifact_prewarm_failed") && text.contains("cannot start here"), "{text}");
    // `warmpool pool status` shows the output too.
    let token = std::fs::read_to_string(cp.dir.path().join("admin.token")).unwrap();
    let args = ["pool", "status", &pool.id, "--endpoint", &cp.url, "--token", token.trim()].map(String::from);
    // Off the test's runtime, which serves the API the CLI calls.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_warmpool")).args(args).output().unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, output) = text.split_once('\n').expect("the output follows the status line");
    assert!(status.contains("degraded=[artifact_prewarm_failed"), "{text}");
    assert!(output.contains("\n  {") && output.contains("cannot start here"), "{text}");
    // Filling stops: once the starts in flight when it tripped are counted, the failure count stays put.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let settled = cp.client.pool_status(&pool.id).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = cp.client.pool_status(&pool.id).await.unwrap();
    assert_eq!((later.failed, later.warming), (settled.failed, 0));
    // `reconcile` lifts the stop (and it trips again).
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    cp.wait_status(&pool.id, "more attempts", |x| x.failed > settled.failed).await;
}

#[tokio::test]
async fn degraded_reasons_follow_real_conditions() {
    let cp = TestControlPlane::start_with(|a| a.reconciler = "off".into()).await;
    let mut spec = quick_template("later");
    spec.build.steps = vec!["sleep 2".into()];
    cp.client.create_template(&spec).await.unwrap();
    let pool = cp.client.create_pool(&pool_spec("later", "later:stable", 1, 1)).await.unwrap();
    let s = cp.client.pool_status(&pool.id).await.unwrap();
    assert!(s.degraded_reasons.contains(&DegradedReason::TemplateBuildUnavailable), "no build at all: {s:?}");
    assert!(s.degraded_reasons.contains(&DegradedReason::ControllerDisabled));
    let b = cp.client.create_build("later", &["stable".into()]).await.unwrap();
    let s = cp.client.pool_status(&pool.id).await.unwrap();
    assert!(s.degraded_reasons.contains(&DegradedReason::ArtifactNotReady), "{s:?}");
    cp.client.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let s = cp.client.pool_status(&pool.id).await.unwrap();
    assert!(!s.degraded_reasons.contains(&DegradedReason::ArtifactNotReady), "{s:?}");
    assert_eq!(s.ready, 0, "nothing fills without the reconciler");

    let quota = TestControlPlane::start().await;
    quota.ready_template("api").await;
    let acc = quota
        .client
        .create_account(&AccountCreate {
            name: "small".into(),
            quotas: Quotas { max_sandboxes: None, max_warm_sandboxes: Some(1) },
            ..Default::default()
        })
        .await
        .unwrap();
    let tok = quota.client.create_token(&TokenCreate { account_id: acc.id, name: None }).await.unwrap();
    let tenant = quota.client_with(Some(&tok.token));
    tenant.create_template(&quick_template("api")).await.unwrap();
    let b = tenant.create_build("api", &["stable".into()]).await.unwrap();
    tenant.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let pool = tenant.create_pool(&pool_spec("q", "api:stable", 3, 3)).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = tenant.pool_status(&pool.id).await.unwrap();
        if s.ready == 1 && s.degraded_reasons.contains(&DegradedReason::QuotaExceeded) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_failed_sandbox_is_logged_with_its_exit_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let _cleanup = KillOnDrop(tmp.path().to_path_buf());
    let data = tmp.path().join("data");
    let server = ServerProcess::start(&data, &["--allow-unlimited-disk"]);
    let mut spec = quick_template("quitter");
    // Sandboxes print a line and exit 5 once /tmp/quit exists (the build's check, bld_…, just stays up).
    spec.start_cmd = Some(
        "touch ready.flag; case $WARMPOOL_SANDBOX_ID in bld_*) exec sleep infinity;; esac; \
         while [ ! -f /tmp/quit ]; do sleep 0.1; done; echo quitter-last-words; exit 5"
            .into(),
    );
    server.client.create_template(&spec).await.unwrap();
    let b = server.client.create_build("quitter", &["stable".into()]).await.unwrap();
    let b = server.client.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
    let pool = server.client.create_pool(&pool_spec("quitter", "quitter:stable", 1, 1)).await.unwrap();
    server.client.wait_pool_ready(&pool.id, 1, Duration::from_secs(60), |_| {}).await.unwrap();
    let req = SandboxCreate {
        warm_pool: Some(pool.id.to_string()),
        warm_pool_mode: Some(CheckoutMode::Require),
        ..Default::default()
    };
    let sandbox = server.client.create_sandbox(&req).await.unwrap();
    let quit = ExecRequest { command: vec!["touch".into(), "/tmp/quit".into()], ..Default::default() };
    server.client.exec(&sandbox.id, &quit).await.unwrap();
    let log = data.with_extension("server.log");
    let failed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("Sandbox failed") && l.contains(sandbox.id.as_str()))
            .map(String::from)
    };
    wait_until("the sandbox to fail", Duration::from_secs(60), || failed().is_some());
    let line = failed().unwrap();
    assert!(
        line.contains("reason=procd exited: A warm process exited") && line.contains("process start, code 5"),
        "{line}"
    );
    assert!(line.contains("output=") && line.contains("quitter-last-words"), "{line}");
    server.client.delete_sandbox(&sandbox.id).await.unwrap();
    server.client.delete_pool(&pool.id).await.unwrap();
    wait_no_procd(tmp.path());
}
