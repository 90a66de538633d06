//! The domain: accounts, templates and builds, pools, sandboxes and checkouts. It calls the store and the runtime
//! and knows nothing of HTTP; handlers translate requests into these calls.

pub mod accounts;
pub mod pools;
pub mod sandboxes;
pub mod templates;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::sync::{mpsc, Notify, Semaphore};
use warmpool_api::{FieldError, SandboxState};

use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::store::{PoolRow, Store, StoreError};

/// Errors of the domain, each mapped to one API error code by the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("missing or invalid token")]
    Unauthorized,
    #[error("this call needs an admin token")]
    Forbidden,
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Quota(String),
    #[error("{message}")]
    Unavailable { reason: String, field: Option<String>, message: String },
    #[error("store failure")]
    Store(#[source] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => AppError::Conflict(format!("{what} already exists")),
            e => AppError::Store(e),
        }
    }
}

pub type AppResult<T> = Result<T, AppError>;

pub fn not_found(kind: &'static str, id: &str) -> AppError {
    AppError::NotFound { kind, id: id.to_string() }
}

/// Who is calling: the account whose resources they see, and whether they may administer accounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub account_id: String,
    pub admin: bool,
}

pub fn new_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub data_dir: PathBuf,
    pub reconciler_enabled: bool,
    /// Sandboxes started at once by the reconciler.
    pub max_parallel_starts: usize,
    /// Builds run at once.
    pub max_parallel_builds: usize,
}

pub struct App {
    pub store: Arc<dyn Store>,
    pub runtime: Arc<dyn Runtime>,
    pub metrics: Metrics,
    pub config: AppConfig,
    /// Wakes the reconciler (no payload: it looks at everything).
    pub poke: Notify,
    /// Per-pool wake-ups for checkouts waiting on inventory.
    inventory: Mutex<HashMap<String, Arc<Notify>>>,
    /// Serializes read-modify-write of pool rows.
    pool_lock: Mutex<()>,
    pub start_slots: Arc<Semaphore>,
    pub build_slots: Arc<Semaphore>,
}

impl App {
    pub fn new(store: Arc<dyn Store>, runtime: Arc<dyn Runtime>, config: AppConfig) -> Arc<App> {
        Arc::new(App {
            store,
            runtime,
            metrics: Metrics::default(),
            start_slots: Arc::new(Semaphore::new(config.max_parallel_starts.max(1))),
            build_slots: Arc::new(Semaphore::new(config.max_parallel_builds.max(1))),
            config,
            poke: Notify::new(),
            inventory: Mutex::new(HashMap::new()),
            pool_lock: Mutex::new(()),
        })
    }

    pub fn inventory_signal(&self, pool_id: &str) -> Arc<Notify> {
        self.inventory.lock().expect("inventory").entry(pool_id.to_string()).or_default().clone()
    }

    /// Read-modify-write of one pool row, serialized with every other.
    pub fn update_pool<T>(&self, pool_id: &str, f: impl FnOnce(&mut PoolRow) -> T) -> AppResult<Option<T>> {
        let _guard = self.pool_lock.lock().expect("pool lock");
        let Some(mut row) = self.store.get_pool_by_id(pool_id)? else {
            return Ok(None);
        };
        let out = f(&mut row);
        self.store.update_pool(&row)?;
        Ok(Some(out))
    }

    /// Brings the runtime in line with the store after a (re)start: live sandboxes are re-adopted; sandboxes
    /// caught mid-start, and ones whose procd died, are cleaned up; directories the store does not know are killed
    /// and removed; builds caught mid-way fail.
    pub async fn recover(self: &Arc<Self>) -> AppResult<()> {
        let rows = self.store.list_all_sandboxes()?;
        let known: std::collections::HashSet<String> = rows.iter().map(|r| r.sandbox.id.clone()).collect();
        let (mut adopted, mut removed) = (0, 0);
        for mut row in rows {
            let live = matches!(row.sandbox.state, SandboxState::Running | SandboxState::Paused);
            if live && self.runtime.adopt(&row.sandbox.id, &row.handle) {
                adopted += 1;
                continue;
            }
            self.runtime.stop(&row.sandbox.id, &row.handle, true).await;
            if row.pool_id.is_some() || row.sandbox.state == SandboxState::Starting {
                // Inventory is refilled by the reconciler; a half-started sandbox was never handed out.
                self.store.delete_sandbox(&row.sandbox.id)?;
            } else if live {
                row.sandbox.state = SandboxState::Failed;
                row.error = Some("procd was not running when the server restarted".into());
                self.store.update_sandbox(&row)?;
            }
            removed += 1;
        }
        let mut orphans = 0;
        for id in self.runtime.sandbox_dirs() {
            if !known.contains(&id) {
                self.runtime.remove_unknown(&id).await;
                orphans += 1;
            }
        }
        for mut build in self.store.list_builds_in(&["queued", "building"])? {
            build.build.status = warmpool_api::BuildStatus::Failed;
            build.build.error = Some("the server restarted while this build was running".into());
            build.build.finished_at = Some(Utc::now());
            self.store.update_build(&build)?;
            self.runtime.remove_artifact(&build.build.id).await;
        }
        tracing::info!(adopted, removed, orphans, "Recovered sandboxes from the store");
        Ok(())
    }

    /// Handles procd exits reported by the runtime: a live sandbox becomes `failed`; inventory is dropped and the
    /// reconciler refills.
    pub async fn watch_exits(self: Arc<Self>, mut exits: mpsc::UnboundedReceiver<String>) {
        while let Some(id) = exits.recv().await {
            let Ok(Some(mut row)) = self.store.get_sandbox(&id) else {
                continue;
            };
            if !matches!(row.sandbox.state, SandboxState::Running | SandboxState::Paused) {
                continue;
            }
            if self.runtime.is_alive(&row.handle) {
                continue;
            }
            let tail = self.runtime.log_tail(&row.handle, 2000);
            tracing::warn!(sandbox = %id, "procd exited; sandbox failed");
            row.sandbox.state = SandboxState::Failed;
            row.error = Some(format!("procd exited: {}", tail.trim()));
            if let Some(pool) = row.pool_id.clone() {
                let _ = self.update_pool(&pool, |p| p.ctl.failed_total += 1);
                self.runtime.stop(&id, &row.handle, true).await;
                let _ = self.store.delete_sandbox(&id);
            } else {
                let _ = self.store.update_sandbox(&row);
            }
            self.poke.notify_one();
        }
    }

    /// Applies sandboxes' timeout policies once a second.
    pub async fn enforce_timeouts(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = Utc::now();
            let Ok(rows) = self.store.list_all_sandboxes() else {
                continue;
            };
            for row in rows {
                let due = row.pool_id.is_none()
                    && row.sandbox.state == SandboxState::Running
                    && row.sandbox.expires_at.is_some_and(|t| t <= now);
                if due {
                    if let Err(e) = self.expire_sandbox(row).await {
                        tracing::warn!(error = &e as &dyn std::error::Error, "Timeout policy failed");
                    }
                }
            }
        }
    }
}
