//! Terraform-side shapes of templates and probes, and their conversion to and from the API's types.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tf_provider::value::{serde_as_vec, Value};
use warmpool_api as api;

pub type Str = Value<String>;
pub type Num = Value<i64>;
pub type StrList = Value<Vec<Str>>;
pub type StrMap = Value<BTreeMap<String, Str>>;

pub fn known(v: &Str) -> Option<String> {
    v.as_ref_option().cloned()
}

pub fn strs(v: &StrList) -> Vec<String> {
    v.as_ref_option().map(|l| l.iter().filter_map(known).collect()).unwrap_or_default()
}

pub fn map(v: &StrMap) -> BTreeMap<String, String> {
    v.as_ref_option()
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), known(v)?))).collect())
        .unwrap_or_default()
}

pub fn num(v: &Num) -> Option<u64> {
    v.as_ref_option().map(|n| (*n).max(0) as u64)
}

/// A count for a `u32` field: one too large stays too large (the API then names it) instead of wrapping.
pub fn saturating_u32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

pub fn s(v: impl Into<String>) -> Str {
    Value::Value(v.into())
}

pub fn opt_s(v: Option<impl Into<String>>) -> Str {
    v.map(|v| Value::Value(v.into())).unwrap_or(Value::Null)
}

pub fn list(v: &[String]) -> StrList {
    Value::Value(v.iter().map(|s| Value::Value(s.clone())).collect())
}

/// A map attribute: null when empty, so a config that leaves it out plans clean.
pub fn map_value(v: &BTreeMap<String, String>) -> StrMap {
    if v.is_empty() {
        Value::Null
    } else {
        Value::Value(v.iter().map(|(k, v)| (k.clone(), Value::Value(v.clone()))).collect())
    }
}

/// A list attribute: null when empty.
pub fn list_or_null(v: &[String]) -> StrList {
    if v.is_empty() {
        Value::Null
    } else {
        list(v)
    }
}

pub fn opt_n(v: Option<impl Into<i64>>) -> Num {
    v.map(|v| Value::Value(v.into())).unwrap_or(Value::Null)
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecBlock {
    pub command: StrList,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HttpGetBlock {
    pub port: Num,
    pub path: Str,
    pub host: Str,
    pub scheme: Str,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpSocketBlock {
    pub port: Num,
    pub host: Str,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessBlock {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeBlock {
    #[serde(with = "serde_as_vec")]
    pub exec: Value<ExecBlock>,
    #[serde(with = "serde_as_vec")]
    pub http_get: Value<HttpGetBlock>,
    #[serde(with = "serde_as_vec")]
    pub tcp_socket: Value<TcpSocketBlock>,
    #[serde(with = "serde_as_vec")]
    pub process: Value<ProcessBlock>,
    pub initial_delay_ms: Num,
    pub period_ms: Num,
    pub timeout_ms: Num,
    pub failure_threshold: Num,
    pub success_threshold: Num,
}

impl ProbeBlock {
    pub fn to_api(&self) -> api::ProbeSpec {
        let n32 = |v: &Num| num(v).map(saturating_u32);
        api::ProbeSpec {
            exec: self.exec.as_ref_option().map(|e| api::ExecCheck {
                command: if e.command.is_unknown() { vec!["(unknown)".into()] } else { strs(&e.command) },
            }),
            http_get: self.http_get.as_ref_option().map(|h| api::HttpGetCheck {
                port: if h.port.is_unknown() { 1 } else { num(&h.port).unwrap_or(0) as u16 },
                path: known(&h.path),
                host: known(&h.host),
                scheme: known(&h.scheme),
                headers: None,
            }),
            tcp_socket: self.tcp_socket.as_ref_option().map(|t| api::TcpSocketCheck {
                port: if t.port.is_unknown() { 1 } else { num(&t.port).unwrap_or(0) as u16 },
                host: known(&t.host),
            }),
            process: self.process.as_ref_option().map(|_| api::ProcessCheck {}),
            initial_delay_ms: num(&self.initial_delay_ms),
            period_ms: num(&self.period_ms),
            timeout_ms: num(&self.timeout_ms),
            failure_threshold: n32(&self.failure_threshold),
            success_threshold: n32(&self.success_threshold),
        }
    }

    pub fn from_api(p: &api::ProbeSpec) -> ProbeBlock {
        ProbeBlock {
            exec: p
                .exec
                .as_ref()
                .map(|e| Value::Value(ExecBlock { command: list(&e.command) }))
                .unwrap_or(Value::Null),
            http_get: p
                .http_get
                .as_ref()
                .map(|h| {
                    Value::Value(HttpGetBlock {
                        port: Value::Value(h.port as i64),
                        path: opt_s(h.path.clone()),
                        host: opt_s(h.host.clone()),
                        scheme: opt_s(h.scheme.clone()),
                    })
                })
                .unwrap_or(Value::Null),
            tcp_socket: p
                .tcp_socket
                .as_ref()
                .map(|t| {
                    Value::Value(TcpSocketBlock {
                        port: Value::Value(t.port as i64),
                        host: opt_s(t.host.clone()),
                    })
                })
                .unwrap_or(Value::Null),
            process: p.process.as_ref().map(|_| Value::Value(ProcessBlock {})).unwrap_or(Value::Null),
            initial_delay_ms: opt_n(p.initial_delay_ms.map(|n| n as i64)),
            period_ms: opt_n(p.period_ms.map(|n| n as i64)),
            timeout_ms: opt_n(p.timeout_ms.map(|n| n as i64)),
            failure_threshold: opt_n(p.failure_threshold),
            success_threshold: opt_n(p.success_threshold),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WarmProcessBlock {
    pub name: Str,
    #[serde(rename = "type")]
    pub process_type: Str,
    pub alias: Str,
    pub command: StrList,
    pub language: Str,
    pub cwd: Str,
    pub env: StrMap,
    #[serde(with = "serde_as_vec")]
    pub startup_probe: Value<ProbeBlock>,
    #[serde(with = "serde_as_vec")]
    pub readiness_probe: Value<ProbeBlock>,
    #[serde(with = "serde_as_vec")]
    pub liveness_probe: Value<ProbeBlock>,
}

impl WarmProcessBlock {
    /// The API spec; `Err((field, message))` for an enum value the API would reject.
    pub fn to_api(&self, index: usize) -> Result<api::WarmProcessSpec, (String, String)> {
        let process_type = match known(&self.process_type).as_deref() {
            None | Some("cmd") => api::ProcessType::Cmd,
            Some("repl") => api::ProcessType::Repl,
            Some(other) => {
                return Err((
                    format!("warm_processes[{index}].type"),
                    format!("must be \"cmd\" or \"repl\" (got {other:?})"),
                ))
            }
        };
        let language = match known(&self.language).as_deref() {
            None => None,
            Some("python") => Some(api::ReplLanguage::Python),
            Some("node") => Some(api::ReplLanguage::Node),
            Some("bash") => Some(api::ReplLanguage::Bash),
            Some(other) => {
                return Err((
                    format!("warm_processes[{index}].language"),
                    format!("must be python, node or bash (got {other:?})"),
                ))
            }
        };
        let probe = |p: &Value<ProbeBlock>| p.as_ref_option().map(ProbeBlock::to_api);
        let probes = api::ProbeSet {
            startup: probe(&self.startup_probe),
            readiness: probe(&self.readiness_probe),
            liveness: probe(&self.liveness_probe),
        };
        let any_probe = probes.startup.is_some() || probes.readiness.is_some() || probes.liveness.is_some();
        Ok(api::WarmProcessSpec {
            name: if self.name.is_unknown() { Some(format!("unknown-{index}")) } else { known(&self.name) },
            process_type,
            alias: known(&self.alias),
            command: if self.command.is_unknown() {
                Some(vec!["(unknown)".into()])
            } else {
                self.command.as_ref_option().map(|_| strs(&self.command))
            },
            language,
            cwd: known(&self.cwd),
            env: map(&self.env),
            probes: any_probe.then_some(probes),
        })
    }

    pub fn from_api(p: &api::WarmProcessSpec) -> WarmProcessBlock {
        let probe = |p: Option<&api::ProbeSpec>| {
            p.map(|p| Value::Value(ProbeBlock::from_api(p))).unwrap_or(Value::Null)
        };
        let probes = p.probes.clone().unwrap_or_default();
        WarmProcessBlock {
            name: opt_s(p.name.clone()),
            process_type: s(match p.process_type {
                api::ProcessType::Cmd => "cmd",
                api::ProcessType::Repl => "repl",
            }),
            alias: opt_s(p.alias.clone()),
            command: p.command.as_ref().map(|c| list(c)).unwrap_or(Value::Null),
            language: opt_s(p.language.map(|l| match l {
                api::ReplLanguage::Python => "python",
                api::ReplLanguage::Node => "node",
                api::ReplLanguage::Bash => "bash",
            })),
            cwd: opt_s(p.cwd.clone()),
            env: map_value(&p.env),
            startup_probe: probe(probes.startup.as_ref()),
            readiness_probe: probe(probes.readiness.as_ref()),
            liveness_probe: probe(probes.liveness.as_ref()),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcesBlock {
    pub cpu: Value<f64>,
    pub memory_mb: Num,
    pub disk_mb: Num,
}

/// `autoscale { enabled, headroom, window_seconds, scale_to_zero_after_seconds }` of a warm pool.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleBlock {
    pub enabled: Value<bool>,
    pub headroom: Value<f64>,
    pub window_seconds: Num,
    pub scale_to_zero_after_seconds: Num,
}

impl AutoscaleBlock {
    pub fn to_api(&self) -> warmpool_api::Autoscale {
        warmpool_api::Autoscale {
            enabled: self.enabled.as_ref_option().copied().unwrap_or(false),
            headroom: self.headroom.as_ref_option().copied(),
            window_seconds: num(&self.window_seconds),
            scale_to_zero_after_seconds: num(&self.scale_to_zero_after_seconds),
        }
    }

    /// The block a pool's settings read back as (none when autoscale is off and nothing is set).
    pub fn from_api(a: &warmpool_api::Autoscale) -> Value<AutoscaleBlock> {
        if *a == warmpool_api::Autoscale::default() {
            return Value::Null;
        }
        Value::Value(AutoscaleBlock {
            enabled: Value::Value(a.enabled),
            headroom: a.headroom.map(Value::Value).unwrap_or(Value::Null),
            window_seconds: opt_n(a.window_seconds.map(|n| n as i64)),
            scale_to_zero_after_seconds: opt_n(a.scale_to_zero_after_seconds.map(|n| n as i64)),
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TimeoutsBlock {
    pub create: Str,
    pub update: Str,
}

impl TimeoutsBlock {
    /// The `create`/`update` timeout of an optional `timeouts` block, or `default`.
    pub fn get(
        block: &Value<TimeoutsBlock>,
        pick: fn(&TimeoutsBlock) -> &Str,
        default: std::time::Duration,
    ) -> std::time::Duration {
        block
            .as_ref_option()
            .and_then(|t| known(pick(t)))
            .and_then(|t| humantime::parse_duration(&t).ok())
            .unwrap_or(default)
    }
}
