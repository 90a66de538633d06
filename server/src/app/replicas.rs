//! Several replicas on one store. Every replica serves every API call (exec, probes, logs and deletes reach any
//! sandbox: with the local runtime, replicas on one host share the data dir). What must happen once is divided:
//!
//! - **Pools**: each pool is reconciled by the one replica holding its lock ([`App::own_pool`]). A replica takes
//!   free pools up to its share (pools ÷ live replicas), so pools spread, and the pools of a replica that died are
//!   free at once (its database session closed) and taken within a second ([`App::balance`]). Taking a pool adopts
//!   its inventory: ready sandboxes are watched again, half-started ones of a dead replica undone.
//! - **Everything else a dead replica left** (its callers' sandboxes, cold starts, builds) is taken over by the
//!   leader ([`App::adopt_orphans`]).
//! - Other replicas' changes arrive as [`StoreEvent`]s: they poke the pool's reconciler (if it is here) and wake
//!   checkouts waiting here for that pool.
//!
//! With the embedded store this replica is the only one: it owns every pool and is the leader.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::mpsc::UnboundedReceiver;

use super::lifecycle::StopCause;
use super::{App, AppResult};
use crate::store::{Lifecycle, SandboxRow, StoreEvent};

use Lifecycle::*;

/// How often a replica looks for pools nobody reconciles.
const BALANCE_EVERY: Duration = Duration::from_secs(1);

impl App {
    /// Joins the store's replicas and follows their changes.
    pub async fn join_cluster(self: &Arc<Self>) -> AppResult<()> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.store.join(&self.replica, tx).await?;
        tokio::spawn(self.clone().follow_events(rx));
        Ok(())
    }

    async fn follow_events(self: Arc<Self>, mut events: UnboundedReceiver<StoreEvent>) {
        while let Some(event) = events.recv().await {
            match event {
                StoreEvent::Pool(pool) => {
                    self.inventory_signal(&pool).notify_waiters();
                    self.pokes.pool(&pool);
                }
                StoreEvent::All => self.pokes.all(),
                StoreEvent::LocksLost => {
                    self.owned.lock().expect("owned").clear();
                    self.leader.store(false, Ordering::SeqCst);
                }
            }
        }
    }

    /// Whether this replica reconciles the pool now.
    pub fn owns(&self, pool_id: &str) -> bool {
        self.owned.lock().expect("owned").contains(pool_id)
    }

    /// The pools this replica reconciles, sorted.
    pub fn owned_pools(&self) -> Vec<String> {
        let mut pools: Vec<String> = self.owned.lock().expect("owned").iter().cloned().collect();
        pools.sort();
        pools
    }

    /// How many pools this replica should reconcile at most (None: all of them).
    pub async fn pool_share(&self) -> AppResult<Option<usize>> {
        Ok(self.store.cluster().await?.map(|c| c.pools.div_ceil(c.replicas.max(1)).max(1) as usize))
    }

    /// Makes this replica the pool's reconciler if it is free and this replica is below `share`; adopts the pool's
    /// inventory when it does. True when this replica reconciles the pool.
    pub async fn own_pool(self: &Arc<Self>, pool_id: &str, share: Option<usize>) -> AppResult<bool> {
        {
            let owned = self.owned.lock().expect("owned");
            if owned.contains(pool_id) {
                return Ok(true);
            }
            if share.is_some_and(|share| owned.len() >= share) {
                return Ok(false);
            }
        }
        if !self.store.lock_pool(pool_id).await? {
            return Ok(false);
        }
        self.owned.lock().expect("owned").insert(pool_id.to_string());
        tracing::debug!(pool = %pool_id, replica = %self.replica, "Reconciling pool");
        self.adopt_pool(pool_id).await?;
        Ok(true)
    }

    /// Lets the pool go (it was deleted).
    pub async fn release_pool(&self, pool_id: &str) {
        self.metrics.forget_pool(pool_id);
        self.forget_demand(pool_id);
        if self.owned.lock().expect("owned").remove(pool_id) {
            if let Err(e) = self.store.unlock_pool(pool_id).await {
                tracing::warn!(pool = %pool_id, error = &e as &dyn std::error::Error, "Cannot release a pool");
            }
        }
    }

    /// Takes over the inventory a replica that is gone left in a pool: ready sandboxes are adopted (watched for exit
    /// and readiness) or failed when procd is gone; sandboxes it was starting are undone; removals left half-done
    /// are finished. Sandboxes of a live replica (one that lost the pool with its database session) stay its own:
    /// it finishes what it started, and the conditional writes make whatever both do happen once. A sandbox that
    /// cannot be taken over now is left for the pool's next pass.
    async fn adopt_pool(self: &Arc<Self>, pool_id: &str) -> AppResult<()> {
        let mut alive = HashMap::new();
        for row in self.store.list_pool_sandboxes(pool_id).await? {
            if row.pool_id.as_deref() != Some(pool_id) || self.owner_alive(&row, &mut alive).await? {
                continue;
            }
            let id = row.sandbox.id.clone();
            if let Err(e) = self.take_over(row).await {
                let e = &e as &dyn std::error::Error;
                tracing::warn!(pool = %pool_id, sandbox = %id, error = e, "Cannot take over a sandbox");
            }
        }
        Ok(())
    }

    /// Whether the replica owning `row` still runs (`alive` caches the answers of one sweep).
    async fn owner_alive(&self, row: &SandboxRow, alive: &mut HashMap<String, bool>) -> AppResult<bool> {
        let Some(owner) = &row.owner else { return Ok(false) };
        if owner == &self.replica {
            return Ok(true);
        }
        if let Some(known) = alive.get(owner) {
            return Ok(*known);
        }
        let known = self.store.replica_alive(owner).await?;
        alive.insert(owner.clone(), known);
        Ok(known)
    }

    /// Finishes or adopts a sandbox whose owner is gone, as the owner would have: a half-started sandbox is undone
    /// (nobody was handed it), a removal is finished, a live one is adopted (or failed if procd is gone).
    async fn take_over(self: &Arc<Self>, mut row: SandboxRow) -> AppResult<()> {
        let id = row.sandbox.id.clone();
        match row.lifecycle {
            // Committed before the runtime acts, like every move: the start's owner may still be alive (a lost
            // session looks like a death until it reconnects), and its start task, seeing procd stop, must lose
            // its `warming → failed` to this stop rather than count a failure that never happened.
            Warming => {
                if let Some(row) = self.begin_stop(row, &[Warming], StopCause::TakenOver).await? {
                    self.finish_stop(&row).await?;
                }
            }
            Draining => self.finish_stop(&row).await?,
            Failed if row.pool_id.is_some() => self.finish_stop(&row).await?,
            Failed => {}
            Ready | Claimed if self.runtime.adopt(&id, &row.handle) => {
                let from = row.lifecycle;
                row.owner = Some(self.replica.clone());
                if self.store.update_sandbox_if(&row, &[from]).await? && from == Ready {
                    self.watch_readiness(&row);
                }
            }
            Ready | Claimed => {
                let from = row.lifecycle;
                self.fail_sandbox(
                    row,
                    &[from],
                    "procd was gone when another replica took it over".into(),
                    None,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Takes over what replicas that are gone left outside pools: their callers' sandboxes (adopted, so their
    /// exits are seen), cold starts they were making (undone), removals (finished), and builds (failed: a build's
    /// steps ran in the replica that died).
    pub async fn adopt_orphans(self: &Arc<Self>) -> AppResult<usize> {
        let mut alive = HashMap::new();
        let mut taken = 0;
        for row in self.store.list_all_sandboxes().await? {
            if row.pool_id.is_some() || self.owner_alive(&row, &mut alive).await? {
                continue;
            }
            self.take_over(row).await?;
            taken += 1;
        }
        for mut build in self.store.list_builds_in(&["queued", "building"]).await? {
            let runner_alive = match &build.runner {
                Some(r) if r == &self.replica => true,
                Some(r) => *alive.entry(r.clone()).or_insert(self.store.replica_alive(r).await?),
                None => false,
            };
            if runner_alive {
                continue;
            }
            build.build.status = warmpool_api::BuildStatus::Failed;
            build.build.error = Some("the server running this build stopped before it finished".into());
            build.build.finished_at = Some(Utc::now());
            self.store.update_build(&build).await?;
            self.runtime.remove_artifact(&build.build.id).await;
            taken += 1;
        }
        Ok(taken)
    }

    /// With several replicas: once a second, takes free pools up to this replica's share, and leads when no other
    /// replica does (the leader takes over what a replica that died left outside pools). Cheap at rest: one small
    /// query a second.
    pub async fn balance(self: Arc<Self>) {
        let mut replicas = 0;
        loop {
            tokio::time::sleep(BALANCE_EVERY).await;
            if let Err(e) = self.balance_once(&mut replicas).await {
                tracing::warn!(error = &e as &dyn std::error::Error, "Cannot balance pools over replicas");
            }
        }
    }

    async fn balance_once(self: &Arc<Self>, last_replicas: &mut u64) -> AppResult<()> {
        let Some(cluster) = self.store.cluster().await? else { return Ok(()) };
        let replica_left = cluster.replicas < *last_replicas;
        *last_replicas = cluster.replicas;
        let became_leader = !self.leader.load(Ordering::SeqCst) && self.store.lock_leader().await?;
        if became_leader {
            self.leader.store(true, Ordering::SeqCst);
        }
        if self.leader.load(Ordering::SeqCst) && (became_leader || replica_left) {
            let taken = self.adopt_orphans().await?;
            if taken > 0 {
                tracing::info!(taken, "Took over what a stopped replica left");
            }
        }
        if cluster.locked_pools < cluster.pools {
            let share = self.pool_share().await?;
            for pool in self.store.list_pool_ids().await? {
                if !self.owns(&pool) && self.own_pool(&pool, share).await? {
                    self.pokes.pool(&pool);
                }
            }
        }
        Ok(())
    }
}
