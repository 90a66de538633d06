//! End-to-end suites across the real binaries: a `warmpool serve` process, the procd processes it starts, and a
//! client talking HTTP to it. Each test owns a temporary data dir and kills every procd under it when it ends,
//! pass or fail.

mod chaos;
mod images;
mod isolation;

use std::path::Path;
use std::time::Duration;

use warmpool_api::*;
use warmpool_client::Client;

pub use warmpool_testkit::{
    kill_all_under, procs_mentioning, wait_no_procd, wait_until, KillOnDrop, ServerProcess,
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

pub fn pool_spec(name: &str, template: &str, min: u32, max: u32) -> WarmPoolSpec {
    WarmPoolSpec {
        name: name.into(),
        template: template.into(),
        min_ready: min,
        max_ready: max,
        ..Default::default()
    }
}

pub fn require(pool: &str, wait_ms: u64) -> SandboxCreate {
    SandboxCreate {
        warm_pool: Some(pool.into()),
        warm_pool_mode: Some(CheckoutMode::Require),
        warm_pool_wait_ms: Some(wait_ms),
        ..Default::default()
    }
}

pub async fn wait_status(
    c: &Client,
    pool: &str,
    what: &str,
    cond: impl Fn(&PoolStatus) -> bool,
) -> PoolStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let s = c.pool_status(pool).await.unwrap();
        if cond(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "pool never reached {what}: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
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
    let alive = procs_mentioning(data);
    warmpool_testkit::containers_under(data)
        .into_iter()
        .filter(|(_, id)| id.starts_with("sbx_"))
        .filter(|(root, id)| {
            let state = std::fs::read_to_string(root.join(id).join("state.json")).unwrap_or_default();
            alive.iter().any(|pid| state.contains(&format!("\"init_process_pid\":{pid},")))
        })
        .map(|(_, id)| id)
        .collect()
}

/// Sandbox cgroups of a data dir's sandboxes (cgroup v1 memory controller, where the host has it).
pub fn cgroups_of(ids: &[String]) -> Vec<String> {
    ids.iter().filter(|id| Path::new("/sys/fs/cgroup/memory/warmpool").join(id).exists()).cloned().collect()
}
