//! Three `warmpool serve` replicas on one PostgreSQL (started by the test) and one data dir (the local runtime on
//! one host): checkouts spread over all three never share a sandbox, any replica serves any sandbox, and the pools
//! of a replica killed with `kill -9` mid-refill are taken over and converge with nothing leaked; a replica that
//! loses its database session without dying counts no failure that did not happen.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use warmpool_api::*;
use warmpool_client::Client;
use warmpool_testkit::postgres::Postgres;

use crate::*;

/// Three replicas on a new PostgreSQL and one temporary data dir, started one after the other (the first creates
/// the admin token they share). Fields drop in reverse order: servers, then their containers, then the database.
/// Fields drop in this order: the servers first (so nothing starts behind the cleanup), then what they ran, then
/// their directory, then the database.
struct Replicas {
    servers: Vec<ServerProcess>,
    clients: Vec<Client>,
    _cleanup: KillOnDrop,
    _tmp: tempfile::TempDir,
    data: std::path::PathBuf,
    pg: Postgres,
    /// The database's name (`pg.sql` runs statements in it).
    db: String,
}

fn replicas(extra: &[&str]) -> Replicas {
    let pg = Postgres::start();
    let database = pg.database();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cleanup = KillOnDrop(data.clone());
    let db = database.rsplit('/').next().unwrap().to_string();
    // Each replica names its connections (`warmpool-r<i>`), so a test can find one replica's sessions.
    let servers: Vec<ServerProcess> = (0..3)
        .map(|i| {
            let url = format!("{database}?application_name=warmpool-r{i}");
            let mut args = vec!["--database", url.as_str()];
            args.extend_from_slice(extra);
            ServerProcess::start(&data, &args)
        })
        .collect();
    let clients = servers.iter().map(|s| s.client.clone()).collect();
    Replicas { servers, clients, _cleanup: cleanup, data, _tmp: tmp, db, pg }
}

/// The pools a replica reconciles, as its `/readyz` says.
async fn reconciled_by(c: &Client) -> BTreeSet<PoolId> {
    let ready = c.readyz().await.unwrap();
    serde_json::from_value(ready["replica"]["pools"].clone()).unwrap()
}

/// Every replica hands out a sandbox of a pool of 40 (one checkout each, whichever replica reconciles it), then 200
/// concurrent `require` checkouts, spread round-robin over the three, race for the other 37 (with no capacity to
/// refill): exactly 37 distinct hits, none of them handed out before, and the rest clean `warm_pool_unavailable`s.
/// Each hit then runs a command through another replica, and is deleted through a third. (Which replica wins how
/// many of the race is the machine's scheduling, not a property: on a loaded host one replica has won 39 of 40.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_hand_each_ready_sandbox_out_once() {
    let cluster = replicas(&["--max-sandboxes", "40"]);
    let (clients, data) = (&cluster.clients, &cluster.data);
    build(&clients[0], &template("burst", 0.0)).await;
    let pool = clients[1].create_pool(&pool_spec("burst", "burst:stable", 40, 40)).await.unwrap();
    wait_status(&clients[2], &pool.id, "40 ready", |s| s.ready == 40).await;

    let mut hits = Vec::new();
    for (replica, c) in clients.iter().enumerate() {
        hits.push((replica, c.create_sandbox(&require(&pool.id, 0)).await.unwrap().id));
    }

    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (c, id) = (clients[i % 3].clone(), pool.id.clone());
            tokio::spawn(async move { (i % 3, c.create_sandbox(&require(&id, 0)).await) })
        })
        .collect();
    let (mut per_replica, mut unavailable) = ([0; 3], 0);
    for t in tasks {
        match t.await.unwrap() {
            (replica, Ok(s)) => {
                per_replica[replica] += 1;
                hits.push((replica, s.id));
            }
            (_, Err(e)) => {
                assert_eq!(e.code(), Some("warm_pool_unavailable"), "{e}");
                unavailable += 1;
            }
        }
    }
    let distinct: HashSet<&SandboxId> = hits.iter().map(|(_, id)| id).collect();
    assert_eq!(
        (hits.len(), distinct.len(), unavailable),
        (40, 40, 163),
        "race hits per replica: {per_replica:?}"
    );

    for (replica, id) in &hits {
        let r = sh(&clients[(replica + 1) % 3], id, "hostname").await;
        assert_eq!((r.exit_code, r.stdout.trim()), (0, id.as_str()));
        clients[(replica + 2) % 3].delete_sandbox(id).await.unwrap();
    }
    clients[0].delete_pool(&pool.id).await.unwrap();
    wait_no_procd(data.as_path());
}

/// Three pools spread over three replicas; every pool is raised from 2 to 6 and the replica reconciling the most
/// pools is killed with `kill -9` while they refill. The survivors take its pools (undoing the starts it left
/// half-done, adopting its ready sandboxes) and every pool converges: 18 ready sandboxes, 18 containers, none
/// warming or leaked. Prints how long convergence took.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replicas_pools_converge_and_nothing_leaks() {
    let mut cluster = replicas(&[]);
    let (clients, data) = (cluster.clients.clone(), cluster.data.clone());
    build(&clients[0], &template("spread", 0.5)).await;
    let mut pools = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let spec = pool_spec(&format!("spread-{i}"), "spread:stable", 2, 8);
        pools.push(c.create_pool(&spec).await.unwrap().id);
    }
    for pool in &pools {
        wait_status(&clients[0], pool, "2 ready", |s| s.ready == 2).await;
    }
    let mut owned = Vec::new();
    for c in &clients {
        owned.push(reconciled_by(c).await);
    }
    let all: Vec<&PoolId> = owned.iter().flatten().collect();
    assert_eq!(all.len(), 3, "each pool has exactly one replica: {owned:?}");
    let victim = (0..3).max_by_key(|i| owned[*i].len()).unwrap();
    let survivor = clients[(victim + 1) % 3].clone();

    for pool in &pools {
        let patch = WarmPoolPatch { min_ready: Some(6), ..Default::default() };
        survivor.update_pool(pool, &patch).await.unwrap();
    }
    // Kill it while its pools are warming.
    let victims_pool = owned[victim].iter().next().unwrap().clone();
    wait_status(&survivor, &victims_pool, "a refill under way", |s| s.warming > 0).await;
    cluster.servers[victim].kill9();
    let killed = Instant::now();
    for pool in &pools {
        wait_status(&survivor, pool, "6 ready again", |s| s.ready == 6 && s.warming == 0 && s.draining == 0)
            .await;
    }
    eprintln!(
        "pools converged {:?} after kill -9 of the replica reconciling {:?}",
        killed.elapsed(),
        owned[victim]
    );

    let mut taken = BTreeSet::new();
    for (i, c) in clients.iter().enumerate().filter(|(i, _)| *i != victim) {
        let now = reconciled_by(c).await;
        assert!(now.is_superset(&owned[i]), "a survivor keeps its pools");
        taken.extend(now);
    }
    assert_eq!(taken, pools.iter().cloned().collect(), "the survivors reconcile every pool");
    wait_until("exactly the 18 ready sandboxes to run", Duration::from_secs(30), || {
        running_sandboxes(&data).len() == 18
    });
    for pool in &pools {
        survivor.delete_pool(pool).await.unwrap();
    }
    wait_no_procd(data.as_path());
}

/// A pool of 10 refilling after two checkouts; the replica reconciling it loses every database connection
/// (`pg_terminate_backend`) while it keeps running. Another replica takes the pool, the first reconnects, and the
/// pool converges to 10 ready with `failed` at 0 throughout: nothing failed, so nothing may be counted. Every ready
/// and claimed sandbox is still served (by every replica), and exactly those run.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_losing_its_database_session_counts_no_false_failures() {
    let cluster = replicas(&["--max-sandboxes", "16"]);
    let (clients, data) = (cluster.clients.clone(), cluster.data.clone());
    build(&clients[0], &template("session", 0.5)).await;
    let pool = clients[0].create_pool(&pool_spec("session", "session:stable", 10, 10)).await.unwrap().id;
    wait_status(&clients[0], &pool, "10 ready", |s| s.ready == 10).await;
    let mut claimed = Vec::new();
    for c in &clients[..2] {
        claimed.push(c.create_sandbox(&require(&pool, 0)).await.unwrap().id);
    }
    let mut victim = None;
    for (i, c) in clients.iter().enumerate() {
        if reconciled_by(c).await.contains(&pool) {
            victim = Some(i);
        }
    }
    let victim = victim.expect("a replica reconciles the pool");
    wait_status(&clients[0], &pool, "a refill under way", |s| s.warming > 0).await;

    let killed = cluster.pg.sql(
        &cluster.db,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'warmpool-r{victim}'"
        ),
    );
    assert!(
        killed.trim().parse::<u32>().unwrap() >= 2,
        "the victim's session and statement connections: {killed}"
    );

    // Convergence: the pool is reconciled again (by someone), full, and the victim is back in the cluster.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = clients[(victim + 1) % 3].pool_status(&pool).await.unwrap();
        assert_eq!(s.failed, 0, "no sandbox failed: {s:?}");
        let mut owners = 0;
        for c in &clients {
            owners += usize::from(reconciled_by(c).await.contains(&pool));
        }
        let back = cluster.pg.sql(
            &cluster.db,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'warmpool-r{victim}'"),
        );
        if owners == 1 && s.ready == 10 && s.warming == 0 && s.draining == 0 && back.trim() != "0" {
            break;
        }
        assert!(Instant::now() < deadline, "never converged: {s:?}, {owners} owners");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whatever the lost session left running (watchers, starts) has had its chance to miscount: watch a while.
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        for c in &clients {
            let s = c.pool_status(&pool).await.unwrap();
            assert_eq!((s.failed, s.ready, s.claimed), (0, 10, 2), "{s:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for c in &clients {
        claimed.push(c.create_sandbox(&require(&pool, 0)).await.unwrap().id);
    }
    for (i, id) in claimed.iter().enumerate() {
        for c in &clients {
            let r = sh(c, id, "hostname").await;
            assert_eq!((r.exit_code, r.stdout.trim()), (0, id.as_str()), "sandbox {i} served");
        }
    }
    let s = wait_status(&clients[victim], &pool, "refilled", |s| s.ready == 10 && s.warming == 0).await;
    assert_eq!((s.failed, s.claimed), (0, 5), "{s:?}");
    wait_until("exactly the ready and claimed sandboxes to run", Duration::from_secs(30), || {
        running_sandboxes(&data).len() == 15
    });
    for id in &claimed {
        clients[0].delete_sandbox(id).await.unwrap();
    }
    clients[0].delete_pool(&pool).await.unwrap();
    wait_no_procd(data.as_path());
}
