//! `warmpool bench fill`: how long a pool of N takes to become ready, beside how long plain `runc run -d` takes
//! to start N containers of the same shape at the same parallelism, in one run on one host (the target is at most
//! 2×). Runs beside a server on the local runtime, as root (it drives runc itself). Prints JSON.
//!
//! Each round starts the plain containers first (then removes them), then creates a pool of N of a template that
//! is ready `--ready-after-ms` after it starts, times it until all N are ready, reads the per-phase start times the
//! server observed meanwhile (`warmpool_sandbox_start_seconds{phase}`), and deletes the pool; each measurement
//! begins `--settle` after the last removal, so neither pays for the other's teardown. Everything the bench
//! makes (template, pools, containers, their bundles and cgroups) is removed when it ends, failed or not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use warmpool_api::*;

use super::commands::client;
use super::Global;
use crate::runtime::local::oci::IdRange;
use crate::runtime::local::plain::PlainBase;

#[derive(Args, Clone, Debug)]
pub struct FillArgs {
    /// Sandboxes in the pool, and plain containers beside it.
    #[arg(long, default_value_t = 100)]
    pub count: u32,
    /// Plain containers started at once (default: the server's `--max-parallel-starts`, as `/readyz` reports it).
    #[arg(long)]
    pub parallel: Option<usize>,
    /// When the template's sandboxes become ready after they start (its readiness' `initial_delay_ms`).
    #[arg(long, default_value_t = 200)]
    pub ready_after_ms: u64,
    /// Rounds (each: plain containers, then a pool), to see how noisy the host is.
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// How long to let the host settle after removing containers, before the next measurement (the kernel
    /// frees network namespaces in the background, holding locks every start needs).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// How long one pool fill may take.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Host ids the plain containers' ids map to (as the server's `--userns-range`).
    #[arg(long, default_value = "100000:65536", value_parser = IdRange::parse)]
    pub userns_range: IdRange,
}

/// Where the plain containers live: their shared base, bundles and runc state (under `/run/warmpool`, whose path
/// the containers' root can walk).
struct Plain {
    dir: PathBuf,
    base: PlainBase,
}

impl Plain {
    fn root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// runc, its own errors going to `log`. A detached container inherits runc's stdio, so nothing of it may be
    /// a pipe the bench waits on.
    fn runc(&self, log: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("runc");
        c.arg("--root").arg(self.root()).arg("--log").arg(log);
        c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        c
    }

    /// Starts `count` containers, `parallel` at a time, with `runc run -d`; returns the wall time.
    async fn run(&self, round: u32, count: u32, parallel: usize) -> anyhow::Result<Duration> {
        let ids: Vec<String> =
            (0..count).map(|i| format!("plain_{}_{round}_{i}", std::process::id())).collect();
        // Bundles are written before the clock starts: runc's own cost is what is measured.
        for id in &ids {
            let bundle = self.dir.join("bundles").join(id);
            std::fs::create_dir_all(&bundle)?;
            std::fs::write(
                bundle.join("config.json"),
                self.base.config(id, &["/bin/sleep", "3600"]).to_string(),
            )?;
        }
        let started = Instant::now();
        let results: Vec<anyhow::Result<()>> = futures::stream::iter(ids.iter())
            .map(|id| async move {
                let bundle = self.dir.join("bundles").join(id);
                let log = bundle.join("runc.log");
                let status = self
                    .runc(&log)
                    .arg("run")
                    .arg("--detach")
                    .arg("--bundle")
                    .arg(&bundle)
                    .arg(id)
                    .status()
                    .await
                    .context("running runc")?;
                anyhow::ensure!(
                    status.success(),
                    "runc run {id} failed: {}",
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                );
                Ok(())
            })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
        let elapsed = started.elapsed();
        results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
        Ok(elapsed)
    }

    /// Removes every container of this bench (idempotent) and their bundles.
    async fn remove_containers(&self, parallel: usize) {
        let ids: Vec<String> = std::fs::read_dir(self.root())
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        futures::stream::iter(ids)
            .for_each_concurrent(parallel.max(1), |id| async move {
                let _ =
                    self.runc(&self.dir.join("delete.log")).args(["delete", "--force", &id]).status().await;
            })
            .await;
        let _ = std::fs::remove_dir_all(self.dir.join("bundles"));
    }
}

/// `warmpool_sandbox_start_seconds` sums and counts by their labels (`phase="…"`, or empty).
fn start_seconds(metrics: &str) -> BTreeMap<String, (f64, f64)> {
    let mut out: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in metrics.lines() {
        for (suffix, sum) in [("_sum", true), ("_count", false)] {
            let Some(rest) = line.strip_prefix(&format!("warmpool_sandbox_start_seconds{suffix}")) else {
                continue;
            };
            let (labels, value) = match rest.strip_prefix('{') {
                Some(r) => match r.split_once("} ") {
                    Some((labels, value)) => (labels.to_string(), value),
                    None => continue,
                },
                None => (String::new(), rest.trim()),
            };
            let phase = labels.split("phase=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or("total");
            let Ok(value) = value.trim().parse::<f64>() else { continue };
            let entry = out.entry(phase.to_string()).or_default();
            if sum {
                entry.0 = value;
            } else {
                entry.1 = value;
            }
        }
    }
    out
}

/// Mean milliseconds per phase over the starts observed between two scrapes.
fn phase_means(
    before: &BTreeMap<String, (f64, f64)>,
    after: &BTreeMap<String, (f64, f64)>,
) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (phase, (sum, count)) in after {
        let (sum0, count0) = before.get(phase).copied().unwrap_or_default();
        if count - count0 > 0.0 {
            out.insert(phase.clone(), ((sum - sum0) / (count - count0) * 1000.0).into());
        }
    }
    out.into()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    if xs.is_empty() {
        0.0
    } else {
        xs[xs.len() / 2]
    }
}

pub async fn fill(global: &Global, args: FillArgs) -> anyhow::Result<i32> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(unsafe { libc::geteuid() } == 0, "bench fill runs runc itself: run it as root");
    let c = Arc::new(client(global)?);
    let ready = c.readyz().await.context("asking the server what it runs")?;
    let runtime = ready["runtime"]["runtime"].as_str().unwrap_or_default();
    anyhow::ensure!(
        runtime == "local",
        "bench fill compares with runc: the server's runtime is {runtime:?}, not local"
    );
    let parallel = args
        .parallel
        .or_else(|| ready["max_parallel_starts"].as_u64().map(|n| n as usize))
        .unwrap_or(100)
        .max(1);
    let name = format!("bench-fill-{}", std::process::id());
    let dir = Path::new("/run/warmpool").join(&name);
    let plain = Plain { base: PlainBase::prepare(&dir, args.userns_range)?, dir };
    let result = rounds(&c, &args, &name, &plain, parallel).await;
    // Everything goes, whatever happened.
    plain.remove_containers(parallel).await;
    let _ = std::fs::remove_dir_all(&plain.dir);
    for pool in c.list_pools().await.unwrap_or_default().into_iter().filter(|p| p.name.starts_with(&name)) {
        let _ = c.delete_pool(&pool.id).await;
    }
    let _ = c.delete_template(&name).await;
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

async fn rounds(
    c: &warmpool_client::Client,
    args: &FillArgs,
    name: &str,
    plain: &Plain,
    parallel: usize,
) -> anyhow::Result<serde_json::Value> {
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": name,
        "build": {"steps": []},
        "start_cmd": "exec sleep infinity",
        "readiness": {"process": {}, "initial_delay_ms": args.ready_after_ms},
    }))?;
    c.create_template(&spec).await.context("creating the benchmark template")?;
    let b = c.create_build(name, &[]).await?;
    let b = c.wait_build(&b.id, Duration::from_secs(600), |_| {}).await?;
    anyhow::ensure!(b.status == BuildStatus::Ready, "the benchmark template did not build: {:?}", b.error);
    let template = format!("{name}@{}", b.id);
    // One sandbox's start time, one at a time (what a pool fill should take little more than).
    let mut cold = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let s = c
            .create_sandbox(&SandboxCreate { template: Some(template.clone()), ..Default::default() })
            .await?;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
        c.delete_sandbox(&s.id).await?;
    }
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        tokio::time::sleep(args.settle).await;
        let runc = plain.run(round, args.count, parallel).await.context("starting the plain containers")?;
        plain.remove_containers(parallel).await;
        tokio::time::sleep(args.settle).await;

        let before = start_seconds(&c.metrics().await?);
        let started = Instant::now();
        let pool = c
            .create_pool(&WarmPoolSpec {
                name: format!("{name}-{round}"),
                template: template.clone(),
                min_ready: args.count,
                max_ready: args.count,
                ..Default::default()
            })
            .await
            .context("creating the benchmark pool")?;
        let deadline = started + args.timeout;
        loop {
            let status = c.pool_status(&pool.id).await?;
            if status.ready >= args.count {
                break;
            }
            if let Some((reason, detail)) = status.stuck() {
                anyhow::bail!("the benchmark pool is stuck ({reason}): {detail}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the pool had {} of {} ready",
                status.ready,
                args.count
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let fill = started.elapsed();
        let after = start_seconds(&c.metrics().await?);
        c.delete_pool(&pool.id).await.context("deleting the benchmark pool")?;
        rounds.push(serde_json::json!({
            "pool_fill_ms": fill.as_secs_f64() * 1000.0,
            "plain_runc_ms": runc.as_secs_f64() * 1000.0,
            "ratio": fill.as_secs_f64() / runc.as_secs_f64(),
            "start_phase_mean_ms": phase_means(&before, &after),
        }));
    }
    let get = |key: &str| rounds.iter().filter_map(|r| r[key].as_f64()).collect::<Vec<_>>();
    Ok(serde_json::json!({
        "count": args.count,
        "parallel": parallel,
        "ready_after_ms": args.ready_after_ms,
        "one_sandbox_start_ms": median(cold),
        "rounds": rounds,
        "median": {
            "pool_fill_ms": median(get("pool_fill_ms")),
            "plain_runc_ms": median(get("plain_runc_ms")),
            "ratio": median(get("ratio")),
        },
        "note": "plain runc: `runc run -d` of containers of a sandbox's shape (namespaces, seccomp, cgroups, \
                 read-only host binds) without overlay, procd, network wiring or readiness",
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_seconds_are_read_by_phase_and_unlabelled() {
        let text = "warmpool_sandbox_start_seconds_sum{phase=\"container\"} 2.5\n\
                    warmpool_sandbox_start_seconds_count{phase=\"container\"} 10\n\
                    warmpool_sandbox_start_seconds_bucket{phase=\"container\",le=\"0.1\"} 3\n\
                    warmpool_sandbox_start_seconds_sum 4\n\
                    warmpool_sandbox_start_seconds_count 8\n";
        let seen = start_seconds(text);
        assert_eq!(seen["container"], (2.5, 10.0));
        assert_eq!(seen["total"], (4.0, 8.0));
        let before = BTreeMap::from([("container".to_string(), (0.5, 5.0))]);
        assert_eq!(phase_means(&before, &seen)["container"], 400.0);
        assert_eq!(phase_means(&before, &seen)["total"], 500.0);
    }
}
