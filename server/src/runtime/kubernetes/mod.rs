//! The Kubernetes runtime: every sandbox and every build is a pod running the template's image with procd as its
//! PID 1 (see `pod`). The server reaches procd over gRPC on the pod IP with the sandbox's token.
//!
//! One watch (a kube-rs reflector over the pods labelled `app.kubernetes.io/managed-by=warmpool` in the namespace)
//! keeps every pod's state in memory: readiness waits read it, and a pod that fails, is evicted or deleted, or
//! whose node is lost is reported on `exits` (no polling per pod). After a restart the same cache lists the live
//! pods, re-adopted by their `warmpool.dev/sandbox` label.
//!
//! A build runs its steps in a pod (`bld-…-steps`), then procd packs the working directory as a zstd tar that the
//! server keeps in `<data-dir>/artifacts/<build>.tar.zst` and serves at `GET /v1/builds/{id}/artifact` to the
//! `artifact` init container of every pod started from the build, with a build-scoped token valid for an hour.

pub mod pod;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::sync::{mpsc, Notify};
use warmpool_api::{
    BuildId, ExecRequest, ExecResult, LogLine, NetworkMode, ProbeKind, ProbeResult, ProbeStatus, TemplateSpec,
};
use warmpool_procd::config::Listen;

use super::procd::Procd;
use super::{warm_processes, working_dir, Runtime, RuntimeError, RuntimeHandle, StartSpec, Subject};
use crate::secrets::Secrets;
use pod::{PodPlan, BUILD_LABEL, MANAGED, PROCD_PORT, SANDBOX_CONTAINER, SANDBOX_LABEL};

/// How long a pod started from a build may take to fetch its artifact.
/// The most of a pod's log one `logs` call reads (the pod log API returns it as one body).
const LOG_LIMIT_BYTES: i64 = 16 << 20;
const ARTIFACT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// How long a build's steps pod may take to be scheduled, pull its image and start procd.
const BUILD_POD_START: Duration = Duration::from_secs(600);

/// What `warmpool serve --runtime kubernetes` was given.
#[derive(Debug, Clone)]
pub struct Options {
    /// The namespace sandboxes run in (default: the kubeconfig context's, or the server pod's own).
    pub namespace: Option<String>,
    /// A kubeconfig file (default: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
    pub kubeconfig: Option<PathBuf>,
    /// The `warmpool` image: the init containers run procd from it.
    pub image: String,
    /// The server's URL as pods see it (artifact downloads).
    pub advertise_url: String,
    pub data_dir: PathBuf,
    pub max_sandboxes: usize,
    /// Pods get a user namespace of their own (`hostUsers: false`).
    pub user_namespaces: bool,
}

pub struct KubernetesRuntime {
    pods: Api<Pod>,
    namespace: String,
    image: String,
    advertise_url: String,
    artifacts: PathBuf,
    max_sandboxes: usize,
    user_namespaces: bool,
    secrets: Arc<Secrets>,
    procd: Procd,
    cache: reflector::Store<Pod>,
    /// Woken at every pod event.
    changed: Arc<Notify>,
}

/// A client for the cluster `options` name, checked to answer: a missing kubeconfig or an unreachable API server
/// is one error naming where the configuration came from.
pub async fn connect(options: &Options) -> Result<(kube::Client, String), RuntimeError> {
    let source = match &options.kubeconfig {
        Some(p) => format!("kubeconfig {}", p.display()),
        None => "in-cluster or default kubeconfig".to_string(),
    };
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| RuntimeError::Failed(format!("reading kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.map_err(|e| {
                RuntimeError::Failed(format!("kubeconfig {}: {e}", path.display()))
            })?
        }
        None => kube::Config::infer().await.map_err(|e| {
            RuntimeError::Failed(format!(
                "no Kubernetes configuration: not in a cluster and no kubeconfig found ({e}); pass --kubeconfig"
            ))
        })?,
    };
    let url = config.cluster_url.to_string();
    let namespace = options.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config)
        .map_err(|e| RuntimeError::Failed(format!("Kubernetes client for {url} ({source}): {e}")))?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let one = ListParams::default().limit(1);
    match tokio::time::timeout(Duration::from_secs(10), pods.list(&one)).await {
        Ok(Ok(_)) => Ok((client, namespace)),
        Ok(Err(e)) => Err(RuntimeError::Failed(format!(
            "cannot list pods in namespace {namespace} at {url} ({source}): {e}"
        ))),
        Err(_) => Err(RuntimeError::Failed(format!(
            "the Kubernetes API at {url} ({source}) did not answer within 10 s"
        ))),
    }
}

impl KubernetesRuntime {
    /// Starts the pod watch on `client` and waits for its first listing. `exits` hears the id of every sandbox
    /// whose pod stops running.
    pub async fn new(
        client: kube::Client,
        namespace: String,
        options: &Options,
        exits: mpsc::UnboundedSender<String>,
        secrets: Arc<Secrets>,
    ) -> Result<Arc<KubernetesRuntime>, RuntimeError> {
        let artifacts = options.data_dir.join("artifacts");
        std::fs::create_dir_all(&artifacts).map_err(RuntimeError::io("creating the artifacts directory"))?;
        let pods: Api<Pod> = Api::namespaced(client, &namespace);
        let (cache, writer) = reflector::store();
        let changed = Arc::new(Notify::new());
        let config = watcher::Config::default().labels(&format!("{}={}", MANAGED.0, MANAGED.1));
        let events = watcher(pods.clone(), config).default_backoff().reflect(writer);
        tokio::spawn(watch(events, exits, changed.clone()));
        tokio::time::timeout(Duration::from_secs(30), cache.wait_until_ready())
            .await
            .map_err(|_| {
                RuntimeError::Failed(format!("listing pods in namespace {namespace} took over 30 s"))
            })?
            .map_err(|_| RuntimeError::Failed("the pod watch stopped".into()))?;
        Ok(Arc::new(KubernetesRuntime {
            pods,
            namespace,
            image: options.image.clone(),
            advertise_url: options.advertise_url.trim_end_matches('/').to_string(),
            artifacts,
            max_sandboxes: options.max_sandboxes,
            user_namespaces: options.user_namespaces,
            procd: Procd::new(secrets.clone()),
            secrets,
            cache,
            changed,
        }))
    }

    fn artifact_path(&self, build_id: &str) -> PathBuf {
        self.artifacts.join(format!("{build_id}.tar.zst"))
    }

    fn cached(&self, pod_name: &str) -> Option<Arc<Pod>> {
        self.cache.get(&ObjectRef::new(pod_name).within(&self.namespace))
    }

    /// procd's address in a pod, once the pod has an IP.
    fn at(&self, handle: &RuntimeHandle) -> Result<Listen, RuntimeError> {
        let pod = self.cached(&handle.dir);
        let ip = pod.as_ref().and_then(|p| p.status.as_ref()?.pod_ip.as_deref()?.parse().ok());
        ip.map(|ip| Listen::Tcp(std::net::SocketAddr::new(ip, PROCD_PORT)))
            .ok_or_else(|| RuntimeError::Unreachable(format!("pod {} has no IP (yet)", handle.dir)))
    }

    /// The pod of a sandbox, a build's steps or a build's start-contract run. `artifact` is the build whose
    /// artifact the pod starts from (none for a build's steps).
    fn plan(&self, name: String, spec: &StartSpec, artifact: Option<&str>, processes: bool) -> PodPlan {
        let warm = if processes { warm_processes(spec) } else { Vec::new() };
        let mut labels = pod::labels(match spec.subject {
            Subject::Build(_) => "build",
            Subject::Sandbox { .. } => "sandbox",
        });
        labels.insert(SANDBOX_LABEL.into(), spec.subject.id().into());
        labels.insert(BUILD_LABEL.into(), spec.subject.build_id().to_string());
        if let Some(p) = &spec.pool_id {
            labels.insert(pod::POOL_LABEL.into(), p.to_string());
        }
        if let Some(account) = &spec.account_id {
            labels.insert(pod::ACCOUNT_LABEL.into(), account.to_string());
        }
        let expires = chrono::Utc::now().timestamp() + ARTIFACT_TOKEN_TTL.as_secs() as i64;
        PodPlan {
            name,
            labels,
            image: spec.spec.image.clone().unwrap_or_else(|| self.image.clone()),
            warmpool_image: self.image.clone(),
            procd_config: serde_json::json!({"token_file": "/config/token", "warm_processes": warm, "env": super::procd_env(&spec.spec)}),
            procd_token: self.procd.token(spec.subject.id()),
            artifact: artifact.map(|b| {
                (
                    format!("{}/v1/builds/{b}/artifact", self.advertise_url),
                    self.secrets.artifact_token(b, expires),
                )
            }),
            workdir: working_dir(spec),
            resources: spec.spec.resources.clone(),
            network: spec.network,
            user_namespaces: self.user_namespaces,
        }
    }

    async fn create(
        &self,
        plan: &PodPlan,
        has_warm_processes: bool,
        id: &str,
    ) -> Result<RuntimeHandle, RuntimeError> {
        self.pods
            .create(&PostParams::default(), &pod::manifest(plan))
            .await
            .map_err(|e| RuntimeError::Failed(format!("creating pod {}: {e}", plan.name)))?;
        Ok(RuntimeHandle {
            id: id.to_string(),
            dir: plan.name.clone(),
            has_warm_processes,
            ..Default::default()
        })
    }

    /// Deletes a pod; one that is already gone is fine. Returns whether there was one.
    async fn delete(&self, name: &str) -> Result<bool, RuntimeError> {
        match self.pods.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(e) => Err(RuntimeError::Failed(format!("deleting pod {name}: {e}"))),
        }
    }

    /// Deletes a pod left by an earlier attempt and waits until its name is free again (a deleted pod stays while
    /// its containers get their grace period), so that a pod of the same name can be created.
    async fn replace(&self, name: &str) -> Result<(), RuntimeError> {
        if !self.delete(name).await? {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self
            .pods
            .get_opt(name)
            .await
            .map_err(|e| RuntimeError::Failed(format!("reading pod {name}: {e}")))?
            .is_some()
        {
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Failed(format!("pod {name} was still terminating after 60 s")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

/// Follows the pod watch: every event wakes the readiness waits, and a pod that no longer runs is reported.
async fn watch(
    events: impl futures::Stream<Item = Result<watcher::Event<Pod>, watcher::Error>>,
    exits: mpsc::UnboundedSender<String>,
    changed: Arc<Notify>,
) {
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) if !alive(&p) => report(&exits, &p),
            Ok(watcher::Event::Delete(p)) => report(&exits, &p),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "Pod watch failed; retrying"),
        }
        changed.notify_waiters();
    }
}

fn report(exits: &mpsc::UnboundedSender<String>, pod: &Pod) {
    if let Some(id) = pod.metadata.labels.as_ref().and_then(|l| l.get(SANDBOX_LABEL)) {
        let _ = exits.send(id.clone());
    }
}

/// A pod that runs or is still starting (not failed, finished or being deleted).
fn alive(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    pod.metadata.deletion_timestamp.is_none() && !matches!(phase, Some("Failed" | "Succeeded"))
}

/// Why a pod will not run: a terminated container (with the end of its output), or a container that cannot
/// start (an image that does not pull, a bad config).
fn failure(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let statuses =
        status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten());
    for c in statuses {
        let state = c.state.as_ref();
        let terminated = state.and_then(|s| s.terminated.as_ref());
        if let Some(t) = terminated.filter(|t| t.exit_code != 0 || c.name == SANDBOX_CONTAINER) {
            let reason = t.reason.as_deref().unwrap_or("Terminated");
            let message = t.message.as_deref().unwrap_or("").trim();
            return Some(format!("container {} {reason} (exit code {}): {message}", c.name, t.exit_code));
        }
        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or("");
            if matches!(
                reason,
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
                    | "CreateContainerError"
                    | "RunContainerError"
            ) {
                return Some(format!(
                    "container {} {reason}: {}",
                    c.name,
                    w.message.as_deref().unwrap_or("")
                ));
            }
        }
    }
    (!alive(pod)).then(|| {
        let reason = status.reason.as_deref().or(status.phase.as_deref()).unwrap_or("stopped");
        format!("pod {reason}: {}", status.message.as_deref().unwrap_or(""))
    })
}

#[async_trait::async_trait]
impl Runtime for KubernetesRuntime {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "runtime": "kubernetes",
            "isolation": "pod",
            "namespace": self.namespace,
            "image": self.image,
            "advertise_url": self.advertise_url,
            "pods": self.cache.state().len(),
        })
    }

    async fn run_build_steps(
        &self,
        build_id: &BuildId,
        spec: &TemplateSpec,
        log: &Path,
    ) -> Result<(), RuntimeError> {
        let start = StartSpec {
            subject: Subject::Build(build_id.clone()),
            account_id: None,
            pool_id: None,
            spec: spec.clone(),
            envs: Default::default(),
            cwd: None,
            volumes: Vec::new(),
            network: NetworkMode::Isolated,
        };
        let name = format!("{}-steps", pod::pod_name(build_id));
        self.replace(&name).await?;
        let handle = self.create(&self.plan(name.clone(), &start, None, false), false, build_id).await?;
        let result = async {
            self.wait_ready(&handle, BUILD_POD_START).await?;
            let at = self.at(&handle)?;
            self.procd.run_steps(build_id, &at, spec, log).await?;
            self.procd.archive(build_id, &at, &working_dir(&start), &self.artifact_path(build_id)).await
        }
        .await;
        if let Ok(at) = self.at(&handle) {
            self.procd.forget(&at);
        }
        let _ = self.delete(&name).await;
        result.map(|size| tracing::info!(build = %build_id, bytes = size, "Artifact packed"))
    }

    async fn seal_artifact(&self, build_id: &BuildId) -> Result<(), RuntimeError> {
        match self.artifact_path(build_id).exists() {
            true => Ok(()),
            false => Err(RuntimeError::Failed(format!("build {build_id} has no packed artifact"))),
        }
    }

    async fn remove_artifact(&self, build_id: &BuildId) {
        let name = pod::pod_name(build_id);
        let _ = self.delete(&format!("{name}-steps")).await;
        let _ = self.delete(&name).await;
        let _ = std::fs::remove_file(self.artifact_path(build_id));
    }

    async fn start(&self, spec: StartSpec) -> Result<RuntimeHandle, RuntimeError> {
        let id = spec.subject.id();
        // Both start from an artifact: a build's start-contract check from the one its steps' pod packed.
        let plan = self.plan(pod::pod_name(id), &spec, Some(spec.subject.build_id()), true);
        if let Subject::Build(_) = spec.subject {
            self.replace(&plan.name).await?;
            return self.create(&plan, !warm_processes(&spec).is_empty(), id).await;
        }
        if let Some(v) = spec.volumes.first() {
            return Err(RuntimeError::Invalid {
                field: "volumes",
                message: format!("named volumes ({:?}) are not available on the kubernetes runtime", v.name),
            });
        }
        if spec.network == NetworkMode::Host {
            return Err(RuntimeError::Invalid {
                field: "network.mode",
                message: "host networking is not available on the kubernetes runtime".into(),
            });
        }
        self.create(&plan, !warm_processes(&spec).is_empty(), id).await
    }

    async fn wait_ready(&self, handle: &RuntimeHandle, timeout: Duration) -> Result<(), RuntimeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::from("the pod has not been scheduled yet");
        let mut seen = false;
        loop {
            let changed = self.changed.notified();
            match self.cached(&handle.dir) {
                None if seen => return Err(RuntimeError::Exited(format!("pod {} was deleted", handle.dir))),
                None => {}
                Some(pod) => {
                    seen = true;
                    if let Some(why) = failure(&pod) {
                        return Err(RuntimeError::Exited(why));
                    }
                    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                    match self.at(handle) {
                        Ok(at) if running => match self.procd.ready(&at, handle).await {
                            Ok(true) => return Ok(()),
                            Ok(false) => {}
                            Err(message) => last = message,
                        },
                        _ => last = format!("pod {} is {}", handle.dir, phase(&pod)),
                    }
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(RuntimeError::NotReady(format!(
                    "readiness did not pass within {timeout:?}: {last}"
                )));
            }
            // A pod event, or the next readiness look.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(50)), changed).await;
        }
    }

    async fn stop_build(&self, handle: &RuntimeHandle) {
        if let Ok(at) = self.at(handle) {
            self.procd.forget(&at);
        }
        let _ = self.delete(&handle.dir).await;
    }

    async fn destroy(&self, id: &str, handle: Option<&RuntimeHandle>) -> Result<(), RuntimeError> {
        if let Some(at) = handle.and_then(|h| self.at(h).ok()) {
            self.procd.forget(&at);
        }
        self.delete(&pod::pod_name(id)).await.map(|_| ())
    }

    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
        base_cwd: Option<&str>,
        env: BTreeMap<String, String>,
    ) -> Result<ExecResult, RuntimeError> {
        self.procd.exec(&handle.id, &self.at(handle)?, req, base_cwd, env).await
    }

    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        self.procd.probe(&self.at(handle)?, kind).await
    }
    fn procd(&self, handle: &RuntimeHandle) -> Result<crate::runtime::procd::ProcdConn, RuntimeError> {
        self.procd.connection(&handle.id, &self.at(handle)?)
    }

    async fn watch_readiness(
        &self,
        handle: &RuntimeHandle,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError> {
        self.procd.watch_readiness(&self.at(handle)?).await
    }

    async fn pause(&self, handle: &RuntimeHandle, paused: bool) -> Result<(), RuntimeError> {
        self.procd.pause(&handle.id, &self.at(handle)?, paused).await
    }

    /// The last `lines` lines of the `sandbox` container's log, from the pod log API (`tailLines`; the kubelet
    /// rotates and bounds the file).
    async fn logs(&self, handle: &RuntimeHandle, lines: usize) -> BoxStream<'static, LogLine> {
        let params = LogParams {
            container: Some(SANDBOX_CONTAINER.into()),
            tail_lines: Some(lines as i64),
            limit_bytes: Some(LOG_LIMIT_BYTES),
            ..Default::default()
        };
        let text = self.pods.logs(&handle.dir, &params).await.unwrap_or_default();
        futures::stream::iter(super::log_lines(&text)).boxed()
    }

    /// The `sandbox` container's log (procd's mirror); once the pod is gone, what its termination message kept.
    async fn log_tail(&self, handle: &RuntimeHandle, bytes: usize) -> String {
        let params = LogParams {
            container: Some(SANDBOX_CONTAINER.into()),
            limit_bytes: Some(bytes as i64),
            ..Default::default()
        };
        match self.pods.logs(&handle.dir, &params).await {
            Ok(text) => super::tail(text.as_bytes(), bytes),
            Err(_) => self.cached(&handle.dir).as_deref().and_then(failure).unwrap_or_default(),
        }
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        self.cached(&handle.dir).is_some_and(|p| alive(&p))
    }

    fn adopt(&self, _id: &str, handle: &RuntimeHandle) -> bool {
        // The watch already follows every pod of this runtime.
        self.is_alive(handle)
    }

    fn list_sandboxes(&self) -> Vec<String> {
        self.cache
            .state()
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get(SANDBOX_LABEL).cloned())
            .filter(|id| id.starts_with("sbx_"))
            .collect()
    }

    fn free_capacity(&self, running: usize) -> usize {
        self.max_sandboxes.saturating_sub(running)
    }

    fn artifact_file(&self, build_id: &str) -> Option<PathBuf> {
        Some(self.artifact_path(build_id)).filter(|p| p.exists())
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

#[cfg(test)]
mod tests;
