//! Warm pools end to end: fill, checkout modes, leases, rollouts, disable/drain, prewarm failures, metrics, and
//! the claim race.

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
    let count = |mode: &str, source: &str| {
        let needle =
            format!("warmpool_checkouts_total{{mode=\"{mode}\",pool=\"{}\",source=\"{source}\"}} ", pool.id);
        metrics.lines().find_map(|l| l.strip_prefix(&needle)).map(|v| v.parse::<u64>().unwrap()).unwrap_or(0)
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
async fn concurrent_require_checkouts_never_share_a_sandbox() {
    // Capacity 20: once 20 sandboxes exist the pool cannot refill, so exactly 20 requests can hit.
    let cp = TestControlPlane::start_with(|a| a.max_sandboxes = 20).await;
    cp.ready_template("api").await;
    let pool = cp.client.create_pool(&pool_spec("burst", "api:stable", 20, 20)).await.unwrap();
    cp.wait_status(&pool.id, "20 ready", |s| s.ready == 20).await;
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let c = cp.client.clone();
        let id = pool.id.clone();
        tasks.push(tokio::spawn(
            async move { c.create_sandbox(&checkout(&id, CheckoutMode::Require, 0)).await },
        ));
    }
    let (mut hits, mut unavailable) = (HashSet::new(), 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(s) => assert!(hits.insert(s.id), "a sandbox was handed out twice"),
            Err(e) => {
                assert_eq!(e.code(), Some("warm_pool_unavailable"), "{e}");
                unavailable += 1;
            }
        }
    }
    assert_eq!((hits.len(), unavailable), (20, 180));
    let status = cp
        .wait_status(&pool.id, "capacity shortage", |s| {
            s.degraded_reasons.contains(&DegradedReason::NoEligibleHosts)
        })
        .await;
    assert_eq!((status.claimed, status.ready), (20, 0));
}

#[tokio::test]
async fn leases_raise_the_target_and_the_last_release_drains() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("api").await;
    let pool = cp.client.create_pool(&pool_spec("ci", "api:stable", 1, 4)).await.unwrap();
    cp.wait_status(&pool.id, "1 ready", |s| s.ready == 1).await;
    let key = "octo/repo/123/1/build";
    let lease = cp.client.put_lease(&pool.id, key, &LeaseSpec { count: 2, ttl_seconds: 600 }).await.unwrap();
    assert_eq!(lease.key, key, "keys may contain slashes");
    // Idempotent: the same key updates, it does not add.
    cp.client.put_lease(&pool.id, key, &LeaseSpec { count: 2, ttl_seconds: 600 }).await.unwrap();
    cp.client.put_lease(&pool.id, "other", &LeaseSpec { count: 5, ttl_seconds: 600 }).await.unwrap();
    let s = cp.wait_status(&pool.id, "4 ready", |s| s.ready == 4).await;
    assert_eq!(s.target, 4, "capped at max_ready");
    assert_eq!(cp.client.list_leases(&pool.id).await.unwrap().len(), 2);

    let r = cp.client.release_lease(&pool.id, key, true).await.unwrap();
    assert_eq!((r.released, r.remaining_leases, r.drained), (true, 1, false), "another lease remains");
    let r = cp.client.release_lease(&pool.id, "other", true).await.unwrap();
    assert_eq!((r.released, r.remaining_leases, r.drained), (true, 0, true));
    let s = cp.wait_status(&pool.id, "drained", |s| s.ready == 0 && s.warming == 0 && s.draining == 0).await;
    assert_eq!(s.state, PoolState::Draining);
    assert!(s.degraded_reasons.contains(&DegradedReason::DrainActive));
    // Releasing again is harmless.
    assert!(!cp.client.release_lease(&pool.id, "other", true).await.unwrap().released);
    // Short leases expire on their own.
    cp.client.pool_action(&pool.id, "enable").await.unwrap();
    cp.client.put_lease(&pool.id, "short", &LeaseSpec { count: 1, ttl_seconds: 1 }).await.unwrap();
    assert_eq!(cp.client.pool_status(&pool.id).await.unwrap().target, 2);
    cp.wait_status(&pool.id, "lease expiry", |s| s.target == 1).await;
}

#[tokio::test]
async fn moving_the_tag_rolls_the_pool_and_leaves_claimed_sandboxes_alone() {
    let cp = TestControlPlane::start().await;
    let (_, first) = cp.ready_template("api").await;
    let pool = cp.client.create_pool(&pool_spec("roll", "api:stable", 2, 2)).await.unwrap();
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    let claimed = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 10_000)).await.unwrap();
    assert_eq!(claimed.build_id, first.id);

    cp.client
        .update_template(
            "api",
            &TemplatePatch {
                start_cmd: Some("echo v2 > version; touch ready.flag; exec sleep infinity".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let second = cp.build("api", &["stable"]).await;
    assert_eq!(second.status, BuildStatus::Ready);
    let s = cp
        .wait_status(&pool.id, "rollout", |s| {
            // Old ready sandboxes serve until new ones are ready, then drain: settled means only new ones.
            s.resolved_build_id.as_deref() == Some(second.id.as_str())
                && s.ready == 2
                && s.warming + s.draining == 0
        })
        .await;
    assert_eq!(s.rollout_generation, 2);
    assert_eq!(s.previous_build_id.as_deref(), Some(first.id.as_str()));
    let fresh = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 10_000)).await.unwrap();
    assert_eq!(fresh.build_id, second.id);
    let r = run(&cp.client, &fresh.id, &["cat", "version"]).await;
    assert_eq!(r.stdout, "v2\n");
    // The sandbox checked out before the rollout still runs the old build.
    let old = cp.client.get_sandbox(&claimed.id).await.unwrap();
    assert_eq!((old.state, old.build_id.as_str()), (SandboxState::Running, first.id.as_str()));
    let r = run(&cp.client, &claimed.id, &["true"]).await;
    assert_eq!(r.exit_code, 0);
}

#[tokio::test]
async fn disable_keeps_inventory_drain_removes_it_delete_drains() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("api").await;
    let pool = cp.client.create_pool(&pool_spec("states", "api", 2, 2)).await.unwrap();
    assert_eq!(pool.version_policy, VersionPolicy::PinnedBuild);
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    let p = cp.client.pool_action(&pool.id, "disable").await.unwrap();
    assert_eq!(p.state, PoolState::Disabled);
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    let s = cp.client.pool_status(&pool.id).await.unwrap();
    assert_eq!((s.state, s.target, s.ready), (PoolState::Disabled, 0, 2), "disable keeps ready inventory");
    // Its kept inventory is still handed out; nothing refills it.
    let kept = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap();
    assert!(kept.warm_pool_checkout.unwrap().hit);
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    assert_eq!(cp.client.pool_status(&pool.id).await.unwrap().ready, 1);
    cp.client.pool_action(&pool.id, "drain").await.unwrap();
    cp.wait_status(&pool.id, "drained", |s| s.ready == 0 && s.draining == 0).await;
    let err = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap_err();
    let warmpool_client::Error::Api { details, .. } = err else { panic!() };
    assert_eq!(details["reason"], "pool_draining");
    let cold = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Prefer, 0)).await.unwrap();
    assert_eq!(cold.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::PoolDraining));
    cp.client.pool_action(&pool.id, "enable").await.unwrap();
    cp.wait_status(&pool.id, "refilled", |s| s.ready == 2).await;
    cp.client.delete_pool(&pool.id).await.unwrap();
    assert_eq!(cp.client.get_pool(&pool.id).await.unwrap_err().code(), Some("not_found"));
    let left = cp.client.list_sandboxes().await.unwrap();
    assert_eq!(left.len(), 2, "checked-out sandboxes outlive their pool");
    for s in left {
        cp.client.delete_sandbox(&s.id).await.unwrap();
    }
    wait_no_procd(cp.dir.path());
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
    // Filling stops: the failure count stays put.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let later = cp.client.pool_status(&pool.id).await.unwrap();
    assert_eq!((later.failed, later.warming), (s.failed, 0));
    // `reconcile` lifts the stop (and it trips again).
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    cp.wait_status(&pool.id, "more attempts", |x| x.failed > s.failed).await;
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
async fn idle_timeout_replaces_stale_ready_sandboxes() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("api").await;
    let spec = WarmPoolSpec { idle_timeout_seconds: Some(1), ..pool_spec("idle", "api:stable", 1, 1) };
    let pool = cp.client.create_pool(&spec).await.unwrap();
    let first = cp.wait_status(&pool.id, "1 ready", |s| s.ready == 1).await;
    assert_eq!(first.expired, 0);
    let later = cp.wait_status(&pool.id, "an expiry", |s| s.expired >= 1).await;
    assert!(later.target == 1);
    cp.wait_status(&pool.id, "a replacement", |s| s.ready == 1).await;
}

/// A checked-out sandbox whose start process exits has failed; the server's "Sandbox failed" warning names the
/// reason procd gave (the process and its exit code) as a field, with the output tail in a field of its own.
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
        warm_pool: Some(pool.id.clone()),
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
            .find(|l| l.contains("Sandbox failed") && l.contains(&sandbox.id))
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
