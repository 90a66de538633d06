//! Pools on the simulated runtime: leases, rollouts, the prewarm-failure breaker, idle expiry, crashes of ready
//! inventory, disable and drain.

use std::time::Duration;

use warmpool_api::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_raise_the_target_and_the_last_release_drains() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("ci", "api:stable", 1, 4).await;
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
    assert_eq!(s.failed, 0, "a drain is not a failure");
    // Releasing again is harmless.
    assert!(!cp.client.release_lease(&pool.id, "other", true).await.unwrap().released);
    // Short leases expire on their own.
    cp.client.pool_action(&pool.id, "enable").await.unwrap();
    cp.client.put_lease(&pool.id, "short", &LeaseSpec { count: 1, ttl_seconds: 1 }).await.unwrap();
    assert_eq!(cp.client.pool_status(&pool.id).await.unwrap().target, 2);
    cp.wait_status(&pool.id, "lease expiry", |s| s.target == 1 && s.ready == 1 && s.draining == 0).await;
}

/// Moving the tracked tag rolls the pool: the generation goes up, the new build's sandboxes replace the old ones,
/// ready capacity never drops to zero meanwhile, and a claimed sandbox is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tag_rolls_the_pool_without_emptying_it() {
    let cp = SimPlane::start().await;
    let first = cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 3, 3).await;
    cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    let claimed = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    // The new build's sandboxes take a while, so the rollout is observable.
    cp.sim.script("api", ready_after(300));
    let second = cp.build("api").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = cp.client.pool_status(&pool.id).await.unwrap();
        assert!(s.ready > 0, "ready capacity dropped to zero during the rollout: {s:?}");
        let ready_builds: Vec<String> = cp
            .store
            .list_pool_sandboxes(&pool.id)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.lifecycle == warmpool_server::store::Lifecycle::Ready)
            .map(|r| r.sandbox.build_id.into())
            .collect();
        if ready_builds.len() == 3 && ready_builds.iter().all(|b| *b == second.id) {
            assert_eq!((s.rollout_generation, s.resolved_build_id.as_deref()), (2, Some(second.id.as_str())));
            assert_eq!(s.previous_build_id.as_deref(), Some(first.id.as_str()));
            assert_eq!(s.failed, 0, "a rollout is not a failure");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the rollout did not finish: {s:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let kept = cp.client.get_sandbox(&claimed.id).await.unwrap();
    assert_eq!((kept.state, kept.build_id), (SandboxState::Running, first.id));
}

/// Three failed starts in a row stop the pool filling (`artifact_prewarm_failed`); `reconcile` resumes it once the
/// cause is gone. A deliberate stop never counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_stops_a_failing_pool_and_reconcile_resumes_it() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    cp.sim.script(
        "api",
        Script { start_fails: Some("the start contract failed".into()), ..Default::default() },
    );
    let pool = cp.pool("api", "api:stable", 2, 2).await;
    let s = cp
        .wait_status(&pool.id, "the breaker", |s| {
            s.degraded_reasons.contains(&DegradedReason::ArtifactPrewarmFailed)
        })
        .await;
    assert!(s.failed >= 3, "{s:?}");
    let started = cp.sim.stats().started;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cp.sim.stats().started, started, "a stopped pool starts nothing");

    cp.sim.script("api", ready_after(1));
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    let s = cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    assert!(!s.degraded_reasons.contains(&DegradedReason::ArtifactPrewarmFailed), "{s:?}");
    // Draining and enabling again are deliberate: they never trip the breaker.
    for _ in 0..3 {
        cp.client.pool_action(&pool.id, "drain").await.unwrap();
        cp.wait_status(&pool.id, "drained", |s| s.ready == 0 && s.warming == 0 && s.draining == 0).await;
        cp.client.pool_action(&pool.id, "enable").await.unwrap();
        cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    }
    assert!(!cp
        .client
        .pool_status(&pool.id)
        .await
        .unwrap()
        .degraded_reasons
        .contains(&DegradedReason::ArtifactPrewarmFailed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_inventory_that_crashes_or_idles_out_is_replaced() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 2, 2).await;
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    let before = cp.ready_ids(&pool.id).await;
    assert!(cp.sim.crash(&before[0]));
    let s = cp.wait_status(&pool.id, "the crashed one replaced", |s| s.ready == 2 && s.failed == 1).await;
    assert_eq!(s.target, 2);
    assert!(!cp.ready_ids(&pool.id).await.contains(&before[0]));

    cp.client
        .update_pool(&pool.id, &WarmPoolPatch { idle_timeout_seconds: Some(1), ..Default::default() })
        .await
        .unwrap();
    let s = cp.wait_status(&pool.id, "idle sandboxes replaced", |s| s.expired >= 2 && s.ready == 2).await;
    assert_eq!(s.failed, 1, "expiry is not a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_keeps_inventory_and_delete_drains_it() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 2, 2).await;
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    cp.client.pool_action(&pool.id, "disable").await.unwrap();
    cp.client.pool_action(&pool.id, "reconcile").await.unwrap();
    let s = cp.client.pool_status(&pool.id).await.unwrap();
    assert_eq!((s.state, s.target, s.ready), (PoolState::Disabled, 0, 2), "disable keeps ready inventory");
    // The kept inventory is still handed out; nothing refills it.
    for _ in 0..2 {
        let kept = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap();
        assert!(kept.warm_pool_checkout.unwrap().hit);
    }
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Prefer, 0)).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::PoolDisabled));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cp.client.pool_status(&pool.id).await.unwrap().ready, 0, "a disabled pool is not refilled");
    cp.client.pool_action(&pool.id, "enable").await.unwrap();
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    cp.client.pool_action(&pool.id, "drain").await.unwrap();
    cp.wait_status(&pool.id, "drained", |s| s.ready == 0 && s.draining == 0).await;
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Prefer, 0)).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::PoolDraining));
    cp.client.pool_action(&pool.id, "enable").await.unwrap();
    cp.wait_status(&pool.id, "2 ready", |s| s.ready == 2).await;
    let live_before = cp.sim.stats().live;
    cp.client.delete_pool(&pool.id).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while cp.sim.stats().live != live_before - 2 {
        assert!(tokio::time::Instant::now() < deadline, "delete did not drain: {:?}", cp.sim.stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(cp.client.get_pool(&pool.id).await.unwrap_err().code(), Some("not_found"));
    assert_eq!(
        cp.client.list_sandboxes().await.unwrap().len(),
        4,
        "checked-out and cold sandboxes outlive their pool"
    );
}

/// A pool claimed over and over is not passed once per claim: passes are at least 50 ms apart, whatever pokes them
/// (each claim, each sandbox that becomes ready), and the pool still refills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_claimed_over_and_over_is_passed_at_most_every_50_ms() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 60, 60).await;
    cp.wait_status(&pool.id, "60 ready", |s| s.ready == 60).await;
    let passes = || async {
        let text = cp.client.metrics().await.unwrap();
        let line =
            text.lines().find(|l| l.starts_with("warmpool_reconcile_seconds_count")).unwrap().to_string();
        line.rsplit(' ').next().unwrap().parse::<u64>().unwrap()
    };
    let before = passes().await;
    let started = std::time::Instant::now();
    for _ in 0..50 {
        cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    }
    cp.wait_status(&pool.id, "refilled", |s| s.ready == 60).await;
    let (took, passed) = (started.elapsed(), passes().await - before);
    let most = took.as_millis() as u64 / 50 + 2;
    assert!(passed <= most, "{passed} passes in {took:?} (at most {most})");
}
