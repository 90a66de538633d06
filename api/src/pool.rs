//! Warm pools, their status and leases.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{validate_name, FieldError};
use crate::ids::{BuildId, PoolId, TemplateId};
use crate::refs::TemplateRef;
use crate::sandbox::CheckoutMode;
use crate::template::Resources;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VersionPolicy {
    PinnedBuild,
    TrackTag,
}

impl VersionPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionPolicy::PinnedBuild => "pinned_build",
            VersionPolicy::TrackTag => "track_tag",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PoolState {
    Enabled,
    Disabled,
    Draining,
}

impl PoolState {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolState::Enabled => "enabled",
            PoolState::Disabled => "disabled",
            PoolState::Draining => "draining",
        }
    }
}

impl std::str::FromStr for PoolState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "enabled" => PoolState::Enabled,
            "disabled" => PoolState::Disabled,
            "draining" => PoolState::Draining,
            other => return Err(format!("unknown pool state {other:?}")),
        })
    }
}

/// The most sandboxes one pool keeps (`min_ready`, `max_ready`), and the most one lease adds.
pub const POOL_SIZE_MAX: u32 = 10_000;

/// `POST /v1/template-warm-pools`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolSpec {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// A template ref: `name`, `name:tag` or `name@bld_…`.
    pub template: String,
    /// Default: `track_tag` when the ref (or `track_tag`) names a tag, else `pinned_build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_policy: Option<VersionPolicy>,
    /// The tag a `track_tag` pool follows; defaults to the ref's tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_tag: Option<String>,
    #[schema(maximum = 10000)]
    pub min_ready: u32,
    #[schema(maximum = 10000)]
    pub max_ready: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_policy: Option<CheckoutMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 31536000)]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Lets demand set the target (off by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::Autoscale>,
    /// Starts of this pool per second, at most (a token bucket; default unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0.001, maximum = 10000)]
    pub max_starts_per_second: Option<f64>,
}

impl WarmPoolSpec {
    /// Field checks that need no store: name, ref syntax, counts, policy/tag consistency.
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        let template = TemplateRef::parse("template", &self.template)?;
        for (field, value) in [("min_ready", self.min_ready), ("max_ready", self.max_ready)] {
            if value > POOL_SIZE_MAX {
                return Err(FieldError::new(field, format!("must be at most {POOL_SIZE_MAX} (got {value})")));
            }
        }
        if self.max_ready < self.min_ready {
            return Err(FieldError::new(
                "max_ready",
                format!("must be >= min_ready ({} < {})", self.max_ready, self.min_ready),
            ));
        }
        if let Some(tag) = &self.track_tag {
            validate_name("track_tag", tag)?;
        }
        if self.effective_version_policy() == VersionPolicy::TrackTag
            && self.track_tag.is_none()
            && template.tag().is_none()
        {
            return Err(FieldError::new(
                "track_tag",
                "is required for version_policy \"track_tag\" unless the template ref names a tag",
            ));
        }
        if let Some(r) = &self.resources {
            r.validate("resources")?;
        }
        if let Some(idle) = self.idle_timeout_seconds {
            crate::validate_seconds("idle_timeout_seconds", idle)?;
        }
        if let Some(a) = &self.autoscale {
            a.validate("autoscale")?;
        }
        crate::validate_max_starts_per_second(self.max_starts_per_second)?;
        Ok(())
    }

    pub fn effective_version_policy(&self) -> VersionPolicy {
        self.version_policy.unwrap_or_else(|| {
            let tagged =
                TemplateRef::parse("template", &self.template).ok().and_then(|r| r.tag().map(str::to_owned));
            if self.track_tag.is_some() || tagged.is_some() {
                VersionPolicy::TrackTag
            } else {
                VersionPolicy::PinnedBuild
            }
        })
    }

    /// The tag a `track_tag` pool follows.
    pub fn effective_track_tag(&self) -> Option<String> {
        if self.effective_version_policy() != VersionPolicy::TrackTag {
            return None;
        }
        self.track_tag.clone().or_else(|| {
            TemplateRef::parse("template", &self.template).ok().and_then(|r| r.tag().map(str::to_owned))
        })
    }
}

/// `PATCH /v1/template-warm-pools/{id}`: present fields replace the pool's values.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPoolPatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_policy: Option<VersionPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_tag: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 10000)]
    pub min_ready: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 10000)]
    pub max_ready: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkout_policy: Option<CheckoutMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 31536000)]
    pub idle_timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Replaces the pool's `autoscale` block (`{"enabled": false}` turns it off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<crate::Autoscale>,
    /// A rate replaces the pool's; `null` makes it unlimited again.
    #[serde(default, deserialize_with = "crate::nullable", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>, nullable, minimum = 0.001, maximum = 10000)]
    pub max_starts_per_second: Option<Option<f64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct WarmPool {
    pub id: PoolId,
    pub name: String,
    pub template: String,
    pub template_id: TemplateId,
    pub version_policy: VersionPolicy,
    pub track_tag: Option<String>,
    pub min_ready: u32,
    pub max_ready: u32,
    pub resources: Resources,
    pub checkout_policy: Option<CheckoutMode>,
    pub idle_timeout_seconds: Option<u64>,
    pub labels: BTreeMap<String, String>,
    pub state: PoolState,
    pub rollout_generation: u64,
    pub resolved_build_id: Option<BuildId>,
    pub previous_build_id: Option<BuildId>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub autoscale: crate::Autoscale,
    #[serde(default)]
    pub max_starts_per_second: Option<f64>,
}

impl WarmPool {
    /// The spec that recreates this pool (used by PATCH to validate the result as a whole).
    pub fn spec(&self) -> WarmPoolSpec {
        WarmPoolSpec {
            name: self.name.clone(),
            template: self.template.clone(),
            version_policy: Some(self.version_policy),
            track_tag: self.track_tag.clone(),
            min_ready: self.min_ready,
            max_ready: self.max_ready,
            resources: Some(self.resources.clone()),
            checkout_policy: self.checkout_policy,
            idle_timeout_seconds: self.idle_timeout_seconds,
            labels: self.labels.clone(),
            enabled: Some(self.state != PoolState::Disabled),
            autoscale: Some(self.autoscale.clone()),
            max_starts_per_second: self.max_starts_per_second,
        }
    }
}

/// Why a pool cannot hold its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DegradedReason {
    NoEligibleHosts,
    ArtifactNotReady,
    ArtifactPrewarmFailed,
    QuotaExceeded,
    TemplateBuildUnavailable,
    ControllerDisabled,
    DrainActive,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PoolStatus {
    /// `enabled` fills; `disabled` keeps its ready inventory and stops filling; `draining` removes its inventory.
    pub state: PoolState,
    /// Ready sandboxes the pool aims at: `min(max_ready, min_ready + active lease counts)`, 0 unless enabled.
    pub target: u32,
    /// Started sandboxes whose readiness passes, waiting for a checkout.
    pub ready: u32,
    /// Sandboxes starting (not ready yet).
    pub warming: u32,
    /// Sandboxes checked out of this pool that still run.
    pub claimed: u32,
    /// Inventory being stopped (drained, rolled out, expired).
    pub draining: u32,
    /// Starts that failed and ready sandboxes that failed, since the pool was created.
    pub failed: u32,
    /// Ready sandboxes replaced because they outlived `idle_timeout_seconds`, since the pool was created.
    pub expired: u32,
    /// Ready sandboxes missing to reach the target now: `target - ready`, never below 0.
    pub unavailable: u32,
    /// Why the pool is not filling as asked (empty when it is).
    pub degraded_reasons: Vec<DegradedReason>,
    /// Incremented by every rollout to a new build.
    pub rollout_generation: u64,
    /// The build the pool fills now.
    pub resolved_build_id: Option<BuildId>,
    /// The build of the rollout before, whose inventory is drained.
    pub previous_build_id: Option<BuildId>,
    /// When the reconciler last handled this pool.
    pub last_reconciled_at: Option<DateTime<Utc>>,
    /// How long that pass took.
    pub last_reconcile_duration_ms: Option<u64>,
    /// The error of the last reconcile pass or failed start; the next pass that succeeds clears it.
    pub last_error: Option<String>,
    /// Output of the last sandbox that failed to start, kept while `artifact_prewarm_failed` holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_logs: Option<String>,
    /// Claims per minute, hit ratio, warm-up p90 and the ready count they call for (always computed).
    #[serde(default)]
    pub demand: crate::PoolDemand,
}

/// `PUT /v1/template-warm-pools/{id}/leases/{key}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseSpec {
    #[schema(maximum = 10000)]
    pub count: u32,
    #[schema(minimum = 1, maximum = 604800)]
    pub ttl_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Lease {
    pub key: String,
    pub pool_id: PoolId,
    pub count: u32,
    pub ttl_seconds: u64,
    pub expires_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The result of `DELETE …/leases/{key}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct LeaseRelease {
    pub released: bool,
    /// Leases still active on the pool.
    pub remaining_leases: u32,
    /// Whether the pool was drained because this was its last lease.
    pub drained: bool,
}

impl DegradedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DegradedReason::NoEligibleHosts => "no_eligible_hosts",
            DegradedReason::ArtifactNotReady => "artifact_not_ready",
            DegradedReason::ArtifactPrewarmFailed => "artifact_prewarm_failed",
            DegradedReason::QuotaExceeded => "quota_exceeded",
            DegradedReason::TemplateBuildUnavailable => "template_build_unavailable",
            DegradedReason::ControllerDisabled => "controller_disabled",
            DegradedReason::DrainActive => "drain_active",
        }
    }

    /// Whether waiting alone can clear it. `artifact_prewarm_failed` needs a `reconcile` or a spec change,
    /// `template_build_unavailable` a new build, `controller_disabled` a server with its reconciler on, and
    /// `drain_active` an `enable`; the others clear as builds finish, capacity frees up or quotas allow.
    pub fn clears_by_waiting(self) -> bool {
        !matches!(
            self,
            DegradedReason::ArtifactPrewarmFailed
                | DegradedReason::TemplateBuildUnavailable
                | DegradedReason::ControllerDisabled
                | DegradedReason::DrainActive
        )
    }
}

impl PoolStatus {
    /// The first reason this pool cannot fill by waiting (`disabled`, or a degraded reason), with what it last
    /// reported or what would clear it: a wait should stop at once and say so.
    pub fn stuck(&self) -> Option<(&'static str, String)> {
        if self.state == PoolState::Disabled {
            return Some(("disabled", "a disabled pool does not fill until it is enabled again".into()));
        }
        let reason = self.degraded_reasons.iter().copied().find(|r| !r.clears_by_waiting())?;
        let detail = self.last_failure_logs.clone().or_else(|| self.last_error.clone()).unwrap_or_default();
        Some((reason.as_str(), detail))
    }
}
