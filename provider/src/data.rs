//! Data sources: `warmpool_template` (a ref → template id and resolved build) and `warmpool_warm_pool` (by id or
//! name → its configuration and live status counts).

use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint::*, AttributeType, Schema};
use tf_provider::value::{Value, ValueEmpty};
use tf_provider::{AttributePath, DataSource, Diagnostics};
use warmpool_api as api;

use crate::model::*;
use crate::schema::*;
use crate::Shared;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateData {
    #[serde(rename = "ref")]
    pub reference: Str,
    pub id: Str,
    pub name: Str,
    pub build_id: Str,
    pub build_status: Str,
}

pub struct TemplateDataSource {
    pub shared: Shared,
}

#[async_trait::async_trait]
impl DataSource for TemplateDataSource {
    type State<'a> = TemplateData;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(Schema {
            version: 1,
            block: block(
                "Resolves a template ref (name, name:tag or name@bld_…) to its template and build.",
                vec![
                    ("ref", string(Required, "The template ref.")),
                    ("id", string(Computed, "Template id.")),
                    ("name", string(Computed, "Template name.")),
                    ("build_id", string(Computed, "The build the ref resolves to.")),
                    ("build_status", string(Computed, "Its status.")),
                ],
                vec![],
            ),
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: Self::State<'a>) -> Option<()> {
        if let Some(r) = known(&config.reference) {
            if let Err(e) = api::TemplateRef::parse("ref", &r) {
                diags.error("Invalid ref", e.message, AttributePath::new("ref"));
            }
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        mut config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<Self::State<'a>> {
        let c = self.shared.client(diags)?;
        let reference = known(&config.reference)?;
        let parsed = api::TemplateRef::parse("ref", &reference).ok()?;
        let t = match c.get_template(parsed.name()).await {
            Ok(t) => t,
            Err(e) => {
                diags.error("Cannot resolve template ref", e.to_string(), AttributePath::new("ref"));
                return None;
            }
        };
        let build_id = match &parsed {
            api::TemplateRef::Build { build_id, .. } => Some(build_id.clone()),
            api::TemplateRef::Tag { tag, .. } => c
                .list_tags(&t.id)
                .await
                .unwrap_or_default()
                .into_iter()
                .find(|x| &x.name == tag)
                .map(|x| x.build_id),
            api::TemplateRef::Name(_) => c
                .list_builds(&t.id)
                .await
                .unwrap_or_default()
                .into_iter()
                .rev()
                .find(|b| b.status == api::BuildStatus::Ready)
                .map(|b| b.id),
        };
        config.id = s(&t.id);
        config.name = s(&t.name);
        config.build_id = opt_s(build_id.clone());
        config.build_status = match build_id {
            Some(b) => c.get_build(&b).await.map(|b| s(b.status.as_str())).unwrap_or(Value::Null),
            None => Value::Null,
        };
        Some(config)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolData {
    pub id: Str,
    pub name: Str,
    pub template: Str,
    pub version_policy: Str,
    pub track_tag: Str,
    pub min_ready: Num,
    pub max_ready: Num,
    pub enabled: Value<bool>,
    pub state: Str,
    pub rollout_generation: Num,
    pub resolved_build_id: Str,
    pub target: Num,
    pub ready: Num,
    pub warming: Num,
    pub claimed: Num,
    pub draining: Num,
    pub failed: Num,
    pub expired: Num,
    pub unavailable: Num,
    pub degraded_reasons: StrList,
}

pub struct PoolDataSource {
    pub shared: Shared,
}

#[async_trait::async_trait]
impl DataSource for PoolDataSource {
    type State<'a> = PoolData;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        let count = |d: &str| number(Computed, d);
        Some(Schema {
            version: 1,
            block: block(
                "A warm pool's configuration and live status, by id or name.",
                vec![
                    ("id", string(OptionalComputed, "Pool id (give id or name).")),
                    ("name", string(OptionalComputed, "Pool name (give id or name).")),
                    ("template", string(Computed, "Template ref.")),
                    ("version_policy", string(Computed, "pinned_build or track_tag.")),
                    ("track_tag", string(Computed, "Followed tag.")),
                    ("min_ready", count("min_ready.")),
                    ("max_ready", count("max_ready.")),
                    ("enabled", boolean(Computed, "Whether the pool is enabled.")),
                    ("state", string(Computed, "enabled, disabled or draining.")),
                    ("rollout_generation", count("Rollout generation.")),
                    ("resolved_build_id", string(Computed, "The build the pool fills.")),
                    ("target", count("Current target.")),
                    ("ready", count("Ready sandboxes.")),
                    ("warming", count("Starting sandboxes.")),
                    ("claimed", count("Checked-out sandboxes still running.")),
                    ("draining", count("Sandboxes being removed.")),
                    ("failed", count("Failed starts since creation.")),
                    ("expired", count("Sandboxes replaced by the idle timeout.")),
                    ("unavailable", count("target - ready when positive.")),
                    (
                        "degraded_reasons",
                        attr(
                            AttributeType::List(Box::new(AttributeType::String)),
                            Computed,
                            "Why the pool is below target.",
                        ),
                    ),
                ],
                vec![],
            ),
        })
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: Self::State<'a>) -> Option<()> {
        if config.id.is_null() && config.name.is_null() {
            diags.root_error_short("warmpool_warm_pool needs id or name");
        }
        Some(())
    }

    async fn read<'a>(
        &self,
        diags: &mut Diagnostics,
        mut config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<Self::State<'a>> {
        let c = self.shared.client(diags)?;
        let key = known(&config.id).or_else(|| known(&config.name))?;
        let (p, st) = match async {
            Ok::<_, warmpool_client::Error>((c.get_pool(&key).await?, c.pool_status(&key).await?))
        }
        .await
        {
            Ok(x) => x,
            Err(e) => {
                diags.root_error(format!("Cannot read warm pool {key}"), e.to_string());
                return None;
            }
        };
        let n = |v: u32| Value::Value(v as i64);
        config.id = s(&p.id);
        config.name = s(&p.name);
        config.template = s(&p.template);
        config.version_policy = s(p.version_policy.as_str());
        config.track_tag = opt_s(p.track_tag.clone());
        config.min_ready = n(p.min_ready);
        config.max_ready = n(p.max_ready);
        config.enabled = Value::Value(p.state == api::PoolState::Enabled);
        config.state = s(p.state.as_str());
        config.rollout_generation = Value::Value(p.rollout_generation as i64);
        config.resolved_build_id = opt_s(p.resolved_build_id.clone());
        config.target = n(st.target);
        config.ready = n(st.ready);
        config.warming = n(st.warming);
        config.claimed = n(st.claimed);
        config.draining = n(st.draining);
        config.failed = n(st.failed);
        config.expired = n(st.expired);
        config.unavailable = n(st.unavailable);
        let reasons: Vec<String> = st
            .degraded_reasons
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok()?.as_str().map(String::from))
            .collect();
        config.degraded_reasons = list(&reasons);
        Some(config)
    }
}
