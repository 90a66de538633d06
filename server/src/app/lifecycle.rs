//! The sandbox lifecycle: every move of every sandbox (pool inventory included) between `warming`, `ready`,
//! `claimed`, `draining` and `failed` is made here, as one conditional store write committed **before** the
//! runtime acts on it. A claim and a stop therefore never both win, and a crash at any point leaves a row that
//! says what to finish ([`App::recover`]): nothing runs without a row, and no live row lacks its process.
//!
//! Deliberate stops (scale-down, rollout, drain, idle expiry, delete, timeout) go through `draining` and are never
//! counted as failures; only a real failure (start contract not met, procd lost, readiness lost) is `failed`.

use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::StreamExt;
use warmpool_api::{ProbeStatus, SandboxId, SandboxState};

use super::templates::start_timeout;
use super::{App, AppError, AppResult};
use crate::runtime::{RuntimeError, StartSpec};
use crate::store::{Lifecycle, SandboxRow};

use Lifecycle::*;

/// Why a sandbox is stopped on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Above the pool's target.
    ScaleDown,
    /// Of an older rollout generation.
    Rollout,
    /// The pool is draining or being deleted.
    Drain,
    /// Ready longer than the pool's `idle_timeout_seconds`.
    Expired,
    /// `DELETE /v1/sandboxes/{id}`.
    Deleted,
    /// Its timeout policy destroyed it.
    Timeout,
    /// A start whose replica lost it (died, or lost its database session) before it was ready, undone by the
    /// replica taking over: nobody was handed it, and nothing about it failed.
    TakenOver,
}

/// Why a start did not produce a ready sandbox.
#[derive(Debug)]
pub enum StartError {
    /// It was stopped on purpose while starting (a drain, a scale-down, a delete): not a failure.
    Stopped,
    /// A real failure, already recorded; the error is what the caller is told.
    Failed(AppError),
}

impl From<AppError> for StartError {
    fn from(e: AppError) -> Self {
        StartError::Failed(e)
    }
}

/// A runtime error as the domain reports it: `context` and what the client may know of it, with the whole error
/// kept as the source for the log.
pub fn runtime_error(context: &str, e: RuntimeError) -> AppError {
    let message = format!("{context}: {}", e.client_message());
    AppError::Runtime { message, source: e }
}

impl App {
    /// Moves `row` to `to` if the stored lifecycle is one of `from`; on false nothing changed (another transition
    /// won) and `row` is as it was.
    pub async fn transition(
        &self,
        row: &mut SandboxRow,
        to: Lifecycle,
        from: &[Lifecycle],
    ) -> AppResult<bool> {
        let before = (row.lifecycle, row.sandbox.state);
        row.lifecycle = to;
        // `paused` is a claimed sandbox's runtime state, kept across writes that do not change the lifecycle.
        if !(to == Claimed && row.sandbox.state == SandboxState::Paused) {
            row.sandbox.state = to.sandbox_state();
        }
        let won = self.store.update_sandbox_if(row, from).await?;
        if !won {
            (row.lifecycle, row.sandbox.state) = before;
        }
        Ok(won)
    }

    /// Starts procd for an inserted `warming` row and waits for readiness, then moves it to `done` (`ready` for
    /// inventory, `claimed` for a cold create). The handle is recorded before waiting, so a crash can find procd.
    pub async fn start_sandbox(
        &self,
        row: &mut SandboxRow,
        spec: StartSpec,
        done: Lifecycle,
    ) -> Result<(), StartError> {
        let timeout = start_timeout(&spec.spec);
        let started = Instant::now();
        let handle = match self.runtime.start(spec).await {
            Ok(h) => h,
            Err(e) => return Err(self.start_failed(row, e).await),
        };
        row.handle = handle.clone();
        if !self.store.update_sandbox_if(row, &[Warming]).await.map_err(AppError::from)? {
            let _ = self.runtime.destroy(&row.sandbox.id, Some(&handle)).await;
            return Err(StartError::Stopped);
        }
        if let Err(e) = self.runtime.wait_ready(&handle, timeout).await {
            return Err(self.start_failed(row, e).await);
        }
        self.observe_start(&row.sandbox.id, started.elapsed());
        row.ready_at = Some(Utc::now());
        if !self.transition(row, done, &[Warming]).await? {
            let _ = self.runtime.destroy(&row.sandbox.id, Some(&handle)).await;
            return Err(StartError::Stopped);
        }
        Ok(())
    }

    /// Records a start's time, whole (`phase="total"`) and by phase where the runtime timed them.
    fn observe_start(&self, id: &str, total: std::time::Duration) {
        let starts = &self.metrics.sandbox_start_seconds;
        starts.with_label_values(&["total"]).observe(total.as_secs_f64());
        for (phase, took) in self.runtime.take_start_phases(id) {
            starts.with_label_values(&[phase.as_str()]).observe(took.as_secs_f64());
        }
    }

    /// A start that failed: a real failure unless the sandbox was being stopped anyway. Either way nothing is left.
    async fn start_failed(&self, row: &mut SandboxRow, e: RuntimeError) -> StartError {
        let logs = if row.handle.dir.is_empty() {
            String::new()
        } else {
            self.runtime.log_tail(&row.handle, 4000).await
        };
        let id = row.sandbox.id.clone();
        let logs = logs.trim();
        let message = if logs.is_empty() {
            format!("sandbox {id} failed to start: {}", e.client_message())
        } else {
            format!("sandbox {id} failed to start: {}\n{logs}", e.client_message())
        };
        tracing::warn!(sandbox = %id, error = &e as &dyn std::error::Error, "Start failed");
        let error = AppError::Runtime { message: message.clone(), source: e };
        row.error = Some(message);
        let failed = match self.transition(row, Failed, &[Warming]).await {
            Ok(won) => won,
            Err(store) => return StartError::Failed(store),
        };
        if !failed {
            let _ = self.runtime.destroy(&id, Some(&row.handle)).await;
            return StartError::Stopped;
        }
        // A pool's failed start counts at once (and feeds the prewarm breaker), before the slow cleanup.
        if let Some(pool) = &row.pool_id {
            let recorded = self
                .update_pool(pool, |p| {
                    p.ctl.prewarm_failures += 1;
                    p.ctl.failed_total += 1;
                    p.ctl.last_failure_logs = row.error.clone();
                    p.ctl.last_error = row.error.clone();
                    p.pool.name.clone()
                })
                .await;
            if let Ok(Some(name)) = &recorded {
                self.metrics.pool_failure(pool, name);
            }
            if let Err(e) = recorded {
                tracing::warn!(pool = %pool, error = &e as &dyn std::error::Error, "Cannot record a failed start");
            }
        }
        let _ = self.runtime.destroy(&id, Some(&row.handle)).await;
        if let Err(store) = self.store.delete_sandbox_if(&id, &[Failed]).await {
            return StartError::Failed(store.into());
        }
        StartError::Failed(error)
    }

    /// First half of a deliberate stop: `from → draining`, committed. `None` when another transition won (a claim
    /// took the sandbox first, or it is already going).
    pub async fn begin_stop(
        &self,
        mut row: SandboxRow,
        from: &[Lifecycle],
        cause: StopCause,
    ) -> AppResult<Option<SandboxRow>> {
        if !self.transition(&mut row, Draining, from).await? {
            return Ok(None);
        }
        self.unwatch(&row.sandbox.id);
        tracing::debug!(sandbox = %row.sandbox.id, ?cause, "Stopping sandbox");
        if cause == StopCause::Expired {
            if let Some(pool) = &row.pool_id {
                self.update_pool(pool, |p| p.ctl.expired_total += 1).await?;
            }
        }
        Ok(Some(row))
    }

    /// Second half: the runtime removes everything, then the row goes. Also what finishes a `draining` row left by
    /// a crash or a failed removal (idempotent).
    pub async fn finish_stop(&self, row: &SandboxRow) -> AppResult<()> {
        let id = &row.sandbox.id;
        if !self.stopping.lock().expect("stopping").insert(id.clone()) {
            return Ok(());
        }
        let result = self.runtime.destroy(id, Some(&row.handle)).await;
        self.stopping.lock().expect("stopping").remove(id);
        result.map_err(|e| runtime_error(&format!("stopping sandbox {id}"), e))?;
        self.store.delete_sandbox_if(id, &[Draining, Failed]).await?;
        if let Some(pool) = row.pool_id.as_ref().or(row.claimed_from.as_ref()) {
            self.pokes.pool(pool);
        }
        Ok(())
    }

    /// A deliberate stop, both halves. False when the sandbox was not in one of `from`.
    pub async fn stop_sandbox(
        &self,
        row: SandboxRow,
        from: &[Lifecycle],
        cause: StopCause,
    ) -> AppResult<bool> {
        match self.begin_stop(row, from, cause).await? {
            Some(row) => self.finish_stop(&row).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// A real failure of a live sandbox (`from → failed`). Pool inventory is counted in the pool's `failed`,
    /// removed and replaced; a caller's sandbox keeps its row and logs until deleted.
    /// `reason` says why; `output` is the tail of what the sandbox printed, if there is any to keep.
    pub async fn fail_sandbox(
        &self,
        mut row: SandboxRow,
        from: &[Lifecycle],
        reason: String,
        output: Option<String>,
    ) -> AppResult<bool> {
        let output = output.map(|o| o.trim().to_string()).filter(|o| !o.is_empty());
        tracing::warn!(sandbox = %row.sandbox.id, %reason, output = output.as_deref().unwrap_or(""), "Sandbox failed");
        row.error = Some(match output {
            Some(output) => format!("{reason}\n{output}"),
            None => reason,
        });
        if !self.transition(&mut row, Failed, from).await? {
            return Ok(false);
        }
        if let Some(pool) = &row.pool_id {
            let name = self
                .update_pool(pool, |p| {
                    p.ctl.failed_total += 1;
                    p.pool.name.clone()
                })
                .await?;
            if let Some(name) = name {
                self.metrics.pool_failure(pool, &name);
            }
            // Removing it pokes the pool, which replaces it.
            self.finish_stop(&row).await?;
        }
        Ok(true)
    }

    /// Watches a ready inventory sandbox's readiness (procd evaluates it; a stream, no polling): the moment it
    /// stops passing, or procd stops answering while it still runs (a frozen procd: the channel's keepalive ends
    /// the stream within seconds), the sandbox leaves `ready` (so no checkout can take it) and the pool replaces it.
    pub fn watch_readiness(self: &Arc<Self>, row: &SandboxRow) {
        let app = self.clone();
        let id = row.sandbox.id.clone();
        let handle = row.handle.clone();
        let task = tokio::spawn(async move {
            let message = match app.runtime.watch_readiness(&handle).await {
                Ok(mut statuses) => loop {
                    match statuses.next().await {
                        Some(ProbeStatus::Passed) => continue,
                        Some(status) => break format!("readiness stopped passing ({})", status.as_str()),
                        None => break "procd stopped answering (its readiness watch ended)".to_string(),
                    }
                },
                Err(e) => format!("procd stopped answering: {e}"),
            };
            app.watchers.lock().expect("watchers").remove(&id);
            // A procd that exited is the exit watcher's to report (with its log).
            if !app.runtime.is_alive(&handle) {
                return;
            }
            if let Ok(Some(row)) = app.store.get_sandbox(&id).await {
                if let Err(e) = app.fail_sandbox(row, &[Ready], message, None).await {
                    tracing::warn!(sandbox = %id, error = &e as &dyn std::error::Error, "Cannot retire an unready sandbox");
                }
            }
        });
        self.watchers.lock().expect("watchers").insert(row.sandbox.id.clone(), task.abort_handle());
    }

    /// Stops watching a sandbox's readiness (it was claimed or is being stopped).
    pub fn unwatch(&self, id: &str) {
        if let Some(task) = self.watchers.lock().expect("watchers").remove(id) {
            task.abort();
        }
    }

    /// Brings the runtime in line with the store after a (re)start: anything the runtime holds that has no row is
    /// removed (the runtime is asked first: a row is always written before its sandbox starts, so a sandbox another
    /// replica is starting right now has its row); rows of replicas that are gone (this process's earlier run
    /// included) are finished, undone or adopted ([`App::adopt_orphans`]); then the pools this replica takes adopt
    /// their inventory ([`App::own_pool`]).
    pub async fn recover(self: &Arc<Self>) -> AppResult<()> {
        let held = self.runtime.list_sandboxes();
        let known: std::collections::HashSet<SandboxId> =
            self.store.list_all_sandboxes().await?.into_iter().map(|r| r.sandbox.id).collect();
        let mut orphans = 0;
        for id in held.into_iter().filter(|id| !known.contains(id.as_str())) {
            self.runtime.destroy(&id, None).await.map_err(|e| runtime_error("recovery", e))?;
            orphans += 1;
        }
        if self.store.lock_leader().await? {
            self.leader.store(true, std::sync::atomic::Ordering::SeqCst);
            self.adopt_orphans().await?;
        }
        let share = self.pool_share().await?;
        let mut pools = 0;
        for pool in self.store.list_pool_ids().await? {
            pools += usize::from(self.own_pool(&pool, share).await?);
        }
        tracing::info!(orphans, pools, replica = %self.replica, "Recovered sandboxes from the store");
        self.pokes.all();
        Ok(())
    }

    /// Handles procd exits reported by the runtime: a live sandbox whose procd is gone has failed.
    pub async fn watch_exits(
        self: Arc<Self>,
        exits: Arc<tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>>,
    ) {
        let mut exits = exits.lock().await;
        while let Some(id) = exits.recv().await {
            // Another transition may win the race (a claim taking the ready sandbox whose procd just died): then
            // the sandbox is failed from the state that won, so a dead sandbox never stays `running`.
            for _ in 0..5 {
                let Ok(Some(row)) = self.store.get_sandbox(&id).await else { break };
                let from = row.lifecycle;
                if !matches!(from, Ready | Claimed) || self.runtime.is_alive(&row.handle) {
                    break;
                }
                let tail = self.runtime.log_tail(&row.handle, 2000).await;
                let reason = format!("procd exited: {}", crate::runtime::exit_reason(&tail));
                match self.fail_sandbox(row, &[from], reason, Some(tail)).await {
                    Ok(true) => break,
                    Ok(false) => continue,
                    Err(e) => {
                        let e = &e as &dyn std::error::Error;
                        tracing::warn!(sandbox = %id, error = e, "Cannot record a failed sandbox");
                        break;
                    }
                }
            }
        }
    }
}
