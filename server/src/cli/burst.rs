//! `warmpool bench burst`: a ramp of claims against two pools side by side, one with a static `min_ready` and
//! one with `autoscale`, of a template that is ready 2 s after start. Each claim is a `require` checkout that does
//! not wait (`warm_pool_wait_ms` 0), so a claim is served warm or refused at once: the hit ratio is the share of
//! claims a user would have got warm (a miss in `prefer` mode is a cold start, measured once for reference). A
//! claimed sandbox is deleted at once. Prints, per arm: hit ratio, warm checkout p50/p99, sandbox-seconds of warm
//! capacity (ready + warming, sampled every second) and the time back to `min_ready` after the ramp.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use tokio::sync::Mutex;
use warmpool_api::*;

use super::commands::client;
use super::Global;

#[derive(Args, Clone, Debug)]
pub struct BurstArgs {
    /// Template ref to claim from (default: the bench makes one that is ready 2 s after start, and deletes it).
    #[arg(long)]
    pub template: Option<String>,
    /// How long the ramp lasts.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub ramp: Duration,
    /// Claims per second at the start of the ramp.
    #[arg(long, default_value_t = 1.0)]
    pub from: f64,
    /// Claims per second at the end of the ramp.
    #[arg(long, default_value_t = 10.0)]
    pub to: f64,
    /// `min_ready` of both pools.
    #[arg(long, default_value_t = 2)]
    pub min_ready: u32,
    /// `max_ready` of the autoscaled pool.
    #[arg(long, default_value_t = 40)]
    pub max_ready: u32,
    /// The autoscaled pool's `autoscale.window_seconds`.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// The autoscaled pool's `autoscale.scale_to_zero_after_seconds`.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub scale_to_zero_after: Duration,
    /// The autoscaled pool's `autoscale.headroom` (default: the server's, 1.2).
    #[arg(long)]
    pub headroom: Option<f64>,
    /// How long the autoscaled pool may take to return to `min_ready` after the ramp.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub settle_timeout: Duration,
}

/// When each claim of a linear ramp from `from` to `to` claims/s over `ramp` falls (seconds from its start):
/// the k-th claim at the t where the ramp's cumulative count `from·t + (to − from)·t²/(2·ramp)` reaches k.
pub fn ramp_schedule(from: f64, to: f64, ramp: f64) -> Vec<f64> {
    let slope = (to - from) / ramp;
    let total = from * ramp + slope * ramp * ramp / 2.0;
    (0..total.floor() as u64)
        .map(|k| {
            let k = k as f64;
            if slope.abs() < 1e-12 {
                k / from
            } else {
                (-from + (from * from + 2.0 * slope * k).sqrt()) / slope
            }
        })
        .collect()
}

/// One arm's claims and capacity.
#[derive(Default)]
struct Arm {
    hits_ms: Vec<f64>,
    /// When each claim was made (seconds into the ramp) and whether it was a hit.
    outcomes: Vec<(f64, bool)>,
    misses: u64,
    errors: Vec<String>,
    sandbox_seconds_ramp: f64,
    sandbox_seconds_total: f64,
    max_target: u32,
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize])
}

pub async fn burst(global: &Global, args: BurstArgs) -> anyhow::Result<i32> {
    let c = Arc::new(client(global)?);
    let tag = format!("b{}", std::process::id());
    let made_template = match &args.template {
        Some(_) => None,
        None => {
            let name = format!("bench-burst-{}", std::process::id());
            let spec: TemplateSpec = serde_json::from_value(serde_json::json!({
                "name": name,
                // The build's own start check leaves ready.flag behind: each sandbox removes it first.
                "start_cmd": "rm -f ready.flag; sleep 2; touch ready.flag; exec sleep infinity",
                "readiness": {"exec": {"command": ["test", "-f", "ready.flag"]}, "timeout_ms": 30000},
            }))?;
            c.create_template(&spec).await.context("creating the benchmark template")?;
            let build = c.create_build(&name, std::slice::from_ref(&tag)).await?;
            let build = c.wait_build(&build.id, Duration::from_secs(300), |_| {}).await?;
            anyhow::ensure!(build.status == BuildStatus::Ready, "the benchmark template's build failed");
            Some(name)
        }
    };
    let template =
        args.template.clone().unwrap_or_else(|| format!("{}:{tag}", made_template.as_ref().unwrap()));
    let result = run(&c, &args, &template).await;
    if let Some(name) = made_template {
        let _ = c.delete_template(&name).await;
    }
    let report = result?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(0)
}

async fn run(
    c: &Arc<warmpool_client::Client>,
    args: &BurstArgs,
    template: &str,
) -> anyhow::Result<serde_json::Value> {
    let pid = std::process::id();
    let static_spec = WarmPoolSpec {
        name: format!("bench-static-{pid}"),
        template: template.into(),
        min_ready: args.min_ready,
        max_ready: args.min_ready,
        ..Default::default()
    };
    let auto_spec = WarmPoolSpec {
        name: format!("bench-autoscale-{pid}"),
        template: template.into(),
        min_ready: args.min_ready,
        max_ready: args.max_ready,
        autoscale: Some(Autoscale {
            enabled: true,
            headroom: args.headroom,
            window_seconds: Some(args.window.as_secs()),
            scale_to_zero_after_seconds: Some(args.scale_to_zero_after.as_secs()),
        }),
        ..Default::default()
    };
    let mut pools = Vec::new();
    for spec in [&static_spec, &auto_spec] {
        pools.push(c.create_pool(spec).await.with_context(|| format!("creating pool {}", spec.name))?);
    }
    let outcome = measure(c, args, template, &pools).await;
    for p in &pools {
        let _ = c.delete_pool(&p.id).await;
    }
    outcome
}

async fn measure(
    c: &Arc<warmpool_client::Client>,
    args: &BurstArgs,
    template: &str,
    pools: &[WarmPool],
) -> anyhow::Result<serde_json::Value> {
    for p in pools {
        c.wait_pool_ready(&p.id, args.min_ready, Duration::from_secs(300), |_| {}).await?;
    }
    // What a miss costs in `prefer` mode: one cold create of the same template.
    let cold_started = Instant::now();
    let cold =
        c.create_sandbox(&SandboxCreate { template: Some(template.into()), ..Default::default() }).await?;
    let cold_ms = cold_started.elapsed().as_secs_f64() * 1000.0;
    let _ = c.delete_sandbox(&cold.id).await;

    let arms: Vec<Arc<Mutex<Arm>>> = pools.iter().map(|_| Arc::default()).collect();
    let ramping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Warm capacity, sampled every second: ready + warming of each pool.
    let sampler = {
        let (c, arms, ramping) = (c.clone(), arms.clone(), ramping.clone());
        let ids: Vec<PoolId> = pools.iter().map(|p| p.id.clone()).collect();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut last = Instant::now();
            loop {
                tick.tick().await;
                let dt = last.elapsed().as_secs_f64();
                last = Instant::now();
                for (id, arm) in ids.iter().zip(&arms) {
                    if let Ok(s) = c.pool_status(id).await {
                        let mut arm = arm.lock().await;
                        let held = (s.ready + s.warming) as f64 * dt;
                        arm.sandbox_seconds_total += held;
                        if ramping.load(std::sync::atomic::Ordering::SeqCst) {
                            arm.sandbox_seconds_ramp += held;
                        }
                        arm.max_target = arm.max_target.max(s.target);
                    }
                }
            }
        })
    };

    let schedule = ramp_schedule(args.from, args.to, args.ramp.as_secs_f64());
    let started = Instant::now();
    let mut claims = Vec::new();
    for at in &schedule {
        tokio::time::sleep_until((started + Duration::from_secs_f64(*at)).into()).await;
        for (pool, arm) in pools.iter().zip(&arms) {
            let (c, arm, pool, at) = (c.clone(), arm.clone(), pool.id.clone(), *at);
            claims.push(tokio::spawn(async move {
                let req = SandboxCreate {
                    warm_pool: Some(pool.into()),
                    warm_pool_mode: Some(CheckoutMode::Require),
                    warm_pool_wait_ms: Some(0),
                    ..Default::default()
                };
                let t = Instant::now();
                let result = c.create_sandbox(&req).await;
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                match result {
                    Ok(sandbox) => {
                        let mut a = arm.lock().await;
                        a.hits_ms.push(ms);
                        a.outcomes.push((at, true));
                        drop(a);
                        let _ = c.delete_sandbox(&sandbox.id).await;
                    }
                    Err(e) if e.code() == Some("warm_pool_unavailable") => {
                        let mut a = arm.lock().await;
                        a.misses += 1;
                        a.outcomes.push((at, false));
                    }
                    Err(e) => arm.lock().await.errors.push(e.to_string()),
                }
            }));
        }
    }
    for claim in claims {
        let _ = claim.await;
    }
    let ramp_s = started.elapsed().as_secs_f64();
    ramping.store(false, std::sync::atomic::Ordering::SeqCst);

    // Back to min_ready: the target is min_ready again and nothing above it is left warming or ready.
    let mut back = Vec::new();
    for p in pools {
        let since = Instant::now();
        let deadline = since + args.settle_timeout;
        let settled = loop {
            let s = c.pool_status(&p.id).await?;
            if s.target == args.min_ready && s.ready + s.warming <= args.min_ready && s.draining == 0 {
                break Some(since.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        back.push(settled);
    }
    sampler.abort();

    let mut report = serde_json::Map::new();
    for ((pool, arm), back) in pools.iter().zip(&arms).zip(back) {
        let mut arm = arm.lock().await;
        arm.hits_ms.sort_by(f64::total_cmp);
        let hits = arm.hits_ms.len() as u64;
        let claims = hits + arm.misses + arm.errors.len() as u64;
        let kind = if pool.autoscale.enabled { "autoscale" } else { "static" };
        // Hit ratio in each third of the ramp (slow, middle, fast).
        let third = args.ramp.as_secs_f64() / 3.0;
        let by_third: Vec<Option<f64>> = (0..3)
            .map(|i| {
                let part: Vec<bool> = arm
                    .outcomes
                    .iter()
                    .filter(|(at, _)| ((at / third) as usize).min(2) == i)
                    .map(|(_, hit)| *hit)
                    .collect();
                (!part.is_empty()).then(|| part.iter().filter(|h| **h).count() as f64 / part.len() as f64)
            })
            .collect();
        report.insert(
            kind.into(),
            serde_json::json!({
                "pool": pool.name,
                "min_ready": pool.min_ready,
                "max_ready": pool.max_ready,
                "claims": claims,
                "hits": hits,
                "misses": arm.misses,
                "errors": arm.errors.len(),
                "first_error": arm.errors.first(),
                "hit_ratio": if claims > 0 { hits as f64 / claims as f64 } else { 0.0 },
                "hit_ratio_by_third_of_the_ramp": by_third,
                "warm_checkout_p50_ms": percentile(&arm.hits_ms, 0.5),
                "warm_checkout_p99_ms": percentile(&arm.hits_ms, 0.99),
                "max_target": arm.max_target,
                "sandbox_seconds_during_ramp": arm.sandbox_seconds_ramp.round(),
                "sandbox_seconds_total": arm.sandbox_seconds_total.round(),
                "seconds_back_to_min_ready": back,
            }),
        );
    }
    report.insert(
        "ramp".into(),
        serde_json::json!({
            "from_per_second": args.from,
            "to_per_second": args.to,
            "seconds": ramp_s,
            "claims_per_arm": schedule.len(),
            "window_seconds": args.window.as_secs(),
            "scale_to_zero_after_seconds": args.scale_to_zero_after.as_secs(),
            "cold_create_ms": cold_ms,
        }),
    );
    Ok(serde_json::Value::Object(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ramp_schedule_rises_linearly() {
        let s = ramp_schedule(1.0, 10.0, 120.0);
        // 1·120 + 9/120·120²/2 = 660 claims.
        assert_eq!(s.len(), 660);
        assert!(s.windows(2).all(|w| w[1] > w[0]));
        assert!(*s.last().unwrap() < 120.0);
        let in_first_10s = s.iter().filter(|t| **t < 10.0).count();
        let in_last_10s = s.iter().filter(|t| **t >= 110.0).count();
        assert!((13..=14).contains(&in_first_10s), "{in_first_10s}");
        assert!((96..=97).contains(&in_last_10s), "{in_last_10s}");
        assert_eq!(ramp_schedule(2.0, 2.0, 5.0), vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5]);
    }
}
