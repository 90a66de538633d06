//! Runtimes run sandboxes, each with procd as its PID 1: `local` (an OCI container per sandbox, run by runc on this
//! host) and `kubernetes` (a pod per sandbox). The domain talks to a runtime only through [`Runtime`]; both talk to
//! procd through [`procd::Procd`].

pub mod kubernetes;
pub mod local;
pub mod procd;
pub mod sim;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::stream::BoxStream;
use warmpool_api::{
    AccountId, BuildId, ExecRequest, ExecResult, LogLine, PoolId, ProbeKind, ProbeResult, ProbeSpec,
    ProbeStatus, ProcessType, SandboxId, TemplateSpec, WarmProcessSpec, START_PROCESS,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// A request field names something the sandbox cannot do (a command that does not exist, a missing `cwd`).
    #[error("{field}: {message}")]
    Invalid { field: &'static str, message: String },
    #[error("sandbox did not become ready: {0}")]
    NotReady(String),
    #[error("procd exited while starting: {0}")]
    Exited(String),
    /// A step of the runtime failed (a build step, runc, the network setup); the message says which.
    #[error("{0}")]
    Failed(String),
    #[error("procd is unreachable: {0}")]
    Unreachable(String),
    #[error("no capacity left on this host ({0} sandboxes)")]
    NoCapacity(usize),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// Whether the host cannot take writes now (disk full, read-only filesystem): an operator's problem that
    /// clears by itself, not a bug.
    pub fn is_out_of_space(&self) -> bool {
        matches!(self, RuntimeError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EROFS | libc::EDQUOT)))
    }

    /// What a client may be told about it: what went wrong inside the sandbox (a probe's message, procd's exit
    /// reason, a request field), never the host's side (paths, tools' stderr, which stay in the server's log).
    pub fn client_message(&self) -> String {
        match self {
            RuntimeError::Invalid { .. } | RuntimeError::NotReady(_) | RuntimeError::Exited(_) => {
                self.to_string()
            }
            RuntimeError::NoCapacity(_) => self.to_string(),
            RuntimeError::Unreachable(_) => "procd is unreachable".into(),
            _ if self.is_out_of_space() => "the host is out of disk space".into(),
            RuntimeError::Failed(_) | RuntimeError::Io { .. } => {
                "the runtime failed on the host (the server's log has the cause)".into()
            }
        }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let context = context.into();
        move |source| RuntimeError::Io { context, source }
    }
}

/// What a start is for. The runtime knows it by [`Subject::id`] (its directory, container or pod, and
/// `WARMPOOL_SANDBOX_ID` inside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A sandbox, started from its build's artifact.
    Sandbox { id: SandboxId, build_id: BuildId },
    /// A build's workspace (or, on Kubernetes, what its steps packed): for its steps, or its start-contract check.
    Build(BuildId),
}

impl Subject {
    pub fn id(&self) -> &str {
        match self {
            Subject::Sandbox { id, .. } => id,
            Subject::Build(id) => id,
        }
    }

    /// The build it belongs to: the sandbox's, or the build itself.
    pub fn build_id(&self) -> &BuildId {
        match self {
            Subject::Sandbox { build_id, .. } | Subject::Build(build_id) => build_id,
        }
    }
}

/// What a sandbox (or a build's start-contract check) runs and with what.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub subject: Subject,
    /// Whose sandbox (or build) it is (None: a build's steps), and the pool it is inventory of: labels on runtimes
    /// that keep any.
    pub account_id: Option<AccountId>,
    pub pool_id: Option<PoolId>,
    pub spec: TemplateSpec,
    /// Extra environment for start_cmd and warm processes (`envs`).
    pub envs: BTreeMap<String, String>,
    /// Working directory override (absolute inside the sandbox).
    pub cwd: Option<String>,
    /// Named volumes of the sandbox's account and where they appear inside it.
    pub volumes: Vec<Volume>,
    pub network: warmpool_api::NetworkMode,
}

/// A named volume: storage of an account that outlives sandboxes, mounted at `mount_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    pub account_id: AccountId,
    pub name: String,
    pub mount_path: String,
}

/// How the runtime finds a sandbox's processes again (after a restart, too). Stored with the sandbox's row and
/// meaningful to the runtime that made it only.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RuntimeHandle {
    /// The sandbox (or build) id the runtime knows it by.
    #[serde(default)]
    pub id: String,
    /// procd as seen from the server's pid namespace, and its start time (clock ticks since boot): together they
    /// name the process even after its pid is reused.
    pub procd_pid: Option<u32>,
    #[serde(default)]
    pub procd_started: Option<u64>,
    /// Where the runtime keeps the sandbox: its directory (local), its pod's name (kubernetes).
    pub dir: String,
    /// procd's Unix socket (local; on Kubernetes procd is at the pod's IP, looked up when called).
    pub socket: String,
    /// Whether procd runs warm processes (false for a template with no start_cmd and no warm processes).
    #[serde(default)]
    pub has_warm_processes: bool,
}

/// A phase of a sandbox's start, as `warmpool_sandbox_start_seconds{phase}` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPhase {
    /// Root filesystem, bundle and the container itself (`runc create` and `start`), network wiring excepted.
    Container,
    /// Wiring the sandbox's network namespace.
    Network,
    /// From the container's start until procd answers.
    Procd,
    /// From procd's first answer until readiness passes.
    Readiness,
}

impl StartPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            StartPhase::Container => "container",
            StartPhase::Network => "network",
            StartPhase::Procd => "procd",
            StartPhase::Readiness => "readiness",
        }
    }
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    fn name(&self) -> &'static str;
    /// What isolation this host gives sandboxes (namespaces, cgroups), for `/readyz`.
    fn details(&self) -> serde_json::Value;
    /// Runs a template's build steps in the build's own workspace, appending their output to `log`.
    async fn run_build_steps(
        &self,
        build_id: &BuildId,
        spec: &TemplateSpec,
        log: &std::path::Path,
    ) -> Result<(), RuntimeError>;
    /// Turns the build's workspace, whose start contract passed, into the build's artifact.
    async fn seal_artifact(&self, build_id: &BuildId) -> Result<(), RuntimeError>;
    async fn remove_artifact(&self, build_id: &BuildId);

    /// Starts procd for a sandbox, or in a build's workspace for its start-contract check (does not wait for
    /// readiness).
    async fn start(&self, spec: StartSpec) -> Result<RuntimeHandle, RuntimeError>;
    /// Waits until readiness passes, procd exits, or `timeout`.
    async fn wait_ready(&self, handle: &RuntimeHandle, timeout: Duration) -> Result<(), RuntimeError>;
    /// Stops a build's start-contract run (procd and its cgroups); the build directory stays for sealing.
    async fn stop_build(&self, handle: &RuntimeHandle);
    /// Removes everything the runtime holds for a sandbox: procd (SIGTERM, then SIGKILL), every process and cgroup,
    /// the directory. Idempotent, and complete without a handle (a crash between starting procd and recording its
    /// handle must not leak it). An error leaves something to retry.
    async fn destroy(&self, id: &str, handle: Option<&RuntimeHandle>) -> Result<(), RuntimeError>;
    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
        base_cwd: Option<&str>,
        env: BTreeMap<String, String>,
    ) -> Result<ExecResult, RuntimeError>;
    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError>;
    /// The sandbox's readiness now, then at every change, until procd goes away (the stream ends).
    async fn watch_readiness(
        &self,
        handle: &RuntimeHandle,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError>;
    async fn pause(&self, handle: &RuntimeHandle, paused: bool) -> Result<(), RuntimeError>;
    /// The last `lines` lines of procd's mirrored output (its JSON lines), as far as the runtime still has them,
    /// streamed: the log is never loaded whole.
    async fn logs(&self, handle: &RuntimeHandle, lines: usize) -> BoxStream<'static, LogLine>;
    /// The last `bytes` of procd's own output (its mirror and its messages), starting at a whole line.
    async fn log_tail(&self, handle: &RuntimeHandle, bytes: usize) -> String;
    fn is_alive(&self, handle: &RuntimeHandle) -> bool;
    /// Watches a procd started by an earlier server process; false if it is gone.
    fn adopt(&self, id: &str, handle: &RuntimeHandle) -> bool;
    /// Ids of every sandbox the runtime holds anything for (to remove those the store does not know).
    fn list_sandboxes(&self) -> Vec<String>;
    /// How many more sandboxes this host takes.
    fn free_capacity(&self, running: usize) -> usize;
    /// procd of a sandbox, for the routes that work inside it (processes, files, archives).
    fn procd(&self, _handle: &RuntimeHandle) -> Result<procd::ProcdConn, RuntimeError> {
        Err(RuntimeError::Failed(format!("the {} runtime cannot reach procd", self.name())))
    }
    /// How long each phase of sandbox `id`'s start took, once [`Runtime::wait_ready`] saw it ready (`container`,
    /// `network`, `procd`, `readiness`: see [`StartPhase`]); a runtime that does not time them says nothing.
    /// Taken: a second call returns nothing.
    fn take_start_phases(&self, _id: &str) -> Vec<(StartPhase, Duration)> {
        Vec::new()
    }
    /// A build's artifact as a zstd tar, on runtimes that keep it as one (served to the pods that unpack it).
    fn artifact_file(&self, _build_id: &str) -> Option<std::path::PathBuf> {
        None
    }
}

/// The workspace, the default `cwd` inside every sandbox.
pub const WORKSPACE: &str = "/workspace";

/// The working directory of a sandbox: the request's `cwd`, else the template's, else the workspace.
pub fn working_dir(spec: &StartSpec) -> String {
    spec.cwd.clone().or(spec.spec.cwd.clone()).unwrap_or_else(|| WORKSPACE.into())
}

/// The template's settings for procd itself (the log-mirror variables), for procd's config `env`.
pub fn procd_env(spec: &TemplateSpec) -> BTreeMap<String, String> {
    let names = warmpool_procd::config::LOG_VARIABLES;
    spec.env
        .iter()
        .filter(|(k, _)| names.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// procd's warm processes for a sandbox: `start_cmd` (with the template's readiness) and the warm processes, with
/// the sandbox's environment and working directory filled in.
pub fn warm_processes(spec: &StartSpec) -> Vec<WarmProcessSpec> {
    let t = &spec.spec;
    let base_cwd = working_dir(spec);
    let mut env: BTreeMap<String, String> = t.env.clone();
    env.extend(spec.envs.clone());
    env.insert("WARMPOOL_SANDBOX_ID".into(), spec.subject.id().to_string());
    let mut processes = Vec::new();
    if let Some(cmd) = &t.start_cmd {
        let readiness = t.readiness.clone().map(|r| ProbeSpec {
            // In a template, readiness.timeout_ms bounds the whole start; each check gets at most 1 s of it.
            timeout_ms: Some(r.timeout_ms.unwrap_or(1000).min(1000)),
            ..r
        });
        processes.push(WarmProcessSpec {
            name: Some(START_PROCESS.into()),
            process_type: ProcessType::Cmd,
            command: Some(vec!["/bin/sh".into(), "-c".into(), cmd.clone()]),
            cwd: Some(base_cwd.clone()),
            env: env.clone(),
            probes: readiness.map(|r| warmpool_api::ProbeSet { readiness: Some(r), ..Default::default() }),
            ..Default::default()
        });
    }
    for p in &t.warm_processes {
        let mut p = p.clone();
        p.cwd = Some(p.cwd.unwrap_or_else(|| base_cwd.clone()));
        let mut penv = env.clone();
        penv.extend(p.env.clone());
        p.env = penv;
        processes.push(p);
    }
    processes
}

/// The last `bytes` of `data` as text, starting at a whole line.
pub fn tail(data: &[u8], bytes: usize) -> String {
    let start = data.len().saturating_sub(bytes);
    let text = String::from_utf8_lossy(&data[start..]).into_owned();
    match (start > 0, text.find('\n')) {
        (true, Some(i)) => text[i + 1..].to_string(),
        _ => text,
    }
}

/// Why procd exited, from the tail of its log: its last error with the fields it names (`A warm process exited;
/// procd stops so the sandbox is replaced (process start, code 3)`), else the last line it printed that is not
/// JSON (a startup error), never a line of a process's output: the reason, which the output tail goes with.
pub fn exit_reason(log: &str) -> String {
    let mut own_text = None;
    for line in log.lines().rev().map(str::trim).filter(|l| !l.is_empty()) {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            own_text.get_or_insert(line);
            continue;
        };
        if v["level"] != "ERROR" {
            continue;
        }
        let fields = &v["fields"];
        let message = fields["message"].as_str().unwrap_or("procd failed");
        let details: Vec<String> = ["process", "code", "error"]
            .into_iter()
            .filter_map(|k| match &fields[k] {
                serde_json::Value::Null => None,
                serde_json::Value::String(s) => Some(format!("{k} {s}")),
                other => Some(format!("{k} {other}")),
            })
            .collect();
        return if details.is_empty() {
            message.to_string()
        } else {
            format!("{message} ({})", details.join(", "))
        };
    }
    match own_text {
        Some(line) => line.to_string(),
        None if log.trim().is_empty() => "procd printed nothing".into(),
        None => "procd exited without logging an error".into(),
    }
}

/// procd's JSON log lines among its output (its own messages are skipped).
pub fn log_lines(text: &str) -> Vec<LogLine> {
    text.lines().filter_map(|l| serde_json::from_str::<LogLine>(l).ok()).collect()
}

#[cfg(test)]
mod exit_reason_tests {
    use super::exit_reason;

    #[test]
    fn the_reason_is_procds_last_error_not_the_last_output_line() {
        let log = concat!(
            r#"{"level":"INFO","fields":{"message":"procd is serving"},"target":"warmpool_procd"}"#,
            "\n",
            r#"{"ts":"t","process":"start","pid":10,"stream":"stdout","data":"last words"}"#,
            "\n",
            r#"{"level":"ERROR","fields":{"message":"A warm process exited; procd stops","process":"start","code":3}}"#,
            "\n",
        );
        assert_eq!(exit_reason(log), "A warm process exited; procd stops (process start, code 3)");
        assert_eq!(exit_reason("Error: cannot bind the socket\n"), "Error: cannot bind the socket");
        assert_eq!(exit_reason(""), "procd printed nothing");
        let output_only = r#"{"ts":"t","process":"start","pid":10,"stream":"stdout","data":"last words"}"#;
        assert_eq!(exit_reason(output_only), "procd exited without logging an error");
    }
}
