//! End-to-end suites across the real binaries: a `warmpool serve` process, the procd processes it starts, and
//! what talks to it: the client, the real `terraform` with the provider, the action's binary and node shim,
//! schemathesis. Each test owns a temporary data dir and kills every procd under it when it ends,
//! pass or fail.

mod action;
mod chaos;
mod hostile;
mod images;
mod isolation;
mod kubernetes;
mod oidc;
mod openapi;
mod replicas;
mod sandbox_io;
mod terraform;

use std::path::Path;
use std::time::Duration;

use warmpool_api::*;
use warmpool_client::Client;

pub use warmpool_testkit::{
    kill_all_under, pool_spec, procd_pids, running_containers, wait_no_procd, wait_status, wait_until,
    KillOnDrop, ServerProcess, TempServer,
};

/// The host's address on the sandboxes' bridge network (`network.mode: isolated`).
pub const GATEWAY: &str = "10.88.0.1";

/// A template whose sandboxes become ready `delay_s` seconds after they start. Each sandbox writes its own flag
/// (named by its id), so a flag left in the build artifact cannot pass a sandbox's readiness early.
pub fn template(name: &str, delay_s: f64) -> TemplateSpec {
    serde_json::from_value(serde_json::json!({
        "name": name,
        "build": {"steps": ["echo built > built.txt"]},
        "start_cmd": format!("sleep {delay_s}; touch ready-$WARMPOOL_SANDBOX_ID; exec sleep infinity"),
        "readiness": {"exec": {"command": ["sh", "-c", "test -f ready-$WARMPOOL_SANDBOX_ID"]}, "timeout_ms": 30000},
    }))
    .unwrap()
}

/// Creates `spec`, builds it, tags the build `stable`.
pub async fn build(c: &Client, spec: &TemplateSpec) {
    c.create_template(spec).await.unwrap();
    let b = c.create_build(&spec.name, &["stable".into()]).await.unwrap();
    let b = c.wait_build(&b.id, Duration::from_secs(120), |_| {}).await.unwrap();
    assert_eq!(b.status, BuildStatus::Ready, "{:?}", b.error);
}

/// A cold create of `template`.
pub fn cold(template: &str) -> SandboxCreate {
    SandboxCreate { template: Some(template.into()), ..Default::default() }
}

/// Runs `script` with `sh -c` in a sandbox.
pub async fn sh(c: &Client, id: &str, script: &str) -> ExecResult {
    c.exec(id, &ExecRequest { command: vec!["sh".into(), "-c".into(), script.into()], ..Default::default() })
        .await
        .unwrap()
}

pub fn require(pool: &str, wait_ms: u64) -> SandboxCreate {
    SandboxCreate {
        warm_pool: Some(pool.into()),
        warm_pool_mode: Some(CheckoutMode::Require),
        warm_pool_wait_ms: Some(wait_ms),
        ..Default::default()
    }
}

/// Sandbox directories of a data dir.
pub fn sandbox_dirs(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("sandboxes"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Ids of the sandboxes of a data dir whose container runs.
pub fn running_sandboxes(data: &Path) -> std::collections::BTreeSet<String> {
    running_containers(data).into_iter().map(|c| c.id).filter(|id| id.starts_with("sbx_")).collect()
}

/// Sandbox cgroups of a data dir's sandboxes (cgroup v1 memory controller, where the host has it).
pub fn cgroups_of(ids: &[String]) -> Vec<String> {
    ids.iter().filter(|id| Path::new("/sys/fs/cgroup/memory/warmpool").join(id).exists()).cloned().collect()
}
