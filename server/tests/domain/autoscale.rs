//! Autoscale on the simulated runtime: a burst of claims raises the target to what demand calls for, never above
//! `max_ready`, never below `min_ready`; once the claims stop, the pool goes back to `min_ready`.

use std::time::{Duration, Instant};

use warmpool_api::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_scales_the_pool_up_within_bounds_and_idle_brings_it_back() {
    let plane = SimPlane::start().await;
    // Ready 1 s after start: 30 claims in the 10 s window × 1 s × headroom 5 = 15, above max_ready.
    plane.template("slow", ready_after(1000)).await;
    let spec = WarmPoolSpec {
        name: "auto".into(),
        template: "slow:stable".into(),
        min_ready: 1,
        max_ready: 8,
        autoscale: Some(Autoscale {
            enabled: true,
            headroom: Some(5.0),
            window_seconds: Some(10),
            scale_to_zero_after_seconds: Some(2),
        }),
        ..Default::default()
    };
    plane.client.create_pool(&spec).await.unwrap();
    plane.wait_status("auto", "ready 1", |s| s.ready == 1).await;

    let in_bounds = |s: &PoolStatus| {
        assert!((1..=8).contains(&s.target), "target out of bounds: {s:?}");
        assert!(s.ready + s.warming <= 8, "more than max_ready inventory: {s:?}");
    };
    // 30 claims, about 20 a second, each checked-out sandbox deleted at once.
    let mut hits = 0;
    for _ in 0..30 {
        if let Ok(s) = plane.client.create_sandbox(&checkout("auto", CheckoutMode::Require, 0)).await {
            hits += 1;
            plane.client.delete_sandbox(&s.id).await.unwrap();
        }
        in_bounds(&plane.client.pool_status("auto").await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(hits >= 1, "the first claim finds the ready sandbox");
    let up = plane.client.pool_status("auto").await.unwrap();
    assert_eq!(up.demand.claims, 30, "{:?}", up.demand);
    assert_eq!(up.demand.recommended_ready.min(8), up.target, "{:?}", up.demand);
    assert_eq!(up.target, 8, "demand above max_ready is capped: {:?}", up.demand);
    plane.wait_status("auto", "filled to max_ready", |s| s.ready == 8).await;

    // No claims: after 2 s the pool is idle, and a tenth of the window (1 s) later it goes back to min_ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = plane.client.pool_status("auto").await.unwrap();
        in_bounds(&s);
        if s.target == 1 && s.ready == 1 && s.warming == 0 {
            assert!(s.demand.idle, "{:?}", s.demand);
            assert_eq!(s.demand.recommended_ready, 0);
            break;
        }
        assert!(Instant::now() < deadline, "never went back to min_ready: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
