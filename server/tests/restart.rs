//! Crash recovery with the real `warmpool` binary: a SIGKILL of the server loses no template, build or sandbox,
//! re-adopts live sandboxes, and leaves no orphan process.

use std::time::Duration;

use warmpool_api::*;

use crate::harness::*;

#[tokio::test]
async fn sigkill_loses_nothing_and_leaves_no_orphans() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = KillOnDrop(dir.clone());
    let mut server = ServerProcess::start(&dir, &[]);
    let c = server.client.clone();
    c.create_template(&quick_template("api")).await.unwrap();
    let b = c.create_build("api", &["stable".into()]).await.unwrap();
    let b = c.wait_build(&b.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let s = c.create_sandbox(&cold("api:stable")).await.unwrap();
    let pool = c
        .create_pool(&WarmPoolSpec {
            name: "p".into(),
            template: "api:stable".into(),
            min_ready: 2,
            max_ready: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    c.wait_pool_ready(&pool.id, 2, Duration::from_secs(60), |_| {}).await.unwrap();
    let before = procd_pids(&dir).len();

    // An orphan: a live sandbox whose row the store loses while the server is down.
    let orphan_sandbox = c.create_sandbox(&cold("api:stable")).await.unwrap();
    server.kill9();
    {
        use warmpool_server::store::{Lifecycle, Store};
        let store = warmpool_server::store::sqlite::SqliteStore::open(&dir.join("warmpool.db")).unwrap();
        assert!(store.delete_sandbox_if(&orphan_sandbox.id, &Lifecycle::ALL).await.unwrap());
    }
    let orphan = dir.join("sandboxes").join(&orphan_sandbox.id);
    assert!(orphan.exists());
    assert_eq!(procd_pids(&dir).len(), before + 1);

    let server = ServerProcess::start(&dir, &[]);
    let c = server.client.clone();
    wait_until("the orphan to be removed", Duration::from_secs(10), || !orphan.exists());
    assert_eq!(procd_pids(&dir).len(), before, "the orphan's container was killed");
    assert_eq!(c.get_template("api").await.unwrap().name, "api");
    assert_eq!(c.get_build(&b.id).await.unwrap().status, BuildStatus::Ready);
    let again = c.get_sandbox(&s.id).await.unwrap();
    assert_eq!(again.state, SandboxState::Running);
    let r = run(&c, &s.id, &["echo", "still here"]).await;
    assert_eq!(r.stdout, "still here\n");
    let status = c.pool_status(&pool.id).await.unwrap();
    assert_eq!(status.ready, 2, "pool inventory was re-adopted: {status:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(procd_pids(&dir).len(), before, "nothing was started twice and nothing leaked");
    // A re-adopted sandbox is still watched: deleting it stops its processes.
    c.delete_sandbox(&s.id).await.unwrap();
    assert!(!dir.join("sandboxes").join(&s.id).exists());
    c.delete_pool(&pool.id).await.unwrap();
    wait_no_procd(&dir);
}
