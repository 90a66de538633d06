//! The store: every piece of durable state, behind [`Store`] so the embedded SQLite store and a PostgreSQL store
//! are interchangeable. Handlers never see SQL; the domain (`app`) calls these methods.
//!
//! Rows keep the queried columns as columns and the rest of the object as JSON, so the wire types stay the single
//! definition of a resource. The warm-pool claim is one atomic statement ([`Store::claim_ready`]).

pub mod sqlite;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use warmpool_api::{
    Account, Build, Lease, Sandbox, Template, TemplateSpec, TimeoutPolicy, WarmPool, WarmPoolCheckout,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("store failure: {0}")]
    Backend(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            rusqlite::Error::SqliteFailure(f, msg) if f.code == rusqlite::ErrorCode::ConstraintViolation => {
                StoreError::Conflict(msg.clone().unwrap_or_else(|| "row".into()))
            }
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Backend(format!("corrupt JSON column: {e}"))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// An API token: only its SHA-256 is stored. Admin tokens have no account.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenRow {
    pub id: String,
    pub account_id: Option<String>,
    pub name: Option<String>,
    pub hash: String,
    pub admin: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateRow {
    pub account_id: String,
    pub template: Template,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BuildRow {
    pub account_id: String,
    pub build: Build,
    /// The template's spec when the build was made: what its sandboxes run.
    pub spec: TemplateSpec,
}

/// A pool plus its controller's bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PoolRow {
    pub account_id: String,
    pub pool: WarmPool,
    pub ctl: PoolControl,
}

/// What the reconciler records about a pool (published in its status).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PoolControl {
    /// Consecutive failed starts; at 3 the pool stops filling.
    pub prewarm_failures: u32,
    pub last_failure_logs: Option<String>,
    pub failed_total: u32,
    pub expired_total: u32,
    pub last_reconciled_at: Option<DateTime<Utc>>,
    pub last_reconcile_duration_ms: Option<u64>,
    pub last_error: Option<String>,
    /// Why filling was blocked in the last pass (quota, capacity).
    pub blocked: Vec<warmpool_api::DegradedReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRow {
    pub account_id: String,
    pub lease: Lease,
}

/// Where a sandbox stands relative to a pool.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PoolSlot {
    /// Starting for the pool.
    Warming,
    /// Ready and unclaimed.
    Ready,
    /// Being removed from the pool (rollout, drain, expiry).
    Draining,
}

impl PoolSlot {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolSlot::Warming => "warming",
            PoolSlot::Ready => "ready",
            PoolSlot::Draining => "draining",
        }
    }
}

/// How the runtime finds a sandbox's processes again (after a restart, too).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeHandle {
    /// The procd process as seen from the server's pid namespace.
    pub procd_pid: Option<u32>,
    /// The process the server spawned (procd itself, or the `unshare` wrapper around it).
    pub child_pid: Option<u32>,
    pub dir: String,
    pub socket: String,
    pub token: String,
    /// cgroup directories created for the sandbox.
    #[serde(default)]
    pub cgroups: Vec<String>,
    /// Whether procd runs its warm processes (false for a template with no start_cmd and no warm processes).
    #[serde(default)]
    pub has_warm_processes: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SandboxRow {
    pub account_id: String,
    pub sandbox: Sandbox,
    /// Inventory of this pool (None for cold sandboxes and after a checkout).
    pub pool_id: Option<String>,
    pub pool_slot: Option<PoolSlot>,
    /// The pool it was checked out from.
    pub claimed_from: Option<String>,
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
}

/// What a claim writes into the sandbox it takes.
#[derive(Debug, Clone)]
pub struct ClaimUpdate {
    pub account_id: String,
    pub labels: BTreeMap<String, String>,
    pub checkout: WarmPoolCheckout,
    pub timeout_policy: Option<TimeoutPolicy>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// Every durable operation. Methods are synchronous: the embedded store answers in microseconds; a networked
/// implementation runs them on a blocking pool.
pub trait Store: Send + Sync {
    fn describe(&self) -> String;

    fn insert_account(&self, account: &Account) -> StoreResult<()>;
    fn get_account(&self, id: &str) -> StoreResult<Option<Account>>;
    fn list_accounts(&self) -> StoreResult<Vec<Account>>;
    fn update_account(&self, account: &Account) -> StoreResult<()>;

    fn insert_token(&self, token: &TokenRow) -> StoreResult<()>;
    fn token_by_hash(&self, hash: &str) -> StoreResult<Option<TokenRow>>;
    fn has_admin_token(&self) -> StoreResult<bool>;
    fn delete_token(&self, id: &str) -> StoreResult<bool>;

    fn insert_template(&self, row: &TemplateRow) -> StoreResult<()>;
    /// By id or name, within the account.
    fn get_template(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<TemplateRow>>;
    fn list_templates(&self, account_id: &str) -> StoreResult<Vec<TemplateRow>>;
    fn update_template(&self, row: &TemplateRow) -> StoreResult<()>;
    /// Deletes the template with its builds and tags.
    fn delete_template(&self, id: &str) -> StoreResult<()>;

    fn insert_build(&self, row: &BuildRow) -> StoreResult<()>;
    fn get_build(&self, id: &str) -> StoreResult<Option<BuildRow>>;
    fn list_builds(&self, template_id: &str) -> StoreResult<Vec<BuildRow>>;
    fn list_builds_in(&self, statuses: &[&str]) -> StoreResult<Vec<BuildRow>>;
    fn update_build(&self, row: &BuildRow) -> StoreResult<()>;
    fn latest_ready_build(&self, template_id: &str) -> StoreResult<Option<BuildRow>>;

    fn put_tag(&self, template_id: &str, tag: &str, build_id: &str, at: DateTime<Utc>) -> StoreResult<()>;
    fn get_tag(&self, template_id: &str, tag: &str) -> StoreResult<Option<warmpool_api::Tag>>;
    fn list_tags(&self, template_id: &str) -> StoreResult<Vec<warmpool_api::Tag>>;
    fn delete_tag(&self, template_id: &str, tag: &str) -> StoreResult<bool>;

    fn insert_pool(&self, row: &PoolRow) -> StoreResult<()>;
    fn get_pool(&self, account_id: &str, id_or_name: &str) -> StoreResult<Option<PoolRow>>;
    fn get_pool_by_id(&self, id: &str) -> StoreResult<Option<PoolRow>>;
    /// All pools, or one account's.
    fn list_pools(&self, account_id: Option<&str>) -> StoreResult<Vec<PoolRow>>;
    fn update_pool(&self, row: &PoolRow) -> StoreResult<()>;
    fn delete_pool(&self, id: &str) -> StoreResult<()>;

    fn put_lease(&self, row: &LeaseRow) -> StoreResult<()>;
    fn delete_lease(&self, pool_id: &str, key: &str) -> StoreResult<bool>;
    fn list_leases(&self, pool_id: &str) -> StoreResult<Vec<LeaseRow>>;

    fn insert_sandbox(&self, row: &SandboxRow) -> StoreResult<()>;
    fn get_sandbox(&self, id: &str) -> StoreResult<Option<SandboxRow>>;
    /// One account's sandboxes that are not pool inventory.
    fn list_sandboxes(&self, account_id: &str) -> StoreResult<Vec<SandboxRow>>;
    /// Every sandbox the store knows (inventory too).
    fn list_all_sandboxes(&self) -> StoreResult<Vec<SandboxRow>>;
    fn list_pool_sandboxes(&self, pool_id: &str) -> StoreResult<Vec<SandboxRow>>;
    fn update_sandbox(&self, row: &SandboxRow) -> StoreResult<()>;
    fn delete_sandbox(&self, id: &str) -> StoreResult<()>;
    /// Live sandboxes on this server (all accounts, inventory too).
    fn count_live_sandboxes(&self) -> StoreResult<u64>;
    /// Counts an account's live sandboxes: `(owned, warm inventory)`.
    fn count_sandboxes(&self, account_id: &str) -> StoreResult<(u64, u64)>;
    /// Atomically takes one ready sandbox of the pool (the resolved build first, oldest first) and makes it the
    /// caller's. Two callers never get the same sandbox.
    fn claim_ready(
        &self,
        pool_id: &str,
        prefer_build: Option<&str>,
        claim: &ClaimUpdate,
    ) -> StoreResult<Option<SandboxRow>>;
}
