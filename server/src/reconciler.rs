//! The reconciler keeps every pool at its target. Level-triggered: a pass looks at everything (on a timer and when
//! poked; a poke carries no payload), a pure [`plan`] turns observed + desired state into actions, and
//! [`App::reconcile_pool`] executes them. No retries inside a pass: errors are recorded in the pool's status and
//! the next pass tries again. Starts run in the background, bounded by a semaphore, so a pool of 100 fills in
//! about one start time (times 100 / the bound).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use warmpool_api::{BuildStatus, DegradedReason, PoolState, Sandbox, SandboxState, VersionPolicy};

use crate::app::pools::{target, PREWARM_FAILURE_LIMIT};
use crate::app::{new_id, App};
use crate::runtime::StartSpec;
use crate::store::{PoolSlot, RuntimeHandle, SandboxRow};

/// A pool's unclaimed sandbox as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: String,
    pub generation: u64,
    pub slot: PoolSlot,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Above target.
    Excess,
    /// Of an older rollout generation.
    Rollout,
    /// The pool is draining.
    Drain,
    /// Ready longer than `idle_timeout_seconds`.
    Expired,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub start: u32,
    pub stop: Vec<(String, StopReason)>,
    /// Why fewer sandboxes are started than the target needs.
    pub blocked: Vec<DegradedReason>,
}

/// Desired + observed → actions. Pure: no I/O, tested with tables.
pub fn plan(o: &Observed) -> Plan {
    let mut p = Plan::default();
    let live: Vec<&Member> = o.members.iter().filter(|m| m.slot != PoolSlot::Draining).collect();
    if o.state == PoolState::Draining {
        p.stop = live.iter().map(|m| (m.id.clone(), StopReason::Drain)).collect();
        return p;
    }
    let mut current_ready = Vec::new();
    let mut current_warming = Vec::new();
    let mut old_ready = Vec::new();
    for m in &live {
        let expired = m.slot == PoolSlot::Ready
            && o.idle_timeout_seconds.zip(m.ready_for_secs).is_some_and(|(limit, age)| age >= limit);
        if expired {
            p.stop.push((m.id.clone(), StopReason::Expired));
        } else if m.generation == o.generation {
            if m.slot == PoolSlot::Ready {
                current_ready.push(*m)
            } else {
                current_warming.push(*m)
            }
        } else if m.slot == PoolSlot::Ready {
            old_ready.push(*m);
        } else {
            p.stop.push((m.id.clone(), StopReason::Rollout));
        }
    }
    if o.state == PoolState::Disabled {
        // Disabled keeps its inventory (old generations included) and starts nothing.
        p.stop.retain(|(_, r)| *r == StopReason::Expired);
        return p;
    }
    let target = o.target as usize;
    // Old ready sandboxes keep serving until the new generation has enough ready ones.
    let keep_old = target.saturating_sub(current_ready.len()).min(old_ready.len());
    p.stop.extend(old_ready[keep_old..].iter().map(|m| (m.id.clone(), StopReason::Rollout)));
    // Above target: stop warming ones first, then the newest ready.
    let alive = current_ready.len() + current_warming.len();
    if alive > target {
        let mut excess = alive - target;
        for m in current_warming.iter().chain(current_ready.iter().rev()) {
            if excess == 0 {
                break;
            }
            p.stop.push((m.id.clone(), StopReason::Excess));
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
    /// Runs passes until the process ends: on every poke and at least once a second.
    pub async fn run_reconciler(self: Arc<Self>) {
        loop {
            if tokio::time::timeout(Duration::from_secs(1), self.poke.notified()).await.is_ok() {
                // Let a burst of pokes (one per checkout) coalesce into one pass.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let started = Instant::now();
            let pools = match self.store.list_pools(None) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = &e as &dyn std::error::Error, "Reconciler cannot list pools");
                    continue;
                }
            };
            for pool in pools {
                self.reconcile_pool(&pool.pool.id).await;
            }
            self.metrics.reconcile_seconds.with_label_values(&[]).observe(started.elapsed().as_secs_f64());
        }
    }

    /// One pass over one pool.
    #[tracing::instrument(skip(self), level = "debug")]
    pub async fn reconcile_pool(self: &Arc<Self>, pool_id: &str) {
        let started = Instant::now();
        let outcome = self.reconcile_inner(pool_id).await;
        let elapsed = started.elapsed();
        let _ = self.update_pool(pool_id, |row| {
            row.ctl.last_reconciled_at = Some(Utc::now());
            row.ctl.last_reconcile_duration_ms = Some(elapsed.as_millis() as u64);
            match outcome {
                Ok(blocked) => {
                    row.ctl.blocked = blocked;
                    row.ctl.last_error = None;
                }
                Err(e) => row.ctl.last_error = Some(e),
            }
        });
    }

    async fn reconcile_inner(self: &Arc<Self>, pool_id: &str) -> Result<Vec<DegradedReason>, String> {
        let err = |e: &dyn std::error::Error| e.to_string();
        // Follow the tag (track_tag) or resolve a pinned ref once.
        let row = self
            .update_pool(pool_id, |row| {
                let p = &mut row.pool;
                let wanted = match (p.version_policy, &p.track_tag) {
                    (VersionPolicy::TrackTag, Some(tag)) => {
                        self.store.get_tag(&p.template_id, tag).ok().flatten().map(|t| t.build_id)
                    }
                    _ if p.resolved_build_id.is_none() => {
                        self.resolve_ref(&row.account_id, "template", &p.template).ok().and_then(|(_, b)| b).map(|b| b.build.id)
                    }
                    _ => None,
                };
                let ready = wanted
                    .as_ref()
                    .and_then(|id| self.store.get_build(id).ok().flatten())
                    .is_some_and(|b| b.build.status == BuildStatus::Ready);
                if let Some(new) = wanted.filter(|_| ready) {
                    if p.resolved_build_id.as_deref() != Some(new.as_str()) {
                        if p.resolved_build_id.is_some() {
                            p.previous_build_id = p.resolved_build_id.take();
                            p.rollout_generation += 1;
                            row.ctl.prewarm_failures = 0;
                            tracing::info!(pool = %p.id, build = %new, generation = p.rollout_generation, "Rolling out a new build");
                        }
                        p.resolved_build_id = Some(new);
                    }
                }
                row.clone()
            })
            .map_err(|e| err(&e))?;
        let Some(row) = row else { return Ok(Vec::new()) };
        let pool = &row.pool;
        let now = Utc::now();
        let leases = self.store.list_leases(&pool.id).map_err(|e| err(&e))?;
        for l in leases.iter().filter(|l| l.lease.expires_at <= now) {
            let _ = self.store.delete_lease(&pool.id, &l.lease.key);
        }
        let build = match &pool.resolved_build_id {
            Some(id) => self
                .store
                .get_build(id)
                .map_err(|e| err(&e))?
                .filter(|b| b.build.status == BuildStatus::Ready),
            None => None,
        };
        let template = self.store.get_template(&row.account_id, &pool.template_id).map_err(|e| err(&e))?;
        let sandboxes = self.store.list_pool_sandboxes(&pool.id).map_err(|e| err(&e))?;
        let members: Vec<&SandboxRow> =
            sandboxes.iter().filter(|s| s.pool_id.as_deref() == Some(pool.id.as_str())).collect();
        let quota = self.quotas(&row.account_id).map_err(|e| err(&e))?;
        let quota_headroom = match quota.max_warm_sandboxes {
            Some(max) => {
                let (_, warm) = self.store.count_sandboxes(&row.account_id).map_err(|e| err(&e))?;
                Some(max.saturating_sub(warm) as u32)
            }
            None => None,
        };
        let live_total = self.store.count_live_sandboxes().map_err(|e| err(&e))? as usize;
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
                    slot: s.pool_slot.unwrap_or(PoolSlot::Warming),
                    ready_for_secs: s.ready_at.map(|t| (now - t).num_seconds().max(0) as u64),
                })
                .collect(),
            idle_timeout_seconds: pool.idle_timeout_seconds,
            quota_headroom,
            capacity: self.runtime.free_capacity(live_total) as u32,
        };
        let plan = plan(&observed);
        for (state, n) in [
            ("ready", observed.members.iter().filter(|m| m.slot == PoolSlot::Ready).count()),
            ("warming", observed.members.iter().filter(|m| m.slot == PoolSlot::Warming).count()),
            ("draining", observed.members.iter().filter(|m| m.slot == PoolSlot::Draining).count()),
        ] {
            self.metrics.pool_sandboxes.with_label_values(&[&pool.id, state]).set(n as i64);
        }

        for (id, reason) in &plan.stop {
            let Some(mut member) = members.iter().find(|m| &m.sandbox.id == id).map(|m| (*m).clone()) else {
                continue;
            };
            member.pool_slot = Some(PoolSlot::Draining);
            self.store.update_sandbox(&member).map_err(|e| err(&e))?;
            if *reason == StopReason::Expired {
                let _ = self.update_pool(&pool.id, |r| r.ctl.expired_total += 1);
            }
            let app = self.clone();
            tokio::spawn(async move {
                let _ = app.destroy(member).await;
            });
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
                    pool_slot: Some(PoolSlot::Warming),
                    claimed_from: None,
                    pool_generation: pool.rollout_generation,
                    ready_at: None,
                    timeout_policy: None,
                    claim_env: Default::default(),
                    handle: RuntimeHandle::default(),
                    error: None,
                };
                // Inserted now, so the next pass counts it as warming and does not start it twice.
                self.store.insert_sandbox(&sandbox_row).map_err(|e| err(&e))?;
                let start = StartSpec {
                    sandbox_id: sandbox_row.sandbox.id.clone(),
                    artifact: Some(self.runtime.artifact(&build.build.id)),
                    spec,
                    envs: Default::default(),
                    cwd: None,
                    volumes: Vec::new(),
                    private_network: false,
                };
                let app = self.clone();
                let pool_id = pool.id.clone();
                tokio::spawn(async move { app.prewarm(pool_id, sandbox_row, start).await });
            }
        }
        Ok(plan.blocked)
    }

    async fn prewarm(self: Arc<Self>, pool_id: String, mut row: SandboxRow, spec: StartSpec) {
        let _slot = self.start_slots.clone().acquire_owned().await;
        // The pool may have drained or moved on while this start waited for a slot.
        if self.store.get_sandbox(&row.sandbox.id).ok().flatten().and_then(|r| r.pool_slot)
            != Some(PoolSlot::Warming)
        {
            return;
        }
        match self.start_sandbox(&mut row, spec).await {
            Ok(()) => {
                let _ = self.update_pool(&pool_id, |r| r.ctl.prewarm_failures = 0);
                // A drain or a pool delete may have removed it while it was starting.
                match self.store.get_sandbox(&row.sandbox.id).ok().flatten() {
                    Some(current) if current.pool_slot == Some(PoolSlot::Ready) => {
                        self.inventory_signal(&pool_id).notify_waiters();
                    }
                    Some(current) => {
                        let _ = self.destroy(current).await;
                    }
                    None => self.runtime.stop(&row.sandbox.id, &row.handle, true).await,
                }
            }
            Err(e) => {
                let message = e.to_string();
                tracing::warn!(pool = %pool_id, sandbox = %row.sandbox.id, %message, "Prewarm failed");
                let _ = self.update_pool(&pool_id, |r| {
                    r.ctl.prewarm_failures += 1;
                    r.ctl.failed_total += 1;
                    r.ctl.last_failure_logs = Some(message.clone());
                    r.ctl.last_error = Some(message);
                });
            }
        }
        self.poke.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, generation: u64, slot: PoolSlot, age: Option<u64>) -> Member {
        Member { id: id.into(), generation, slot, ready_for_secs: age }
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

    fn stops(p: &Plan) -> Vec<(&str, StopReason)> {
        p.stop.iter().map(|(id, r)| (id.as_str(), *r)).collect()
    }

    #[test]
    fn planner_table() {
        use PoolSlot::*;
        use StopReason::*;
        struct Case {
            name: &'static str,
            o: Observed,
            start: u32,
            stop: Vec<(&'static str, StopReason)>,
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
                let slot = match s { 0 => PoolSlot::Warming, 1 => PoolSlot::Ready, _ => PoolSlot::Draining };
                member(&format!("m{i}"), *g, slot, *age)
            }).collect();
            let o = Observed { idle_timeout_seconds: Some(50), ..observed(target, members.clone()) };
            let p = plan(&o);
            let stopped: std::collections::HashSet<_> = p.stop.iter().map(|(id, _)| id.clone()).collect();
            proptest::prop_assert_eq!(stopped.len(), p.stop.len());
            let current_live = members.iter().filter(|m| m.generation == 2 && m.slot != PoolSlot::Draining && !stopped.contains(&m.id)).count();
            proptest::prop_assert!(current_live + p.start as usize <= (target as usize).max(current_live.min(target as usize)));
        }
    }
}
