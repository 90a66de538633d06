//! Benchmarks against a running server, printing their numbers as JSON:
//! - `warmpool bench checkout` measures warm checkouts (claims from a filled pool by concurrent clients) against
//!   cold creates of the same template (`--endpoints` spreads the checkouts over several replicas);
//! - `warmpool bench pools --count N` creates N idle pools and measures the server's CPU use at rest (from its
//!   `process_cpu_seconds_total` metric), then the checkout latency with all of them present;
//! - `warmpool bench artifact` compares cold create and pool fill for a tiny and a big artifact.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use warmpool_api::*;

use super::commands::client;
use super::Global;

#[derive(Args, Clone, Debug)]
pub struct CheckoutArgs {
    /// Template ref to benchmark (it must have a ready build).
    #[arg(long)]
    pub template: String,
    /// Warm checkouts to measure (the pool is filled to this many, then disabled so it does not refill).
    #[arg(long, default_value_t = 64)]
    pub warm: u32,
    /// Concurrent clients for the warm checkouts.
    #[arg(long, default_value_t = 32)]
    pub clients: u32,
    /// Cold creates to measure (one at a time).
    #[arg(long, default_value_t = 3)]
    pub cold: u32,
    /// How long filling the pool may take (`5m`).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Replicas to spread the warm checkouts over, round-robin (`http://a:7070,http://b:7070`; default: only
    /// `--endpoint`). The pool is made through `--endpoint`.
    #[arg(long, value_delimiter = ',')]
    pub endpoints: Vec<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn summary(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(|a, b| a.total_cmp(b));
    serde_json::json!({
        "count": ms.len(),
        "p50_ms": percentile(&ms, 0.50),
        "p90_ms": percentile(&ms, 0.90),
        "p99_ms": percentile(&ms, 0.99),
        "max_ms": ms.last().copied().unwrap_or(0.0),
    })
}

/// Cumulative `warmpool_checkout_seconds{source="warm_pool"}` bucket counts, by upper bound.
fn checkout_buckets(metrics: &str) -> Vec<(f64, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("warmpool_checkout_seconds_bucket{"))
        .filter(|l| l.contains("source=\"warm_pool\""))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            let count = l.rsplit(' ').next()?.parse().ok()?;
            Some((le, count))
        })
        .collect()
}

/// The warm checkout buckets of every replica, added up.
async fn all_checkout_buckets(clients: &[Arc<warmpool_client::Client>]) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut total: Vec<(f64, f64)> = Vec::new();
    for c in clients {
        for (le, n) in checkout_buckets(&c.metrics().await?) {
            match total.iter_mut().find(|(b, _)| *b == le) {
                Some((_, sum)) => *sum += n,
                None => total.push((le, n)),
            }
        }
    }
    total.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(total)
}

/// p50/p99 upper bounds of the checkouts observed between two scrapes.
fn server_quantiles(before: &[(f64, f64)], after: &[(f64, f64)]) -> serde_json::Value {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| (*le, n - before.iter().find(|(b, _)| b == le).map(|(_, m)| *m).unwrap_or(0.0)))
        .collect();
    let total = diff.last().map(|(_, n)| *n).unwrap_or(0.0);
    let quantile = |q: f64| diff.iter().find(|(_, n)| *n >= q * total).map(|(le, _)| le * 1000.0);
    serde_json::json!({"count": total, "p50_ms_at_most": quantile(0.5), "p99_ms_at_most": quantile(0.99)})
}

pub async fn checkout(global: &Global, args: CheckoutArgs) -> anyhow::Result<i32> {
    let c = Arc::new(client(global)?);
    let name = format!("bench-{}", std::process::id());
    let pool = c
        .create_pool(&WarmPoolSpec {
            name: name.clone(),
            template: args.template.clone(),
            min_ready: args.warm,
            max_ready: args.warm,
            ..Default::default()
        })
        .await
        .context("creating the benchmark pool")?;
    let fill_started = Instant::now();
    let filled = c.wait_pool_ready(&pool.id, args.warm, args.timeout, |_| {}).await;
    let fill_ms = fill_started.elapsed().as_secs_f64() * 1000.0;
    if let Err(e) = filled {
        let _ = c.delete_pool(&pool.id).await;
        return Err(e).context("filling the benchmark pool");
    }
    // A disabled pool keeps handing out its inventory but does not refill, so the measured checkouts are claims
    // of existing inventory, not competing with sandbox starts for the CPU.
    c.pool_action(&pool.id, "disable").await?;
    let replicas: Vec<Arc<warmpool_client::Client>> = if args.endpoints.is_empty() {
        vec![c.clone()]
    } else {
        let at = |endpoint: &String| Global { endpoint: Some(endpoint.clone()), ..global.clone() };
        args.endpoints.iter().map(|e| client(&at(e)).map(Arc::new)).collect::<anyhow::Result<_>>()?
    };
    let buckets_before = all_checkout_buckets(&replicas).await?;
    let remaining = Arc::new(std::sync::atomic::AtomicI64::new(args.warm as i64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.clients.max(1) as usize {
        let (c, remaining, pool_id) =
            (replicas[i % replicas.len()].clone(), remaining.clone(), pool.id.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while remaining.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) > 0 {
                let t = Instant::now();
                let req = SandboxCreate {
                    warm_pool: Some(pool_id.to_string()),
                    warm_pool_mode: Some(CheckoutMode::Require),
                    ..Default::default()
                };
                let r = c.create_sandbox(&req).await;
                out.push((t.elapsed().as_secs_f64() * 1000.0, r));
            }
            out
        }));
    }
    let mut warm_ms = Vec::new();
    let mut ids = Vec::new();
    let mut misses = 0;
    for t in tasks {
        for (ms, r) in t.await? {
            match r {
                Ok(s) if s.warm_pool_checkout.as_ref().is_some_and(|co| co.hit) => {
                    warm_ms.push(ms);
                    ids.push(s.id);
                }
                Ok(s) => {
                    misses += 1;
                    ids.push(s.id);
                }
                Err(_) => misses += 1,
            }
        }
    }
    let warm_elapsed = started.elapsed().as_secs_f64();
    let server_side = server_quantiles(&buckets_before, &all_checkout_buckets(&replicas).await?);
    let throughput = warm_ms.len() as f64 / warm_elapsed;
    let _ = c.delete_pool(&pool.id).await;
    for id in ids {
        let _ = c.delete_sandbox(&id).await;
    }

    let mut cold_ms = Vec::new();
    for _ in 0..args.cold {
        let t = Instant::now();
        let s = c
            .create_sandbox(&SandboxCreate { template: Some(args.template.clone()), ..Default::default() })
            .await?;
        cold_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        c.delete_sandbox(&s.id).await?;
    }
    let warm = summary(warm_ms.clone());
    let cold = summary(cold_ms.clone());
    let ratio = |warm_ms: Option<f64>| match (warm_ms, cold["p50_ms"].as_f64()) {
        (Some(w), Some(c)) if w > 0.0 && c > 0.0 => c / w,
        _ => 0.0,
    };
    let report = serde_json::json!({
        "template": args.template,
        "clients": args.clients,
        "replicas": replicas.len(),
        "pool_fill_ms": fill_ms,
        "warm": warm,
        "warm_misses": misses,
        "warm_throughput_per_s": throughput,
        "cold": cold,
        "cold_over_warm_p50": ratio(warm["p50_ms"].as_f64()),
        "server_side_warm": server_side,
        "cold_over_server_side_warm_p50": ratio(server_side["p50_ms_at_most"].as_f64()),
        "note": "warm/cold are measured by the client over loopback HTTP (with 32 clients in flight they include \
            queueing); server_side_warm comes from the warmpool_checkout_seconds histogram (bucket upper bounds)",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

#[derive(Args, Clone, Debug)]
pub struct PoolsArgs {
    /// Idle pools to create (`min_ready` 0, no leases: nothing to start, only their reconcile cost).
    #[arg(long, default_value_t = 1000)]
    pub count: u32,
    /// How long the server is watched at rest once the pools exist.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Requests in flight while creating and deleting the pools.
    #[arg(long, default_value_t = 16)]
    pub parallel: usize,
    /// Warm checkouts measured with the pools present (from an extra pool of this many ready sandboxes; 0 skips).
    #[arg(long, default_value_t = 16)]
    pub checkouts: u32,
    /// Keep the pools afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// `process_cpu_seconds_total` of a `/metrics` text.
fn cpu_seconds(metrics: &str) -> anyhow::Result<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("the server does not report process_cpu_seconds_total")
}

/// Runs `f` over `items` with at most `parallel` in flight.
async fn for_each_parallel<T, F, Fut>(items: Vec<T>, parallel: usize, f: F) -> anyhow::Result<()>
where
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    use futures::StreamExt;
    let results: Vec<anyhow::Result<()>> =
        futures::stream::iter(items.into_iter().map(f)).buffer_unordered(parallel.max(1)).collect().await;
    results.into_iter().collect()
}

pub async fn pools(global: &Global, args: PoolsArgs) -> anyhow::Result<i32> {
    let c = Arc::new(client(global)?);
    let prefix = format!("bench-pools-{}", std::process::id());
    let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
        "name": prefix,
        "start_cmd": "touch ready-$WARMPOOL_SANDBOX_ID; exec sleep infinity",
        "readiness": {"exec": {"command": ["sh", "-c", "test -f ready-$WARMPOOL_SANDBOX_ID"]}},
    }))?;
    c.create_template(&spec).await.context("creating the benchmark template")?;
    let b = c.create_build(&prefix, &[]).await?;
    let b = c.wait_build(&b.id, Duration::from_secs(300), |_| {}).await?;
    anyhow::ensure!(b.status == BuildStatus::Ready, "the benchmark template did not build: {:?}", b.error);
    let template = format!("{prefix}@{}", b.id);

    let idle = Instant::now();
    let names: Vec<String> = (0..args.count).map(|i| format!("{prefix}-{i}")).collect();
    for_each_parallel(names.clone(), args.parallel, |name| {
        let (c, template) = (c.clone(), template.clone());
        async move {
            let spec = WarmPoolSpec { name, template, min_ready: 0, max_ready: 1, ..Default::default() };
            c.create_pool(&spec).await.map(drop).context("creating a pool")
        }
    })
    .await?;
    let create_s = idle.elapsed().as_secs_f64();
    // Let the passes the creations caused run out.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = cpu_seconds(&c.metrics().await?)?;
    tokio::time::sleep(args.window).await;
    let after = cpu_seconds(&c.metrics().await?)?;
    let cpu_percent = (after - before) / args.window.as_secs_f64() * 100.0;

    let mut checkout = serde_json::Value::Null;
    if args.checkouts > 0 {
        let spec = WarmPoolSpec {
            name: format!("{prefix}-warm"),
            template: template.clone(),
            min_ready: args.checkouts,
            max_ready: args.checkouts,
            enabled: Some(true),
            ..Default::default()
        };
        let pool = c.create_pool(&spec).await?;
        c.wait_pool_ready(&pool.id, args.checkouts, Duration::from_secs(300), |_| {}).await?;
        c.pool_action(&pool.id, "disable").await?;
        let buckets_before = checkout_buckets(&c.metrics().await?);
        let mut ms = Vec::new();
        for _ in 0..args.checkouts {
            let req = SandboxCreate {
                warm_pool: Some(pool.id.to_string()),
                warm_pool_mode: Some(CheckoutMode::Require),
                ..Default::default()
            };
            let t = Instant::now();
            let s = c.create_sandbox(&req).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            c.delete_sandbox(&s.id).await?;
        }
        checkout = serde_json::json!({
            "client": summary(ms),
            "server_side": server_quantiles(&buckets_before, &checkout_buckets(&c.metrics().await?)),
        });
        c.delete_pool(&pool.id).await?;
    }
    if !args.keep {
        for_each_parallel(names, args.parallel, |name| {
            let c = c.clone();
            async move { c.delete_pool(&name).await.map_err(Into::into) }
        })
        .await?;
        c.delete_template(&prefix).await?;
    }
    let report = serde_json::json!({
        "pools": args.count,
        "create_seconds": create_s,
        "window_seconds": args.window.as_secs_f64(),
        "server_cpu_percent_of_one_core": cpu_percent,
        "checkout_with_pools_present": checkout,
        "note": "idle pools: min_ready 0, no leases; CPU is the server process's user+system time over the window",
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

#[derive(Args, Clone, Debug)]
pub struct ArtifactArgs {
    /// Size of the big artifact, in MB.
    #[arg(long, default_value_t = 300)]
    pub size_mb: u64,
    /// Files in the big artifact.
    #[arg(long, default_value_t = 20_000)]
    pub files: u64,
    /// Cold creates measured per artifact.
    #[arg(long, default_value_t = 5)]
    pub cold: u32,
    /// Sandboxes in the measured pool fill (and in the disk measurement).
    #[arg(long, default_value_t = 10)]
    pub pool: u32,
    /// The server's data dir, to measure the disk its sandboxes add (skipped when not given).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
}

/// Bytes used under `dir` (allocated blocks, as `du` counts them), not following mounts.
fn disk_usage(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return 0 };
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            // The rootfs mount point shows the lower layers: what a sandbox adds is its upper layer.
            if path.file_name().is_some_and(|n| n == "rootfs") {
                continue;
            }
            total += disk_usage(&path);
        }
    }
    total
}

/// Cold create and pool fill of a tiny and a big artifact, side by side: a sandbox's root filesystem is an overlay
/// over the artifact, so both should cost the same.
pub async fn artifact(global: &Global, args: ArtifactArgs) -> anyhow::Result<i32> {
    let c = Arc::new(client(global)?);
    let prefix = format!("bench-artifact-{}", std::process::id());
    let per_file = args.size_mb * 1024 * 1024 / args.files.max(1);
    let big_step = format!(
        "python3 -c \"import os\nfor i in range({files}):\n  d = 'data/%03d' % (i // 1000)\n  os.makedirs(d, exist_ok=True)\n  open('%s/f%d' % (d, i), 'wb').write(os.urandom({per_file}))\"",
        files = args.files,
    );
    let cases = [("tiny", "head -c 1024 /dev/urandom > data.bin".to_string()), ("big", big_step)];
    let mut report = serde_json::Map::new();
    for (label, step) in cases {
        let name = format!("{prefix}-{label}");
        let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
            "name": name,
            "build": {"steps": [step]},
            "start_cmd": "touch ready-$WARMPOOL_SANDBOX_ID; exec sleep infinity",
            "readiness": {"exec": {"command": ["sh", "-c", "test -f ready-$WARMPOOL_SANDBOX_ID"]}},
        }))?;
        c.create_template(&spec).await?;
        let t = Instant::now();
        let b = c.create_build(&name, &[]).await?;
        let b = c.wait_build(&b.id, Duration::from_secs(1800), |_| {}).await?;
        anyhow::ensure!(b.status == BuildStatus::Ready, "the {label} template did not build: {:?}", b.error);
        let build_s = t.elapsed().as_secs_f64();
        let template = format!("{name}@{}", b.id);
        let mut cold_ms = Vec::new();
        for _ in 0..args.cold {
            let t = Instant::now();
            let s = c
                .create_sandbox(&SandboxCreate { template: Some(template.clone()), ..Default::default() })
                .await?;
            cold_ms.push(t.elapsed().as_secs_f64() * 1000.0);
            c.delete_sandbox(&s.id).await?;
        }
        // Bundles and their writable layers (on the layers filesystem).
        let usage =
            |d: &std::path::Path| disk_usage(&d.join("sandboxes")) + disk_usage(&d.join("layers/sandboxes"));
        let before = args.data_dir.as_ref().map(|d| usage(d));
        let t = Instant::now();
        let spec = WarmPoolSpec {
            name: name.clone(),
            template,
            min_ready: args.pool,
            max_ready: args.pool,
            ..Default::default()
        };
        let pool = c.create_pool(&spec).await?;
        c.wait_pool_ready(&pool.id, args.pool, Duration::from_secs(600), |_| {}).await?;
        let fill_ms = t.elapsed().as_secs_f64() * 1000.0;
        let added_mb = args
            .data_dir
            .as_ref()
            .zip(before)
            .map(|(d, before)| usage(d).saturating_sub(before) as f64 / (1024.0 * 1024.0));
        c.delete_pool(&pool.id).await?;
        c.delete_template(&name).await?;
        report.insert(
            label.into(),
            serde_json::json!({
                "artifact_bytes": if label == "tiny" { 1024 } else { per_file * args.files },
                "artifact_files": if label == "tiny" { 1 } else { args.files },
                "build_seconds": build_s,
                "cold_create": summary(cold_ms),
                "pool_fill_ms": fill_ms,
                "pool_sandboxes": args.pool,
                "disk_added_by_pool_mb": added_mb,
            }),
        );
    }
    let ratio = |key: &str| {
        let get = |label: &str| report[label][key]["p50_ms"].as_f64().unwrap_or(0.0);
        if get("tiny") > 0.0 {
            get("big") / get("tiny")
        } else {
            0.0
        }
    };
    let cold_ratio = ratio("cold_create");
    let fill = |label: &str| report[label]["pool_fill_ms"].as_f64().unwrap_or(0.0);
    let fill_ratio = if fill("tiny") > 0.0 { fill("big") / fill("tiny") } else { 0.0 };
    report.insert("cold_create_p50_big_over_tiny".into(), cold_ratio.into());
    report.insert("pool_fill_big_over_tiny".into(), fill_ratio.into());
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}
