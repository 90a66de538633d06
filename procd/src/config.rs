//! procd's configuration: the config file or `WARMPOOL_WARM_PROCESSES`, the listen address, the sandbox token, and
//! the log-mirror settings from the environment. Everything is validated before anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use warmpool_api::{validate_warm_processes, FieldError, WarmProcessSpec};

/// The file form of the configuration (`procd --config FILE`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub warm_processes: Vec<WarmProcessSpec>,
    /// The template's settings for procd itself (the log-mirror variables, [`LOG_VARIABLES`]): the template is where
    /// users set them, and they win over procd's own environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
}

/// The variables that shape the log mirror, in both spellings.
pub const LOG_VARIABLES: [&str; 4] = [
    "WARMPOOL_PROCESS_LOGS",
    "WARMPOOL_PROCESS_LOG_MAX_BYTES",
    "SANDBOX0_PROCESS_LOGS",
    "SANDBOX0_PROCESS_LOG_MAX_BYTES",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// A listening Unix socket inherited as this descriptor (`fd://3`): the local runtime creates the socket in a
    /// directory the sandbox cannot see, so nothing inside can replace or redirect it.
    Fd(i32),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix://{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp://{a}"),
            Listen::Fd(fd) => write!(f, "fd://{fd}"),
        }
    }
}

/// Parses `unix:///path/procd.sock`, `tcp://host:port` or `fd://N` (an inherited listening socket, N ≥ 3: 0 to 2
/// are stdin, stdout and stderr).
pub fn parse_listen(field: &str, value: &str) -> Result<Listen, FieldError> {
    if let Some(fd) = value.strip_prefix("fd://") {
        return match fd.parse::<i32>() {
            Ok(n) if n >= 3 => Ok(Listen::Fd(n)),
            _ => Err(FieldError::new(field, format!("{fd:?} is not a descriptor number of 3 or more"))),
        };
    }
    if let Some(path) = value.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(FieldError::new(field, format!("unix socket path must be absolute (got {value:?})")));
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = value.strip_prefix("tcp://") {
        return addr
            .parse()
            .map(Listen::Tcp)
            .map_err(|_| FieldError::new(field, format!("{addr:?} is not a host:port address")));
    }
    Err(FieldError::new(field, format!("must start with unix://, tcp:// or fd:// (got {value:?})")))
}

/// Whether and how output is mirrored as JSON lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub enabled: bool,
    pub max_bytes: usize,
    /// Problems with the variables, reported once procd's logging is up.
    pub warnings: Vec<String>,
}

pub const DEFAULT_LOG_MAX_BYTES: usize = 4096;
/// The largest `data` of a mirrored line: procd buffers a line up to it, and escaped as JSON (at most 6 bytes for
/// one) it stays within the 64 KiB line the server's log readers take.
pub const LOG_MAX_BYTES_LIMIT: usize = 10 * 1024;

impl LogSettings {
    /// Reads `WARMPOOL_PROCESS_LOGS` / `WARMPOOL_PROCESS_LOG_MAX_BYTES` (or their `SANDBOX0_` spellings) through
    /// `get`, so tests need not touch the process environment.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> LogSettings {
        let lookup = |suffix: &str| {
            get(&format!("WARMPOOL_{suffix}"))
                .map(|v| (format!("WARMPOOL_{suffix}"), v))
                .or_else(|| get(&format!("SANDBOX0_{suffix}")).map(|v| (format!("SANDBOX0_{suffix}"), v)))
        };
        let mut warnings = Vec::new();
        let enabled = match lookup("PROCESS_LOGS") {
            None => true,
            Some((name, v)) => match v.trim().to_ascii_lowercase().as_str() {
                "false" | "0" | "no" | "off" => false,
                "true" | "1" | "yes" | "on" | "" => true,
                _ => {
                    warnings.push(format!("{name}={v:?} is not a boolean; the log mirror stays on"));
                    true
                }
            },
        };
        let max_bytes = match lookup("PROCESS_LOG_MAX_BYTES") {
            None => DEFAULT_LOG_MAX_BYTES,
            Some((name, v)) => match v.trim().parse::<i64>() {
                Ok(n) if n > LOG_MAX_BYTES_LIMIT as i64 => {
                    warnings.push(format!(
                        "{name}={v:?} is over {LOG_MAX_BYTES_LIMIT}; using {LOG_MAX_BYTES_LIMIT}"
                    ));
                    LOG_MAX_BYTES_LIMIT
                }
                Ok(n) if n > 0 => n as usize,
                _ => {
                    warnings.push(format!(
                        "{name}={v:?} is not a positive number of bytes; using {DEFAULT_LOG_MAX_BYTES}"
                    ));
                    DEFAULT_LOG_MAX_BYTES
                }
            },
        };
        LogSettings { enabled, max_bytes, warnings }
    }
}

/// Everything procd needs to start, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: Listen,
    pub token: Option<String>,
    pub warm_processes: Vec<WarmProcessSpec>,
    pub logs: LogSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(#[from] FieldError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{source_name} is not valid JSON: {message}")]
    Json { source_name: String, message: String },
}

/// The inputs of [`load`], as the command line and environment give them.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub token_file: Option<PathBuf>,
    /// `WARMPOOL_WARM_PROCESSES`.
    pub warm_processes_env: Option<String>,
    /// `WARMPOOL_PROCD_TOKEN`.
    pub token_env: Option<String>,
}

/// Reads the configuration; `env` is procd's environment (the log-mirror settings are read from it and from the
/// config file's `env`).
pub fn load(inputs: Inputs, env: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
    let mut file = match &inputs.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            parse_json::<ConfigFile>(&path.display().to_string(), &text)?
        }
        None => ConfigFile::default(),
    };
    if let Some(json) = &inputs.warm_processes_env {
        if inputs.config.is_none() || file.warm_processes.is_empty() {
            file.warm_processes = parse_json("WARMPOOL_WARM_PROCESSES", json)?;
        }
    }
    let listen_text = inputs.listen.clone().or(file.listen.clone()).ok_or_else(|| {
        FieldError::new("listen", "is required (--listen or \"listen\" in the config file)")
    })?;
    let listen = parse_listen("listen", &listen_text)?;
    let token = match inputs.token_file.as_ref().or(file.token_file.as_ref()) {
        Some(path) => Some(read_token(path)?),
        None => inputs.token_env.clone().filter(|t| !t.is_empty()),
    };
    if token.is_none() && matches!(listen, Listen::Tcp(_)) {
        return Err(FieldError::new(
            "listen",
            "a TCP listener needs a token (token_file or WARMPOOL_PROCD_TOKEN)",
        )
        .into());
    }
    validate_warm_processes("warm_processes", &file.warm_processes)?;
    // A setting the template gives (in either spelling) wins over procd's environment.
    let in_file = |suffix: &str| {
        ["WARMPOOL_", "SANDBOX0_"].iter().any(|p| file.env.contains_key(&format!("{p}{suffix}")))
    };
    let logs = LogSettings::from_env(|k| {
        let suffix = k.split_once('_').map_or(k, |(_, s)| s);
        if in_file(suffix) {
            file.env.get(k).cloned()
        } else {
            env(k)
        }
    });
    Ok(Settings { listen, token, warm_processes: file.warm_processes, logs })
}

fn read_token(path: &Path) -> Result<String, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let token = text.trim().to_string();
    if token.is_empty() {
        return Err(FieldError::new("token_file", format!("{} is empty", path.display())).into());
    }
    Ok(token)
}

fn parse_json<T: serde::de::DeserializeOwned>(source_name: &str, text: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text)
        .map_err(|e| ConfigError::Json { source_name: source_name.into(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> =
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_config_files_env_sets_the_log_mirror_over_procds_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("procd.json");
        let config = r#"{"listen": "unix:///tmp/p.sock", "env": {"SANDBOX0_PROCESS_LOGS": "false",
            "SANDBOX0_PROCESS_LOG_MAX_BYTES": "10"}}"#;
        std::fs::write(&path, config).unwrap();
        let inputs = Inputs { config: Some(path), ..Default::default() };
        let settings = load(inputs, env(&[("WARMPOOL_PROCESS_LOG_MAX_BYTES", "99")])).unwrap();
        assert!(!settings.logs.enabled);
        assert_eq!(settings.logs.max_bytes, 10);
    }

    #[test]
    fn log_settings() {
        assert_eq!(LogSettings::from_env(env(&[])).max_bytes, 4096);
        assert!(!LogSettings::from_env(env(&[("WARMPOOL_PROCESS_LOGS", "false")])).enabled);
        assert!(!LogSettings::from_env(env(&[("SANDBOX0_PROCESS_LOGS", "false")])).enabled);
        assert_eq!(LogSettings::from_env(env(&[("SANDBOX0_PROCESS_LOG_MAX_BYTES", "10")])).max_bytes, 10);
        let bad = LogSettings::from_env(env(&[("WARMPOOL_PROCESS_LOG_MAX_BYTES", "-3")]));
        assert_eq!(bad.max_bytes, 4096);
        assert_eq!(bad.warnings.len(), 1);
        let huge = LogSettings::from_env(env(&[("WARMPOOL_PROCESS_LOG_MAX_BYTES", "9223372036854775807")]));
        assert_eq!((huge.max_bytes, huge.warnings.len()), (LOG_MAX_BYTES_LIMIT, 1));
        let zero = LogSettings::from_env(env(&[("WARMPOOL_PROCESS_LOG_MAX_BYTES", "0")]));
        assert_eq!(zero.max_bytes, 4096);
    }

    #[test]
    fn listen_forms() {
        assert_eq!(parse_listen("listen", "unix:///tmp/p.sock").unwrap(), Listen::Unix("/tmp/p.sock".into()));
        assert!(matches!(parse_listen("listen", "tcp://127.0.0.1:7071").unwrap(), Listen::Tcp(_)));
        assert!(parse_listen("listen", "unix://rel.sock").is_err());
        assert!(parse_listen("listen", "http://x").is_err());
        assert_eq!(parse_listen("listen", "fd://3").unwrap(), Listen::Fd(3));
        assert_eq!(Listen::Fd(3).to_string(), "fd://3");
        for stdio_or_junk in ["fd://0", "fd://2", "fd://-1", "fd://x", "fd://"] {
            assert!(parse_listen("listen", stdio_or_junk).is_err(), "{stdio_or_junk}");
        }
    }

    #[test]
    fn tcp_without_token_is_rejected() {
        let inputs = Inputs { listen: Some("tcp://127.0.0.1:0".into()), ..Default::default() };
        let err = load(inputs, env(&[])).unwrap_err();
        assert!(err.to_string().starts_with("listen "), "{err}");
    }

    #[test]
    fn reserved_cwd_names_the_field() {
        let inputs = Inputs {
            listen: Some("unix:///tmp/x.sock".into()),
            warm_processes_env: Some(
                r#"[{"type":"cmd","command":["true"]},{"type":"cmd","command":["true"],"cwd":"/config"}]"#
                    .into(),
            ),
            ..Default::default()
        };
        let err = load(inputs, env(&[])).unwrap_err();
        assert_eq!(err.to_string(), "warm_processes[1].cwd uses reserved path \"/config\"");
    }

    proptest! {
        /// Arbitrary JSON arrays never panic the loader; they are accepted or rejected with a message.
        #[test]
        fn warm_process_config_never_panics(cwd in "[/a-z.]{0,12}", ty in "(cmd|repl|x)", with_cmd: bool) {
            let cmd = if with_cmd { r#","command":["sleep","1"]"# } else { "" };
            let json = format!(r#"[{{"type":"{ty}","cwd":"{cwd}"{cmd}}}]"#);
            let inputs = Inputs {
                listen: Some("unix:///tmp/x.sock".into()),
                warm_processes_env: Some(json),
                ..Default::default()
            };
            match load(inputs, |_| None) {
                Ok(s) => {
                    prop_assert!(warmpool_api::validate_cwd("cwd", &cwd).is_ok());
                    prop_assert_eq!(s.warm_processes.len(), 1);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
