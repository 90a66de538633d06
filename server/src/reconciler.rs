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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use warmpool_api::{BuildStatus, DegradedReason, PoolState, Sandbox, SandboxState};

use crate::app::lifecycle::{StartError, StopCause};
use crate::app::pools::{start_rollout, target, Counts, PREWARM_FAILURE_LIMIT};
use crate::app::{new_id, App, AppError};
use crate::runtime::StartSpec;
use crate::store::{Lifecycle, RuntimeHandle, SandboxRow};

/// Every pool gets a pass at least this often, even if nothing poked it.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How soon a pool blocked on capacity or quota is looked at again.
const BLOCKED_RETRY: Duration = Duration::from_secs(2);

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

/// A pool's unclaimed sandbox as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub generation: u64,
    /// `warming`, `ready`, `draining` or `failed` (claimed sandboxes are no longer members).
    pub lifecycle: Lifecycle,
    /// Seconds since it became ready.
    pub ready_for_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: PoolState,
    pub target: u32,
    pub generation: u64,
    /// The resolved build is ready to start sandboxes from.
    pub build_ready: bool,
    /// Filling stopped after repeated prewarm failures.
    pub fill_stopped: bool,
    pub members: Vec<Member>,
    pub idle_timeout_seconds: Option<u64>,
    /// More warm sandboxes the account's quota allows (None: unlimited).
    pub quota_headroom: Option<u32>,
    /// More sandboxes the runtime takes.
    pub capacity: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub start: u32,
    pub stop: Vec<(String, StopCause)>,
    /// Why fewer sandboxes are started than the target needs.
    pub blocked: Vec<DegradedReason>,
}

/// Desired + observed → actions. Pure: no I/O, tested with tables.
pub fn plan(o: &Observed) -> Plan {
    let mut p = Plan::default();
    let live: Vec<&Member> =
        o.members.iter().filter(|m| matches!(m.lifecycle, Lifecycle::Warming | Lifecycle::Ready)).collect();
    if o.state == PoolState::Draining {
        p.stop = live.iter().map(|m| (m.id.clone(), StopCause::Drain)).collect();
        return p;
    }
    let mut current_ready = Vec::new();
    let mut current_warming = Vec::new();
    let mut old_ready = Vec::new();
    for m in &live {
        let expired = m.lifecycle == Lifecycle::Ready
            && o.idle_timeout_seconds.zip(m.ready_for_secs).is_some_and(|(limit, age)| age >= limit);
        if expired {
            p.stop.push((m.id.clone(), StopCause::Expired));
        } else if m.generation == o.generation {
            if m.lifecycle == Lifecycle::Ready {
                current_ready.push(*m)
            } else {
                current_warming.push(*m)
            }
        } else if m.lifecycle == Lifecycle::Ready {
            old_ready.push(*m);
        } else {
            p.stop.push((m.id.clone(), StopCause::Rollout));
        }
    }
    if o.state == PoolState::Disabled {
        // Disabled keeps its inventory (old generations included) and starts nothing.
        p.stop.retain(|(_, r)| *r == StopCause::Expired);
        return p;
    }
    let target = o.target as usize;
    // Old ready sandboxes keep serving until the new generation has enough ready ones.
    let keep_old = target.saturating_sub(current_ready.len()).min(old_ready.len());
    p.stop.extend(old_ready[keep_old..].iter().map(|m| (m.id.clone(), StopCause::Rollout)));
    // Above target: stop warming ones first, then the newest ready.
    let alive = current_ready.len() + current_warming.len();
    if alive > target {
        let mut excess = alive - target;
        for m in current_warming.iter().chain(current_ready.iter().rev()) {
            if excess == 0 {
                break;
            }
            p.stop.push((m.id.clone(), StopCause::ScaleDown));
            excess -= 1;
        }
        return p;
    }
    if !o.build_ready || o.fill_stopped {
        return p;
    }
    let want = (target - alive) as u32;
    let mut start = want;
    if let Some(headroom) = o.quota_headroom {
        if headroom < start {
            start = headroom;
            p.blocked.push(DegradedReason::QuotaExceeded);
        }
    }
    if o.capacity < start {
        start = o.capacity;
        p.blocked.push(DegradedReason::NoEligibleHosts);
    }
    p.start = start;
    p
}

impl App {
    /// Runs passes until the process ends: for poked pools at once (pokes within 5 ms coalesce), and for the rest
    /// when their due time comes.
    pub async fn run_reconciler(self: Arc<Self>) {
        let mut due: HashMap<String, Instant> = HashMap::new();
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
                    Ok(rows) => pools.extend(rows.into_iter().map(|r| r.pool.id)),
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
                match self.reconcile_pool(&pool).await {
                    Some(after) => due.insert(pool, Instant::now() + after),
                    None => due.remove(&pool),
                };
            }
            self.metrics.reconcile_seconds.with_label_values(&[]).observe(started.elapsed().as_secs_f64());
        }
    }

    /// One pass over one pool; returns when it next falls due (None: the pool is gone).
    #[tracing::instrument(skip(self), level = "debug")]
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
        Some(next)
    }

    async fn reconcile_inner(self: &Arc<Self>, pool_id: &str) -> Result<Option<Pass>, AppError> {
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
        let observed = Observed {
            state: pool.state,
            target: target(pool, &leases, now),
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
        let plan = plan(&observed);
        let counts = Counts::of(&pool.id, &sandboxes);
        for (state, n) in
            [("ready", counts.ready), ("warming", counts.warming), ("draining", counts.draining)]
        {
            self.metrics.pool_sandboxes.with_label_values(&[&pool.id, state]).set(n as i64);
        }

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
            let (template, build) =
                (template.expect("build_ready checks it"), build.expect("build_ready checks it"));
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
                        id: new_id(warmpool_api::id_prefix::SANDBOX),
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
                    sandbox_id: sandbox_row.sandbox.id.clone(),
                    account_id: row.account_id.clone(),
                    pool_id: Some(pool.id.clone()),
                    build_id: Some(build.build.id.clone()),
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
        // When does a time-based change fall due? Leases expire; ready sandboxes reach their idle timeout.
        let mut next = RESYNC + Duration::from_millis(rand::random::<u64>() % 30_000);
        let mut until = |at: DateTime<Utc>| {
            let left = (at - now).to_std().unwrap_or_default() + Duration::from_millis(10);
            next = next.min(left);
        };
        leases.iter().filter(|l| l.lease.expires_at > now).for_each(|l| until(l.lease.expires_at));
        if let Some(idle) = pool.idle_timeout_seconds {
            members
                .iter()
                .filter_map(|m| m.ready_at.filter(|_| m.lifecycle == Lifecycle::Ready))
                .for_each(|at| until(at + chrono::Duration::seconds(idle as i64)));
        }
        if !plan.blocked.is_empty() {
            next = next.min(BLOCKED_RETRY);
        }
        Ok(Some(Pass { blocked: plan.blocked, next }))
    }

    /// Starts one inventory sandbox. Only a real failure counts (and feeds the prewarm breaker); a sandbox stopped
    /// while starting (scale-down, drain, rollout) does not.
    async fn prewarm(self: Arc<Self>, pool_id: String, mut row: SandboxRow, spec: StartSpec) {
        let _slot = self.start_slots.clone().acquire_owned().await;
        // The pool may have drained or moved on while this start waited for a slot.
        let still_wanted = matches!(
            self.store.get_sandbox(&row.sandbox.id).await,
            Ok(Some(current)) if current.lifecycle == Lifecycle::Warming
        );
        if still_wanted {
            match self.start_sandbox(&mut row, spec, Lifecycle::Ready).await {
                Ok(()) => {
                    let _ = self.update_pool(&pool_id, |r| r.ctl.prewarm_failures = 0).await;
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

/// What a pass leaves behind.
struct Pass {
    blocked: Vec<DegradedReason>,
    next: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, generation: u64, lifecycle: Lifecycle, age: Option<u64>) -> Member {
        Member { id: id.into(), generation, lifecycle, ready_for_secs: age }
    }

    fn observed(target: u32, members: Vec<Member>) -> Observed {
        Observed {
            state: PoolState::Enabled,
            target,
            generation: 2,
            build_ready: true,
            fill_stopped: false,
            members,
            idle_timeout_seconds: None,
            quota_headroom: None,
            capacity: 1000,
        }
    }

    fn stops(p: &Plan) -> Vec<(&str, StopCause)> {
        p.stop.iter().map(|(id, r)| (id.as_str(), *r)).collect()
    }

    #[test]
    fn planner_table() {
        use Lifecycle::*;
        use StopCause::{Drain, Expired, Rollout, ScaleDown as Excess};
        struct Case {
            name: &'static str,
            o: Observed,
            start: u32,
            stop: Vec<(&'static str, StopCause)>,
            blocked: Vec<DegradedReason>,
        }
        let cases = vec![
            Case {
                name: "empty pool fills to target",
                o: observed(3, vec![]),
                start: 3,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "warming counts toward target",
                o: observed(3, vec![member("a", 2, Warming, None), member("b", 2, Ready, Some(1))]),
                start: 1,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "excess stops warming first, then newest ready",
                o: observed(
                    1,
                    vec![
                        member("a", 2, Ready, Some(9)),
                        member("b", 2, Ready, Some(1)),
                        member("c", 2, Warming, None),
                    ],
                ),
                start: 0,
                stop: vec![("c", Excess), ("b", Excess)],
                blocked: vec![],
            },
            Case {
                name: "rollout keeps old ready until new ones are ready",
                o: observed(
                    2,
                    vec![
                        member("o1", 1, Ready, Some(5)),
                        member("o2", 1, Ready, Some(5)),
                        member("ow", 1, Warming, None),
                    ],
                ),
                start: 2,
                stop: vec![("ow", Rollout)],
                blocked: vec![],
            },
            Case {
                name: "rollout drains old ready as new ones become ready",
                o: observed(
                    2,
                    vec![
                        member("o1", 1, Ready, Some(5)),
                        member("o2", 1, Ready, Some(5)),
                        member("n1", 2, Ready, Some(0)),
                    ],
                ),
                start: 1,
                stop: vec![("o2", Rollout)],
                blocked: vec![],
            },
            Case {
                name: "draining stops everything and starts nothing",
                o: Observed {
                    state: PoolState::Draining,
                    ..observed(
                        0,
                        vec![
                            member("a", 2, Ready, Some(1)),
                            member("b", 2, Warming, None),
                            member("c", 2, Draining, None),
                        ],
                    )
                },
                start: 0,
                stop: vec![("a", Drain), ("b", Drain)],
                blocked: vec![],
            },
            Case {
                name: "disabled keeps inventory",
                o: Observed {
                    state: PoolState::Disabled,
                    ..observed(0, vec![member("a", 2, Ready, Some(1)), member("o", 1, Ready, Some(1))])
                },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "idle timeout expires stale ready sandboxes and replaces them",
                o: Observed {
                    idle_timeout_seconds: Some(60),
                    ..observed(2, vec![member("old", 2, Ready, Some(61)), member("new", 2, Ready, Some(3))])
                },
                start: 1,
                stop: vec![("old", Expired)],
                blocked: vec![],
            },
            Case {
                name: "quota caps the fill",
                o: Observed { quota_headroom: Some(1), ..observed(3, vec![]) },
                start: 1,
                stop: vec![],
                blocked: vec![DegradedReason::QuotaExceeded],
            },
            Case {
                name: "no capacity",
                o: Observed { capacity: 0, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![DegradedReason::NoEligibleHosts],
            },
            Case {
                name: "build not ready: nothing starts",
                o: Observed { build_ready: false, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "prewarm failures stop filling",
                o: Observed { fill_stopped: true, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
        ];
        for c in cases {
            let p = plan(&c.o);
            assert_eq!(p.start, c.start, "{}: start", c.name);
            assert_eq!(stops(&p), c.stop, "{}: stop", c.name);
            assert_eq!(p.blocked, c.blocked, "{}: blocked", c.name);
        }
    }

    proptest::proptest! {
        /// Whatever is observed, an enabled pool never plans more live sandboxes of the current generation than
        /// its target, and never stops a sandbox twice.
        #[test]
        fn planner_never_overshoots(target in 0u32..20, slots in proptest::collection::vec((0u64..3, 0u8..3, proptest::option::of(0u64..100)), 0..30)) {
            let members: Vec<Member> = slots.iter().enumerate().map(|(i, (g, s, age))| {
                let slot = match s { 0 => Lifecycle::Warming, 1 => Lifecycle::Ready, _ => Lifecycle::Draining };
                member(&format!("m{i}"), *g, slot, *age)
            }).collect();
            let o = Observed { idle_timeout_seconds: Some(50), ..observed(target, members.clone()) };
            let p = plan(&o);
            let stopped: std::collections::HashSet<_> = p.stop.iter().map(|(id, _)| id.clone()).collect();
            proptest::prop_assert_eq!(stopped.len(), p.stop.len());
            let current_live = members.iter().filter(|m| m.generation == 2 && m.lifecycle != Lifecycle::Draining && !stopped.contains(&m.id)).count();
            proptest::prop_assert!(current_live + p.start as usize <= (target as usize).max(current_live.min(target as usize)));
        }
    }
}
