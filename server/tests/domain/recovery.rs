//! A restart of the control plane over the same store: sandboxes that outlived it are adopted, ones that died
//! meanwhile are replaced, and nothing is leaked.

use warmpool_api::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_live_sandboxes_and_replaces_dead_ones() {
    let cp = SimPlane::start().await;
    cp.template("api", ready_after(1)).await;
    let pool = cp.pool("api", "api:stable", 3, 3).await;
    cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    let claimed = cp.client.create_sandbox(&checkout(&pool.id, CheckoutMode::Require, 5_000)).await.unwrap();
    cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    let ready = cp.ready_ids(&pool.id).await;
    let started = cp.sim.stats().started;

    // Restarted with the sandboxes still running: all adopted, nothing started or stopped.
    let cp = cp.restart(true).await;
    let s = cp.wait_status(&pool.id, "3 ready", |s| s.ready == 3).await;
    assert_eq!(s.failed, 0);
    assert_eq!(cp.ready_ids(&pool.id).await, ready);
    assert_eq!(cp.sim.stats().started, started, "adopted, not restarted");
    assert_eq!(cp.client.get_sandbox(&claimed.id).await.unwrap().state, SandboxState::Running);

    // One ready sandbox dies while the server is down (nobody hears its exit).
    let (dir, store, sim) = (cp.dir.clone(), cp.store.clone(), cp.sim.clone());
    drop(cp);
    sim.report_exits_to(tokio::sync::mpsc::unbounded_channel().0);
    assert!(sim.crash(&ready[0]));
    let cp = SimPlane::start_on(dir, store, Some(sim)).await;
    cp.wait_status(&pool.id, "refilled after a death while down", |s| s.ready == 3).await;
    assert!(!cp.ready_ids(&pool.id).await.contains(&ready[0]));

    // Restarted on an empty host (every sandbox gone): the pool refills, the claimed sandbox is failed.
    let cp = cp.restart(false).await;
    cp.wait_status(&pool.id, "refilled on a new host", |s| s.ready == 3).await;
    let gone = cp.client.get_sandbox(&claimed.id).await.unwrap();
    assert_eq!(gone.state, SandboxState::Failed);
    assert_eq!(cp.sim.stats().live, 3, "nothing but the pool's inventory runs: {:?}", cp.sim.live());
}
