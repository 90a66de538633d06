//! Probes, evaluated periodically by procd itself. A probe call only reads the latest evaluated state, so it is
//! cheap and never waits on a slow check. A liveness probe within its initial delay passes; startup stops being
//! evaluated after its first success; readiness and liveness wait for startup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use warmpool_api::{ProbeCheckResult, ProbeKind, ProbeResult, ProbeSpec, ProbeStatus, WarmProcessSpec};

use crate::supervisor::{Event, Process, Supervisor};

#[derive(Debug, Clone)]
struct CheckState {
    status: ProbeStatus,
    reason: String,
    message: String,
    successes: u32,
    failures: u32,
}

/// One evaluation of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub passed: bool,
    pub reason: String,
    pub message: String,
}

impl Outcome {
    fn pass(reason: &str, message: impl Into<String>) -> Self {
        Outcome { passed: true, reason: reason.into(), message: message.into() }
    }
    fn fail(reason: &str, message: impl Into<String>) -> Self {
        Outcome { passed: false, reason: reason.into(), message: message.into() }
    }
}

/// The latest state of every probe, and the probe specs per warm process.
pub struct Probes {
    sup: Arc<Supervisor>,
    specs: Vec<(String, WarmProcessSpec)>,
    states: Mutex<HashMap<(String, ProbeKind), CheckState>>,
    http: reqwest::Client,
    changed: tokio::sync::Notify,
}

impl Probes {
    pub fn new(sup: Arc<Supervisor>, specs: Vec<(String, WarmProcessSpec)>) -> Arc<Probes> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(true)
            .build()
            .expect("http client");
        let mut states = HashMap::new();
        for (name, spec) in &specs {
            for kind in ProbeKind::ALL {
                if spec.probes.as_ref().and_then(|p| p.get(kind)).is_some() {
                    let (status, reason) = match kind {
                        ProbeKind::Liveness => (ProbeStatus::Passed, "initial_delay"),
                        _ => (ProbeStatus::Failed, "pending"),
                    };
                    let message = "not evaluated yet".to_string();
                    states.insert(
                        (name.clone(), kind),
                        CheckState { status, reason: reason.into(), message, successes: 0, failures: 0 },
                    );
                }
            }
        }
        Arc::new(Probes { sup, specs, states: Mutex::new(states), http, changed: tokio::sync::Notify::new() })
    }

    /// Completes at the next change of any probe state.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.sup.is_shutting_down()
    }

    fn spec(&self, name: &str, kind: ProbeKind) -> Option<&ProbeSpec> {
        self.specs.iter().find(|(n, _)| n == name).and_then(|(_, s)| s.probes.as_ref()?.get(kind))
    }

    fn state(&self, name: &str, kind: ProbeKind) -> Option<CheckState> {
        self.states.lock().expect("probe states").get(&(name.to_string(), kind)).cloned()
    }

    fn startup_passed(&self, name: &str) -> bool {
        self.state(name, ProbeKind::Startup).is_none_or(|s| s.status == ProbeStatus::Passed)
    }

    /// Starts one evaluation loop per configured probe of `process`.
    pub fn start(self: &Arc<Self>, process: Arc<Process>) {
        for kind in ProbeKind::ALL {
            if let Some(spec) = self.spec(&process.name, kind).cloned() {
                let probes = self.clone();
                let process = process.clone();
                tokio::spawn(async move { probes.run_loop(process, kind, spec).await });
            }
        }
    }

    async fn run_loop(self: Arc<Self>, process: Arc<Process>, kind: ProbeKind, spec: ProbeSpec) {
        tokio::time::sleep(Duration::from_millis(spec.initial_delay_ms.unwrap_or(0))).await;
        if kind != ProbeKind::Startup {
            while !self.startup_passed(&process.name) {
                let wait = self.changed.notified();
                if !process.running() {
                    return;
                }
                let _ = tokio::time::timeout(Duration::from_millis(100), wait).await;
            }
        }
        let mut period = Duration::from_millis(spec.period_ms(kind));
        loop {
            if !process.running() || self.sup.is_shutting_down() {
                return;
            }
            if self.sup.is_paused() {
                tokio::time::sleep(period).await;
                continue;
            }
            let outcome = self.evaluate(&process, &spec).await;
            let status = self.record(&process.name, kind, &spec, outcome);
            if kind == ProbeKind::Startup && status == ProbeStatus::Passed {
                return;
            }
            if kind == ProbeKind::Liveness && status == ProbeStatus::Failed {
                let message = self.state(&process.name, kind).map(|s| s.message).unwrap_or_default();
                let _ = self.sup.events().send(Event::LivenessFailed { name: process.name.clone(), message });
                return;
            }
            if status == ProbeStatus::Passed && spec.period_ms.is_none() {
                // The fast default period only serves to notice readiness quickly; a warm pool of idle sandboxes
                // should not spawn ten checks a second each.
                period = Duration::from_millis(warmpool_api::DEFAULT_LIVENESS_PERIOD_MS);
            }
            tokio::time::sleep(period).await;
        }
    }

    /// Applies thresholds: the status flips only after `success_threshold` / `failure_threshold` in a row.
    fn record(&self, name: &str, kind: ProbeKind, spec: &ProbeSpec, outcome: Outcome) -> ProbeStatus {
        let mut states = self.states.lock().expect("probe states");
        let state = states.entry((name.to_string(), kind)).or_insert_with(|| CheckState {
            status: ProbeStatus::Failed,
            reason: String::new(),
            message: String::new(),
            successes: 0,
            failures: 0,
        });
        if outcome.passed {
            state.successes = state.successes.saturating_add(1);
            state.failures = 0;
            if state.successes >= spec.success_threshold() {
                state.status = ProbeStatus::Passed;
            }
        } else {
            state.failures = state.failures.saturating_add(1);
            state.successes = 0;
            if state.failures >= spec.failure_threshold() {
                state.status = ProbeStatus::Failed;
            }
        }
        state.reason = outcome.reason;
        state.message = outcome.message;
        let status = state.status;
        drop(states);
        self.changed.notify_waiters();
        status
    }

    async fn evaluate(&self, process: &Process, spec: &ProbeSpec) -> Outcome {
        let timeout = Duration::from_millis(spec.timeout_ms());
        if spec.process.is_some() {
            return if process.running() {
                Outcome::pass("running", "process is running")
            } else {
                Outcome::fail("exited", "process exited")
            };
        }
        if let Some(exec) = &spec.exec {
            return match self
                .sup
                .exec_collect(&exec.command, process.cwd.as_ref(), &process.env, timeout)
                .await
            {
                Ok(o) if o.exit.timed_out => {
                    Outcome::fail("timeout", format!("{:?} timed out after {timeout:?}", exec.command))
                }
                Ok(o) if o.exit.exit_code == 0 => Outcome::pass("exit_code", "exit code 0"),
                Ok(o) => {
                    let stderr = String::from_utf8_lossy(&o.stderr);
                    let tail: String =
                        stderr.trim().chars().rev().take(200).collect::<Vec<_>>().into_iter().rev().collect();
                    let detail = if tail.is_empty() { String::new() } else { format!(": {tail}") };
                    Outcome::fail(
                        "exit_code",
                        format!("{:?} exited with code {}{detail}", exec.command, o.exit.exit_code),
                    )
                }
                Err(e) => Outcome::fail("exec_error", error_chain(&e)),
            };
        }
        if let Some(http) = &spec.http_get {
            let url = format!(
                "{}://{}:{}{}",
                http.scheme.as_deref().unwrap_or("http"),
                http.host.as_deref().unwrap_or("127.0.0.1"),
                http.port,
                http.path.as_deref().unwrap_or("/")
            );
            let mut req = self.http.get(&url).timeout(timeout);
            for (k, v) in http.headers.iter().flatten() {
                req = req.header(k, v);
            }
            return match req.send().await {
                Ok(r) if (200..400).contains(&r.status().as_u16()) => {
                    Outcome::pass("http_status", format!("GET {url}: {}", r.status()))
                }
                Ok(r) => Outcome::fail("http_status", format!("GET {url}: {}", r.status())),
                Err(e) if e.is_timeout() => {
                    Outcome::fail("timeout", format!("GET {url} timed out after {timeout:?}"))
                }
                Err(e) => Outcome::fail("connect", format!("GET {url}: {}", error_chain(&e))),
            };
        }
        if let Some(tcp) = &spec.tcp_socket {
            let addr = format!("{}:{}", tcp.host.as_deref().unwrap_or("127.0.0.1"), tcp.port);
            return match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => Outcome::pass("connected", format!("connected to {addr}")),
                Ok(Err(e)) => Outcome::fail("connect", format!("connect {addr}: {e}")),
                Err(_) => Outcome::fail("timeout", format!("connect {addr} timed out after {timeout:?}")),
            };
        }
        Outcome::fail("invalid_probe", "probe has no action")
    }

    /// The aggregated result of one kind: procd's own check first, then one per warm process; the first failed
    /// check decides.
    pub fn result(&self, kind: ProbeKind) -> ProbeResult {
        let mut checks = Vec::new();
        let shutting_down = self.sup.is_shutting_down();
        checks.push(ProbeCheckResult {
            name: "procd".into(),
            target: "procd".into(),
            status: if shutting_down { ProbeStatus::Failed } else { ProbeStatus::Passed },
            reason: if shutting_down { "shutting_down" } else { "serving" }.into(),
            message: if shutting_down { "procd is shutting down" } else { "procd is serving" }.into(),
        });
        let warm = self.sup.warm_processes();
        for (name, _) in &self.specs {
            let process = warm.iter().find(|p| &p.name == name);
            let target = self.spec(name, kind).map(describe).unwrap_or_else(|| "process".to_string());
            let (status, reason, message) = match process {
                None => {
                    (ProbeStatus::Failed, "not_started".into(), format!("process {name:?} has not started"))
                }
                Some(p) if !p.running() => (
                    ProbeStatus::Failed,
                    "exited".into(),
                    format!("process {name:?} exited with code {}", p.exit_code().unwrap_or(-1)),
                ),
                Some(_) if kind != ProbeKind::Startup && !self.startup_passed(name) => (
                    ProbeStatus::Failed,
                    "startup_pending".into(),
                    format!("startup probe of {name:?} has not passed yet"),
                ),
                Some(_) => match self.state(name, kind) {
                    Some(s) => (s.status, s.reason, s.message),
                    None => (ProbeStatus::Passed, "running".into(), format!("process {name:?} is running")),
                },
            };
            checks.push(ProbeCheckResult { name: name.clone(), target, status, reason, message });
        }
        if kind == ProbeKind::Readiness && self.specs.is_empty() {
            checks.push(ProbeCheckResult {
                name: "warm_processes".into(),
                target: "warm_processes".into(),
                status: ProbeStatus::Failed,
                reason: "no_warm_processes".into(),
                message: "no warm process is running".into(),
            });
        }
        let failed = checks.iter().find(|c| c.status == ProbeStatus::Failed).cloned();
        match failed {
            Some(f) => ProbeResult {
                kind,
                status: ProbeStatus::Failed,
                reason: f.reason,
                message: f.message,
                checks,
            },
            None if kind == ProbeKind::Liveness && self.sup.is_paused() => ProbeResult {
                kind,
                status: ProbeStatus::Suspended,
                reason: "paused".into(),
                message: "the sandbox is paused".into(),
                checks,
            },
            None => ProbeResult {
                kind,
                status: ProbeStatus::Passed,
                reason: "passed".into(),
                message: "all checks passed".into(),
                checks,
            },
        }
    }
}

fn describe(spec: &ProbeSpec) -> String {
    if let Some(e) = &spec.exec {
        return format!("exec: {}", e.command.join(" "));
    }
    if let Some(h) = &spec.http_get {
        return format!(
            "http_get: {}:{}{}",
            h.host.as_deref().unwrap_or("127.0.0.1"),
            h.port,
            h.path.as_deref().unwrap_or("/")
        );
    }
    if let Some(t) = &spec.tcp_socket {
        return format!("tcp_socket: {}:{}", t.host.as_deref().unwrap_or("127.0.0.1"), t.port);
    }
    "process".into()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
