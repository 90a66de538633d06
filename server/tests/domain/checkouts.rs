//! Checkouts on the simulated runtime: the three modes, unpoolable shapes, waiting for inventory, readiness that
//! stops passing, and the claim race.

use std::collections::HashSet;
use std::time::Duration;

use warmpool_api::*;

use super::*;

/// Makes a checkout request unpoolable.
type Shape = Box<dyn Fn(&mut SandboxCreate)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_modes_and_their_fallbacks() {
    let cp = SimPlane::start().await;
    // Slow enough that the pool cannot refill between two requests.
    cp.template("api", ready_after(800)).await;
    let pool = cp.pool("api", "api:stable", 1, 1).await;
    cp.wait_status(&pool.id, "1 ready", |s| s.ready == 1).await;

    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert_eq!((co.source, co.hit, co.mode), (CheckoutSource::WarmPool, true, CheckoutMode::Require));
    assert_eq!(s.state, SandboxState::Running);
    let (status, code, details) =
        api_error(cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap_err());
    assert_eq!(
        (status, code.as_str(), details["reason"].as_str()),
        (503, "warm_pool_unavailable", Some("no_ready_inventory"))
    );
    // prefer without inventory goes cold, and a cold start is never a hit.
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Prefer, 0)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert_eq!(
        (co.source, co.hit, co.fallback_reason),
        (CheckoutSource::Cold, false, Some(FallbackReason::NoReadyInventory))
    );
    assert_eq!(s.state, SandboxState::Running, "a cold sandbox is returned ready");
    // A waiting require gets the refill as soon as it is ready.
    cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    let co = s.warm_pool_checkout.unwrap();
    assert!(co.hit && co.waited_ms > 0, "{co:?}");
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Bypass, 0)).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::Bypass));

    // The pool's default mode applies when the request names none.
    cp.client
        .update_pool(
            &pool.id,
            &WarmPoolPatch { checkout_policy: Some(CheckoutMode::Bypass), ..Default::default() },
        )
        .await
        .unwrap();
    let req = SandboxCreate { warm_pool: Some(pool.id.to_string()), ..Default::default() };
    let s = cp.client.create_sandbox(&req).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().mode, CheckoutMode::Bypass);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpoolable_shapes_go_cold_or_fail_naming_the_field() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 1, 1).await;
    cp.wait_status(&pool.id, "1 ready", |s| s.ready == 1).await;
    let shapes: Vec<(&str, Shape)> = vec![
        ("envs", Box::new(|r| r.envs = Some([("X".to_string(), "1".to_string())].into()))),
        ("cwd", Box::new(|r| r.cwd = Some("/srv".into()))),
        ("desktop", Box::new(|r| r.desktop = Some(true))),
        (
            "network",
            Box::new(|r| {
                r.network = Some(serde_json::from_value(serde_json::json!({"mode": "none"})).unwrap())
            }),
        ),
    ];
    for (field, shape) in &shapes {
        let mut req = checkout(&pool.id, CheckoutMode::Require, 0);
        shape(&mut req);
        let (status, code, details) = api_error(cp.client.create_sandbox(&req).await.unwrap_err());
        assert_eq!(
            (status, code.as_str(), details["field"].as_str(), details["reason"].as_str()),
            (503, "warm_pool_unavailable", Some(*field), Some("unpoolable_shape")),
            "{field}"
        );
    }
    let mut req = checkout(&pool.id, CheckoutMode::Prefer, 0);
    shapes[0].1(&mut req);
    let s = cp.client.create_sandbox(&req).await.unwrap();
    assert_eq!(s.warm_pool_checkout.unwrap().fallback_reason, Some(FallbackReason::UnpoolableShape));
    // Spelling out the default network is poolable.
    let mut req = checkout(&pool.id, CheckoutMode::Require, 0);
    req.network = Some(serde_json::from_value(serde_json::json!({"mode": "isolated"})).unwrap());
    assert!(cp.client.create_sandbox(&req).await.unwrap().warm_pool_checkout.unwrap().hit);
    // A mode without a pool is a bad request.
    let req = SandboxCreate {
        template: Some("api".into()),
        warm_pool_mode: Some(CheckoutMode::Require),
        ..Default::default()
    };
    let (status, code, _) = api_error(cp.client.create_sandbox(&req).await.unwrap_err());
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
}

/// A ready sandbox whose readiness stops passing leaves `ready` at once, is never handed out, and is replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_readiness_flaps_is_never_handed_out() {
    let cp = SimPlane::start().await;
    // The replacement takes a while, so the pool is observably empty meanwhile.
    cp.template("api", ready_after(300)).await;
    let pool = cp.pool("api", "api:stable", 1, 1).await;
    cp.wait_status(&pool.id, "1 ready", |s| s.ready == 1).await;
    let flapping = cp.ready_ids(&pool.id).await.pop().unwrap();
    cp.sim.set_ready(&flapping, false);
    cp.wait_status(&pool.id, "the flapping sandbox out of ready", |s| s.ready == 0 && s.failed == 1).await;
    let (status, code, _) =
        api_error(cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 0)).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (503, "warm_pool_unavailable"),
        "a sandbox that is not ready is never handed out"
    );
    let s = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    assert!(s.warm_pool_checkout.unwrap().hit);
    assert_ne!(s.id, flapping, "the replacement is handed out, not the sandbox that stopped being ready");
}

/// Many callers race for fewer ready sandboxes: every sandbox goes to one caller, the rest wait or go cold, and
/// the pool ends up full again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checkouts_never_share_a_sandbox() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(50)).await;
    let pool = cp.pool("api", "api:stable", 20, 20).await;
    cp.wait_status(&pool.id, "20 ready", |s| s.ready == 20).await;
    for round in 0..5 {
        let tasks: Vec<_> = (0..60)
            .map(|i| {
                let c = cp.client.clone();
                let mode = if i % 3 == 0 { CheckoutMode::Prefer } else { CheckoutMode::Require };
                let req = checkout(&pool.id, mode, 0);
                tokio::spawn(async move { c.create_sandbox(&req).await })
            })
            .collect();
        let mut hits = HashSet::new();
        let mut total_hits = 0;
        for t in tasks {
            if let Ok(s) = t.await.unwrap() {
                let co = s.warm_pool_checkout.unwrap();
                if co.hit {
                    total_hits += 1;
                    hits.insert(s.id);
                }
            }
        }
        assert_eq!(hits.len(), total_hits, "round {round}: a sandbox was handed out twice");
        assert!(total_hits <= 20, "round {round}: {total_hits} hits from 20 ready sandboxes");
        cp.wait_status(&pool.id, "the pool refilled", |s| s.ready == 20).await;
    }
    let stats = cp.sim.stats();
    assert!(stats.live >= 20, "{stats:?}");
}

/// With room for 20 sandboxes on the host, 200 simultaneous require checkouts of a pool of 20: exactly 20 hit,
/// each a different sandbox, the rest are told no inventory, and the pool reports it cannot refill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_capacity_gets_each_sandbox_once() {
    let cp = SimPlane::start_with_capacity(20).await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("burst", "api:stable", 20, 20).await;
    cp.wait_status(&pool.id, "20 ready", |s| s.ready == 20).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let c = cp.client.clone();
            let req = checkout(&pool.id, CheckoutMode::Require, 0);
            tokio::spawn(async move { c.create_sandbox(&req).await })
        })
        .collect();
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

/// Thousands of operations interleaved on one pool (checkouts in every mode, crashes and flaps of inventory,
/// target changes, leases), in random order and concurrently: no sandbox is ever handed out twice, and when the
/// dust settles the store and the runtime agree on what runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_interleavings_never_double_claim_or_leak() {
    use rand::{Rng, SeedableRng};
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(2)).await;
    let pool = cp.pool("api", "api:stable", 8, 16).await;
    cp.wait_status(&pool.id, "8 ready", |s| s.ready == 8).await;
    let seed: u64 = rand::random();
    eprintln!("seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut handed_out = HashSet::new();
    for round in 0..30 {
        let mut tasks = Vec::new();
        for _ in 0..40 {
            let (c, sim, pool_id) = (cp.client.clone(), cp.sim.clone(), pool.id.clone());
            let ready = cp.ready_ids(&pool.id).await;
            let op = rng.gen_range(0..10);
            let pick = (!ready.is_empty()).then(|| ready[rng.gen_range(0..ready.len())].clone());
            let wait = rng.gen_range(0..30);
            tasks.push(tokio::spawn(async move {
                match (op, pick) {
                    (0, Some(id)) => {
                        sim.crash(&id);
                        None
                    }
                    (1, Some(id)) => {
                        sim.set_ready(&id, false);
                        None
                    }
                    (2, _) => {
                        let lease = LeaseSpec { count: (wait % 8) as u32, ttl_seconds: 60 };
                        c.put_lease(&pool_id, "burst", &lease).await.unwrap();
                        None
                    }
                    (3, _) => {
                        c.release_lease(&pool_id, "burst", false).await.unwrap();
                        None
                    }
                    (4, _) => c.create_sandbox(&checkout(&pool_id, CheckoutMode::Prefer, wait)).await.ok(),
                    _ => c.create_sandbox(&checkout(&pool_id, CheckoutMode::Require, wait)).await.ok(),
                }
            }));
        }
        for t in tasks {
            if let Some(s) = t.await.unwrap() {
                if s.warm_pool_checkout.as_ref().is_some_and(|co| co.hit) {
                    assert!(handed_out.insert(s.id.clone()), "round {round}: {} was handed out twice", s.id);
                }
                // Checked-out sandboxes go, as CI jobs' do.
                if rng.gen_bool(0.5) {
                    cp.client.delete_sandbox(&s.id).await.unwrap();
                }
            }
        }
    }
    cp.client.release_lease(&pool.id, "burst", false).await.unwrap();
    cp.wait_status(&pool.id, "settled at 8", |s| {
        s.target == 8 && s.ready == 8 && s.warming == 0 && s.draining == 0
    })
    .await;
    // What runs is exactly what the store knows: the pool's inventory and the callers' sandboxes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // Failed sandboxes keep their rows (their callers see them fail) but nothing runs for them.
        let rows: HashSet<String> = cp
            .store
            .list_all_sandboxes()
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.lifecycle != warmpool_server::store::Lifecycle::Failed)
            .map(|r| r.sandbox.id.into())
            .collect();
        let live: HashSet<String> = cp.sim.live().into_iter().filter(|id| id.starts_with("sbx_")).collect();
        if rows == live {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let mut stale = Vec::new();
            for id in rows.difference(&live) {
                let r = cp.store.get_sandbox(id).await.unwrap().unwrap();
                stale.push(format!(
                    "{id}: {:?} {:?} pool {:?} from {:?}",
                    r.lifecycle, r.sandbox.state, r.pool_id, r.claimed_from
                ));
            }
            panic!(
                "rows with nothing running: {stale:?}; running without a row: {:?}",
                live.difference(&rows)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{} checkouts hit, runtime: {:?}", handed_out.len(), cp.sim.stats());
}
