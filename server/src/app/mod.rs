//! The domain: accounts, templates and builds, pools, sandboxes and checkouts. It calls the store and the runtime
//! and knows nothing of HTTP; handlers translate requests into these calls.

pub mod accounts;
pub mod checkout;
pub mod demand;
pub mod io;
pub mod lifecycle;
pub mod observe;
pub mod pools;
pub mod reconciler;
pub mod replicas;
pub mod sandboxes;
pub mod templates;
pub mod trust;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use tokio::sync::{Notify, Semaphore};
use tokio::task::AbortHandle;
use warmpool_api::{AccountId, FieldError, SandboxId};

use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::secrets::Secrets;
use crate::store::{Lifecycle, PoolRow, Store, StoreError};
use reconciler::{PassRecord, Pokes};

/// Errors of the domain, each mapped to one API error code by the HTTP layer.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("missing or invalid token")]
    Unauthorized,
    /// An identity token offered at `POST /v1/auth/oidc` failed `check` (`unauthorized`, naming the check).
    #[error("{message}")]
    OidcRefused { check: &'static str, message: String },
    /// The caller may not do this, whatever the input (`forbidden`); `field` names what it asked for, if a field.
    #[error("{message}")]
    Forbidden { field: Option<String>, message: String },
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Quota(String),
    /// A streamed body went past the server's limit (`payload_too_large`).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A checkout found no usable inventory (`warm_pool_unavailable`).
    #[error("{message}")]
    WarmPoolUnavailable { reason: String, field: Option<String>, message: String },
    /// The store or the runtime cannot take writes now (`service_unavailable`); clears without a restart.
    #[error("{0}")]
    ServiceUnavailable(String),
    #[error("store failure")]
    Store(#[source] StoreError),
    /// The runtime could not do it: `message` is what the client is told (`conflict`, or `service_unavailable`
    /// when the host is out of space); `source` is the whole error, for the log.
    #[error("{message}")]
    Runtime {
        message: String,
        #[source]
        source: crate::runtime::RuntimeError,
    },
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AppError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(what) => AppError::Conflict(format!("{what} already exists")),
            e @ StoreError::OverQuota { .. } => AppError::Quota(e.to_string()),
            StoreError::Unavailable { reason, .. } => AppError::ServiceUnavailable(format!(
                "the database cannot take writes right now: {reason}; nothing was changed, retry once the \
                 operator has fixed it"
            )),
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
    pub account_id: AccountId,
    pub admin: bool,
    /// The account's quotas as read with the token (a checkout needs no read of its own).
    pub quotas: warmpool_api::Quotas,
}

/// One page of a list as the API answers it: `limit + 1` rows asked of the store tell whether more follow, and
/// the last id shown is the cursor of the next page.
pub async fn paged<R, T>(
    page: &crate::store::Page,
    fetch: impl AsyncFnOnce(&crate::store::Page) -> Result<Vec<R>, StoreError>,
    id: impl Fn(&T) -> &str,
    map: impl FnMut(R) -> T,
) -> AppResult<warmpool_api::List<T>> {
    let ask = crate::store::Page { after: page.after.clone(), limit: page.limit.saturating_add(1) };
    let mut items: Vec<T> = fetch(&ask).await?.into_iter().map(map).collect();
    let more = items.len() > page.limit as usize;
    items.truncate(page.limit as usize);
    let next_cursor = if more { items.last().map(|t| id(t).to_string()) } else { None };
    Ok(warmpool_api::List { items, next_cursor })
}

/// A fresh id made from 16 random hex digits: `new_id(SandboxId::from_suffix)`, `new_id(|s| format!("clm_{s}"))`.
pub fn new_id<T>(make: impl FnOnce(String) -> T) -> T {
    use rand::RngCore;
    let mut bytes = [0u8; 8];
    rand::thread_rng().fill_bytes(&mut bytes);
    make(hex::encode(bytes))
}

#[derive(Debug, Clone)]
pub struct AppConfig {
    pub data_dir: PathBuf,
    pub reconciler_enabled: bool,
    /// Sandboxes started at once by the reconciler.
    pub max_parallel_starts: usize,
    /// Builds run at once.
    pub max_parallel_builds: usize,
    /// Quotas of accounts created without them (`--default-quotas`).
    pub default_quotas: warmpool_api::Quotas,
    /// Where template images may come from (`--allowed-registries`, `--image-dir`).
    pub images: crate::images::ImagePolicy,
    /// Issuers whose identity tokens trust policies may admit (`--oidc-issuer`).
    pub oidc: crate::oidc::OidcConfig,
    /// The largest body of the file, archive and stdin routes (`--max-upload-bytes`).
    pub max_upload_bytes: u64,
}

/// The app's background loops, stopped when this is dropped (at shutdown; when a test's control plane goes).
pub struct Background(Vec<AbortHandle>);

/// Runs a background loop that ends only when aborted. One that panics is logged and started again a second later,
/// so a bug one input reaches does not stop the loop for everything else. What the loop was handling when it
/// panicked (one procd exit, one pool's pass) is not retried by the restart.
fn supervise<T, F, Fut>(context: &T, name: &'static str, mut run: F) -> AbortHandle
where
    T: Clone + Send + 'static,
    F: FnMut(T) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures::FutureExt;
    let context = context.clone();
    tokio::spawn(async move {
        loop {
            if std::panic::AssertUnwindSafe(run(context.clone())).catch_unwind().await.is_ok() {
                return;
            }
            tracing::error!(task = name, "A background loop panicked (see above); starting it again in 1 s");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    })
    .abort_handle()
}

impl Drop for Background {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

pub struct App {
    /// This process among the replicas sharing the store (`rep_…`, new at every start).
    pub replica: String,
    pub store: Arc<dyn Store>,
    pub runtime: Arc<dyn Runtime>,
    pub secrets: Arc<Secrets>,
    pub metrics: Metrics,
    pub config: AppConfig,
    /// Verifies identity tokens offered at `POST /v1/auth/oidc`.
    pub oidc: crate::oidc::Verifier,
    /// Pools the reconciler should look at (see [`Pokes`]).
    pub pokes: Pokes,
    /// Per-pool wake-ups for checkouts waiting on inventory.
    inventory: Mutex<HashMap<String, Arc<Notify>>>,
    pub start_slots: Arc<Semaphore>,
    pub build_slots: Arc<Semaphore>,
    /// Readiness watches of ready inventory, by sandbox.
    watchers: Mutex<HashMap<SandboxId, AbortHandle>>,
    /// Sandboxes whose removal is under way (so a retry does not run it twice).
    stopping: Mutex<HashSet<SandboxId>>,
    /// Each pool's last reconcile pass, kept in memory (a pass that changed nothing writes nothing).
    pub passes: Mutex<HashMap<String, PassRecord>>,
    /// Pools this replica reconciles (it holds their locks in the store).
    owned: Mutex<HashSet<String>>,
    /// Whether this replica runs the once-per-cluster work (taking over what dead replicas left).
    leader: std::sync::atomic::AtomicBool,
    /// Claims not yet written, start buckets (see [`demand`]).
    pub demand: demand::DemandState,
}

impl App {
    pub fn new(
        store: Arc<dyn Store>,
        runtime: Arc<dyn Runtime>,
        secrets: Arc<Secrets>,
        config: AppConfig,
    ) -> Arc<App> {
        Arc::new(App {
            replica: new_id(|s| format!("rep_{s}")),
            store,
            runtime,
            secrets,
            metrics: Metrics::default(),
            start_slots: Arc::new(Semaphore::new(config.max_parallel_starts.max(1))),
            build_slots: Arc::new(Semaphore::new(config.max_parallel_builds.max(1))),
            oidc: crate::oidc::Verifier::new(config.oidc.clone()),
            config,
            pokes: Pokes::default(),
            inventory: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            stopping: Mutex::new(HashSet::new()),
            passes: Mutex::new(HashMap::new()),
            owned: Mutex::new(HashSet::new()),
            leader: Default::default(),
            demand: Default::default(),
        })
    }

    /// Brings the app up over its store and runtime: joins the replicas, recovers what an earlier run left, and
    /// starts the background loops (the reconciler, procd exits, timeout policies, the pools' spread over
    /// replicas). They run until the returned [`Background`] is dropped.
    pub async fn start(
        self: &Arc<Self>,
        exits: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> AppResult<Background> {
        self.join_cluster().await?;
        self.recover().await?;
        let exits = Arc::new(tokio::sync::Mutex::new(exits));
        let mut tasks = vec![
            supervise(self, "balance", App::balance),
            supervise(self, "watch_exits", move |app| app.watch_exits(exits.clone())),
            supervise(self, "enforce_timeouts", App::enforce_timeouts),
            supervise(self, "demand", App::run_demand_loop),
        ];
        if self.config.reconciler_enabled {
            tasks.push(supervise(self, "reconciler", App::run_reconciler));
        }
        Ok(Background(tasks))
    }

    pub fn inventory_signal(&self, pool_id: &str) -> Arc<Notify> {
        self.inventory.lock().expect("inventory").entry(pool_id.to_string()).or_default().clone()
    }

    /// Read-modify-write of one pool row: `f` runs on the stored row and its result is written only if no other
    /// write (of any replica) came in between; otherwise it runs again on the newer row.
    pub async fn update_pool<T>(
        &self,
        pool_id: &str,
        mut f: impl FnMut(&mut PoolRow) -> T,
    ) -> AppResult<Option<T>> {
        loop {
            let Some(mut row) = self.store.get_pool_by_id(pool_id).await? else {
                return Ok(None);
            };
            let out = f(&mut row);
            if self.store.update_pool(&row).await? {
                return Ok(Some(out));
            }
        }
    }

    /// Applies sandboxes' timeout policies once a second (on the leader replica).
    pub async fn enforce_timeouts(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            // Once per cluster: the leader's job.
            if !self.leader.load(std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let now = Utc::now();
            let Ok(rows) = self.store.list_all_sandboxes().await else {
                continue;
            };
            for row in rows {
                let due = row.pool_id.is_none()
                    && row.lifecycle == Lifecycle::Claimed
                    && row.sandbox.state == warmpool_api::SandboxState::Running
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_background_loop_that_panics_is_started_again() {
        let runs = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(Notify::new());
        let _task = supervise(
            &(runs.clone(), done.clone()),
            "test",
            |(runs, done): (Arc<AtomicUsize>, Arc<Notify>)| async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("the first run panics");
                }
                done.notify_one();
            },
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), done.notified())
            .await
            .expect("started again");
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
