//! Sandboxes, checkouts from warm pools, and exec.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{BuildId, PoolId, SandboxId, TemplateId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckoutMode {
    Prefer,
    Require,
    Bypass,
}

impl CheckoutMode {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckoutMode::Prefer => "prefer",
            CheckoutMode::Require => "require",
            CheckoutMode::Bypass => "bypass",
        }
    }
}

impl std::str::FromStr for CheckoutMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "prefer" => CheckoutMode::Prefer,
            "require" => CheckoutMode::Require,
            "bypass" => CheckoutMode::Bypass,
            other => {
                return Err(format!("unknown checkout mode {other:?}: expected prefer, require or bypass"))
            }
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutAction {
    Destroy,
    Pause,
}

/// What happens to a sandbox `timeout_seconds` after it was created (or checked out).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TimeoutPolicy {
    #[schema(minimum = 1, maximum = 31536000)]
    pub timeout_seconds: u64,
    #[serde(default = "default_timeout_action")]
    pub action: TimeoutAction,
}

impl TimeoutPolicy {
    /// `timeout_seconds` is 1 to [`DURATION_SECONDS_MAX`]; `field` names the policy.
    pub fn validate(&self, field: &str) -> Result<(), crate::FieldError> {
        crate::validate_seconds(&crate::join_path(field, "timeout_seconds"), self.timeout_seconds)
    }

    /// When a sandbox created or checked out at `from` times out (`timeout_seconds` bounded as `validate` bounds it).
    pub fn expires_at(&self, from: DateTime<Utc>) -> DateTime<Utc> {
        from + chrono::Duration::seconds(self.timeout_seconds.min(crate::DURATION_SECONDS_MAX) as i64)
    }
}

fn default_timeout_action() -> TimeoutAction {
    TimeoutAction::Destroy
}

/// A named volume (a directory kept by the server per account) made visible inside the sandbox at `mount_path`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMount {
    pub name: String,
    pub mount_path: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    /// A network namespace of its own with outbound access through a bridge; the host's loopback services are out
    /// of reach (default).
    #[default]
    Isolated,
    /// A network namespace of its own with loopback only.
    None,
    /// The host's network namespace (opt-in, for trusted templates).
    Host,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxCreate {
    /// A template ref; optional when `warm_pool` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A pool id or name to check out from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool: Option<String>,
    /// How to use `warm_pool`: `prefer` (a ready sandbox, else a cold start), `require` (a ready sandbox or
    /// `503 warm_pool_unavailable`) or `bypass` (always cold). Default: the pool's `checkout_policy`, else `prefer`.
    /// Only with `warm_pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_mode: Option<CheckoutMode>,
    /// How long a checkout may wait for a warming sandbox when none is ready (default 0). Only with `warm_pool`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_wait_ms: Option<u64>,
    /// Environment for `start_cmd` and warm processes (makes the request unpoolable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envs: Option<BTreeMap<String, String>>,
    /// Named volumes to mount (makes the request unpoolable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<VolumeMount>>,
    /// Working directory of `start_cmd` and warm processes: an absolute path (a relative one is refused); makes the
    /// request unpoolable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// A graphical desktop session. No runtime of this server provides one: a cold create with `true` answers 400
    /// naming `desktop`; from a pool, `require` answers `503 warm_pool_unavailable` naming `desktop` and `prefer`
    /// falls back to that cold create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desktop: Option<bool>,
    /// Network of the sandbox (default `{"mode": "isolated"}`); any other mode makes the request unpoolable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkPolicy>,
    /// What happens `timeout_seconds` after create or checkout; an action other than `destroy` makes the request
    /// unpoolable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_policy: Option<TimeoutPolicy>,
    /// Resume a paused sandbox when it is used again. Accepted for compatibility; this server never resumes a
    /// sandbox by itself (a `pause` timeout leaves it `paused`), so `true` only makes the request unpoolable: a cold
    /// start under `prefer`, `503 warm_pool_unavailable` naming `auto_resume` under `require`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_resume: Option<bool>,
    /// Labels of the sandbox, listed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

impl SandboxCreate {
    /// The first field (in the documented order) that cannot be applied to an already-started sandbox.
    pub fn unpoolable_field(&self) -> Option<&'static str> {
        if self.envs.as_ref().is_some_and(|e| !e.is_empty()) {
            return Some("envs");
        }
        if self.volumes.as_ref().is_some_and(|v| !v.is_empty()) {
            return Some("volumes");
        }
        if self.cwd.is_some() {
            return Some("cwd");
        }
        if self.desktop == Some(true) {
            return Some("desktop");
        }
        // Spelling out the default network is poolable: pool inventory runs in it.
        if self.network.as_ref().is_some_and(|n| n.mode != NetworkMode::Isolated) {
            return Some("network");
        }
        if self.timeout_policy.as_ref().is_some_and(|t| t.action != TimeoutAction::Destroy) {
            return Some("timeout_policy");
        }
        if self.auto_resume == Some(true) {
            return Some("auto_resume");
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    Starting,
    Running,
    Paused,
    Stopped,
    Failed,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Stopped => "stopped",
            SandboxState::Failed => "failed",
        }
    }
}

impl std::str::FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "starting" => SandboxState::Starting,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "stopped" => SandboxState::Stopped,
            "failed" => SandboxState::Failed,
            other => return Err(format!("unknown sandbox state {other:?}")),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckoutSource {
    WarmPool,
    Cold,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FallbackReason {
    NoReadyInventory,
    UnpoolableShape,
    Bypass,
    PoolDisabled,
    PoolDraining,
}

impl FallbackReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::NoReadyInventory => "no_ready_inventory",
            FallbackReason::UnpoolableShape => "unpoolable_shape",
            FallbackReason::Bypass => "bypass",
            FallbackReason::PoolDisabled => "pool_disabled",
            FallbackReason::PoolDraining => "pool_draining",
        }
    }
}

/// How a create that named a pool was served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WarmPoolCheckout {
    pub source: CheckoutSource,
    pub hit: bool,
    pub id: PoolId,
    pub mode: CheckoutMode,
    pub waited_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<FallbackReason>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Sandbox {
    pub id: SandboxId,
    /// The template's name.
    pub template: String,
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub state: SandboxState,
    pub labels: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_pool_checkout: Option<WarmPoolCheckout>,
}

/// `POST /v1/sandboxes/{id}/exec`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub command: Vec<String>,
    /// Absolute inside the sandbox, or relative to the template's `cwd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Default 60000; at most 86400000 (24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 86400000)]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// The longest `timeout_ms` an exec may ask for (24 h): a command never outlives its caller by more.
pub const EXEC_TIMEOUT_MAX_MS: u64 = 24 * 60 * 60 * 1000;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ExecResult {
    /// The exit code; 128 + N when killed by signal N; -1 on timeout.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// `stdout` was cut at 8 MiB.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// `stderr` was cut at 8 MiB.
    #[serde(default)]
    pub stderr_truncated: bool,
    pub duration_ms: u64,
    #[serde(default)]
    pub timed_out: bool,
}

/// Bytes of each exec output stream returned; the rest is dropped and the stream's `_truncated` flag set.
pub const EXEC_OUTPUT_LIMIT: usize = 8 << 20;

/// Lines `GET /v1/sandboxes/{id}/logs` answers without `?tail`, and the most `?tail` may ask for.
pub const LOG_TAIL_DEFAULT: u32 = 1000;
pub const LOG_TAIL_MAX: u32 = 100_000;

/// One mirrored output line of `GET /v1/sandboxes/{id}/logs` (procd's JSON log line).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LogLine {
    pub ts: String,
    pub process: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    pub pid: u32,
    pub stream: String,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
}
