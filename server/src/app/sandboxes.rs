//! Sandboxes: cold creates, checkouts from warm pools (one atomic claim in the store; waiters are woken when
//! inventory appears), exec/probe/logs through procd, deletion and timeout policies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::BoxStream;
use warmpool_api::{
    validate_cwd, validate_env_key, validate_mount_path, validate_name, CheckoutMode, CheckoutSource,
    ExecRequest, ExecResult, FallbackReason, FieldError, List, LogLine, NetworkMode, ProbeKind, ProbeResult,
    Sandbox, SandboxCreate, SandboxId, SandboxState, TimeoutAction, WarmPoolCheckout, EXEC_TIMEOUT_MAX_MS,
    LOG_TAIL_DEFAULT, LOG_TAIL_MAX,
};

use super::checkout::{after_miss, route, Route};
use super::lifecycle::{runtime_error, StartError, StopCause};
use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::runtime::{RuntimeError, StartSpec, Subject, Volume};
use crate::store::{BuildRow, ClaimUpdate, Lifecycle, PoolRow, RuntimeHandle, SandboxRow, TemplateRow};

/// Longest `warm_pool_wait_ms` accepted.
const MAX_WAIT_MS: u64 = 10 * 60 * 1000;

fn validate_create(req: &SandboxCreate) -> Result<(), FieldError> {
    if req.template.is_none() && req.warm_pool.is_none() {
        return Err(FieldError::new("template", "is required unless warm_pool is given"));
    }
    if let Some(t) = &req.template {
        warmpool_api::TemplateRef::parse("template", t)?;
    }
    if req.warm_pool.is_none() {
        // Checkouts name their pool; a mode or a wait without one would be silently ignored.
        if req.warm_pool_mode.is_some() {
            return Err(FieldError::new("warm_pool_mode", "needs warm_pool (the pool to check out from)"));
        }
        if req.warm_pool_wait_ms.is_some() {
            return Err(FieldError::new("warm_pool_wait_ms", "needs warm_pool (the pool to check out from)"));
        }
    }
    if req.warm_pool_wait_ms.is_some_and(|w| w > MAX_WAIT_MS) {
        return Err(FieldError::new("warm_pool_wait_ms", format!("must be at most {MAX_WAIT_MS}")));
    }
    for key in req.envs.iter().flatten().map(|(k, _)| k) {
        validate_env_key(&format!("envs.{key}"), key)?;
    }
    for (i, v) in req.volumes.iter().flatten().enumerate() {
        validate_name(&format!("volumes[{i}].name"), &v.name)?;
        validate_mount_path(&format!("volumes[{i}].mount_path"), &v.mount_path)?;
    }
    if let Some(cwd) = &req.cwd {
        validate_cwd("cwd", cwd)?;
    }
    if let Some(t) = &req.timeout_policy {
        t.validate("timeout_policy")?;
    }
    for key in req.labels.iter().flatten().map(|(k, _)| k) {
        if key.is_empty() || key.len() > 63 {
            return Err(FieldError::new(format!("labels.{key}"), "keys must be 1-63 characters"));
        }
    }
    Ok(())
}

/// How a checkout that named a pool was served, as `warmpool_checkouts_total` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    WarmPool,
    Cold,
    /// A `require` miss, refused with `warm_pool_unavailable`.
    Unavailable,
}

/// What a pool-less or missed checkout starts.
struct ColdPlan {
    template: TemplateRow,
    build: BuildRow,
}

impl App {
    pub async fn create_sandbox(self: &Arc<Self>, caller: &Caller, req: SandboxCreate) -> AppResult<Sandbox> {
        validate_create(&req)?;
        if req.network.as_ref().is_some_and(|n| n.mode == NetworkMode::Host) {
            self.check_host_network(&caller.account_id).await?;
        }
        let started = Instant::now();
        let Some(pool_ref) = req.warm_pool.clone() else {
            let cold = self.cold_plan(caller, req.template.as_deref().expect("validated")).await?;
            return self.create_cold(caller, &req, cold, None).await;
        };
        let pool = self
            .store
            .get_pool(&caller.account_id, &pool_ref)
            .await?
            .ok_or_else(|| not_found("warm pool", &pool_ref))?;
        if let Some(t) = &req.template {
            let name = warmpool_api::TemplateRef::parse("template", t)?.name().to_string();
            let template_id =
                self.store.get_template(&caller.account_id, &name).await?.map(|t| t.template.id);
            if template_id.as_deref() != Some(pool.pool.template_id.as_str()) {
                return Err(FieldError::new(
                    "template",
                    format!("{t:?} is not the template of warm pool {}", pool.pool.name),
                )
                .into());
            }
        }
        let mode = req.warm_pool_mode.or(pool.pool.checkout_policy).unwrap_or(CheckoutMode::Prefer);
        let checkout = |source, waited_ms, fallback_reason| WarmPoolCheckout {
            source,
            hit: source == CheckoutSource::WarmPool,
            id: pool.pool.id.clone(),
            mode,
            waited_ms,
            fallback_reason,
        };
        let refuse = |reason: FallbackReason, field: Option<&str>, waited_ms: u64| {
            let name = &pool.pool.name;
            let message = match (reason, field) {
                (_, Some(field)) => {
                    format!("{field} cannot be applied to an already-started sandbox of warm pool {name}")
                }
                (FallbackReason::PoolDraining, _) => format!("warm pool {name} is draining"),
                (FallbackReason::PoolDisabled, _) => {
                    format!("warm pool {name} is disabled and has no ready sandbox")
                }
                _ => format!("warm pool {name} had no ready sandbox within {waited_ms} ms"),
            };
            AppError::WarmPoolUnavailable {
                reason: reason.as_str().into(),
                field: field.map(Into::into),
                message,
            }
        };
        let wait = match route(mode, req.unpoolable_field(), pool.pool.state, req.warm_pool_wait_ms) {
            Route::Claim { wait } => wait,
            Route::Refuse { reason, field } => {
                self.record_checkout(&pool, mode, Source::Unavailable, Some(reason), started);
                return Err(refuse(reason, field, 0));
            }
            Route::Cold(reason) => {
                self.record_checkout(&pool, mode, Source::Cold, Some(reason), started);
                let cold = self.cold_plan_for_pool(caller, &req, &pool).await?;
                let co = checkout(CheckoutSource::Cold, 0, Some(reason));
                return self.create_cold(caller, &req, cold, Some(co)).await;
            }
        };
        // The claim counts the account's sandboxes against its quota atomically (concurrent checkouts cannot
        // pass it together).
        let max_owned = caller.quotas.max_sandboxes;
        let signal = self.inventory_signal(&pool.pool.id);
        loop {
            let notified = signal.notified();
            let waited_ms = started.elapsed().as_millis() as u64;
            let claim = ClaimUpdate {
                account_id: caller.account_id.clone(),
                max_owned,
                labels: req.labels.clone().unwrap_or_default(),
                checkout: checkout(CheckoutSource::WarmPool, waited_ms, None),
                timeout_policy: req.timeout_policy.clone(),
                expires_at: req.timeout_policy.as_ref().map(|t| t.expires_at(Utc::now())),
                created_at: Utc::now(),
            };
            if let Some(row) =
                self.store.claim_ready(&pool.pool.id, pool.pool.resolved_build_id.as_deref(), &claim).await?
            {
                self.unwatch(&row.sandbox.id);
                self.pokes.pool(&pool.pool.id);
                self.record_checkout(&pool, mode, Source::WarmPool, None, started);
                tracing::debug!(pool = %pool.pool.id, sandbox = %row.sandbox.id, waited_ms, "Checked out");
                return Ok(row.sandbox);
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            // Inventory may appear while we wait: the reconciler wakes us (no polling per request).
            self.pokes.pool(&pool.pool.id);
            let _ = tokio::time::timeout(left, notified).await;
        }
        let waited_ms = started.elapsed().as_millis() as u64;
        let reason = match after_miss(mode, pool.pool.state) {
            Route::Refuse { reason, field } => {
                self.record_checkout(&pool, mode, Source::Unavailable, Some(reason), started);
                return Err(refuse(reason, field, waited_ms));
            }
            Route::Cold(reason) => reason,
            Route::Claim { .. } => unreachable!("a miss never claims"),
        };
        self.record_checkout(&pool, mode, Source::Cold, Some(reason), started);
        let cold = self.cold_plan_for_pool(caller, &req, &pool).await?;
        let co = checkout(CheckoutSource::Cold, waited_ms, Some(reason));
        self.create_cold(caller, &req, cold, Some(co)).await
    }

    /// Counts a checkout that named a pool: a claim of its demand, and `warmpool_checkouts_total`.
    fn record_checkout(
        &self,
        pool: &PoolRow,
        mode: CheckoutMode,
        source: Source,
        fallback: Option<FallbackReason>,
        started: Instant,
    ) {
        let hit = source == Source::WarmPool;
        self.record_claim(&pool.pool.id, hit);
        let source = match source {
            Source::WarmPool => "warm_pool",
            Source::Cold => "cold",
            Source::Unavailable => "unavailable",
        };
        let reason = fallback.map(FallbackReason::as_str).unwrap_or("");
        self.metrics.checkout(&pool.pool.id, &pool.pool.name, mode.as_str(), source, reason);
        if hit {
            self.metrics
                .checkout_seconds
                .with_label_values(&[source])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    async fn cold_plan(&self, caller: &Caller, template_ref: &str) -> AppResult<ColdPlan> {
        let (template, build) = self.resolve_ref(&caller.account_id, "template", template_ref).await?;
        let build = build.ok_or_else(|| {
            AppError::Conflict(format!(
                "template {} has no ready build for {template_ref:?}",
                template.template.name
            ))
        })?;
        Ok(ColdPlan { template, build })
    }

    async fn cold_plan_for_pool(
        &self,
        caller: &Caller,
        req: &SandboxCreate,
        pool: &PoolRow,
    ) -> AppResult<ColdPlan> {
        if let Some(t) = &req.template {
            return self.cold_plan(caller, t).await;
        }
        let build_id = pool.pool.resolved_build_id.clone().ok_or_else(|| {
            AppError::Conflict(format!("warm pool {} has no resolved build to start cold", pool.pool.name))
        })?;
        let build = self.store.get_build(&build_id).await?.ok_or_else(|| not_found("build", &build_id))?;
        let template = self
            .store
            .get_template(&caller.account_id, &pool.pool.template_id)
            .await?
            .ok_or_else(|| not_found("template", &pool.pool.template_id))?;
        Ok(ColdPlan { template, build })
    }

    async fn create_cold(
        self: &Arc<Self>,
        caller: &Caller,
        req: &SandboxCreate,
        plan: ColdPlan,
        checkout: Option<WarmPoolCheckout>,
    ) -> AppResult<Sandbox> {
        // Only a cold create gets this far with a desktop (a checkout refuses it as unpoolable first).
        if req.desktop == Some(true) {
            return Err(FieldError::new(
                "desktop",
                format!("is not supported by the {} runtime", self.runtime.name()),
            )
            .into());
        }
        let max_owned = caller.quotas.max_sandboxes;
        let started = Instant::now();
        let now = Utc::now();
        let sandbox = Sandbox {
            id: new_id(SandboxId::from_suffix),
            template: plan.template.template.name.clone(),
            template_id: plan.template.template.id.clone(),
            build_id: plan.build.build.id.clone(),
            state: SandboxState::Starting,
            labels: req.labels.clone().unwrap_or_default(),
            created_at: now,
            expires_at: req.timeout_policy.as_ref().map(|t| t.expires_at(now)),
            warm_pool_checkout: checkout,
        };
        let mut row = SandboxRow {
            account_id: caller.account_id.clone(),
            sandbox,
            pool_id: None,
            lifecycle: Lifecycle::Warming,
            claimed_from: None,
            pool_generation: 0,
            ready_at: None,
            timeout_policy: req.timeout_policy.clone(),
            claim_env: req.envs.clone().unwrap_or_default(),
            handle: RuntimeHandle::default(),
            error: None,
            owner: Some(self.replica.clone()),
        };
        let volumes = req
            .volumes
            .iter()
            .flatten()
            .map(|v| Volume {
                account_id: caller.account_id.clone(),
                name: v.name.clone(),
                mount_path: v.mount_path.clone(),
            })
            .collect();
        let spec = StartSpec {
            subject: Subject::Sandbox { id: row.sandbox.id.clone(), build_id: plan.build.build.id.clone() },
            account_id: Some(caller.account_id.clone()),
            pool_id: None,
            spec: plan.build.spec.clone(),
            envs: req.envs.clone().unwrap_or_default(),
            cwd: req.cwd.clone(),
            volumes,
            network: req.network.as_ref().map(|n| n.mode).unwrap_or_default(),
        };
        // Counted against the account's quota and inserted atomically: concurrent creates cannot pass it together.
        match max_owned {
            Some(max) => self.store.insert_owned_sandbox(&row, max).await?,
            None => self.store.insert_sandbox(&row).await?,
        }
        // `--max-sandboxes` bounds cold creates as it bounds pools. Counted with this row in, so two creates
        // racing for the last slot cannot both have it (both may lose it; a retry settles that).
        let others = (self.store.count_live_sandboxes().await? as usize).saturating_sub(1);
        if self.runtime.free_capacity(others) == 0 {
            self.store.delete_sandbox_if(&row.sandbox.id, &[Lifecycle::Warming]).await?;
            return Err(AppError::ServiceUnavailable(
                "this host runs as many sandboxes as it may (the server's --max-sandboxes); nothing was \
                 started: retry later, or check out from a warm pool"
                    .into(),
            ));
        }
        match self.start_sandbox(&mut row, spec, Lifecycle::Claimed).await {
            Ok(()) => {}
            Err(StartError::Failed(e)) => return Err(e),
            Err(StartError::Stopped) => {
                return Err(AppError::Conflict(format!(
                    "sandbox {} was deleted while it was starting",
                    row.sandbox.id
                )))
            }
        }
        if row.sandbox.warm_pool_checkout.is_some() {
            self.metrics
                .checkout_seconds
                .with_label_values(&["cold"])
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(row.sandbox)
    }

    /// A caller's sandbox (pool inventory is not anyone's until checked out).
    pub(super) async fn owned(&self, caller: &Caller, id: &str) -> AppResult<SandboxRow> {
        self.store
            .get_sandbox(id)
            .await?
            .filter(|r| r.account_id == caller.account_id && r.pool_id.is_none())
            .ok_or_else(|| not_found("sandbox", id))
    }

    pub async fn get_sandbox(&self, caller: &Caller, id: &str) -> AppResult<Sandbox> {
        Ok(self.owned(caller, id).await?.sandbox)
    }

    pub async fn list_sandboxes(
        &self,
        caller: &Caller,
        page: &crate::store::Page,
    ) -> AppResult<List<Sandbox>> {
        let fetch = async |p: &crate::store::Page| self.store.list_sandboxes(&caller.account_id, p).await;
        super::paged(page, fetch, |s: &Sandbox| &s.id, |r| r.sandbox).await
    }

    /// Deletes a caller's sandbox: `draining` is committed first, so a failure of the store leaves procd running
    /// and the row as it was (retry), and a failure of the runtime leaves a `draining` row (retry, or recovery
    /// finishes it). Deleting a sandbox that is already draining finishes the job.
    pub async fn delete_sandbox(&self, caller: &Caller, id: &str) -> AppResult<()> {
        let row = self.owned(caller, id).await?;
        if row.lifecycle == Lifecycle::Draining {
            return self.finish_stop(&row).await;
        }
        let from = [Lifecycle::Warming, Lifecycle::Claimed, Lifecycle::Failed];
        if !self.stop_sandbox(row, &from, StopCause::Deleted).await? {
            // Another transition won the race (a failure, a concurrent delete): finish what is there.
            if let Some(row) =
                self.store.get_sandbox(id).await?.filter(|r| r.lifecycle == Lifecycle::Draining)
            {
                self.finish_stop(&row).await?;
            }
        }
        Ok(())
    }

    pub(super) async fn expire_sandbox(&self, mut row: SandboxRow) -> AppResult<()> {
        match row.timeout_policy.as_ref().map(|t| t.action) {
            Some(TimeoutAction::Pause) => {
                let id = row.sandbox.id.clone();
                self.runtime
                    .pause(&row.handle, true)
                    .await
                    .map_err(|e| runtime_error(&format!("pausing {id}"), e))?;
                row.sandbox.state = SandboxState::Paused;
                row.sandbox.expires_at = None;
                self.store.update_sandbox_if(&row, &[Lifecycle::Claimed]).await?;
                Ok(())
            }
            _ => {
                tracing::info!(sandbox = %row.sandbox.id, "Timeout policy: destroying sandbox");
                self.stop_sandbox(row, &[Lifecycle::Claimed], StopCause::Timeout).await.map(drop)
            }
        }
    }

    pub async fn exec(&self, caller: &Caller, id: &str, req: ExecRequest) -> AppResult<ExecResult> {
        let row = self.owned(caller, id).await?;
        if req.command.is_empty() || req.command[0].is_empty() {
            return Err(FieldError::new("command", "must not be empty").into());
        }
        if let Some(cwd) = &req.cwd {
            if cwd.split('/').any(|c| c == "..") || cwd.contains('\0') {
                return Err(FieldError::new("cwd", "must not contain '..' components").into());
            }
        }
        for key in req.env.iter().flatten().map(|(k, _)| k) {
            validate_env_key(&format!("env.{key}"), key)?;
        }
        if req.timeout_ms.is_some_and(|t| t > EXEC_TIMEOUT_MAX_MS) {
            return Err(FieldError::new(
                "timeout_ms",
                format!("must be at most {EXEC_TIMEOUT_MAX_MS} (24 h)"),
            )
            .into());
        }
        if row.lifecycle != Lifecycle::Claimed || row.sandbox.state != SandboxState::Running {
            return Err(AppError::Conflict(format!("sandbox {id} is {}", row.sandbox.state.as_str())));
        }
        let build = self.store.get_build(&row.sandbox.build_id).await?;
        let base_cwd = build.as_ref().and_then(|b| b.spec.cwd.clone());
        let mut env: BTreeMap<String, String> = build.map(|b| b.spec.env).unwrap_or_default();
        env.extend(row.claim_env);
        let cwd = req.cwd.clone();
        let command = req.command[0].clone();
        self.runtime.exec(&row.handle, req, base_cwd.as_deref(), env).await.map_err(|e| match e {
            // Name what the caller sent, not the host path the runtime resolved it to.
            RuntimeError::Invalid { field: "cwd", .. } => FieldError::new(
                "cwd",
                format!(
                    "{:?} does not exist in the sandbox or is not a directory",
                    cwd.as_deref().unwrap_or(".")
                ),
            )
            .into(),
            RuntimeError::Invalid { message, .. } => {
                let reason = message.rsplit(": ").next().unwrap_or(&message).to_string();
                FieldError::new("command", format!("{command:?} cannot be started: {reason}")).into()
            }
            e => runtime_error(&format!("exec in sandbox {id} failed"), e),
        })
    }

    pub async fn probe(&self, caller: &Caller, id: &str, kind: ProbeKind) -> AppResult<ProbeResult> {
        let row = self.owned(caller, id).await?;
        self.runtime
            .probe(&row.handle, kind)
            .await
            .map_err(|e| AppError::Conflict(format!("sandbox {id} is not answering probes: {e}")))
    }

    /// The last `tail` lines of the sandbox's mirrored output (default [`LOG_TAIL_DEFAULT`]), streamed.
    pub async fn logs(
        &self,
        caller: &Caller,
        id: &str,
        tail: Option<u32>,
    ) -> AppResult<BoxStream<'static, LogLine>> {
        let row = self.owned(caller, id).await?;
        let tail = tail.unwrap_or(LOG_TAIL_DEFAULT);
        if tail > LOG_TAIL_MAX {
            return Err(FieldError::new("tail", format!("must be at most {LOG_TAIL_MAX}")).into());
        }
        Ok(self.runtime.logs(&row.handle, tail as usize).await)
    }
}
