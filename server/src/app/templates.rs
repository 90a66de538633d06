//! Templates, builds, tags and ref resolution. A build really runs: its steps in a fresh directory, then the
//! start contract (`start_cmd` until `readiness` passes, bounded by the readiness `timeout_ms`), then the
//! directory becomes the build's artifact. Tags move to a build when it is ready.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use warmpool_api::{
    validate_name, AccountId, Build, BuildCreate, BuildId, BuildStatus, FieldError, List, Tag, Template,
    TemplateId, TemplatePatch, TemplateRef, TemplateSpec,
};

use super::{new_id, not_found, App, AppError, AppResult, Caller};
use crate::runtime::{StartSpec, Subject};
use crate::store::{BuildRow, TemplateRow};

/// Default bound on a start contract (readiness) when the template's readiness sets no `timeout_ms`.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a sandbox of `spec` may take to become ready.
pub fn start_timeout(spec: &TemplateSpec) -> Duration {
    spec.readiness
        .as_ref()
        .and_then(|r| r.timeout_ms)
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_START_TIMEOUT)
}

impl App {
    pub async fn create_template(&self, caller: &Caller, spec: TemplateSpec) -> AppResult<Template> {
        spec.validate()?;
        self.check_image(&spec)?;
        let now = Utc::now();
        let template = Template::from_spec(new_id(TemplateId::from_suffix), spec, now, now);
        self.store
            .insert_template(&TemplateRow {
                account_id: caller.account_id.clone(),
                template: template.clone(),
            })
            .await?;
        Ok(template)
    }

    /// Refuses an `image` the server's image policy does not allow (see [`crate::images`]), on every runtime.
    fn check_image(&self, spec: &TemplateSpec) -> AppResult<()> {
        if let Some(image) = &spec.image {
            self.config.images.check("image", image)?;
        }
        Ok(())
    }

    pub async fn list_templates(
        &self,
        caller: &Caller,
        page: &crate::store::Page,
    ) -> AppResult<List<Template>> {
        let fetch = async |p: &crate::store::Page| self.store.list_templates(&caller.account_id, p).await;
        super::paged(page, fetch, |t: &Template| &t.id, |r| r.template).await
    }

    pub async fn get_template(&self, caller: &Caller, id_or_name: &str) -> AppResult<TemplateRow> {
        self.store
            .get_template(&caller.account_id, id_or_name)
            .await?
            .ok_or_else(|| not_found("template", id_or_name))
    }

    pub async fn update_template(
        &self,
        caller: &Caller,
        id_or_name: &str,
        patch: TemplatePatch,
    ) -> AppResult<Template> {
        let mut row = self.get_template(caller, id_or_name).await?;
        let spec = patch.apply(row.template.spec());
        spec.validate()?;
        self.check_image(&spec)?;
        row.template =
            Template::from_spec(row.template.id.clone(), spec, row.template.created_at, Utc::now());
        self.store.update_template(&row).await?;
        Ok(row.template)
    }

    pub async fn delete_template(&self, caller: &Caller, id_or_name: &str) -> AppResult<()> {
        let row = self.get_template(caller, id_or_name).await?;
        let builds = self.store.list_builds(&row.template.id).await?;
        self.store.delete_template(&row.template.id).await?;
        for b in builds {
            self.runtime.remove_artifact(&b.build.id).await;
        }
        self.pokes.all();
        Ok(())
    }

    /// Queues a build of the template's current spec and runs it in the background.
    pub async fn create_build(
        self: &Arc<Self>,
        caller: &Caller,
        id_or_name: &str,
        req: BuildCreate,
    ) -> AppResult<Build> {
        let template = self.get_template(caller, id_or_name).await?;
        for (i, tag) in req.tags.iter().enumerate() {
            validate_name(&format!("tags[{i}]"), tag)?;
        }
        let build = Build {
            id: new_id(BuildId::from_suffix),
            template_id: template.template.id.clone(),
            status: BuildStatus::Queued,
            tags: req.tags,
            error: None,
            created_at: Utc::now(),
            finished_at: None,
        };
        let row = BuildRow {
            account_id: caller.account_id.clone(),
            build: build.clone(),
            spec: template.template.spec(),
            runner: Some(self.replica.clone()),
        };
        self.store.insert_build(&row).await?;
        let app = self.clone();
        tokio::spawn(async move { app.run_build(row).await });
        Ok(build)
    }

    pub fn build_log_path(&self, build_id: &str) -> std::path::PathBuf {
        self.config.data_dir.join("build-logs").join(format!("{build_id}.log"))
    }

    async fn run_build(self: Arc<Self>, mut row: BuildRow) {
        let _slot = self.build_slots.clone().acquire_owned().await;
        let started = std::time::Instant::now();
        let id = row.build.id.clone();
        row.build.status = BuildStatus::Building;
        if self.store.update_build(&row).await.is_err() {
            return;
        }
        let log = self.build_log_path(&id);
        let _ = std::fs::create_dir_all(log.parent().expect("log dir"));
        let result = self.build_artifact(&id, &row.account_id, &row.spec, &log).await;
        // The template may have been deleted meanwhile.
        if self.store.get_build(&id).await.ok().flatten().is_none() {
            self.runtime.remove_artifact(&id).await;
            return;
        }
        row.build.finished_at = Some(Utc::now());
        match result {
            Ok(()) => {
                row.build.status = BuildStatus::Ready;
                for tag in &row.build.tags {
                    let _ = self.store.put_tag(&row.build.template_id, tag, &id, Utc::now()).await;
                }
                tracing::info!(build = %id, "Build ready");
            }
            Err(message) => {
                append(&log, &format!("==> build failed: {message}\n"));
                tracing::warn!(build = %id, %message, "Build failed");
                row.build.status = BuildStatus::Failed;
                row.build.error = Some(message);
                self.runtime.remove_artifact(&id).await;
            }
        }
        let _ = self.store.update_build(&row).await;
        self.metrics.build_finished(row.build.status.as_str(), started.elapsed().as_secs_f64());
        self.pokes.all();
    }

    async fn build_artifact(
        &self,
        id: &BuildId,
        account_id: &AccountId,
        spec: &TemplateSpec,
        log: &std::path::Path,
    ) -> Result<(), String> {
        self.runtime.run_build_steps(id, spec, log).await.map_err(|e| e.to_string())?;
        if spec.start_cmd.is_some() || !spec.warm_processes.is_empty() {
            append(log, "==> checking the start contract (start_cmd until readiness passes)\n");
            let start = StartSpec {
                subject: Subject::Build(id.clone()),
                account_id: Some(account_id.clone()),
                pool_id: None,
                spec: spec.clone(),
                envs: Default::default(),
                cwd: None,
                volumes: Vec::new(),
                network: Default::default(),
            };
            let handle = self.runtime.start(start).await.map_err(|e| e.to_string())?;
            let ready = self.runtime.wait_ready(&handle, start_timeout(spec)).await;
            let output = self.runtime.log_tail(&handle, 64 * 1024).await;
            self.runtime.stop_build(&handle).await;
            append(log, &output);
            ready.map_err(|e| format!("start contract failed: {e}"))?;
            append(log, "==> readiness passed\n");
        }
        self.runtime.seal_artifact(id).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    pub async fn list_builds(
        &self,
        caller: &Caller,
        template: &str,
        page: &crate::store::Page,
    ) -> AppResult<List<Build>> {
        let t = self.get_template(caller, template).await?;
        let fetch = async |p: &crate::store::Page| self.store.page_builds(&t.template.id, p).await;
        super::paged(page, fetch, |b: &Build| &b.id, |r| r.build).await
    }

    pub async fn get_build(&self, caller: &Caller, id: &str) -> AppResult<BuildRow> {
        self.store
            .get_build(id)
            .await?
            .filter(|b| b.account_id == caller.account_id)
            .ok_or_else(|| not_found("build", id))
    }

    /// A build's artifact file, for a caller of the build's account or the holder of the build's artifact token.
    pub async fn build_artifact_file(&self, token: Option<&str>, id: &str) -> AppResult<std::path::PathBuf> {
        let token = token.ok_or(AppError::Unauthorized)?;
        if token.starts_with(crate::secrets::ARTIFACT_TOKEN_PREFIX) {
            if !self.secrets.check_artifact_token(token, id, Utc::now().timestamp()) {
                return Err(AppError::Unauthorized);
            }
        } else {
            self.get_build(&self.authenticate(Some(token)).await?, id).await?;
        }
        self.runtime.artifact_file(id).ok_or_else(|| AppError::NotFound {
            kind: "artifact",
            id: format!("{id} (only the kubernetes runtime packs artifacts)"),
        })
    }

    pub async fn build_logs(&self, caller: &Caller, id: &str) -> AppResult<String> {
        self.get_build(caller, id).await?;
        // Bounded by the runtime (`BUILD_LOG_MAX`) plus the start contract's tail.
        let bytes = tokio::fs::read(self.build_log_path(id)).await.unwrap_or_default();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn put_tag(
        &self,
        caller: &Caller,
        template: &str,
        tag: &str,
        build_id: &str,
    ) -> AppResult<Tag> {
        let t = self.get_template(caller, template).await?;
        validate_name("tag", tag)?;
        let build = self
            .store
            .get_build(build_id)
            .await?
            .filter(|b| b.build.template_id == t.template.id)
            .ok_or_else(|| {
                FieldError::new("build_id", format!("{build_id:?} is not a build of {}", t.template.name))
            })?;
        if build.build.status != BuildStatus::Ready {
            return Err(AppError::Conflict(format!(
                "build {build_id} is {}, not ready",
                build.build.status.as_str()
            )));
        }
        let now = Utc::now();
        self.store.put_tag(&t.template.id, tag, build_id, now).await?;
        self.pokes.all();
        Ok(Tag { name: tag.into(), template_id: t.template.id, build_id: build.build.id, updated_at: now })
    }

    pub async fn list_tags(&self, caller: &Caller, template: &str) -> AppResult<Vec<Tag>> {
        let t = self.get_template(caller, template).await?;
        Ok(self.store.list_tags(&t.template.id).await?)
    }

    pub async fn get_tag(&self, caller: &Caller, template: &str, tag: &str) -> AppResult<Tag> {
        let t = self.get_template(caller, template).await?;
        self.store.get_tag(&t.template.id, tag).await?.ok_or_else(|| not_found("tag", tag))
    }

    pub async fn delete_tag(&self, caller: &Caller, template: &str, tag: &str) -> AppResult<()> {
        let t = self.get_template(caller, template).await?;
        if !self.store.delete_tag(&t.template.id, tag).await? {
            return Err(not_found("tag", tag));
        }
        self.pokes.all();
        Ok(())
    }

    /// Resolves a ref to its template and build. `Ok((template, None))` when the ref is valid but no build is
    /// (yet) ready for it; `field` names the request field in errors.
    pub async fn resolve_ref(
        &self,
        account_id: &str,
        field: &str,
        value: &str,
    ) -> AppResult<(TemplateRow, Option<BuildRow>)> {
        let r = TemplateRef::parse(field, value)?;
        let template = self
            .store
            .get_template(account_id, r.name())
            .await?
            .ok_or_else(|| FieldError::new(field, format!("no template named {:?}", r.name())))?;
        let build = match &r {
            TemplateRef::Name(_) => self.store.latest_ready_build(&template.template.id).await?,
            TemplateRef::Tag { tag, .. } => match self.store.get_tag(&template.template.id, tag).await? {
                Some(t) => self.store.get_build(&t.build_id).await?,
                None => None,
            },
            TemplateRef::Build { build_id, .. } => {
                let b = self
                    .store
                    .get_build(build_id)
                    .await?
                    .filter(|b| b.build.template_id == template.template.id)
                    .ok_or_else(|| {
                        FieldError::new(field, format!("{build_id} is not a build of {}", r.name()))
                    })?;
                Some(b)
            }
        };
        Ok((template, build))
    }
}

fn append(path: &std::path::Path, text: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(text.as_bytes());
    }
}
