//! Probes and warm processes: the specs a template carries and procd runs, their validation, and the
//! aggregated probe result procd reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{join_path, validate_name, FieldError};

/// A probe: exactly one of `process`, `exec`, `http_get`, `tcp_socket`, plus timing.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 86400000)]
    pub initial_delay_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 86400000)]
    pub period_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 86400000)]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_threshold: Option<u32>,
}

/// Passes while the process runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessCheck {}

/// Passes when the command exits 0. Runs with the warm process's `cwd` and `env`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    pub command: Vec<String>,
}

/// Passes on an HTTP status from 200 to 399.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpGetCheck {
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `http` (default) or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<BTreeMap<String, String>>,
}

/// Passes when a TCP connection opens.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpSocketCheck {
    #[schema(minimum = 1, maximum = 65535)]
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

/// Defaults, chosen for warm pools where start latency matters: startup and readiness are checked every 100 ms
/// (procd slows readiness to once a second after it has passed), liveness every second; each check may take a
/// second; three failures in a row fail a probe.
pub const DEFAULT_FAST_PERIOD_MS: u64 = 100;
pub const DEFAULT_LIVENESS_PERIOD_MS: u64 = 1000;
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
pub const DEFAULT_FAILURE_THRESHOLD: u32 = 3;
pub const DEFAULT_SUCCESS_THRESHOLD: u32 = 1;

impl ProbeSpec {
    pub fn period_ms(&self, kind: ProbeKind) -> u64 {
        self.period_ms.unwrap_or(match kind {
            ProbeKind::Liveness => DEFAULT_LIVENESS_PERIOD_MS,
            _ => DEFAULT_FAST_PERIOD_MS,
        })
    }
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS)
    }
    pub fn failure_threshold(&self) -> u32 {
        self.failure_threshold.unwrap_or(DEFAULT_FAILURE_THRESHOLD)
    }
    pub fn success_threshold(&self) -> u32 {
        self.success_threshold.unwrap_or(DEFAULT_SUCCESS_THRESHOLD)
    }

    /// Checks that exactly one action is set and that numbers are in range; `path` names the probe.
    pub fn validate(&self, path: &str) -> Result<(), FieldError> {
        let actions =
            [self.process.is_some(), self.exec.is_some(), self.http_get.is_some(), self.tcp_socket.is_some()];
        let set = actions.iter().filter(|a| **a).count();
        if set != 1 {
            return Err(FieldError::new(
                path,
                format!("must set exactly one of process, exec, http_get, tcp_socket ({set} set)"),
            ));
        }
        if let Some(exec) = &self.exec {
            if exec.command.is_empty() || exec.command[0].is_empty() {
                return Err(FieldError::new(join_path(path, "exec.command"), "must not be empty"));
            }
        }
        if let Some(http) = &self.http_get {
            if http.port == 0 {
                return Err(FieldError::new(join_path(path, "http_get.port"), "must be 1-65535"));
            }
            if let Some(scheme) = &http.scheme {
                if scheme != "http" && scheme != "https" {
                    return Err(FieldError::new(
                        join_path(path, "http_get.scheme"),
                        format!("must be \"http\" or \"https\" (got {scheme:?})"),
                    ));
                }
            }
            if let Some(p) = &http.path {
                if !p.starts_with('/') {
                    return Err(FieldError::new(join_path(path, "http_get.path"), "must start with '/'"));
                }
            }
        }
        if let Some(tcp) = &self.tcp_socket {
            if tcp.port == 0 {
                return Err(FieldError::new(join_path(path, "tcp_socket.port"), "must be 1-65535"));
            }
        }
        for (name, value, zero_ok) in [
            ("initial_delay_ms", self.initial_delay_ms, true),
            ("period_ms", self.period_ms, false),
            ("timeout_ms", self.timeout_ms, false),
        ] {
            let message = match value {
                Some(0) if !zero_ok => "must be greater than 0".to_string(),
                Some(v) if v > crate::PROBE_MS_MAX => format!("must be at most {}", crate::PROBE_MS_MAX),
                _ => continue,
            };
            return Err(FieldError::new(join_path(path, name), message));
        }
        for (name, value) in
            [("failure_threshold", self.failure_threshold), ("success_threshold", self.success_threshold)]
        {
            if value == Some(0) {
                return Err(FieldError::new(join_path(path, name), "must be at least 1"));
            }
        }
        Ok(())
    }
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    Startup,
    Readiness,
    Liveness,
}

impl ProbeKind {
    pub const ALL: [ProbeKind; 3] = [ProbeKind::Startup, ProbeKind::Readiness, ProbeKind::Liveness];

    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "startup",
            ProbeKind::Readiness => "readiness",
            ProbeKind::Liveness => "liveness",
        }
    }
}

impl std::str::FromStr for ProbeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "startup" => Ok(ProbeKind::Startup),
            "readiness" => Ok(ProbeKind::Readiness),
            "liveness" => Ok(ProbeKind::Liveness),
            other => Err(format!("unknown probe kind {other:?}: expected startup, readiness or liveness")),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProcessType {
    #[default]
    Cmd,
    Repl,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplLanguage {
    Python,
    Node,
    Bash,
}

impl ReplLanguage {
    /// The interactive interpreter procd starts for this language.
    pub fn command(self) -> Vec<String> {
        let argv: &[&str] = match self {
            ReplLanguage::Python => &["python3", "-i", "-u"],
            ReplLanguage::Node => &["node", "--interactive"],
            ReplLanguage::Bash => &["bash", "--noprofile", "--norc", "-i"],
        };
        argv.iter().map(|s| s.to_string()).collect()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeSet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<ProbeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<ProbeSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<ProbeSpec>,
}

impl ProbeSet {
    pub fn get(&self, kind: ProbeKind) -> Option<&ProbeSpec> {
        match kind {
            ProbeKind::Startup => self.startup.as_ref(),
            ProbeKind::Readiness => self.readiness.as_ref(),
            ProbeKind::Liveness => self.liveness.as_ref(),
        }
    }
}

/// A process procd starts with the sandbox and keeps running; its exit ends the sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmProcessSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "type", default)]
    pub process_type: ProcessType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// argv of a `cmd` process; rejected for `repl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Interpreter of a `repl` process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<ReplLanguage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<ProbeSet>,
}

impl WarmProcessSpec {
    /// The name procd reports: `name`, else `process-<index>`.
    pub fn effective_name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("process-{index}"))
    }

    /// The argv procd runs.
    pub fn argv(&self) -> Vec<String> {
        match self.process_type {
            ProcessType::Cmd => self.command.clone().unwrap_or_default(),
            ProcessType::Repl => self.language.map(ReplLanguage::command).unwrap_or_default(),
        }
    }
}

/// Paths a warm process may not use as its working directory: procd's own configuration and binaries.
pub const RESERVED_PATHS: [&str; 2] = ["/config", "/procd/bin"];

/// `cwd` must be absolute, normalized (no `.`/`..` components, no `//`, no trailing `/`), not `/`, and not a
/// reserved path or below one. `/a..b` is a fine name.
pub fn validate_cwd(field: &str, cwd: &str) -> Result<(), FieldError> {
    if !cwd.starts_with('/') {
        return Err(FieldError::new(field, format!("must be an absolute path (got {cwd:?})")));
    }
    if cwd == "/" {
        return Err(FieldError::new(field, "must not be \"/\""));
    }
    if cwd.ends_with('/') || cwd[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(FieldError::new(field, format!("must be a normalized path (got {cwd:?})")));
    }
    if cwd.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL"));
    }
    for reserved in RESERVED_PATHS {
        if cwd == reserved || cwd.strip_prefix(reserved).is_some_and(|rest| rest.starts_with('/')) {
            return Err(FieldError::new(field, format!("uses reserved path {reserved:?}")));
        }
    }
    Ok(())
}

/// Paths a volume may not be mounted at, besides `/` and [`RESERVED_PATHS`]: the kernel's interfaces and the
/// directory of procd's socket. Mounting over them would hide what the sandbox's isolation relies on.
pub const RESERVED_MOUNT_PATHS: [&str; 4] = ["/proc", "/dev", "/sys", "/run/warmpool"];

/// A volume's `mount_path`: the `cwd` rules (absolute, normalized, not `/`, not `/config` or `/procd/bin`) and not
/// [`RESERVED_MOUNT_PATHS`] or below them, nor a parent of any reserved path.
pub fn validate_mount_path(field: &str, path: &str) -> Result<(), FieldError> {
    validate_cwd(field, path)?;
    let below = |a: &str, b: &str| a.strip_prefix(b).is_some_and(|rest| rest.starts_with('/'));
    for reserved in RESERVED_MOUNT_PATHS {
        if path == reserved || below(path, reserved) {
            return Err(FieldError::new(field, format!("uses reserved path {reserved:?}")));
        }
    }
    // A volume over a parent of a reserved path (`/procd`, `/run`) would hide or replace what is there.
    for reserved in RESERVED_MOUNT_PATHS.iter().chain(&RESERVED_PATHS) {
        if below(reserved, path) {
            return Err(FieldError::new(field, format!("would cover reserved path {reserved:?}")));
        }
    }
    Ok(())
}

/// Validates a list of warm processes as `<path>[i]…`: names unique, `command` only and always for `cmd`,
/// `language` only and always for `repl`, `cwd` rules, probes.
pub fn validate_warm_processes(path: &str, processes: &[WarmProcessSpec]) -> Result<(), FieldError> {
    let mut names = std::collections::BTreeSet::new();
    for (i, p) in processes.iter().enumerate() {
        let at = |f: &str| format!("{path}[{i}].{f}");
        if let Some(name) = &p.name {
            validate_name(&at("name"), name)?;
        }
        if !names.insert(p.effective_name(i)) {
            return Err(FieldError::new(at("name"), format!("duplicate name {:?}", p.effective_name(i))));
        }
        match p.process_type {
            ProcessType::Cmd => {
                if p.language.is_some() {
                    return Err(FieldError::new(at("language"), "is only allowed for type \"repl\""));
                }
                match &p.command {
                    Some(c) if !c.is_empty() && !c[0].is_empty() => {}
                    _ => return Err(FieldError::new(at("command"), "is required for type \"cmd\"")),
                }
            }
            ProcessType::Repl => {
                if p.command.is_some() {
                    return Err(FieldError::new(at("command"), "is not allowed for type \"repl\""));
                }
                if p.language.is_none() {
                    return Err(FieldError::new(
                        at("language"),
                        "is required for type \"repl\" (python, node or bash)",
                    ));
                }
            }
        }
        if let Some(cwd) = &p.cwd {
            validate_cwd(&at("cwd"), cwd)?;
        }
        for key in p.env.keys() {
            validate_env_key(&at(&format!("env.{key}")), key)?;
        }
        if let Some(probes) = &p.probes {
            for kind in ProbeKind::ALL {
                if let Some(probe) = probes.get(kind) {
                    probe.validate(&at(&format!("probes.{}", kind.as_str())))?;
                }
            }
        }
    }
    Ok(())
}

/// Environment variable names: non-empty, no `=` or NUL.
pub fn validate_env_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.contains('=') || key.contains('\0') {
        return Err(FieldError::new(field, "is not a valid environment variable name"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProbeStatus {
    Passed,
    Failed,
    Suspended,
}

impl ProbeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeStatus::Passed => "passed",
            ProbeStatus::Failed => "failed",
            ProbeStatus::Suspended => "suspended",
        }
    }
}

/// One check of an aggregated probe result: procd itself first, then one per warm process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ProbeCheckResult {
    pub name: String,
    pub target: String,
    pub status: ProbeStatus,
    pub reason: String,
    pub message: String,
}

/// The aggregated result of one probe kind; the first failed check decides `status`, `reason` and `message`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ProbeResult {
    pub kind: ProbeKind,
    pub status: ProbeStatus,
    pub reason: String,
    pub message: String,
    pub checks: Vec<ProbeCheckResult>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cwd_rules() {
        for ok in ["/app", "/a..b", "/srv/app/x", "/configs", "/procd/binaries", "/procd"] {
            assert!(validate_cwd("cwd", ok).is_ok(), "{ok}");
        }
        for bad in ["app", "/", "/app/", "/a/../b", "/a/./b", "//a", "/config", "/config/x", "/procd/bin/y"] {
            assert!(validate_cwd("cwd", bad).is_err(), "{bad}");
        }
        let err = validate_cwd("warm_processes[1].cwd", "/config").unwrap_err();
        assert_eq!(err.to_string(), "warm_processes[1].cwd uses reserved path \"/config\"");
    }

    #[test]
    fn repl_with_command_is_rejected_by_path() {
        let procs = vec![
            WarmProcessSpec { command: Some(vec!["sleep".into(), "1".into()]), ..Default::default() },
            WarmProcessSpec {
                process_type: ProcessType::Repl,
                language: Some(ReplLanguage::Python),
                command: Some(vec!["python".into()]),
                ..Default::default()
            },
        ];
        let err = validate_warm_processes("warm_processes", &procs).unwrap_err();
        assert_eq!(err.field, "warm_processes[1].command");
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let p = WarmProcessSpec {
            name: Some("a".into()),
            command: Some(vec!["true".into()]),
            ..Default::default()
        };
        let err = validate_warm_processes("warm_processes", &[p.clone(), p]).unwrap_err();
        assert_eq!(err.field, "warm_processes[1].name");
    }

    #[test]
    fn probe_needs_exactly_one_action() {
        assert!(ProbeSpec::default().validate("readiness").is_err());
        let both = ProbeSpec {
            process: Some(ProcessCheck {}),
            tcp_socket: Some(TcpSocketCheck { port: 1, host: None }),
            ..Default::default()
        };
        assert_eq!(both.validate("readiness").unwrap_err().field, "readiness");
        let unknown: Result<ProbeSpec, _> = serde_json::from_str(r#"{"process": {}, "perod_ms": 5}"#);
        assert!(unknown.unwrap_err().to_string().contains("perod_ms"));
    }

    proptest! {
        /// Any path with a `..` or `.` component, or below a reserved path, is rejected; any path built from plain
        /// components outside the reserved ones is accepted.
        #[test]
        fn cwd_property(parts in proptest::collection::vec("[a-z.]{1,6}", 1..5)) {
            let path = format!("/{}", parts.join("/"));
            let has_dot_component = parts.iter().any(|p| p == "." || p == "..");
            let reserved = parts[0] == "config";
            prop_assert_eq!(validate_cwd("cwd", &path).is_ok(), !has_dot_component && !reserved);
        }

        #[test]
        fn probe_config_parsing_never_panics(json in "\\PC{0,64}") {
            if let Ok(p) = serde_json::from_str::<ProbeSpec>(&json) {
                let _ = p.validate("p");
            }
        }
    }
}
