//! Warm pools: CRUD, state changes, leases and status. Filling and draining is the reconciler's job
//! (`crate::reconciler`); these calls change the desired state and poke it.

use std::sync::Arc;

use chrono::Utc;
use warmpool_api::{
    BuildId, BuildStatus, DegradedReason, FieldError, Lease, LeaseRelease, LeaseSpec, List, PoolId,
    PoolState, PoolStatus, VersionPolicy, WarmPool, WarmPoolPatch, WarmPoolSpec,
};

use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::store::{LeaseRow, Lifecycle, PoolControl, PoolRow, SandboxRow, StoreResult};

/// Prewarm failures in a row after which a pool stops filling.
/// How long a delete waits for its pool to drain.
const DELETE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

pub const PREWARM_FAILURE_LIMIT: u32 = 3;

/// `min(max_ready, min_ready + Σ active lease counts)`, 0 unless enabled.
pub fn target(pool: &WarmPool, leases: &[LeaseRow], now: chrono::DateTime<Utc>) -> u32 {
    if pool.state != PoolState::Enabled {
        return 0;
    }
    let leased: u64 = leases.iter().filter(|l| l.lease.expires_at > now).map(|l| l.lease.count as u64).sum();
    (pool.min_ready as u64 + leased).min(pool.max_ready as u64) as u32
}

/// A pool's sandboxes counted by where they are in their lifecycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ready: u32,
    pub warming: u32,
    pub draining: u32,
    /// Checked out from this pool and still alive.
    pub claimed: u32,
}

impl Counts {
    pub fn of(pool_id: &str, rows: &[SandboxRow]) -> Counts {
        let mut c = Counts::default();
        for s in rows {
            let inventory = s.pool_id.as_deref() == Some(pool_id);
            match s.lifecycle {
                Lifecycle::Ready if inventory => c.ready += 1,
                Lifecycle::Warming if inventory => c.warming += 1,
                Lifecycle::Draining if inventory => c.draining += 1,
                Lifecycle::Claimed if s.claimed_from.as_deref() == Some(pool_id) => c.claimed += 1,
                _ => {}
            }
        }
        c
    }
}

/// Starts a new rollout generation towards `new_build` (None: not resolvable yet). Old inventory drains as the new
/// generation fills; a prewarm-failure stop is lifted.
pub fn start_rollout(row: &mut PoolRow, new_build: Option<BuildId>) {
    let p = &mut row.pool;
    if p.resolved_build_id != new_build && p.resolved_build_id.is_some() {
        p.previous_build_id = p.resolved_build_id.take();
    }
    p.resolved_build_id = new_build;
    p.rollout_generation += 1;
    row.ctl.prewarm_failures = 0;
    row.ctl.last_failure_logs = None;
    tracing::info!(pool = %p.id, build = ?p.resolved_build_id, generation = p.rollout_generation, "Rolling out");
}

impl App {
    /// The build the pool should run now: a `track_tag` pool's tag target, otherwise its resolved build (or what its
    /// ref resolves to, before the first resolution).
    pub async fn wanted_build(&self, row: &PoolRow) -> StoreResult<Option<BuildId>> {
        let p = &row.pool;
        Ok(match (p.version_policy, &p.track_tag) {
            (VersionPolicy::TrackTag, Some(tag)) => {
                self.store.get_tag(&p.template_id, tag).await?.map(|t| t.build_id)
            }
            _ if p.resolved_build_id.is_some() => p.resolved_build_id.clone(),
            _ => self
                .resolve_ref(&row.account_id, "template", &p.template)
                .await
                .ok()
                .and_then(|(_, b)| b)
                .map(|b| b.build.id),
        })
    }

    pub async fn create_pool(&self, caller: &Caller, spec: WarmPoolSpec) -> AppResult<WarmPool> {
        spec.validate()?;
        let (template, build) = self.resolve_ref(&caller.account_id, "template", &spec.template).await?;
        let now = Utc::now();
        let policy = spec.effective_version_policy();
        let pool = WarmPool {
            id: new_id(PoolId::from_suffix),
            name: spec.name.clone(),
            template: spec.template.clone(),
            template_id: template.template.id.clone(),
            version_policy: policy,
            track_tag: spec.effective_track_tag(),
            min_ready: spec.min_ready,
            max_ready: spec.max_ready,
            resources: spec.resources.clone().unwrap_or_default(),
            checkout_policy: spec.checkout_policy,
            idle_timeout_seconds: spec.idle_timeout_seconds,
            labels: spec.labels.clone(),
            state: if spec.enabled == Some(false) { PoolState::Disabled } else { PoolState::Enabled },
            rollout_generation: 1,
            resolved_build_id: build.filter(|b| b.build.status == BuildStatus::Ready).map(|b| b.build.id),
            previous_build_id: None,
            created_at: now,
            updated_at: now,
            autoscale: spec.autoscale.clone().unwrap_or_default(),
            max_starts_per_second: spec.max_starts_per_second,
        };
        self.store
            .insert_pool(&PoolRow {
                account_id: caller.account_id.clone(),
                pool: pool.clone(),
                ctl: PoolControl::default(),
                rev: 0,
            })
            .await?;
        self.pokes.pool(&pool.id);
        Ok(pool)
    }

    pub async fn list_pools(&self, caller: &Caller, page: &crate::store::Page) -> AppResult<List<WarmPool>> {
        let fetch = async |p: &crate::store::Page| self.store.page_pools(&caller.account_id, p).await;
        super::paged(page, fetch, |w: &WarmPool| &w.id, |r| r.pool).await
    }

    pub async fn get_pool(&self, caller: &Caller, id_or_name: &str) -> AppResult<PoolRow> {
        self.store
            .get_pool(&caller.account_id, id_or_name)
            .await?
            .ok_or_else(|| not_found("warm pool", id_or_name))
    }

    /// Applies a patch. A change of template, version policy, tag or resources starts a new rollout generation
    /// (old inventory drains as the new fills) and clears a prewarm-failure stop.
    pub async fn update_pool_spec(
        &self,
        caller: &Caller,
        id_or_name: &str,
        patch: WarmPoolPatch,
    ) -> AppResult<WarmPool> {
        let current = self.get_pool(caller, id_or_name).await?;
        let mut spec = current.pool.spec();
        let explicit_tag = patch.track_tag.is_some();
        if let Some(v) = patch.name {
            spec.name = v;
        }
        if let Some(v) = patch.template {
            spec.template = v;
        }
        if let Some(v) = patch.version_policy {
            spec.version_policy = Some(v);
        }
        if let Some(v) = patch.track_tag {
            spec.track_tag = Some(v);
        }
        if let Some(v) = patch.min_ready {
            spec.min_ready = v;
        }
        if let Some(v) = patch.max_ready {
            spec.max_ready = v;
        }
        if let Some(v) = patch.resources {
            spec.resources = Some(v);
        }
        if let Some(v) = patch.checkout_policy {
            spec.checkout_policy = Some(v);
        }
        if let Some(v) = patch.idle_timeout_seconds {
            spec.idle_timeout_seconds = Some(v);
        }
        if let Some(v) = patch.labels {
            spec.labels = v;
        }
        if let Some(v) = patch.autoscale {
            spec.autoscale = Some(v);
        }
        if let Some(v) = patch.max_starts_per_second {
            spec.max_starts_per_second = v;
        }
        // A ref with a tag implies the tag to track unless one is given.
        if !explicit_tag && spec.template != current.pool.template {
            spec.track_tag = None;
        }
        spec.validate()?;
        let (template, build) = self.resolve_ref(&caller.account_id, "template", &spec.template).await?;
        let updated = self
            .update_pool(&current.pool.id, |row| {
                let p = &mut row.pool;
                let rollout = p.template_id != template.template.id
                    || p.version_policy != spec.effective_version_policy()
                    || p.track_tag != spec.effective_track_tag()
                    || p.template != spec.template
                    || Some(&p.resources) != spec.resources.as_ref();
                p.name = spec.name.clone();
                p.template = spec.template.clone();
                p.template_id = template.template.id.clone();
                p.version_policy = spec.effective_version_policy();
                p.track_tag = spec.effective_track_tag();
                p.min_ready = spec.min_ready;
                p.max_ready = spec.max_ready;
                p.resources = spec.resources.clone().unwrap_or_default();
                p.checkout_policy = spec.checkout_policy;
                p.idle_timeout_seconds = spec.idle_timeout_seconds;
                p.labels = spec.labels.clone();
                p.autoscale = spec.autoscale.clone().unwrap_or_default();
                p.max_starts_per_second = spec.max_starts_per_second;
                match patch.enabled {
                    Some(true) => p.state = PoolState::Enabled,
                    Some(false) => p.state = PoolState::Disabled,
                    None => {}
                }
                p.updated_at = Utc::now();
                if rollout {
                    let new_build = build
                        .as_ref()
                        .filter(|b| b.build.status == BuildStatus::Ready)
                        .map(|b| b.build.id.clone());
                    start_rollout(row, new_build);
                }
                row.pool.clone()
            })
            .await?;
        self.pokes.pool(&current.pool.id);
        updated.ok_or_else(|| not_found("warm pool", id_or_name))
    }

    /// Drains the pool, then forgets it. The drain is the reconciler's own: passes run here until nothing unclaimed
    /// is left (claimed sandboxes are their callers' and outlive the pool).
    pub async fn delete_pool(self: &Arc<Self>, caller: &Caller, id_or_name: &str) -> AppResult<()> {
        let row = self.get_pool(caller, id_or_name).await?;
        let id = row.pool.id.clone();
        self.set_pool_state(caller, &id, PoolState::Draining).await?;
        let deadline = std::time::Instant::now() + DELETE_DRAIN_TIMEOUT;
        loop {
            self.reconcile_pool(&id).await;
            let members = self.store.list_pool_sandboxes(&id).await?;
            if !members.iter().any(|s| s.pool_id.as_deref() == Some(id.as_str())) {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(AppError::Conflict(format!(
                    "warm pool {} is still draining after {DELETE_DRAIN_TIMEOUT:?}; delete it again later",
                    row.pool.name
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        self.store.delete_pool(&id).await?;
        self.passes.lock().expect("passes").remove(id.as_str());
        self.release_pool(&id).await;
        Ok(())
    }

    pub async fn set_pool_state(
        &self,
        caller: &Caller,
        id_or_name: &str,
        state: PoolState,
    ) -> AppResult<WarmPool> {
        let row = self.get_pool(caller, id_or_name).await?;
        let pool = self
            .update_pool(&row.pool.id, |r| {
                r.pool.state = state;
                r.pool.updated_at = Utc::now();
                r.pool.clone()
            })
            .await?
            .ok_or_else(|| not_found("warm pool", id_or_name))?;
        self.pokes.pool(&pool.id);
        Ok(pool)
    }

    /// Runs a pass now, and lifts a prewarm-failure stop.
    pub async fn reconcile_now(self: &Arc<Self>, caller: &Caller, id_or_name: &str) -> AppResult<WarmPool> {
        let row = self.get_pool(caller, id_or_name).await?;
        self.update_pool(&row.pool.id, |r| {
            r.ctl.prewarm_failures = 0;
            r.ctl.last_failure_logs = None;
        })
        .await?;
        // The pool's reconciler runs the pass: here, or on the replica that has the pool (the write above told it).
        if self.config.reconciler_enabled && self.own_pool(&row.pool.id, self.pool_share().await?).await? {
            self.reconcile_pool(&row.pool.id).await;
        }
        Ok(self.get_pool(caller, &row.pool.id).await?.pool)
    }

    pub async fn put_lease(
        &self,
        caller: &Caller,
        pool: &str,
        key: &str,
        spec: LeaseSpec,
    ) -> AppResult<Lease> {
        let row = self.get_pool(caller, pool).await?;
        if key.is_empty() || key.len() > 256 {
            return Err(FieldError::new("key", "must be 1-256 characters").into());
        }
        if spec.ttl_seconds == 0 || spec.ttl_seconds > 7 * 24 * 3600 {
            return Err(FieldError::new("ttl_seconds", "must be between 1 and 604800").into());
        }
        if spec.count > warmpool_api::POOL_SIZE_MAX {
            return Err(
                FieldError::new("count", format!("must be at most {}", warmpool_api::POOL_SIZE_MAX)).into()
            );
        }
        let now = Utc::now();
        let lease = Lease {
            key: key.to_string(),
            pool_id: row.pool.id.clone(),
            count: spec.count,
            ttl_seconds: spec.ttl_seconds,
            expires_at: now + chrono::Duration::seconds(spec.ttl_seconds as i64),
            updated_at: now,
        };
        self.store
            .put_lease(&LeaseRow { account_id: caller.account_id.clone(), lease: lease.clone() })
            .await?;
        self.pokes.pool(&row.pool.id);
        Ok(lease)
    }

    pub async fn list_leases(&self, caller: &Caller, pool: &str) -> AppResult<Vec<Lease>> {
        let row = self.get_pool(caller, pool).await?;
        let now = Utc::now();
        Ok(self
            .store
            .list_leases(&row.pool.id)
            .await?
            .into_iter()
            .map(|l| l.lease)
            .filter(|l| l.expires_at > now)
            .collect())
    }

    /// Releases a lease (idempotent); with `drain_if_last`, drains the pool when no other active lease remains.
    pub async fn release_lease(
        &self,
        caller: &Caller,
        pool: &str,
        key: &str,
        drain_if_last: bool,
    ) -> AppResult<LeaseRelease> {
        let row = self.get_pool(caller, pool).await?;
        let released = self.store.delete_lease(&row.pool.id, key).await?;
        let remaining = self.list_leases(caller, &row.pool.id).await?.len() as u32;
        let drained = drain_if_last && remaining == 0;
        if drained {
            self.set_pool_state(caller, &row.pool.id, PoolState::Draining).await?;
        }
        self.pokes.pool(&row.pool.id);
        Ok(LeaseRelease { released, remaining_leases: remaining, drained })
    }

    pub async fn pool_status(&self, caller: &Caller, id_or_name: &str) -> AppResult<PoolStatus> {
        let row = self.get_pool(caller, id_or_name).await?;
        self.status_of(&row).await
    }

    pub async fn status_of(&self, row: &PoolRow) -> AppResult<PoolStatus> {
        let pool = &row.pool;
        let leases = self.store.list_leases(&pool.id).await?;
        let now = Utc::now();
        let (target, demand, _) = self.pool_target(row, &leases, now).await?;
        let demand = match demand {
            Some(demand) => demand,
            None => self.pool_demand(row, now).await?,
        };
        let Counts { ready, warming, draining, claimed } =
            Counts::of(&pool.id, &self.store.list_pool_sandboxes(&pool.id).await?);
        let pass = self.passes.lock().expect("passes").get(pool.id.as_str()).cloned();
        let mut reasons: Vec<DegradedReason> = row.ctl.blocked.clone();
        if let Some(r) = self.artifact_problem(row).await? {
            reasons.push(r);
        }
        if row.ctl.prewarm_failures >= PREWARM_FAILURE_LIMIT {
            reasons.push(DegradedReason::ArtifactPrewarmFailed);
        }
        if !self.config.reconciler_enabled {
            reasons.push(DegradedReason::ControllerDisabled);
        }
        if pool.state == PoolState::Draining {
            reasons.push(DegradedReason::DrainActive);
        }
        reasons.sort();
        reasons.dedup();
        Ok(PoolStatus {
            state: pool.state,
            target,
            ready,
            warming,
            claimed,
            draining,
            failed: row.ctl.failed_total,
            expired: row.ctl.expired_total,
            unavailable: target.saturating_sub(ready),
            degraded_reasons: reasons,
            rollout_generation: pool.rollout_generation,
            resolved_build_id: pool.resolved_build_id.clone(),
            previous_build_id: pool.previous_build_id.clone(),
            last_reconciled_at: pass.as_ref().map(|p| p.at),
            last_reconcile_duration_ms: pass.as_ref().map(|p| p.duration_ms),
            last_error: row.ctl.last_error.clone(),
            last_failure_logs: row.ctl.last_failure_logs.clone(),
            demand,
        })
    }

    /// Why the pool's artifact cannot be used (yet): `artifact_not_ready` while the build it needs is queued or
    /// building, `template_build_unavailable` when it failed, was deleted, or the template is gone.
    pub async fn artifact_problem(&self, row: &PoolRow) -> AppResult<Option<DegradedReason>> {
        let pool = &row.pool;
        if self.store.get_template(&row.account_id, &pool.template_id).await?.is_none() {
            return Ok(Some(DegradedReason::TemplateBuildUnavailable));
        }
        let wanted = self.wanted_build(row).await?;
        let building = self
            .store
            .list_builds(&pool.template_id)
            .await?
            .iter()
            .any(|b| matches!(b.build.status, BuildStatus::Queued | BuildStatus::Building));
        Ok(match wanted {
            None if building => Some(DegradedReason::ArtifactNotReady),
            None => Some(DegradedReason::TemplateBuildUnavailable),
            Some(id) => match self.store.get_build(&id).await?.map(|b| b.build.status) {
                Some(BuildStatus::Ready) => None,
                Some(BuildStatus::Queued | BuildStatus::Building) => Some(DegradedReason::ArtifactNotReady),
                _ => Some(DegradedReason::TemplateBuildUnavailable),
            },
        })
    }
}
