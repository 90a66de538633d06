//! The store: every piece of durable state, behind [`Store`] so the embedded SQLite store and a PostgreSQL store
//! are interchangeable. Handlers never see SQL; the domain (`app`) calls these methods.
//!
//! Rows keep the queried columns as columns and the rest of the object as JSON, so the wire types stay the single
//! definition of a resource. The warm-pool claim is one atomic statement ([`Store::claim_ready`]).
//!
//! Several replicas may share one store (PostgreSQL): each pool is reconciled by the one replica that holds its
//! lock ([`Store::lock_pool`]), and what one replica changes reaches the others as [`StoreEvent`]s. The embedded
//! store serves one replica, which owns every pool; the trait's defaults say so.

#[cfg(test)]
pub mod contract;
pub mod postgres;
pub mod schema;
pub mod sqlite;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

pub use crate::runtime::RuntimeHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;
use warmpool_api::{
    Account, AccountId, Build, Lease, PoolId, Sandbox, Template, TemplateSpec, TimeoutPolicy, TokenId,
    TrustPolicy, TrustPolicyId, WarmPool, WarmPoolCheckout,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("--database {0:?}: expected sqlite:PATH or postgres://user@host:port/db")]
    InvalidUrl(String),
    #[error("{0} already exists")]
    Conflict(String),
    /// The database cannot take writes now (disk full, read-only, I/O error, locked): an operator can fix it and
    /// the store recovers by itself; answered `service_unavailable`.
    #[error("the database cannot take writes now ({reason})")]
    Unavailable {
        reason: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("a stored {what} does not parse")]
    Corrupt {
        what: &'static str,
        #[source]
        source: BoxError,
    },
    /// The account already owns `owned` sandboxes of at most `max` (`max_sandboxes`): nothing was written.
    #[error("the account has {owned} sandboxes; max_sandboxes is {max}")]
    OverQuota { owned: u64, max: u64 },
    #[error("database error")]
    Backend(#[source] BoxError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode::*;
        let code = match &e {
            rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
            _ => None,
        };
        let reason = match code {
            Some(ConstraintViolation) => {
                let rusqlite::Error::SqliteFailure(_, msg) = &e else { unreachable!() };
                return StoreError::Conflict(msg.clone().unwrap_or_else(|| "row".into()));
            }
            Some(DiskFull) => "the disk is full",
            Some(ReadOnly) => "the database is read-only",
            Some(SystemIoFailure) => "an I/O error",
            Some(CannotOpen) => "the database file cannot be opened",
            Some(PermissionDenied) => "permission denied",
            Some(DatabaseBusy | DatabaseLocked) => "the database is locked",
            _ => return StoreError::Backend(Box::new(e)),
        };
        StoreError::Unavailable { reason, source: Box::new(e) }
    }
}

/// An id read back from a column of its own (a wrong prefix means the database was changed behind our back).
pub fn stored_id<T: TryFrom<String, Error = String>>(
    what: &'static str,
    value: impl Into<String>,
) -> StoreResult<T> {
    T::try_from(value.into()).map_err(|e| StoreError::Corrupt { what, source: e.into() })
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Corrupt { what: "JSON column", source: Box::new(e) }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Timestamps as stored: RFC 3339 in UTC with microseconds, so text order is time order.
fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Names a unique violation after what the user knows it as (`template "api"`).
fn conflict_as(what: String) -> impl FnOnce(StoreError) -> StoreError {
    move |e| match e {
        StoreError::Conflict(_) => StoreError::Conflict(what),
        e => e,
    }
}

/// One page of a list, keyset on id: the rows whose id is above `after`, in id order, at most `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub after: Option<String>,
    pub limit: u32,
}

impl Page {
    /// Every row.
    pub const ALL: Page = Page { after: None, limit: u32::MAX };

    fn after(&self) -> &str {
        self.after.as_deref().unwrap_or("")
    }
}

/// A token and the account it acts for (None: no such account row, so no quotas).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Credential {
    pub token: TokenRow,
    pub account: Option<Account>,
}

/// An API token: only its SHA-256 is stored. Admin tokens have no account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRow {
    pub id: TokenId,
    pub account_id: Option<AccountId>,
    pub name: Option<String>,
    pub hash: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
    /// Refused like a revoked token from then on (tokens exchanged for an OIDC identity token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The trust policy that admitted the exchange this token came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_policy: Option<TrustPolicyId>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateRow {
    pub account_id: AccountId,
    pub template: Template,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildRow {
    pub account_id: AccountId,
    pub build: Build,
    /// The template's spec when the build was made: what its sandboxes run.
    pub spec: TemplateSpec,
    /// The replica running the build (a build whose replica is gone failed).
    #[serde(default)]
    pub runner: Option<String>,
}

/// A pool plus its controller's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolRow {
    pub account_id: AccountId,
    pub pool: WarmPool,
    pub ctl: PoolControl,
    /// Bumped by every write: [`Store::update_pool`] writes only over the revision it read, so two replicas'
    /// read-modify-writes of one pool never lose each other's change.
    #[serde(default)]
    pub rev: u64,
}

/// What the reconciler records about a pool (published in its status).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PoolControl {
    /// Consecutive failed starts; at 3 the pool stops filling.
    pub prewarm_failures: u32,
    pub last_failure_logs: Option<String>,
    pub failed_total: u32,
    pub expired_total: u32,
    pub last_error: Option<String>,
    /// Why filling was blocked in the last pass (quota, capacity).
    pub blocked: Vec<warmpool_api::DegradedReason>,
    /// What autoscale decided last (the recommendation in effect).
    #[serde(default)]
    pub autoscale: crate::app::demand::ScaleState,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRow {
    pub account_id: AccountId,
    pub lease: Lease,
}

/// Where a sandbox is in its life. Every sandbox, pool inventory included, moves through one state machine:
///
/// ```text
/// warming ──> ready ──> claimed          (a checkout; cold creates go warming ──> claimed)
/// warming | ready | claimed ──> draining ──> gone (row deleted)   (scale-down, rollout, drain, expiry, delete)
/// any ──> failed                          (only a real failure)
/// ```
///
/// Each transition is one conditional write ([`Store::update_sandbox_if`]) committed before the runtime acts on
/// it, so a claim and a stop can never both win, and a crash leaves a row saying what to finish.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Starting: procd is being started or its readiness has not passed yet.
    Warming,
    /// Pool inventory whose readiness passes, unclaimed.
    Ready,
    /// A caller's sandbox (checked out, or cold-created and ready).
    Claimed,
    /// Being stopped on purpose; the row goes once the runtime has removed everything.
    Draining,
    /// Stopped by a real failure (start contract not met, warm process exit, liveness, procd lost).
    Failed,
}

impl Lifecycle {
    pub const ALL: [Lifecycle; 5] =
        [Lifecycle::Warming, Lifecycle::Ready, Lifecycle::Claimed, Lifecycle::Draining, Lifecycle::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Warming => "warming",
            Lifecycle::Ready => "ready",
            Lifecycle::Claimed => "claimed",
            Lifecycle::Draining => "draining",
            Lifecycle::Failed => "failed",
        }
    }

    /// The sandbox state the API shows for it (`paused` is kept apart: it is a claimed sandbox's runtime state).
    pub fn sandbox_state(self) -> warmpool_api::SandboxState {
        use warmpool_api::SandboxState;
        match self {
            Lifecycle::Warming => SandboxState::Starting,
            Lifecycle::Ready | Lifecycle::Claimed => SandboxState::Running,
            Lifecycle::Draining => SandboxState::Stopped,
            Lifecycle::Failed => SandboxState::Failed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRow {
    pub account_id: AccountId,
    pub sandbox: Sandbox,
    /// Inventory of this pool (None for cold sandboxes and after a checkout).
    pub pool_id: Option<PoolId>,
    pub lifecycle: Lifecycle,
    /// The pool it was checked out from.
    pub claimed_from: Option<PoolId>,
    /// The pool's `rollout_generation` this sandbox was started for.
    #[serde(default)]
    pub pool_generation: u64,
    pub ready_at: Option<DateTime<Utc>>,
    pub timeout_policy: Option<TimeoutPolicy>,
    /// Environment given at claim time, applied to later `exec` calls.
    #[serde(default)]
    pub claim_env: BTreeMap<String, String>,
    pub handle: RuntimeHandle,
    /// The error of a sandbox that failed.
    pub error: Option<String>,
    /// The replica that started or adopted it and watches it: the only one that may undo it while `warming`.
    #[serde(default)]
    pub owner: Option<String>,
}

/// What a claim writes into the sandbox it takes.
#[derive(Debug, Clone)]
pub struct ClaimUpdate {
    pub account_id: AccountId,
    /// The account's `max_sandboxes`: the claim is refused ([`StoreError::OverQuota`]) when the account already
    /// owns that many, counted and claimed atomically.
    pub max_owned: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub checkout: WarmPoolCheckout,
    pub timeout_policy: Option<TimeoutPolicy>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A checkout that named a pool: what demand counts.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimEvent {
    /// Unique per claim (the row's key).
    pub id: String,
    pub pool_id: String,
    pub at: DateTime<Utc>,
    /// Served from ready inventory.
    pub hit: bool,
}

/// What the store knows of a pool's demand (see [`Store::demand_sample`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DemandSample {
    /// Claims and hits since the window's start.
    pub claims: u64,
    pub hits: u64,
    /// Claims since the recent mark, and the earliest of them.
    pub recent_claims: u64,
    pub recent_first_at: Option<DateTime<Utc>>,
    /// The latest claim still stored.
    pub last_claim_at: Option<DateTime<Utc>>,
    /// The latest warm-up times (start to ready), newest first.
    pub warm_seconds: Vec<f64>,
}

impl ClaimUpdate {
    /// What a claim changes, as two JSON objects whose keys replace those of the stored row and of its `sandbox`
    /// (PostgreSQL applies them with `||` inside the claim's one statement, SQLite with [`ClaimUpdate::apply`]):
    /// the one description of a claim's write.
    pub fn patches(&self, pool_id: &str) -> (serde_json::Value, serde_json::Value) {
        let row = serde_json::json!({
            "account_id": self.account_id,
            "pool_id": null,
            "lifecycle": Lifecycle::Claimed,
            "claimed_from": pool_id,
            "timeout_policy": self.timeout_policy,
        });
        let sandbox = serde_json::json!({
            "labels": self.labels,
            "warm_pool_checkout": self.checkout,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
        });
        (row, sandbox)
    }

    /// The claimed row: `row` (a ready sandbox of `pool_id`) with [`ClaimUpdate::patches`] applied.
    pub fn apply(&self, pool_id: &str, row: &SandboxRow) -> StoreResult<SandboxRow> {
        let (row_patch, sandbox_patch) = self.patches(pool_id);
        let mut value = serde_json::to_value(row)?;
        let merge = |target: &mut serde_json::Value, patch: serde_json::Value| {
            if let (Some(target), serde_json::Value::Object(patch)) = (target.as_object_mut(), patch) {
                target.extend(patch);
            }
        };
        merge(&mut value, row_patch);
        merge(&mut value["sandbox"], sandbox_patch);
        Ok(serde_json::from_value(value)?)
    }
}

/// The columns of a sandbox row besides its ids, as both stores write them.
struct SandboxColumns {
    json: String,
    pool_id: Option<String>,
    lifecycle: &'static str,
    state: &'static str,
    ready_at: Option<String>,
}

impl SandboxColumns {
    fn of(row: &SandboxRow) -> StoreResult<SandboxColumns> {
        Ok(SandboxColumns {
            json: serde_json::to_string(row)?,
            pool_id: row.pool_id.as_ref().map(|p| p.to_string()),
            lifecycle: row.lifecycle.as_str(),
            state: row.sandbox.state.as_str(),
            ready_at: row.ready_at.as_ref().map(ts),
        })
    }
}

/// What one replica's change means for the others (PostgreSQL's `LISTEN/NOTIFY`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// Something about this pool changed: its spec, a lease, its inventory (a sandbox became ready, was claimed or
    /// went).
    Pool(String),
    /// Something every pool may depend on changed (a build finished, a tag moved, a template went).
    All,
    /// This replica's session with the database ended, and with it the locks of every pool it reconciled.
    LocksLost,
}

/// How the pools are spread over the live replicas now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    pub replicas: u64,
    pub pools: u64,
    /// Pools some replica reconciles.
    pub locked_pools: u64,
}

/// Every durable operation. Methods are async and never block the caller's thread: PostgreSQL runs on its async
/// driver, SQLite on threads of its own.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    fn describe(&self) -> String;
    /// Makes one small durable write: fails while the store cannot take writes (`/readyz`).
    async fn check_writable(&self) -> StoreResult<()>;

    async fn insert_account(&self, account: &Account) -> StoreResult<()>;
    async fn get_account(&self, id: &str) -> StoreResult<Option<Account>>;
    async fn list_accounts(&self, page: &Page) -> StoreResult<Vec<Account>>;
    async fn update_account(&self, account: &Account) -> StoreResult<()>;

    async fn insert_token(&self, token: &TokenRow) -> StoreResult<()>;
    /// The token with this hash and the account it acts for (`default_account` when it names none), in one read:
    /// every authenticated request makes it.
    async fn credential(&self, hash: &str, default_account: &str) -> StoreResult<Option<Credential>>;
    async fn has_admin_token(&self) -> StoreResult<bool>;
    async fn delete_token(&self, id: &str) -> StoreResult<bool>;

    async fn insert_trust_policy(&self, policy: &TrustPolicy) -> StoreResult<()>;
    /// By id, within the account.
    async fn get_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<Option<TrustPolicy>>;
    async fn list_trust_policies(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TrustPolicy>>;
    /// Every account's policies for one issuer, in id order (what an exchange matches against).
    async fn trust_policies_for_issuer(&self, issuer: &str) -> StoreResult<Vec<TrustPolicy>>;
    async fn delete_trust_policy(&self, account_id: &str, id: &str) -> StoreResult<bool>;

    async fn insert_template(&self, row: &TemplateRow) -> StoreResult<()>;
    /// By id or name, within the account.
    async fn get_template(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>>;
    async fn list_templates(&self, account_id: &str, page: &Page) -> StoreResult<Vec<TemplateRow>>;
    async fn update_template(&self, row: &TemplateRow) -> StoreResult<()>;
    /// Deletes the template with its builds and tags.
    async fn delete_template(&self, id: &str) -> StoreResult<()>;

    async fn insert_build(&self, row: &BuildRow) -> StoreResult<()>;
    async fn get_build(&self, id: &str) -> StoreResult<Option<BuildRow>>;
    async fn list_builds(&self, template_id: &str) -> StoreResult<Vec<BuildRow>>;
    /// One page of a template's builds, by id (the API's list).
    async fn page_builds(&self, template_id: &str, page: &Page) -> StoreResult<Vec<BuildRow>>;
    async fn list_builds_in(&self, statuses: &[&'static str]) -> StoreResult<Vec<BuildRow>>;
    async fn update_build(&self, row: &BuildRow) -> StoreResult<()>;
    async fn latest_ready_build(&self, template_id: &str) -> StoreResult<Option<BuildRow>>;

    async fn put_tag(
        &self,
        template_id: &str,
        tag: &str,
        build_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    async fn get_tag(&self, template_id: &str, tag: &str) -> StoreResult<Option<warmpool_api::Tag>>;
    async fn list_tags(&self, template_id: &str) -> StoreResult<Vec<warmpool_api::Tag>>;
    async fn delete_tag(&self, template_id: &str, tag: &str) -> StoreResult<bool>;

    async fn insert_pool(&self, row: &PoolRow) -> StoreResult<()>;
    async fn get_pool(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>>;
    async fn get_pool_by_id(&self, id: &str) -> StoreResult<Option<PoolRow>>;
    /// All pools, or one account's.
    async fn list_pools(&self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>>;
    /// One page of an account's pools.
    async fn page_pools(&self, account_id: &str, page: &Page) -> StoreResult<Vec<PoolRow>>;
    /// Writes the pool if its stored revision is still `row.rev` (and bumps it); false when another write came
    /// first or the pool is gone.
    async fn update_pool(&self, row: &PoolRow) -> StoreResult<bool>;
    async fn list_pool_ids(&self) -> StoreResult<Vec<String>>;
    async fn delete_pool(&self, id: &str) -> StoreResult<()>;

    async fn put_lease(&self, row: &LeaseRow) -> StoreResult<()>;
    async fn delete_lease(&self, pool_id: &str, key: &str) -> StoreResult<bool>;
    async fn list_leases(&self, pool_id: &str) -> StoreResult<Vec<LeaseRow>>;

    async fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()>;
    /// Inserts an account's own sandbox (not pool inventory) unless the account already owns `max_owned`
    /// ([`StoreError::OverQuota`]), counted and inserted atomically: concurrent creates cannot pass the quota
    /// together.
    async fn insert_owned_sandbox(&self, row: &SandboxRow, max_owned: u64) -> StoreResult<()>;
    async fn get_sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>>;
    /// One account's sandboxes that are not pool inventory.
    async fn list_sandboxes(&self, account_id: &str, page: &Page) -> StoreResult<Vec<SandboxRow>>;
    /// Every sandbox the store knows (inventory too).
    async fn list_all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>>;
    async fn list_pool_sandboxes(&self, pool_id: &str) -> StoreResult<Vec<SandboxRow>>;
    /// Writes the row only if the stored lifecycle is one of `expected`; false when it was not (someone else's
    /// transition won, or the row is gone).
    async fn update_sandbox_if(&self, row: &SandboxRow, expected: &[Lifecycle]) -> StoreResult<bool>;
    /// Deletes the row only if its lifecycle is one of `expected`.
    async fn delete_sandbox_if(&self, id: &str, expected: &[Lifecycle]) -> StoreResult<bool>;
    /// Live sandboxes on this server (all accounts, inventory too).
    async fn count_live_sandboxes(&self) -> StoreResult<u64>;
    /// Counts an account's live sandboxes: `(owned, warm inventory)`.
    async fn count_sandboxes(&self, account_id: &str) -> StoreResult<(u64, u64)>;
    /// Atomically takes one ready sandbox of the pool (the resolved build first, oldest first) and makes it the
    /// caller's (`ready → claimed`). Two callers never get the same sandbox, and a sandbox being stopped is never
    /// taken.
    async fn claim_ready(
        &self,
        pool_id: &str,
        prefer_build: Option<&str>,
        claim: &ClaimUpdate,
    ) -> StoreResult<Option<SandboxRow>>;

    // Demand: claim events and warm-up times, durable so every replica computes the same demand.

    /// Records checkouts that named pools, in one write.
    async fn record_claims(&self, claims: &[ClaimEvent]) -> StoreResult<()>;
    /// Records how long one of the pool's sandboxes took from start to ready.
    async fn record_warmup(
        &self,
        pool_id: &str,
        sandbox_id: &str,
        at: DateTime<Utc>,
        seconds: f64,
    ) -> StoreResult<()>;
    /// The pool's claims since `since` (and since `recent`), its last claim, and its latest `warmups` warm-up times.
    async fn demand_sample(
        &self,
        pool_id: &str,
        since: DateTime<Utc>,
        recent: DateTime<Utc>,
        warmups: u32,
    ) -> StoreResult<DemandSample>;
    /// Deletes the pool's claims before `before` and all but its latest `keep_warmups` warm-up times.
    async fn prune_demand(&self, pool_id: &str, before: DateTime<Utc>, keep_warmups: u32) -> StoreResult<()>;

    // Replicas. The defaults are the embedded store's: one replica, which owns every pool.

    /// Joins the store as `replica` (alive until this process ends) and sends what other replicas change to
    /// `events`.
    async fn join(&self, _replica: &str, _events: UnboundedSender<StoreEvent>) -> StoreResult<()> {
        Ok(())
    }
    /// Whether another replica is still running: rows it owns are its to finish.
    async fn replica_alive(&self, _replica: &str) -> StoreResult<bool> {
        Ok(false)
    }
    /// Takes the pool for this replica to reconcile; false while another replica has it.
    async fn lock_pool(&self, _pool_id: &str) -> StoreResult<bool> {
        Ok(true)
    }
    async fn unlock_pool(&self, _pool_id: &str) -> StoreResult<()> {
        Ok(())
    }
    /// Takes the cluster's one leader lock (work done once for all replicas); false while another replica has it.
    async fn lock_leader(&self) -> StoreResult<bool> {
        Ok(true)
    }
    /// How pools are spread over replicas (None: this replica is the only one).
    async fn cluster(&self) -> StoreResult<Option<Cluster>> {
        Ok(None)
    }
}

/// Opens the store a `--database` URL names: `sqlite:PATH` (`default` when unset) or `postgres://…`.
pub async fn open(
    url: Option<&str>,
    default: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match url {
        None => std::sync::Arc::new(sqlite::SqliteStore::open(default)?),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            std::sync::Arc::new(postgres::PgStore::open(url).await?)
        }
        Some(url) => {
            let path = url.strip_prefix("sqlite:").ok_or_else(|| StoreError::InvalidUrl(url.to_string()))?;
            std::sync::Arc::new(sqlite::SqliteStore::open(std::path::Path::new(
                path.trim_start_matches("//"),
            ))?)
        }
    })
}
