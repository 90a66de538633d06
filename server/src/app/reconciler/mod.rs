//! The reconciler keeps every pool at its target. Level-triggered per pool: a pass over a pool looks at all of it,
//! a pure [`plan`] turns observed + desired state into actions, and [`App::reconcile_pool`] executes them. No
//! retries inside a pass: errors are recorded in the pool's status and the next pass tries again. Starts run in the
//! background, bounded by a semaphore, so a pool of 100 fills in about one start time.
//!
//! Cost grows with changes, not with pools: a pass runs for a pool when something pokes it (an API change, a
//! checkout, a sandbox becoming ready or failing — [`Pokes`]), when a time-based change falls due (a lease expiring,
//! a ready sandbox reaching its idle timeout), and otherwise once every [`RESYNC`] as a safety net, spread over
//! time so that 10,000 idle pools cost a trickle, not a burst. A pass that changes nothing writes nothing.

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio::sync::Notify;
use warmpool_api::{BuildStatus, DegradedReason, PoolId, Sandbox, SandboxId, SandboxState};

use crate::app::lifecycle::StartError;
use crate::app::pools::{start_rollout, PREWARM_FAILURE_LIMIT};

mod plan;
use crate::app::{new_id, App, AppError};
use crate::runtime::{StartSpec, Subject};
use crate::store::{BuildRow, LeaseRow, Lifecycle, PoolRow, RuntimeHandle, SandboxRow, TemplateRow};
pub use plan::{plan, Member, Observed, Plan};

/// Every pool gets a pass at least this often, even if nothing poked it.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a pool blocked on capacity or quota is looked at again.
const BLOCKED_RETRY: Duration = Duration::from_secs(2);
/// The least time between two passes of one pool: a refill waits at most this much longer, and a pool claimed
/// hundreds of times a second is passed (all its members read) at most 20 times a second.
const PASS_SPACING: Duration = Duration::from_millis(50);
/// When a pool whose pass panicked is tried again.
const PANIC_RETRY: Duration = Duration::from_secs(30);

/// Pools that want a pass. A poke names a pool and carries nothing else: the pass looks at everything of it.
#[derive(Default)]
pub struct Pokes {
    dirty: Mutex<HashSet<String>>,
    all: AtomicBool,
    notify: Notify,
}

impl Pokes {
    /// Something about this pool changed.
    pub fn pool(&self, id: &str) {
        self.dirty.lock().expect("pokes").insert(id.to_string());
        self.notify.notify_one();
    }

    /// Something every pool may depend on changed (a build finished, a tag moved, a template went).
    pub fn all(&self) {
        self.all.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    fn take(&self) -> (bool, HashSet<String>) {
        (self.all.swap(false, Ordering::SeqCst), std::mem::take(&mut *self.dirty.lock().expect("pokes")))
    }
}

/// A pool's last pass, published in its status.
#[derive(Debug, Clone, PartialEq)]
pub struct PassRecord {
    pub at: DateTime<Utc>,
    pub duration_ms: u64,
}

impl App {
    /// Runs passes until the process ends: for poked pools at once (pokes within 5 ms coalesce; a pool passed less
    /// than [`PASS_SPACING`] ago waits out the rest), and for the rest when their due time comes.
    pub async fn run_reconciler(self: Arc<Self>) {
        let mut due: HashMap<String, Instant> = HashMap::new();
        // When each pool may be passed again: PASS_SPACING after its last pass, PANIC_RETRY after one that panicked.
        let mut not_before: HashMap<String, Instant> = HashMap::new();
        loop {
            let next = due.values().min().copied().unwrap_or_else(|| Instant::now() + RESYNC);
            let wait = next.saturating_duration_since(Instant::now());
            if tokio::time::timeout(wait, self.pokes.notify.notified()).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let started = Instant::now();
            let (all, mut pools) = self.pokes.take();
            if all || due.is_empty() {
                match self.store.list_pools(None).await {
                    Ok(rows) => pools.extend(rows.into_iter().map(|r| r.pool.id.into())),
                    Err(e) => {
                        tracing::error!(error = &e as &dyn std::error::Error, "Reconciler cannot list pools");
                        self.pokes.all();
                        tokio::time::sleep(BLOCKED_RETRY).await;
                        continue;
                    }
                }
            }
            let now = Instant::now();
            pools.extend(due.iter().filter(|(_, at)| **at <= now).map(|(id, _)| id.clone()));
            // A pool poked again soon after its last pass (claimed over and over) waits out the rest of
            // PASS_SPACING: its pokes meanwhile fold into one pass instead of one pass each.
            not_before.retain(|_, at| *at > now);
            pools.retain(|pool| match not_before.get(pool) {
                Some(at) => {
                    due.insert(pool.clone(), *at);
                    false
                }
                None => true,
            });
            if pools.is_empty() {
                continue;
            }
            // Only the pool's one replica reconciles it (with one replica: this one, always).
            let share = match self.pool_share().await {
                Ok(share) => share,
                Err(e) => {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "Reconciler cannot see the replicas"
                    );
                    continue;
                }
            };
            for pool in pools {
                match self.own_pool(&pool, share).await {
                    Ok(true) => {}
                    Ok(false) => {
                        due.remove(&pool);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(pool = %pool, error = &e as &dyn std::error::Error, "Cannot take a pool");
                        due.insert(pool, Instant::now() + BLOCKED_RETRY);
                        continue;
                    }
                }
                not_before.insert(pool.clone(), Instant::now() + PASS_SPACING);
                // A pass that panics (a bug one pool's data reaches) is that pool's alone: the others go on.
                match AssertUnwindSafe(self.reconcile_pool(&pool)).catch_unwind().await {
                    Ok(Some(after)) => due.insert(pool, Instant::now() + after),
                    Ok(None) => due.remove(&pool),
                    Err(_) => {
                        tracing::error!(pool = %pool, "A reconcile pass panicked (see above); trying again in 30 s");
                        let retry = Instant::now() + PANIC_RETRY;
                        not_before.insert(pool.clone(), retry);
                        due.insert(pool, retry)
                    }
                };
            }
            self.metrics.reconcile_seconds.with_label_values(&[]).observe(started.elapsed().as_secs_f64());
        }
    }

    /// One pass over one pool; returns when it next falls due (None: the pool is gone).
    #[tracing::instrument(name = "reconcile", skip(self))]
    pub async fn reconcile_pool(self: &Arc<Self>, pool_id: &str) -> Option<Duration> {
        let started = Instant::now();
        let (blocked, last_error, next) = match self.reconcile_inner(pool_id).await {
            Ok(None) => {
                self.release_pool(pool_id).await;
                return None;
            }
            Ok(Some(Pass { blocked, next })) => (blocked, None, next),
            Err(e) => (Vec::new(), Some(e.to_string()), BLOCKED_RETRY),
        };
        let record = PassRecord { at: Utc::now(), duration_ms: started.elapsed().as_millis() as u64 };
        self.passes.lock().expect("passes").insert(pool_id.to_string(), record);
        // Write only what changed: an idle pool's pass writes nothing.
        let changed = self
            .store
            .get_pool_by_id(pool_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.ctl.blocked != blocked || r.ctl.last_error != last_error);
        if changed {
            let _ = self
                .update_pool(pool_id, |row| {
                    row.ctl.blocked = blocked.clone();
                    row.ctl.last_error = last_error.clone();
                })
                .await;
        }
        // Published by the demand loop within a second (a busy pool's passes do not each pay for it).
        self.publish_soon(pool_id);
        Some(next)
    }

    /// One pass: observe, plan, execute. None when the pool is gone.
    async fn reconcile_inner(self: &Arc<Self>, pool_id: &str) -> Result<Option<Pass>, AppError> {
        let Some(seen) = self.observe(pool_id).await? else { return Ok(None) };
        let mut plan = plan(&seen.observed);
        // `max_starts_per_second`: the rest start when the pool's bucket allows (a pass is due then).
        let (granted, bucket_wait) = self.start_budget(&seen.row, plan.start);
        plan.start = granted;
        self.execute(&seen, &plan).await?;
        let mut next = next_due(&seen, &plan);
        if let Some(wait) = bucket_wait {
            next = next.min(wait.max(Duration::from_millis(10)));
        }
        // An autoscaled pool's demand changes with time alone (claims leave the window, the pool goes idle); one
        // scaled up above its floor is looked at every second, so it comes down soon after demand does.
        if seen.row.pool.autoscale.enabled {
            let floor = crate::app::pools::target(&seen.row.pool, &seen.leases, seen.now);
            let scaled_up = seen.observed.target > floor;
            next =
                next.min(if scaled_up { Duration::from_secs(1) } else { crate::app::demand::AUTOSCALE_TICK });
        }
        Ok(Some(Pass { next, blocked: plan.blocked }))
    }

    /// Reads everything a pass needs about a pool. It also settles what the pool's own definition decides and
    /// needs no plan: the build it should run now (following its tag, which may start a rollout) and its expired
    /// leases.
    async fn observe(&self, pool_id: &str) -> Result<Option<Seen>, AppError> {
        let Some(row) = self.store.get_pool_by_id(pool_id).await? else { return Ok(None) };
        // Follow the tag (track_tag), or resolve a pinned ref once.
        let wanted = self.wanted_build(&row).await?;
        let wanted_ready = match &wanted {
            Some(id) => self.store.get_build(id).await?.is_some_and(|b| b.build.status == BuildStatus::Ready),
            None => false,
        };
        let row = match wanted.filter(|_| wanted_ready) {
            Some(new) if row.pool.resolved_build_id.as_deref() != Some(new.as_str()) => {
                let updated = self
                    .update_pool(pool_id, |row| {
                        if row.pool.resolved_build_id.is_some() {
                            start_rollout(row, Some(new.clone()));
                        } else {
                            row.pool.resolved_build_id = Some(new.clone());
                        }
                        row.clone()
                    })
                    .await?;
                match updated {
                    Some(row) => row,
                    None => return Ok(None),
                }
            }
            _ => row,
        };
        let pool = &row.pool;
        let now = Utc::now();
        let leases = self.store.list_leases(&pool.id).await?;
        for l in leases.iter().filter(|l| l.lease.expires_at <= now) {
            self.store.delete_lease(&pool.id, &l.lease.key).await?;
        }
        let build = match &pool.resolved_build_id {
            Some(id) => self.store.get_build(id).await?.filter(|b| b.build.status == BuildStatus::Ready),
            None => None,
        };
        let template = self.store.get_template(&row.account_id, &pool.template_id).await?;
        let sandboxes = self.store.list_pool_sandboxes(&pool.id).await?;
        let members: Vec<&SandboxRow> =
            sandboxes.iter().filter(|s| s.pool_id.as_deref() == Some(pool.id.as_str())).collect();
        let quota_headroom = match self.quotas(&row.account_id).await?.max_warm_sandboxes {
            Some(max) => {
                Some(max.saturating_sub(self.store.count_sandboxes(&row.account_id).await?.1) as u32)
            }
            None => None,
        };
        let live_total = self.store.count_live_sandboxes().await? as usize;
        let (target, _, scale) = self.pool_target(&row, &leases, now).await?;
        if scale != row.ctl.autoscale {
            self.update_pool(pool_id, |r| r.ctl.autoscale = scale.clone()).await?;
        }
        self.prune_demand(&row).await?;
        let observed = Observed {
            state: pool.state,
            target,
            generation: pool.rollout_generation,
            build_ready: build.is_some() && template.is_some(),
            fill_stopped: row.ctl.prewarm_failures >= PREWARM_FAILURE_LIMIT,
            members: members
                .iter()
                .map(|s| Member {
                    id: s.sandbox.id.clone(),
                    generation: s.pool_generation,
                    lifecycle: s.lifecycle,
                    ready_for_secs: s.ready_at.map(|t| (now - t).num_seconds().max(0) as u64),
                })
                .collect(),
            idle_timeout_seconds: pool.idle_timeout_seconds,
            quota_headroom,
            capacity: self.runtime.free_capacity(live_total) as u32,
        };
        Ok(Some(Seen { row, leases, build, template, sandboxes, observed, now }))
    }

    /// Carries a plan out: each stop is committed in the store before the runtime acts, each start is a row
    /// inserted before anything starts; the runtime's work runs in the background.
    async fn execute(self: &Arc<Self>, seen: &Seen, plan: &Plan) -> Result<(), AppError> {
        let Seen { row, build, template, .. } = seen;
        let pool = &row.pool;
        let members = seen.members();

        // Removals a crash or a runtime error left half-done are finished here.
        for member in
            members.iter().filter(|m| matches!(m.lifecycle, Lifecycle::Draining | Lifecycle::Failed))
        {
            let (app, member) = (self.clone(), (*member).clone());
            tokio::spawn(async move { app.finish_stop(&member).await });
        }
        for (id, cause) in &plan.stop {
            let Some(member) = members.iter().find(|m| &m.sandbox.id == id) else { continue };
            // Committed here, before the runtime acts; a claim that got there first wins and this does nothing.
            let from = [Lifecycle::Warming, Lifecycle::Ready];
            if let Some(member) = self.begin_stop((*member).clone(), &from, *cause).await? {
                let app = self.clone();
                tokio::spawn(async move { app.finish_stop(&member).await });
            }
        }
        if plan.start > 0 {
            let (template, build) = (
                template.as_ref().expect("build_ready checks it"),
                build.as_ref().expect("build_ready checks it"),
            );
            for _ in 0..plan.start {
                let mut spec = build.spec.clone();
                if pool.resources.cpu.is_some() {
                    spec.resources.cpu = pool.resources.cpu;
                }
                if pool.resources.memory_mb.is_some() {
                    spec.resources.memory_mb = pool.resources.memory_mb;
                }
                let now = Utc::now();
                let sandbox_row = SandboxRow {
                    account_id: row.account_id.clone(),
                    sandbox: Sandbox {
                        id: new_id(SandboxId::from_suffix),
                        template: template.template.name.clone(),
                        template_id: template.template.id.clone(),
                        build_id: build.build.id.clone(),
                        state: SandboxState::Starting,
                        labels: pool.labels.clone(),
                        created_at: now,
                        expires_at: None,
                        warm_pool_checkout: None,
                    },
                    pool_id: Some(pool.id.clone()),
                    lifecycle: Lifecycle::Warming,
                    claimed_from: None,
                    pool_generation: pool.rollout_generation,
                    ready_at: None,
                    timeout_policy: None,
                    claim_env: Default::default(),
                    handle: RuntimeHandle::default(),
                    error: None,
                    owner: Some(self.replica.clone()),
                };
                // Inserted before anything starts: the next pass counts it, and a crash finds it.
                self.store.insert_sandbox(&sandbox_row).await?;
                let start = StartSpec {
                    subject: Subject::Sandbox {
                        id: sandbox_row.sandbox.id.clone(),
                        build_id: build.build.id.clone(),
                    },
                    account_id: Some(row.account_id.clone()),
                    pool_id: Some(pool.id.clone()),
                    spec,
                    envs: Default::default(),
                    cwd: None,
                    volumes: Vec::new(),
                    network: Default::default(),
                };
                let app = self.clone();
                let pool_id = pool.id.clone();
                tokio::spawn(async move { app.prewarm(pool_id, sandbox_row, start).await });
            }
        }
        Ok(())
    }

    /// Starts one inventory sandbox. Only a real failure counts (and feeds the prewarm breaker); a sandbox stopped
    /// while starting (scale-down, drain, rollout) does not.
    async fn prewarm(self: Arc<Self>, pool_id: PoolId, mut row: SandboxRow, spec: StartSpec) {
        let _slot = self.start_slots.clone().acquire_owned().await;
        // The pool may have drained or moved on while this start waited for a slot.
        let still_wanted = matches!(
            self.store.get_sandbox(&row.sandbox.id).await,
            Ok(Some(current)) if current.lifecycle == Lifecycle::Warming
        );
        if still_wanted {
            let started = Instant::now();
            match self.start_sandbox(&mut row, spec, Lifecycle::Ready).await {
                Ok(()) => {
                    self.record_warmup(&pool_id, &row.sandbox.id, started.elapsed()).await;
                    // A success ends a run of failures; it writes the pool only when there was one.
                    let failing = matches!(
                        self.store.get_pool_by_id(&pool_id).await,
                        Ok(Some(r)) if r.ctl.prewarm_failures > 0
                    );
                    if failing {
                        let _ = self.update_pool(&pool_id, |r| r.ctl.prewarm_failures = 0).await;
                    }
                    self.watch_readiness(&row);
                    self.inventory_signal(&pool_id).notify_waiters();
                }
                Err(StartError::Stopped) => {}
                Err(StartError::Failed(e)) => {
                    // Counted in the pool by the lifecycle, when the sandbox went `failed`.
                    let e = &e as &dyn std::error::Error;
                    tracing::warn!(pool = %pool_id, sandbox = %row.sandbox.id, error = e, "Prewarm failed");
                }
            }
        }
        self.pokes.pool(&pool_id);
    }
}

/// What a pass observed of one pool.
struct Seen {
    row: PoolRow,
    leases: Vec<LeaseRow>,
    build: Option<BuildRow>,
    template: Option<TemplateRow>,
    /// The pool's sandboxes, the ones checked out of it included.
    sandboxes: Vec<SandboxRow>,
    observed: Observed,
    now: DateTime<Utc>,
}

impl Seen {
    /// The pool's own (unclaimed) sandboxes.
    fn members(&self) -> Vec<&SandboxRow> {
        self.sandboxes.iter().filter(|s| s.pool_id.as_deref() == Some(self.row.pool.id.as_str())).collect()
    }
}

/// When the pool's next pass falls due without a poke: leases expire and ready sandboxes reach their idle
/// timeout at known times; otherwise the resync, spread over 30 s so idle pools do not come due together.
fn next_due(seen: &Seen, plan: &Plan) -> Duration {
    let now = seen.now;
    let mut next = RESYNC + Duration::from_millis(rand::random::<u64>() % 30_000);
    let mut until = |at: DateTime<Utc>| {
        let left = (at - now).to_std().unwrap_or_default() + Duration::from_millis(10);
        next = next.min(left);
    };
    seen.leases.iter().filter(|l| l.lease.expires_at > now).for_each(|l| until(l.lease.expires_at));
    if let Some(idle) = seen.row.pool.idle_timeout_seconds {
        // Bounded as the API bounds it, for a pool stored before the API did.
        let idle = idle.min(warmpool_api::DURATION_SECONDS_MAX);
        seen.members()
            .iter()
            .filter_map(|m| m.ready_at.filter(|_| m.lifecycle == Lifecycle::Ready))
            .for_each(|at| until(at + chrono::Duration::seconds(idle as i64)));
    }
    if !plan.blocked.is_empty() {
        next = next.min(BLOCKED_RETRY);
    }
    next
}

/// What a pass leaves behind.
struct Pass {
    blocked: Vec<DegradedReason>,
    next: Duration,
}
