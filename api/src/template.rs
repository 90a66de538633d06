//! Templates, builds and tags.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{validate_name, FieldError};
use crate::ids::{BuildId, TemplateId};
use crate::probe::{validate_env_key, validate_warm_processes, ProbeSpec, WarmProcessSpec};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildRecipe {
    /// Shell commands run once, in order, with `/bin/sh -c` in the sandbox directory.
    #[serde(default)]
    pub steps: Vec<String>,
    /// Visible to the build steps only.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs (fractions allowed: 0.5), more than 0 and at most 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 1024)]
    pub cpu: Option<f64>,
    /// Memory limit in MiB, 1 to 1048576 (1 TiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1048576)]
    pub memory_mb: Option<u64>,
    /// Disk limit in MiB, 1 to 16777216 (16 TiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 16777216)]
    pub disk_mb: Option<u64>,
}

impl Resources {
    /// Memory a sandbox may use when its template names none.
    pub const DEFAULT_MEMORY_MB: u64 = 1024;
    /// Disk a sandbox may write (its own layer) when its template names none.
    pub const DEFAULT_DISK_MB: u64 = 10240;

    pub fn memory_mb_or_default(&self) -> u64 {
        self.memory_mb.unwrap_or(Self::DEFAULT_MEMORY_MB)
    }

    pub fn disk_mb_or_default(&self) -> u64 {
        self.disk_mb.unwrap_or(Self::DEFAULT_DISK_MB)
    }

    /// Largest `cpu`.
    pub const MAX_CPU: f64 = 1024.0;
    /// Largest `memory_mb` (1 TiB): beyond it byte counts overflow what the runtimes hand the kernel.
    pub const MAX_MEMORY_MB: u64 = 1 << 20;
    /// Largest `disk_mb` (16 TiB).
    pub const MAX_DISK_MB: u64 = 1 << 24;

    pub fn validate(&self, path: &str) -> Result<(), FieldError> {
        if let Some(cpu) = self.cpu {
            if !(cpu > 0.0 && cpu <= Self::MAX_CPU) {
                return Err(FieldError::new(
                    format!("{path}.cpu"),
                    "must be greater than 0 and at most 1024",
                ));
            }
        }
        for (field, value, max) in
            [("memory_mb", self.memory_mb, Self::MAX_MEMORY_MB), ("disk_mb", self.disk_mb, Self::MAX_DISK_MB)]
        {
            if value.is_some_and(|v| v == 0 || v > max) {
                return Err(FieldError::new(
                    format!("{path}.{field}"),
                    format!("must be between 1 and {max}"),
                ));
            }
        }
        Ok(())
    }
}

/// The body of `POST /v1/templates`: how a sandbox is made.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,62}$")]
    pub name: String,
    /// OCI image the sandboxes run on: a local OCI layout path (`/path/layout:tag`) or a registry reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default)]
    pub build: BuildRecipe,
    /// Run with `/bin/sh -c`; with `readiness`, the startup contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    /// Must pass before a sandbox counts as started. In a template, `timeout_ms` bounds the whole start
    /// (default 60 s); each check is given at most one second of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeSpec>,
    #[serde(default)]
    pub warm_processes: Vec<WarmProcessSpec>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    /// Working directory of `start_cmd` and relative paths, as an absolute path inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl TemplateSpec {
    pub fn validate(&self) -> Result<(), FieldError> {
        validate_name("name", &self.name)?;
        for (i, step) in self.build.steps.iter().enumerate() {
            if step.trim().is_empty() {
                return Err(FieldError::new(format!("build.steps[{i}]"), "must not be empty"));
            }
        }
        for key in self.build.env.keys() {
            validate_env_key(&format!("build.env.{key}"), key)?;
        }
        for key in self.env.keys() {
            validate_env_key(&format!("env.{key}"), key)?;
        }
        if let Some(cmd) = &self.start_cmd {
            if cmd.trim().is_empty() {
                return Err(FieldError::new("start_cmd", "must not be empty"));
            }
        }
        if let Some(readiness) = &self.readiness {
            if self.start_cmd.is_none() && self.warm_processes.is_empty() {
                return Err(FieldError::new("readiness", "needs a start_cmd to probe"));
            }
            readiness.validate("readiness")?;
        }
        validate_warm_processes("warm_processes", &self.warm_processes)?;
        if self.warm_processes.iter().enumerate().any(|(i, p)| p.effective_name(i) == START_PROCESS) {
            return Err(FieldError::new(
                "warm_processes",
                format!("the name {START_PROCESS:?} is reserved for start_cmd"),
            ));
        }
        self.resources.validate("resources")?;
        if let Some(cwd) = &self.cwd {
            crate::probe::validate_cwd("cwd", cwd)?;
        }
        Ok(())
    }
}

/// The name procd gives the process that runs `start_cmd`.
pub const START_PROCESS: &str = "start";

/// `PATCH /v1/templates/{id}`: every field replaces the template's value when present.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplatePatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildRecipe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_processes: Option<Vec<WarmProcessSpec>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl TemplatePatch {
    /// The spec after this patch.
    pub fn apply(self, mut spec: TemplateSpec) -> TemplateSpec {
        if let Some(v) = self.name {
            spec.name = v;
        }
        if let Some(v) = self.image {
            spec.image = Some(v);
        }
        if let Some(v) = self.build {
            spec.build = v;
        }
        if let Some(v) = self.start_cmd {
            spec.start_cmd = Some(v);
        }
        if let Some(v) = self.readiness {
            spec.readiness = Some(v);
        }
        if let Some(v) = self.warm_processes {
            spec.warm_processes = v;
        }
        if let Some(v) = self.env {
            spec.env = v;
        }
        if let Some(v) = self.resources {
            spec.resources = v;
        }
        if let Some(v) = self.cwd {
            spec.cwd = Some(v);
        }
        spec
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Template {
    pub id: TemplateId,
    pub name: String,
    pub image: Option<String>,
    pub build: BuildRecipe,
    pub start_cmd: Option<String>,
    pub readiness: Option<ProbeSpec>,
    pub warm_processes: Vec<WarmProcessSpec>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub cwd: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Template {
    pub fn from_spec(
        id: TemplateId,
        spec: TemplateSpec,
        created_at: DateTime<Utc>,
        updated_at: DateTime<Utc>,
    ) -> Self {
        Template {
            id,
            name: spec.name,
            image: spec.image,
            build: spec.build,
            start_cmd: spec.start_cmd,
            readiness: spec.readiness,
            warm_processes: spec.warm_processes,
            env: spec.env,
            resources: spec.resources,
            cwd: spec.cwd,
            created_at,
            updated_at,
        }
    }

    pub fn spec(&self) -> TemplateSpec {
        TemplateSpec {
            name: self.name.clone(),
            image: self.image.clone(),
            build: self.build.clone(),
            start_cmd: self.start_cmd.clone(),
            readiness: self.readiness.clone(),
            warm_processes: self.warm_processes.clone(),
            env: self.env.clone(),
            resources: self.resources.clone(),
            cwd: self.cwd.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Queued,
    Building,
    Ready,
    Failed,
}

impl BuildStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Queued => "queued",
            BuildStatus::Building => "building",
            BuildStatus::Ready => "ready",
            BuildStatus::Failed => "failed",
        }
    }
    pub fn is_terminal(self) -> bool {
        matches!(self, BuildStatus::Ready | BuildStatus::Failed)
    }
}

impl std::str::FromStr for BuildStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => BuildStatus::Queued,
            "building" => BuildStatus::Building,
            "ready" => BuildStatus::Ready,
            "failed" => BuildStatus::Failed,
            other => return Err(format!("unknown build status {other:?}")),
        })
    }
}

/// `POST /v1/templates/{id}/builds`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildCreate {
    /// Tags moved to the build once it is ready.
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Build {
    pub id: BuildId,
    pub template_id: TemplateId,
    pub status: BuildStatus,
    /// Tags requested for this build (they move when it is ready).
    pub tags: Vec<String>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// `PUT /v1/templates/{id}/tags/{tag}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TagPut {
    pub build_id: BuildId,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Tag {
    pub name: String,
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub updated_at: DateTime<Utc>,
}
