//! `warmpool_template`: the template spec as attributes and blocks. Create and every spec change run a build, wait
//! for it and move `tags` to it; a failed build is an apply error with the build's message and log tail.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tf_provider::schema::{AttributeConstraint::*, NestedBlock, Schema};
use tf_provider::value::{serde_as_vec, Value, ValueEmpty};
use tf_provider::{AttributePath, Diagnostics, Resource};
use warmpool_api as api;

use crate::model::*;
use crate::schema::*;
use crate::{OrDiag, Shared};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TemplateState {
    pub id: Str,
    pub name: Str,
    pub image: Str,
    pub build_steps: StrList,
    pub build_env: StrMap,
    pub start_cmd: Str,
    pub cwd: Str,
    pub env: StrMap,
    pub tags: StrList,
    #[serde(with = "serde_as_vec")]
    pub readiness: Value<ProbeBlock>,
    pub warm_process: Value<Vec<WarmProcessBlock>>,
    #[serde(with = "serde_as_vec")]
    pub resources: Value<ResourcesBlock>,
    #[serde(with = "serde_as_vec")]
    pub timeouts: Value<TimeoutsBlock>,
    pub build_id: Str,
    pub build_status: Str,
}

const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

impl TemplateState {
    /// The spec this state describes; errors carry API field paths.
    pub fn spec(&self) -> Result<api::TemplateSpec, (String, String)> {
        let warm_processes = match self.warm_process.as_ref_option() {
            Some(list) => list.iter().enumerate().map(|(i, p)| p.to_api(i)).collect::<Result<Vec<_>, _>>()?,
            None => Vec::new(),
        };
        let resources = self
            .resources
            .as_ref_option()
            .map(|r| api::Resources {
                cpu: r.cpu.as_ref_option().copied(),
                memory_mb: num(&r.memory_mb),
                disk_mb: num(&r.disk_mb),
            })
            .unwrap_or_default();
        Ok(api::TemplateSpec {
            name: if self.name.is_unknown() {
                "unknown".into()
            } else {
                known(&self.name).unwrap_or_default()
            },
            image: known(&self.image),
            build: api::BuildRecipe { steps: strs(&self.build_steps), env: map(&self.build_env) },
            start_cmd: if self.start_cmd.is_unknown() {
                Some("(unknown)".into())
            } else {
                known(&self.start_cmd)
            },
            readiness: self.readiness.as_ref_option().map(ProbeBlock::to_api),
            warm_processes,
            env: map(&self.env),
            resources,
            cwd: known(&self.cwd),
        })
    }

    /// Copies the server's view of the spec into this state (for refresh and import).
    fn set_spec(&mut self, t: &api::Template) {
        self.id = s(&t.id);
        self.name = s(&t.name);
        self.image = opt_s(t.image.clone());
        self.build_steps = list_or_null(&t.build.steps);
        self.build_env = map_value(&t.build.env);
        self.start_cmd = opt_s(t.start_cmd.clone());
        self.cwd = opt_s(t.cwd.clone());
        self.env = map_value(&t.env);
        self.readiness =
            t.readiness.as_ref().map(|r| Value::Value(ProbeBlock::from_api(r))).unwrap_or(Value::Null);
        self.warm_process = Value::Value(t.warm_processes.iter().map(WarmProcessBlock::from_api).collect());
        let r = &t.resources;
        self.resources = if r.cpu.is_none() && r.memory_mb.is_none() && r.disk_mb.is_none() {
            Value::Null
        } else {
            Value::Value(ResourcesBlock {
                cpu: r.cpu.map(Value::Value).unwrap_or(Value::Null),
                memory_mb: opt_n(r.memory_mb.map(|n| n as i64)),
                disk_mb: opt_n(r.disk_mb.map(|n| n as i64)),
            })
        };
    }

    /// The spec part only (what a change of triggers a build).
    fn spec_only(&self) -> TemplateState {
        TemplateState {
            id: Value::Null,
            tags: Value::Null,
            timeouts: Value::Null,
            build_id: Value::Null,
            build_status: Value::Null,
            warm_process: match &self.warm_process {
                Value::Value(v) if v.is_empty() => Value::Null,
                other => other.clone(),
            },
            ..self.clone()
        }
    }
}

fn probe_block(description: &str) -> NestedBlock {
    let exec =
        block("Passes when the command exits 0.", vec![("command", string_list(Required, "argv"))], vec![]);
    let http = block(
        "Passes on HTTP 200-399.",
        vec![
            ("port", number(Required, "Port.")),
            ("path", string(Optional, "Path (default /).")),
            ("host", string(Optional, "Host (default 127.0.0.1).")),
            ("scheme", string(Optional, "http or https.")),
        ],
        vec![],
    );
    let tcp = block(
        "Passes when a TCP connection opens.",
        vec![("port", number(Required, "Port.")), ("host", string(Optional, "Host (default 127.0.0.1)."))],
        vec![],
    );
    let process = block("Passes while the process runs.", vec![], vec![]);
    NestedBlock::Optional(block(
        description,
        vec![
            ("initial_delay_ms", number(Optional, "Delay before the first check.")),
            ("period_ms", number(Optional, "Time between checks.")),
            (
                "timeout_ms",
                number(Optional, "In `readiness`: the bound of the whole start. In probes: per check."),
            ),
            ("failure_threshold", number(Optional, "Failures in a row that fail the probe.")),
            ("success_threshold", number(Optional, "Successes in a row that pass it.")),
        ],
        vec![
            ("exec", NestedBlock::Optional(exec)),
            ("http_get", NestedBlock::Optional(http)),
            ("tcp_socket", NestedBlock::Optional(tcp)),
            ("process", NestedBlock::Optional(process)),
        ],
    ))
}

pub fn timeouts_block() -> NestedBlock {
    NestedBlock::Optional(block(
        "Operation timeouts (durations such as 10m).",
        vec![("create", string(Optional, "Default 20m.")), ("update", string(Optional, "Default 20m."))],
        vec![],
    ))
}

pub fn template_schema() -> Schema {
    let warm_process = block(
        "A process procd starts with every sandbox and keeps running.",
        vec![
            ("name", string(Optional, "Unique name.")),
            ("type", string(Optional, "cmd (default) or repl.")),
            ("alias", string(Optional, "Alias shown in logs.")),
            ("command", string_list(Optional, "argv (cmd only).")),
            ("language", string(Optional, "python, node or bash (repl only).")),
            ("cwd", string(Optional, "Absolute working directory inside the sandbox.")),
            ("env", string_map(Optional, "Environment.")),
        ],
        vec![
            ("startup_probe", probe_block("Startup probe.")),
            ("readiness_probe", probe_block("Readiness probe.")),
            ("liveness_probe", probe_block("Liveness probe.")),
        ],
    );
    let resources = block(
        "Resource limits.",
        vec![
            ("cpu", number(Optional, "CPUs (fractions allowed).")),
            ("memory_mb", number(Optional, "Memory limit in MiB.")),
            ("disk_mb", number(Optional, "Disk in MiB.")),
        ],
        vec![],
    );
    Schema {
        version: 1,
        block: block(
            "A Warmpool template: how a sandbox is made. Create and every change run a build and move `tags` to it.",
            vec![
                ("id", string(Computed, "Template id (tpl_…).")),
                ("name", string(Required, "Unique name; changing it replaces the template.")),
                ("image", string(Optional, "OCI image (kubernetes runtime).")),
                ("build_steps", string_list(Optional, "Shell commands run once at build time.")),
                ("build_env", string_map(Optional, "Environment of the build steps only.")),
                ("start_cmd", string(Optional, "Run with /bin/sh -c; with readiness, the startup contract.")),
                ("cwd", string(Optional, "Absolute working directory inside the sandbox.")),
                ("env", string_map(Optional, "Runtime environment.")),
                ("tags", string_list(Optional, "Tags moved to each new build when it is ready.")),
                ("build_id", string(Computed, "The build made by the last create or change.")),
                ("build_status", string(Computed, "Its status.")),
            ],
            vec![
                ("readiness", probe_block("Must pass before a sandbox counts as started.")),
                ("warm_process", NestedBlock::List(warm_process)),
                ("resources", NestedBlock::Optional(resources)),
                ("timeouts", timeouts_block()),
            ],
        ),
    }
}

pub struct TemplateResource {
    pub shared: Shared,
}

impl TemplateResource {
    /// Runs a build with the state's tags and waits for it; a failure is reported with the log tail.
    async fn build(
        &self,
        diags: &mut Diagnostics,
        c: &warmpool_client::Client,
        state: &mut TemplateState,
        timeout: Duration,
    ) -> Option<()> {
        let id = known(&state.id)?;
        let build = c.create_build(&id, &strs(&state.tags)).await.or_diag(diags, "Cannot start a build")?;
        let done = match c.wait_build(&build.id, timeout, |_| {}).await {
            Ok(b) => b,
            Err(e) => {
                diags.root_error("Build did not finish", e.to_string());
                return None;
            }
        };
        state.build_id = s(&done.id);
        state.build_status = s(done.status.as_str());
        if done.status == api::BuildStatus::Failed {
            let log = c.build_logs(&done.id).await.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect();
            diags.root_error(
                format!("Build {} of template {} failed", done.id, known(&state.name).unwrap_or_default()),
                format!(
                    "{}\n\nLast lines of the build log:\n{}",
                    done.error.unwrap_or_default(),
                    tail.join("\n")
                ),
            );
            return None;
        }
        Some(())
    }
}

#[async_trait::async_trait]
impl Resource for TemplateResource {
    type State<'a> = TemplateState;
    type PrivateState<'a> = ValueEmpty;
    type ProviderMetaState<'a> = ValueEmpty;

    fn schema(&self, _diags: &mut Diagnostics) -> Option<Schema> {
        Some(template_schema())
    }

    async fn validate<'a>(&self, diags: &mut Diagnostics, config: Self::State<'a>) -> Option<()> {
        let result = config.spec().and_then(|spec| spec.validate().map_err(|e| (e.field, e.message)));
        if let Err(e) = result {
            field_error(diags, e);
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
        let t = match c.get_template(&id).await {
            Ok(t) => t,
            Err(e) if e.code() == Some("not_found") => return None,
            Err(e) => {
                diags.root_error("Cannot read template", e.to_string());
                return None;
            }
        };
        let configured_no_processes =
            matches!(&state.warm_process, Value::Value(v) if v.is_empty()) || state.warm_process.is_null();
        state.set_spec(&t);
        if configured_no_processes && t.warm_processes.is_empty() {
            state.warm_process = Value::Value(Vec::new());
        }
        if let Some(b) = known(&state.build_id) {
            match c.get_build(&b).await {
                Ok(b) => state.build_status = s(b.status.as_str()),
                Err(e) if e.code() == Some("not_found") => state.build_status = s("deleted"),
                Err(_) => {}
            }
        }
        Some((state, private))
    }

    async fn plan_create<'a>(
        &self,
        _diags: &mut Diagnostics,
        mut proposed: Self::State<'a>,
        _config: Self::State<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        proposed.id = Value::Unknown;
        proposed.build_id = Value::Unknown;
        proposed.build_status = Value::Unknown;
        Some((proposed, Value::Null))
    }

    async fn plan_update<'a>(
        &self,
        _diags: &mut Diagnostics,
        prior: Self::State<'a>,
        mut proposed: Self::State<'a>,
        _config: Self::State<'a>,
        private: Self::PrivateState<'a>,
        _meta: Self::ProviderMetaState<'a>,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>, Vec<AttributePath>)> {
        let mut replace = Vec::new();
        if proposed.name != prior.name {
            replace.push(AttributePath::new("name"));
        }
        if proposed.spec_only() != prior.spec_only() {
            proposed.build_id = Value::Unknown;
            proposed.build_status = Value::Unknown;
        } else {
            proposed.build_id = prior.build_id.clone();
            proposed.build_status = prior.build_status.clone();
        }
        proposed.id = prior.id.clone();
        Some((proposed, private, replace))
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
        let t = c.create_template(&spec).await.or_diag(diags, "Cannot create template")?;
        let mut state = planned;
        state.id = s(&t.id);
        let timeout = TimeoutsBlock::get(&state.timeouts, |t| &t.create, BUILD_TIMEOUT);
        if self.build(diags, &c, &mut state, timeout).await.is_none() {
            // Nothing is half-created: a template whose first build failed is removed again.
            let _ = c.delete_template(&t.id).await;
            return None;
        }
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
        let mut state = planned;
        let id = known(&prior.id)?;
        state.id = prior.id.clone();
        if state.spec_only() != prior.spec_only() {
            let spec = state.spec().map_err(|e| field_error(diags, e)).ok()?;
            let patch = api::TemplatePatch {
                name: Some(spec.name),
                image: spec.image,
                build: Some(spec.build),
                start_cmd: spec.start_cmd,
                readiness: spec.readiness,
                warm_processes: Some(spec.warm_processes),
                env: Some(spec.env),
                resources: Some(spec.resources),
                cwd: spec.cwd,
            };
            c.update_template(&id, &patch).await.or_diag(diags, "Cannot update template")?;
            let timeout = TimeoutsBlock::get(&state.timeouts, |t| &t.update, BUILD_TIMEOUT);
            self.build(diags, &c, &mut state, timeout).await?;
        } else if state.tags != prior.tags {
            let build = match known(&prior.build_id).map(api::BuildId::try_from) {
                Some(Ok(build)) => build,
                Some(Err(message)) => {
                    diags.error("Invalid build_id in state", message, AttributePath::new("build_id"));
                    return None;
                }
                None => return None,
            };
            for tag in strs(&state.tags) {
                if let Err(e) = c.put_tag(&id, &tag, &build).await {
                    diags.error("Cannot move tag", e.to_string(), AttributePath::new("tags"));
                    return None;
                }
            }
        }
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
        crate::gone_is_ok(c.delete_template(&known(&state.id)?).await)
            .or_diag(diags, "Cannot delete template")
    }

    async fn import<'a>(
        &self,
        diags: &mut Diagnostics,
        id: String,
    ) -> Option<(Self::State<'a>, Self::PrivateState<'a>)> {
        let c = self.shared.client(diags)?;
        let t = c.get_template(&id).await.or_diag(diags, format!("Cannot import template {id}"))?;
        let mut state = TemplateState::default();
        state.set_spec(&t);
        let builds = c.list_builds(&t.id).await.unwrap_or_default();
        if let Some(b) = builds.iter().rev().find(|b| b.status == api::BuildStatus::Ready).or(builds.last()) {
            state.build_id = s(&b.id);
            state.build_status = s(b.status.as_str());
            let tags: Vec<String> = c
                .list_tags(&t.id)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|tag| tag.build_id == b.id)
                .map(|t| t.name)
                .collect();
            state.tags = list_or_null(&tags);
        }
        Some((state, Value::Null))
    }
}
