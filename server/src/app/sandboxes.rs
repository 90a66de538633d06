//! Sandboxes: cold creates, checkouts from warm pools (one atomic claim in the store; waiters are woken when
//! inventory appears), exec/probe/logs through procd, deletion and timeout policies.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use warmpool_api::{
    id_prefix, validate_cwd, validate_env_key, validate_name, CheckoutMode, CheckoutSource, ExecRequest,
    ExecResult, FallbackReason, FieldError, LogLine, NetworkMode, PoolState, ProbeKind, ProbeResult, Sandbox,
    SandboxCreate, SandboxState, TimeoutAction, WarmPoolCheckout,
};

use super::templates::start_timeout;
use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::runtime::StartSpec;
use crate::store::{BuildRow, ClaimUpdate, PoolRow, PoolSlot, RuntimeHandle, SandboxRow, TemplateRow};

/// Longest `warm_pool_wait_ms` accepted.
const MAX_WAIT_MS: u64 = 10 * 60 * 1000;

fn validate_create(req: &SandboxCreate) -> Result<(), FieldError> {
    if req.template.is_none() && req.warm_pool.is_none() {
        return Err(FieldError::new("template", "is required unless warm_pool is given"));
    }
    if let Some(t) = &req.template {
        warmpool_api::TemplateRef::parse("template", t)?;
    }
    if req.warm_pool_wait_ms.is_some_and(|w| w > MAX_WAIT_MS) {
        return Err(FieldError::new("warm_pool_wait_ms", format!("must be at most {MAX_WAIT_MS}")));
    }
    for key in req.envs.iter().flatten().map(|(k, _)| k) {
        validate_env_key(&format!("envs.{key}"), key)?;
    }
    for (i, v) in req.volumes.iter().flatten().enumerate() {
        validate_name(&format!("volumes[{i}].name"), &v.name)?;
        validate_cwd(&format!("volumes[{i}].mount_path"), &v.mount_path)?;
    }
    if let Some(cwd) = &req.cwd {
        validate_cwd("cwd", cwd)?;
    }
    if req.desktop == Some(true) {
        return Err(FieldError::new("desktop", "is not supported by the local runtime"));
    }
    if let Some(t) = &req.timeout_policy {
        if t.timeout_seconds == 0 {
            return Err(FieldError::new("timeout_policy.timeout_seconds", "must be greater than 0"));
        }
    }
    for key in req.labels.iter().flatten().map(|(k, _)| k) {
        if key.is_empty() || key.len() > 63 {
            return Err(FieldError::new(format!("labels.{key}"), "keys must be 1-63 characters"));
        }
    }
    Ok(())
}

/// What a pool-less or missed checkout starts.
struct ColdPlan {
    template: TemplateRow,
    build: BuildRow,
}

impl App {
    pub async fn create_sandbox(self: &Arc<Self>, caller: &Caller, req: SandboxCreate) -> AppResult<Sandbox> {
        validate_create(&req)?;
        let started = Instant::now();
        let Some(pool_ref) = req.warm_pool.clone() else {
            let cold = self.cold_plan(caller, req.template.as_deref().expect("validated"))?;
            return self.create_cold(caller, &req, cold, None).await;
        };
        let pool = self
            .store
            .get_pool(&caller.account_id, &pool_ref)?
            .ok_or_else(|| not_found("warm pool", &pool_ref))?;
        if let Some(t) = &req.template {
            let name = warmpool_api::TemplateRef::parse("template", t)?.name().to_string();
            let template_id = self.store.get_template(&caller.account_id, &name)?.map(|t| t.template.id);
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
        let miss = |reason: FallbackReason, field: Option<&str>, message: String| -> AppResult<()> {
            if mode == CheckoutMode::Require {
                return Err(AppError::Unavailable {
                    reason: reason.as_str().into(),
                    field: field.map(Into::into),
                    message,
                });
            }
            Ok(())
        };
        let early = if mode == CheckoutMode::Bypass {
            Some(FallbackReason::Bypass)
        } else if let Some(field) = req.unpoolable_field() {
            miss(
                FallbackReason::UnpoolableShape,
                Some(field),
                format!(
                    "{field} cannot be applied to an already-started sandbox of warm pool {}",
                    pool.pool.name
                ),
            )?;
            Some(FallbackReason::UnpoolableShape)
        } else if pool.pool.state == PoolState::Draining {
            let reason = FallbackReason::PoolDraining;
            miss(reason, None, format!("warm pool {} is draining", pool.pool.name))?;
            Some(reason)
        } else {
            None
        };
        if let Some(reason) = early {
            self.record_checkout(&pool, mode, CheckoutSource::Cold, started);
            let cold = self.cold_plan_for_pool(caller, &req, &pool)?;
            return self
                .create_cold(caller, &req, cold, Some(checkout(CheckoutSource::Cold, 0, Some(reason))))
                .await;
        }
        self.check_owned_quota(&caller.account_id)?;
        // A disabled pool still hands out the inventory it kept, but nothing refills it: no point waiting.
        let disabled = pool.pool.state == PoolState::Disabled;
        let wait =
            if disabled { Duration::ZERO } else { Duration::from_millis(req.warm_pool_wait_ms.unwrap_or(0)) };
        let signal = self.inventory_signal(&pool.pool.id);
        loop {
            let notified = signal.notified();
            let waited_ms = started.elapsed().as_millis() as u64;
            let claim = ClaimUpdate {
                account_id: caller.account_id.clone(),
                labels: req.labels.clone().unwrap_or_default(),
                checkout: checkout(CheckoutSource::WarmPool, waited_ms, None),
                timeout_policy: req.timeout_policy.clone(),
                expires_at: req
                    .timeout_policy
                    .as_ref()
                    .map(|t| Utc::now() + chrono::Duration::seconds(t.timeout_seconds as i64)),
                created_at: Utc::now(),
            };
            if let Some(row) =
                self.store.claim_ready(&pool.pool.id, pool.pool.resolved_build_id.as_deref(), &claim)?
            {
                self.poke.notify_one();
                self.record_checkout(&pool, mode, CheckoutSource::WarmPool, started);
                tracing::debug!(pool = %pool.pool.id, sandbox = %row.sandbox.id, waited_ms, "Checked out");
                return Ok(row.sandbox);
            }
            let left = wait.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            // Inventory may appear while we wait: the reconciler wakes us (no polling per request).
            self.poke.notify_one();
            let _ = tokio::time::timeout(left, notified).await;
        }
        let waited_ms = started.elapsed().as_millis() as u64;
        let (reason, message) = if disabled {
            (
                FallbackReason::PoolDisabled,
                format!("warm pool {} is disabled and has no ready sandbox", pool.pool.name),
            )
        } else {
            (
                FallbackReason::NoReadyInventory,
                format!("warm pool {} had no ready sandbox within {waited_ms} ms", pool.pool.name),
            )
        };
        miss(reason, None, message)?;
        self.record_checkout(&pool, mode, CheckoutSource::Cold, started);
        let cold = self.cold_plan_for_pool(caller, &req, &pool)?;
        let co = checkout(CheckoutSource::Cold, waited_ms, Some(reason));
        self.create_cold(caller, &req, cold, Some(co)).await
    }

    fn record_checkout(&self, pool: &PoolRow, mode: CheckoutMode, source: CheckoutSource, started: Instant) {
        let source = match source {
            CheckoutSource::WarmPool => "warm_pool",
            CheckoutSource::Cold => "cold",
        };
        self.metrics.checkouts_total.with_label_values(&[&pool.pool.id, mode.as_str(), source]).inc();
        if source == "warm_pool" {
            self.metrics
                .checkout_seconds
                .with_label_values(&[source])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    fn cold_plan(&self, caller: &Caller, template_ref: &str) -> AppResult<ColdPlan> {
        let (template, build) = self.resolve_ref(&caller.account_id, "template", template_ref)?;
        let build = build.ok_or_else(|| {
            AppError::Conflict(format!(
                "template {} has no ready build for {template_ref:?}",
                template.template.name
            ))
        })?;
        Ok(ColdPlan { template, build })
    }

    fn cold_plan_for_pool(
        &self,
        caller: &Caller,
        req: &SandboxCreate,
        pool: &PoolRow,
    ) -> AppResult<ColdPlan> {
        if let Some(t) = &req.template {
            return self.cold_plan(caller, t);
        }
        let build_id = pool.pool.resolved_build_id.clone().ok_or_else(|| {
            AppError::Conflict(format!("warm pool {} has no resolved build to start cold", pool.pool.name))
        })?;
        let build = self.store.get_build(&build_id)?.ok_or_else(|| not_found("build", &build_id))?;
        let template = self
            .store
            .get_template(&caller.account_id, &pool.pool.template_id)?
            .ok_or_else(|| not_found("template", &pool.pool.template_id))?;
        Ok(ColdPlan { template, build })
    }

    fn check_owned_quota(&self, account_id: &str) -> AppResult<()> {
        if let Some(max) = self.quotas(account_id)?.max_sandboxes {
            let (owned, _) = self.store.count_sandboxes(account_id)?;
            if owned >= max {
                return Err(AppError::Quota(format!(
                    "account has {owned} sandboxes; max_sandboxes is {max}"
                )));
            }
        }
        Ok(())
    }

    async fn create_cold(
        self: &Arc<Self>,
        caller: &Caller,
        req: &SandboxCreate,
        plan: ColdPlan,
        checkout: Option<WarmPoolCheckout>,
    ) -> AppResult<Sandbox> {
        self.check_owned_quota(&caller.account_id)?;
        let started = Instant::now();
        let now = Utc::now();
        let sandbox = Sandbox {
            id: new_id(id_prefix::SANDBOX),
            template: plan.template.template.name.clone(),
            template_id: plan.template.template.id.clone(),
            build_id: plan.build.build.id.clone(),
            state: SandboxState::Starting,
            labels: req.labels.clone().unwrap_or_default(),
            created_at: now,
            expires_at: req
                .timeout_policy
                .as_ref()
                .map(|t| now + chrono::Duration::seconds(t.timeout_seconds as i64)),
            warm_pool_checkout: checkout,
        };
        let mut row = SandboxRow {
            account_id: caller.account_id.clone(),
            sandbox,
            pool_id: None,
            pool_slot: None,
            claimed_from: None,
            pool_generation: 0,
            ready_at: None,
            timeout_policy: req.timeout_policy.clone(),
            claim_env: req.envs.clone().unwrap_or_default(),
            handle: RuntimeHandle::default(),
            error: None,
        };
        let volumes = req
            .volumes
            .iter()
            .flatten()
            .map(|v| (self.runtime.volume_dir(&caller.account_id, &v.name), v.mount_path.clone()))
            .collect();
        let spec = StartSpec {
            sandbox_id: row.sandbox.id.clone(),
            artifact: Some(self.runtime.artifact(&plan.build.build.id)),
            spec: plan.build.spec.clone(),
            envs: req.envs.clone().unwrap_or_default(),
            cwd: req.cwd.clone(),
            volumes,
            private_network: req.network.as_ref().is_some_and(|n| n.mode == NetworkMode::None),
        };
        self.store.insert_sandbox(&row)?;
        self.start_sandbox(&mut row, spec).await?;
        if row.sandbox.warm_pool_checkout.is_some() {
            self.metrics
                .checkout_seconds
                .with_label_values(&["cold"])
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(row.sandbox)
    }

    /// Starts procd for an inserted row (state `starting`) and waits for readiness. On failure the sandbox is
    /// stopped and its row removed, and the error carries procd's last output.
    pub async fn start_sandbox(&self, row: &mut SandboxRow, spec: StartSpec) -> AppResult<()> {
        let timeout = start_timeout(&spec.spec);
        let started = Instant::now();
        let result = async {
            let handle = self.runtime.start(spec).await?;
            row.handle = handle.clone();
            self.store.update_sandbox(row).map_err(|e| crate::runtime::RuntimeError::Build(e.to_string()))?;
            self.runtime.wait_ready(&handle, timeout).await
        }
        .await;
        match result {
            Ok(()) => {
                self.metrics
                    .sandbox_start_seconds
                    .with_label_values(&[])
                    .observe(started.elapsed().as_secs_f64());
                row.sandbox.state = SandboxState::Running;
                row.ready_at = Some(Utc::now());
                if row.pool_slot == Some(PoolSlot::Warming) {
                    row.pool_slot = Some(PoolSlot::Ready);
                }
                self.store.update_sandbox(row)?;
                Ok(())
            }
            Err(e) => {
                let logs = self.runtime.log_tail(&row.handle, 4000);
                self.runtime.stop(&row.sandbox.id, &row.handle, true).await;
                self.store.delete_sandbox(&row.sandbox.id)?;
                let logs = logs.trim();
                Err(AppError::Conflict(if logs.is_empty() {
                    format!("sandbox {} failed to start: {e}", row.sandbox.id)
                } else {
                    format!("sandbox {} failed to start: {e}\n{logs}", row.sandbox.id)
                }))
            }
        }
    }

    /// A caller's sandbox (pool inventory is not anyone's until checked out).
    fn owned(&self, caller: &Caller, id: &str) -> AppResult<SandboxRow> {
        self.store
            .get_sandbox(id)?
            .filter(|r| r.account_id == caller.account_id && r.pool_id.is_none())
            .ok_or_else(|| not_found("sandbox", id))
    }

    pub fn get_sandbox(&self, caller: &Caller, id: &str) -> AppResult<Sandbox> {
        Ok(self.owned(caller, id)?.sandbox)
    }

    pub fn list_sandboxes(&self, caller: &Caller) -> AppResult<Vec<Sandbox>> {
        Ok(self.store.list_sandboxes(&caller.account_id)?.into_iter().map(|r| r.sandbox).collect())
    }

    pub async fn delete_sandbox(&self, caller: &Caller, id: &str) -> AppResult<()> {
        let row = self.owned(caller, id)?;
        self.destroy(row).await
    }

    pub async fn destroy(&self, row: SandboxRow) -> AppResult<()> {
        self.runtime.stop(&row.sandbox.id, &row.handle, true).await;
        self.store.delete_sandbox(&row.sandbox.id)?;
        if row.claimed_from.is_some() || row.pool_id.is_some() {
            self.poke.notify_one();
        }
        Ok(())
    }

    pub(super) async fn expire_sandbox(&self, mut row: SandboxRow) -> AppResult<()> {
        match row.timeout_policy.as_ref().map(|t| t.action) {
            Some(TimeoutAction::Pause) => {
                self.runtime.pause(&row.handle, true).await.map_err(|e| AppError::Internal(e.to_string()))?;
                row.sandbox.state = SandboxState::Paused;
                row.sandbox.expires_at = None;
                self.store.update_sandbox(&row)?;
                Ok(())
            }
            _ => {
                tracing::info!(sandbox = %row.sandbox.id, "Timeout policy: destroying sandbox");
                self.destroy(row).await
            }
        }
    }

    pub async fn exec(&self, caller: &Caller, id: &str, req: ExecRequest) -> AppResult<ExecResult> {
        let row = self.owned(caller, id)?;
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
        if row.sandbox.state != SandboxState::Running {
            return Err(AppError::Conflict(format!("sandbox {id} is {}", row.sandbox.state.as_str())));
        }
        let build = self.store.get_build(&row.sandbox.build_id)?;
        let base_cwd = build.as_ref().and_then(|b| b.spec.cwd.clone());
        let mut env: BTreeMap<String, String> = build.map(|b| b.spec.env).unwrap_or_default();
        env.extend(row.claim_env);
        self.runtime
            .exec(&row.handle, req, base_cwd.as_deref(), env)
            .await
            .map_err(|e| AppError::Conflict(format!("exec in sandbox {id} failed: {e}")))
    }

    pub async fn probe(&self, caller: &Caller, id: &str, kind: ProbeKind) -> AppResult<ProbeResult> {
        let row = self.owned(caller, id)?;
        self.runtime
            .probe(&row.handle, kind)
            .await
            .map_err(|e| AppError::Conflict(format!("sandbox {id} is not answering probes: {e}")))
    }

    pub fn logs(&self, caller: &Caller, id: &str) -> AppResult<Vec<LogLine>> {
        let row = self.owned(caller, id)?;
        Ok(self.runtime.logs(&row.handle))
    }
}
