//! `warmpool_warm_pool`: a warm pool of a template ref. `enabled = false` disables it; destroy drains, then deletes;
//! `wait_for_ready` makes apply wait until `ready >= min_ready`.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint::*, NestedBlock, Schema};
use tf_provider::value::{serde_as_vec, Value, ValueEmpty};
use tf_provider::{AttributePath, Diagnostics, Resource};
use warmpool_api as api;

use crate::model::*;
use crate::schema::*;
use crate::template::timeouts_block;
use crate::{OrDiag, Shared};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolState {
    pub id: Str,
    pub name: Str,
    pub template: Str,
    pub version_policy: Str,
    pub track_tag: Str,
    pub min_ready: Num,
    pub max_ready: Num,
    pub cpu: Value<f64>,
    pub memory_mb: Num,
    pub checkout_policy: Str,
    pub idle_timeout_seconds: Num,
    pub labels: StrMap,
    pub enabled: Value<bool>,
    pub wait_for_ready: Value<bool>,
    #[serde(with = "serde_as_vec")]
    pub timeouts: Value<TimeoutsBlock>,
    pub rollout_generation: Num,
    pub resolved_build_id: Str,
    #[serde(with = "serde_as_vec")]
    pub autoscale: Value<AutoscaleBlock>,
    pub max_starts_per_second: Value<f64>,
    pub recommended_ready: Num,
}

const READY_TIMEOUT: Duration = Duration::from_secs(10 * 60);

fn enum_error(field: &str, value: &str, allowed: &str) -> (String, String) {
    (field.to_string(), format!("must be one of {allowed} (got {value:?})"))
}

impl PoolState {
    fn version_policy(&self) -> Result<Option<api::VersionPolicy>, (String, String)> {
        match known(&self.version_policy).as_deref() {
            None => Ok(None),
            Some("pinned_build") => Ok(Some(api::VersionPolicy::PinnedBuild)),
            Some("track_tag") => Ok(Some(api::VersionPolicy::TrackTag)),
            Some(other) => Err(enum_error("version_policy", other, "pinned_build, track_tag")),
        }
    }

    fn checkout_policy(&self) -> Result<Option<api::CheckoutMode>, (String, String)> {
        match known(&self.checkout_policy) {
            None => Ok(None),
            Some(v) => {
                v.parse().map(Some).map_err(|_| enum_error("checkout_policy", &v, "prefer, require, bypass"))
            }
        }
    }

    fn resources(&self) -> Option<api::Resources> {
        let r = api::Resources {
            cpu: self.cpu.as_ref_option().copied(),
            memory_mb: num(&self.memory_mb),
            disk_mb: None,
        };
        (r.cpu.is_some() || r.memory_mb.is_some()).then_some(r)
    }

    /// The API spec; unknown values (from other resources) are replaced by valid placeholders for validation.
    pub fn spec(&self) -> Result<api::WarmPoolSpec, (String, String)> {
        let count = |v: &Num| {
            if v.is_unknown() {
                None
            } else {
                num(v).map(saturating_u32)
            }
        };
        let (min, max) = (count(&self.min_ready), count(&self.max_ready));
        Ok(api::WarmPoolSpec {
            name: if self.name.is_unknown() {
                "unknown".into()
            } else {
                known(&self.name).unwrap_or_default()
            },
            template: if self.template.is_unknown() {
                "unknown:tag".into()
            } else {
                known(&self.template).unwrap_or_default()
            },
            version_policy: self.version_policy()?,
            track_tag: known(&self.track_tag),
            min_ready: min.unwrap_or(0),
            max_ready: max.unwrap_or(u32::MAX),
            resources: self.resources(),
            checkout_policy: self.checkout_policy()?,
            idle_timeout_seconds: num(&self.idle_timeout_seconds),
            labels: map(&self.labels),
            enabled: self.enabled.as_ref_option().copied(),
            autoscale: self.autoscale.as_ref_option().map(AutoscaleBlock::to_api),
            max_starts_per_second: self.max_starts_per_second.as_ref_option().copied(),
        })
    }

    fn set_from(&mut self, p: &api::WarmPool) {
        self.id = s(&p.id);
        self.name = s(&p.name);
        self.template = s(&p.template);
        self.version_policy = s(p.version_policy.as_str());
        self.track_tag = opt_s(p.track_tag.clone());
        self.min_ready = Value::Value(p.min_ready as i64);
        self.max_ready = Value::Value(p.max_ready as i64);
        self.cpu = p.resources.cpu.map(Value::Value).unwrap_or(Value::Null);
        self.memory_mb = opt_n(p.resources.memory_mb.map(|n| n as i64));
        self.checkout_policy = opt_s(p.checkout_policy.map(|m| m.as_str()));
        self.idle_timeout_seconds = opt_n(p.idle_timeout_seconds.map(|n| n as i64));
        self.labels = map_value(&p.labels);
        self.enabled = Value::Value(p.state == api::PoolState::Enabled);
        self.rollout_generation = Value::Value(p.rollout_generation as i64);
        self.resolved_build_id = opt_s(p.resolved_build_id.clone());
        self.autoscale = AutoscaleBlock::from_api(&p.autoscale);
        self.max_starts_per_second = p.max_starts_per_second.map(Value::Value).unwrap_or(Value::Null);
        // Not a server attribute: Read keeps what the configuration last said; only a state without it gets the
        // default.
        if self.wait_for_ready.is_null() {
            self.wait_for_ready = Value::Value(WAIT_FOR_READY_DEFAULT);
        }
    }
}

/// `wait_for_ready` when the configuration leaves it out, and the value an import records (the server does not
/// know it): the apply returns when the pool is filled, as the quickstart promises.
const WAIT_FOR_READY_DEFAULT: bool = true;

pub fn pool_schema() -> Schema {
    Schema {
        version: 1,
        block: block(
            "A warm pool: keeps ready sandboxes of a template ref.",
            vec![
                ("id", string(Computed, "Pool id (twp_…).")),
                ("name", string(Required, "Unique name.")),
                ("template", string(Required, "Template ref: name, name:tag or name@bld_….")),
                (
                    "version_policy",
                    string(
                        OptionalComputed,
                        "pinned_build or track_tag (default: track_tag for a tagged ref).",
                    ),
                ),
                (
                    "track_tag",
                    string(OptionalComputed, "The tag a track_tag pool follows (default: the ref's tag)."),
                ),
                ("min_ready", number(Required, "Ready sandboxes kept at all times.")),
                ("max_ready", number(Required, "Upper bound of the target (leases raise it up to this).")),
                ("cpu", number(Optional, "CPUs per sandbox (overrides the template).")),
                ("memory_mb", number(Optional, "Memory per sandbox in MiB (overrides the template).")),
                ("checkout_policy", string(Optional, "Default checkout mode: prefer, require or bypass.")),
                ("idle_timeout_seconds", number(Optional, "Replace ready sandboxes older than this.")),
                ("labels", string_map(Optional, "Labels of the pool's sandboxes.")),
                (
                    "enabled",
                    boolean(
                        OptionalComputed,
                        "false disables the pool (it keeps its inventory, stops filling).",
                    ),
                ),
                (
                    "wait_for_ready",
                    boolean(OptionalComputed, "Wait during apply until ready >= min_ready (default true)."),
                ),
                (
                    "rollout_generation",
                    number(
                        Computed,
                        "Incremented by every rollout; unknown in a plan that updates the pool.",
                    ),
                ),
                (
                    "resolved_build_id",
                    string(Computed, "The build the pool fills; unknown in a plan that updates the pool."),
                ),
                (
                    "max_starts_per_second",
                    number(Optional, "Starts of this pool per second, at most (default unlimited)."),
                ),
                (
                    "recommended_ready",
                    number(
                        Computed,
                        "ceil(claims/s × warm-up p90 × headroom) when last read: the ready count demand calls for.",
                    ),
                ),
            ],
            vec![("timeouts", timeouts_block()), ("autoscale", autoscale_block())],
        ),
    }
}

fn autoscale_block() -> NestedBlock {
    NestedBlock::Optional(block(
        "Lets demand set the target: min(max_ready, max(min_ready + leases, recommended_ready)).",
        vec![
            ("enabled", boolean(Required, "Whether demand sets the target.")),
            ("headroom", number(Optional, "Multiplies Little's law (default 1.2, 1 to 10).")),
            ("window_seconds", number(Optional, "The window claims are counted over (default 600).")),
            (
                "scale_to_zero_after_seconds",
                number(Optional, "With no claim for this long, recommended_ready falls to 0."),
            ),
        ],
        vec![],
    ))
}

/// Whether the plan updates the pool: any attribute Terraform sets differs from the prior state.
fn updating(prior: &PoolState, proposed: &PoolState) -> bool {
    let settable = |s: &PoolState| PoolState {
        rollout_generation: Value::Null,
        resolved_build_id: Value::Null,
        recommended_ready: Value::Null,
        ..s.clone()
    };
    settable(prior) != settable(proposed)
}

pub struct PoolResource {
    pub shared: Shared,
}

async fn wait_ready(
    diags: &mut Diagnostics,
    c: &warmpool_client::Client,
    state: &PoolState,
    timeout: Duration,
) -> Option<()> {
    if state.wait_for_ready.as_ref_option() != Some(&true) || state.enabled.as_ref_option() == Some(&false) {
        return Some(());
    }
    let id = known(&state.id)?;
    let want = num(&state.min_ready).map_or(0, saturating_u32);
    if let Err(e) = c.wait_pool_ready(&id, want, timeout, |_| {}).await {
        let status = c.pool_status(&id).await.ok();
        let detail = status
            .map(|s| {
                format!(
                    "ready {} of {want}, warming {}, failed {}, degraded {:?}",
                    s.ready, s.warming, s.failed, s.degraded_reasons
                )
            })
            .unwrap_or_default();
        diags.error(
            format!("Warm pool {id} did not become ready"),
            format!("{e}. {detail}"),
            AttributePath::new("wait_for_ready"),
        );
        return None;
    }
    Some(())
}

/// The pool's `recommended_ready` now (null when its status cannot be read).
async fn recommended_ready(c: &warmpool_client::Client, id: &str) -> Num {
    match c.pool_status(id).await {
        Ok(status) => Value::Value(status.demand.recommended_ready as i64),
        Err(_) => Value::Null,
    }
}

#[async_trait::async_trait]
impl Resource for PoolResource {
    type State<'a> = PoolState;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(pool_schema())
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: Self::State<'a>) -> Option<()> {
        let result = config.spec().and_then(|spec| spec.validate().map_err(|e| (e.field, e.message)));
        match result {
            // An unknown template ref cannot be checked yet.
            Err((field, _)) if field == "template" && config.template.is_unknown() => {}
            Err(e) => field_error(diags, e),
            Ok(_) => {}
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        mut state: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let Some(id) = known(&state.id) else {
            return Some((state, private));
        };
        match c.get_pool(&id).await {
            Ok(p) => {
                state.set_from(&p);
                state.recommended_ready = recommended_ready(&c, &p.id).await;
                Some((state, private))
            }
            Err(e) if e.code() == Some("not_found") => None,
            Err(e) => {
                diags.root_error("Cannot read warm pool", e.to_string());
                None
            }
        }
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        mut proposed: Self::State<'a>,
        _config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        proposed.id = Value::Unknown;
        proposed.rollout_generation = Value::Unknown;
        proposed.resolved_build_id = Value::Unknown;
        proposed.recommended_ready = Value::Unknown;
        for v in [&mut proposed.version_policy, &mut proposed.track_tag] {
            if v.is_null() {
                *v = Value::Unknown;
            }
        }
        if proposed.enabled.is_null() {
            proposed.enabled = Value::Value(true);
        }
        if proposed.wait_for_ready.is_null() {
            proposed.wait_for_ready = Value::Value(WAIT_FOR_READY_DEFAULT);
        }
        Some((proposed, Value::Null))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        prior: Self::State<'a>,
        mut proposed: Self::State<'a>,
        config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>, Vec<AttributePath>)> {
        let rolls = proposed.template != prior.template
            || config.version_policy.is_value() && proposed.version_policy != prior.version_policy
            || config.track_tag.is_value() && proposed.track_tag != prior.track_tag
            || proposed.cpu != prior.cpu
            || proposed.memory_mb != prior.memory_mb;
        if proposed.template != prior.template {
            // The server derives these from the new ref unless they are configured.
            if config.version_policy.is_null() {
                proposed.version_policy = Value::Unknown;
            }
            if config.track_tag.is_null() {
                proposed.track_tag = Value::Unknown;
            }
        }
        if config.enabled.is_null() {
            proposed.enabled = Value::Value(true);
        }
        if rolls || updating(&prior, &proposed) {
            // The apply can move them: a rollout this update starts, or one started since the refresh by a
            // change elsewhere in the same apply (a template rebuilt earlier moving the tag this pool tracks) or
            // outside Terraform. Planning the prior values would make Terraform reject the result.
            proposed.rollout_generation = Value::Unknown;
            proposed.resolved_build_id = Value::Unknown;
            proposed.recommended_ready = Value::Unknown;
        } else {
            proposed.rollout_generation = prior.rollout_generation;
            proposed.resolved_build_id = prior.resolved_build_id.clone();
            proposed.recommended_ready = prior.recommended_ready;
        }
        Some((proposed, private, Vec::new()))
    }

    async fn plan_destroy<'a>(
        &self,
        _diags: &mut Diagnostics,
        _prior: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<Self::PrivateState<'a>> {
        Some(private)
    }

    async fn create<'a>(
        &self,
        diags: &mut Diagnostics,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let spec = planned.spec().map_err(|e| field_error(diags, e)).ok()?;
        let pool = match c.create_pool(&spec).await {
            Ok(p) => p,
            Err(e) => {
                let field = match &e {
                    warmpool_client::Error::Api { details, .. } => {
                        details["field"].as_str().map(attribute_path)
                    }
                    _ => None,
                };
                match field {
                    Some(path) => diags.error("Cannot create warm pool", e.to_string(), path),
                    None => diags.root_error("Cannot create warm pool", e.to_string()),
                }
                return None;
            }
        };
        let mut state = planned;
        state.set_from(&pool);
        let timeout = TimeoutsBlock::get(&state.timeouts, |t| &t.create, READY_TIMEOUT);
        wait_ready(diags, &c, &state, timeout).await;
        let fresh = c.get_pool(&pool.id).await.unwrap_or(pool);
        state.set_from(&fresh);
        state.recommended_ready = recommended_ready(&c, &fresh.id).await;
        Some((state, private))
    }

    async fn update<'a>(
        &self,
        diags: &mut Diagnostics,
        prior: Self::State<'a>,
        planned: Self::State<'a>,
        _config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let id = known(&prior.id)?;
        let spec = planned.spec().map_err(|e| field_error(diags, e)).ok()?;
        let patch = api::WarmPoolPatch {
            name: Some(spec.name),
            template: Some(spec.template),
            version_policy: spec.version_policy,
            track_tag: spec.track_tag,
            min_ready: Some(spec.min_ready),
            max_ready: Some(spec.max_ready),
            resources: Some(spec.resources.unwrap_or_default()),
            checkout_policy: spec.checkout_policy,
            idle_timeout_seconds: spec.idle_timeout_seconds,
            labels: Some(spec.labels),
            enabled: spec.enabled,
            autoscale: Some(spec.autoscale.unwrap_or_default()),
            max_starts_per_second: Some(spec.max_starts_per_second),
        };
        let pool = c.update_pool(&id, &patch).await.or_diag(diags, "Cannot update warm pool")?;
        let mut state = planned;
        state.set_from(&pool);
        let timeout = TimeoutsBlock::get(&state.timeouts, |t| &t.update, READY_TIMEOUT);
        wait_ready(diags, &c, &state, timeout).await;
        state.recommended_ready = recommended_ready(&c, &id).await;
        Some((state, private))
    }

    async fn destroy<'a>(
        &self,
        diags: &mut Diagnostics,
        state: Self::State<'a>,
        _private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<()> {
        let c = self.shared.client(diags)?;
        // The server drains before it deletes.
        crate::gone_is_ok(c.delete_pool(&known(&state.id)?).await).or_diag(diags, "Cannot delete warm pool")
    }

    async fn import<'a>(
        &self,
        diags: &mut Diagnostics,
        id: String,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        match c.get_pool(&id).await {
            Ok(p) => {
                let mut state = PoolState::default();
                // `set_from` gives `wait_for_ready` its default: the imported value.
                state.set_from(&p);
                state.recommended_ready = recommended_ready(&c, &p.id).await;
                Some((state, Value::Null))
            }
            Err(e) => {
                diags.root_error(format!("Cannot import warm pool {id}"), e.to_string());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> PoolState {
        PoolState {
            id: s("twp_1"),
            name: s("api"),
            template: s("api:stable"),
            min_ready: Value::Value(1),
            max_ready: Value::Value(2),
            enabled: Value::Value(true),
            wait_for_ready: Value::Value(true),
            rollout_generation: Value::Value(3),
            resolved_build_id: s("bld_1"),
            ..Default::default()
        }
    }

    /// Only a plan that changes something Terraform sets counts as an update (and so marks the rollout fields
    /// unknown); a refresh that saw a rollout does not.
    #[test]
    fn updating_compares_the_settable_attributes_only() {
        let prior = state();
        let refreshed =
            PoolState { rollout_generation: Value::Value(4), resolved_build_id: s("bld_2"), ..state() };
        assert!(!updating(&prior, &refreshed));
        assert!(updating(&prior, &PoolState { min_ready: Value::Value(2), ..state() }));
        assert!(updating(&prior, &PoolState { enabled: Value::Value(false), ..state() }));
        assert!(updating(&prior, &PoolState { template: Value::Unknown, ..state() }));
    }
}
