//! The simulated runtime: sandboxes in memory, with scripted start times, failures, readiness flaps and crashes,
//! so the domain (checkouts, the reconciler, rollouts, leases, the breaker, recovery) is tested in milliseconds
//! without root. It is never a `--runtime` of `warmpool serve`; the real runtimes keep their own end-to-end suites.
//!
//! What a sandbox does is its template's [`Script`] (by template name, else the default script). Tests act on live
//! sandboxes with [`SimRuntime::crash`] and [`SimRuntime::set_ready`], and read what happened from
//! [`SimRuntime::stats`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use warmpool_api::{
    BuildId, ExecRequest, ExecResult, LogLine, ProbeKind, ProbeResult, ProbeStatus, TemplateSpec,
};

use super::{Runtime, RuntimeError, RuntimeHandle, StartSpec};

/// What the sandboxes of one template do.
#[derive(Debug, Clone)]
pub struct Script {
    /// How long `start` itself takes (the container and procd coming up).
    pub start_takes: Duration,
    /// `start` fails with this message (the start contract's infrastructure failing).
    pub start_fails: Option<String>,
    /// Time from `start` to readiness passing; None: readiness never passes.
    pub ready_after: Option<Duration>,
    /// procd exits this long after readiness passed (a warm process dying, an OOM kill).
    pub crash_after: Option<Duration>,
    /// The build's steps fail with this message.
    pub build_fails: Option<String>,
}

impl Default for Script {
    fn default() -> Script {
        Script {
            start_takes: Duration::ZERO,
            start_fails: None,
            ready_after: Some(Duration::from_millis(5)),
            crash_after: None,
            build_fails: None,
        }
    }
}

/// Counts of what the runtime did, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub started: usize,
    pub destroyed: usize,
    pub crashed: usize,
    pub live: usize,
    /// The most sandboxes that were live at once.
    pub peak_live: usize,
}

struct Sandbox {
    ready: watch::Sender<ProbeStatus>,
    /// The task playing the script (readiness, then a crash); aborted when the sandbox goes.
    script: tokio::task::AbortHandle,
}

pub struct SimRuntime {
    scripts: Mutex<HashMap<String, Script>>,
    default: Mutex<Script>,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    stats: Mutex<Stats>,
    capacity: usize,
    exits: Mutex<mpsc::UnboundedSender<String>>,
    /// Itself, for the tasks that play scripts (a scripted crash is a real one).
    me: std::sync::Weak<SimRuntime>,
}

impl SimRuntime {
    /// A runtime that holds at most `capacity` sandboxes and reports procd exits on `exits`.
    pub fn new(capacity: usize, exits: mpsc::UnboundedSender<String>) -> Arc<SimRuntime> {
        Arc::new_cyclic(|me| SimRuntime {
            scripts: Mutex::default(),
            default: Mutex::default(),
            sandboxes: Mutex::default(),
            stats: Mutex::default(),
            capacity,
            exits: Mutex::new(exits),
            me: me.clone(),
        })
    }

    /// Reports procd exits on `exits` from now on (a restarted control plane taking over the sandboxes).
    pub fn report_exits_to(&self, exits: mpsc::UnboundedSender<String>) {
        *self.exits.lock().expect("sim") = exits;
    }

    /// What sandboxes of templates without a script of their own do from now on.
    pub fn set_default(&self, script: Script) {
        *self.default.lock().expect("sim") = script;
    }

    /// What sandboxes of the template named `template` do from now on.
    pub fn script(&self, template: &str, script: Script) {
        self.scripts.lock().expect("sim").insert(template.to_string(), script);
    }

    fn script_of(&self, spec: &TemplateSpec) -> Script {
        let scripts = self.scripts.lock().expect("sim");
        scripts.get(&spec.name).cloned().unwrap_or_else(|| self.default.lock().expect("sim").clone())
    }

    pub fn stats(&self) -> Stats {
        *self.stats.lock().expect("sim")
    }

    /// Ids of the live sandboxes (builds' start-contract runs included).
    pub fn live(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sandboxes.lock().expect("sim").keys().cloned().collect();
        ids.sort();
        ids
    }

    /// procd of sandbox `id` exits, as a crash would: the runtime reports it and readiness watches end.
    pub fn crash(&self, id: &str) -> bool {
        let Some(sandbox) = self.sandboxes.lock().expect("sim").remove(id) else { return false };
        sandbox.script.abort();
        let mut stats = self.stats.lock().expect("sim");
        stats.crashed += 1;
        stats.live -= 1;
        drop(stats);
        let _ = self.exits.lock().expect("sim").send(id.to_string());
        true
    }

    /// Sandbox `id`'s readiness starts passing or failing (a flap).
    pub fn set_ready(&self, id: &str, passed: bool) -> bool {
        let sandboxes = self.sandboxes.lock().expect("sim");
        let Some(sandbox) = sandboxes.get(id) else { return false };
        sandbox.ready.send_replace(if passed { ProbeStatus::Passed } else { ProbeStatus::Failed });
        true
    }

    fn readiness(&self, id: &str) -> Option<watch::Receiver<ProbeStatus>> {
        self.sandboxes.lock().expect("sim").get(id).map(|s| s.ready.subscribe())
    }

    async fn launch(&self, spec: &StartSpec) -> Result<RuntimeHandle, RuntimeError> {
        let script = self.script_of(&spec.spec);
        tokio::time::sleep(script.start_takes).await;
        if let Some(message) = script.start_fails {
            return Err(RuntimeError::Failed(message));
        }
        let id = spec.subject.id().to_string();
        let (ready, _) = watch::channel(ProbeStatus::Failed);
        let signal = ready.clone();
        let me = self.me.clone();
        let task = tokio::spawn({
            let id = id.clone();
            async move {
                let Some(after) = script.ready_after else { return };
                tokio::time::sleep(after).await;
                signal.send_replace(ProbeStatus::Passed);
                if let Some(after) = script.crash_after {
                    tokio::time::sleep(after).await;
                    if let Some(sim) = me.upgrade() {
                        // Not from this task's own handle: `crash` aborts it.
                        tokio::spawn(async move { sim.crash(&id) });
                    }
                }
            }
        });
        let mut sandboxes = self.sandboxes.lock().expect("sim");
        if sandboxes.len() >= self.capacity {
            task.abort();
            return Err(RuntimeError::NoCapacity(self.capacity));
        }
        if let Some(old) = sandboxes.insert(id.clone(), Sandbox { ready, script: task.abort_handle() }) {
            old.script.abort();
        }
        let mut stats = self.stats.lock().expect("sim");
        stats.started += 1;
        stats.live = sandboxes.len();
        stats.peak_live = stats.peak_live.max(stats.live);
        Ok(RuntimeHandle {
            id: id.clone(),
            dir: format!("sim/{id}"),
            has_warm_processes: spec.spec.start_cmd.is_some() || !spec.spec.warm_processes.is_empty(),
            ..Default::default()
        })
    }

    fn remove(&self, id: &str) {
        let mut sandboxes = self.sandboxes.lock().expect("sim");
        if let Some(sandbox) = sandboxes.remove(id) {
            sandbox.script.abort();
            let mut stats = self.stats.lock().expect("sim");
            stats.destroyed += 1;
            stats.live = sandboxes.len();
        }
    }
}

#[async_trait::async_trait]
impl Runtime for SimRuntime {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn details(&self) -> serde_json::Value {
        serde_json::json!({"runtime": "sim", "capacity": self.capacity})
    }

    async fn run_build_steps(
        &self,
        _build_id: &BuildId,
        spec: &TemplateSpec,
        log: &std::path::Path,
    ) -> Result<(), RuntimeError> {
        let steps = spec.build.steps.join("\n");
        tokio::fs::write(log, format!("{steps}\n"))
            .await
            .map_err(RuntimeError::io("writing the build log"))?;
        match self.script_of(spec).build_fails {
            Some(message) => Err(RuntimeError::Failed(message)),
            None => Ok(()),
        }
    }

    async fn seal_artifact(&self, _build_id: &BuildId) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn remove_artifact(&self, _build_id: &BuildId) {}

    async fn start(&self, spec: StartSpec) -> Result<RuntimeHandle, RuntimeError> {
        self.launch(&spec).await
    }

    async fn wait_ready(&self, handle: &RuntimeHandle, timeout: Duration) -> Result<(), RuntimeError> {
        let Some(mut ready) = self.readiness(&handle.id) else {
            return Err(RuntimeError::Exited("procd exited (simulated crash)".into()));
        };
        let passed = tokio::time::timeout(timeout, ready.wait_for(|s| *s == ProbeStatus::Passed)).await;
        match passed {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(RuntimeError::Exited("procd exited (simulated crash)".into())),
            Err(_) => Err(RuntimeError::NotReady(format!("readiness did not pass within {timeout:?}"))),
        }
    }

    async fn stop_build(&self, handle: &RuntimeHandle) {
        self.remove(&handle.id);
    }

    async fn destroy(&self, id: &str, _handle: Option<&RuntimeHandle>) -> Result<(), RuntimeError> {
        self.remove(id);
        Ok(())
    }

    /// Runs nothing: answers the command line on stdout with exit code 0 (a sandbox that is gone is unreachable).
    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
        _base_cwd: Option<&str>,
        _env: BTreeMap<String, String>,
    ) -> Result<ExecResult, RuntimeError> {
        if !self.is_alive(handle) {
            return Err(RuntimeError::Unreachable("procd exited (simulated crash)".into()));
        }
        Ok(ExecResult {
            exit_code: 0,
            stdout: format!("{}\n", req.command.join(" ")),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            duration_ms: 0,
            timed_out: false,
        })
    }

    async fn probe(&self, handle: &RuntimeHandle, kind: ProbeKind) -> Result<ProbeResult, RuntimeError> {
        let Some(ready) = self.readiness(&handle.id) else {
            return Err(RuntimeError::Unreachable("procd exited (simulated crash)".into()));
        };
        let status = match kind {
            ProbeKind::Readiness => *ready.borrow(),
            _ => ProbeStatus::Passed,
        };
        Ok(ProbeResult {
            kind,
            status,
            reason: String::new(),
            message: "simulated".into(),
            checks: Vec::new(),
        })
    }

    async fn watch_readiness(
        &self,
        handle: &RuntimeHandle,
    ) -> Result<BoxStream<'static, ProbeStatus>, RuntimeError> {
        let Some(ready) = self.readiness(&handle.id) else {
            return Err(RuntimeError::Unreachable("procd exited (simulated crash)".into()));
        };
        // The status now, then every change, until the sandbox goes (its sender is dropped).
        let changes = futures::stream::unfold((ready, true), |(mut ready, first)| async move {
            if !first && ready.changed().await.is_err() {
                return None;
            }
            let status = *ready.borrow_and_update();
            Some((status, (ready, false)))
        });
        Ok(changes.boxed())
    }

    async fn pause(&self, _handle: &RuntimeHandle, _paused: bool) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn logs(&self, _handle: &RuntimeHandle, _lines: usize) -> BoxStream<'static, LogLine> {
        futures::stream::empty().boxed()
    }

    async fn log_tail(&self, _handle: &RuntimeHandle, _bytes: usize) -> String {
        String::new()
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        self.sandboxes.lock().expect("sim").contains_key(&handle.id)
    }

    fn adopt(&self, _id: &str, handle: &RuntimeHandle) -> bool {
        self.is_alive(handle)
    }

    fn list_sandboxes(&self) -> Vec<String> {
        self.live()
    }

    fn free_capacity(&self, running: usize) -> usize {
        self.capacity.saturating_sub(running)
    }
}
