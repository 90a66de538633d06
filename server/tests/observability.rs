//! What operators run: the metrics a real server serves, the shipped Grafana dashboard and Prometheus rules
//! (`deploy/`), checked by `promtool` and evaluated by a real Prometheus scraping a real server; demand in a pool's
//! status; `max_starts_per_second`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use warmpool_api::*;

use crate::harness::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn rules_path() -> PathBuf {
    repo_root().join("deploy/prometheus/warmpool-rules.yml")
}

fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/warmpool.json")
}

/// A Prometheus tool, installed by `scripts/host-deps.sh --tests` (Debian's `prometheus` package).
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| panic!("{name} is not installed: run scripts/host-deps.sh --tests"))
}

/// The metric names a text uses: words that start with `warmpool_` or `process_` (recording rules are
/// `warmpool:…`, alerts `Warmpool…`), histogram series folded into their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("warmpool_") || w.starts_with("process_"))
        .map(|w| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| w.strip_suffix(s));
            base.unwrap_or(w).to_string()
        })
        .collect()
}

/// Metric names with at least one sample in a `/metrics` text.
fn served_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|w| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| w.strip_suffix(s));
            base.unwrap_or(w).to_string()
        })
        .collect()
}

/// A server with one filled pool that has had a hit and a miss: every series the rules and the dashboard read
/// exists.
async fn busy_server(extra: impl FnOnce(&mut warmpool_server::cli::serve::ServeArgs)) -> TestControlPlane {
    let cp = TestControlPlane::start_with(extra).await;
    cp.ready_template("obs").await;
    cp.client.create_pool(&pool_spec("obs", "obs:stable", 1, 1)).await.unwrap();
    cp.wait_status("obs", "ready 1", |s| s.ready == 1).await;
    cp
}

async fn checkout(cp: &TestControlPlane) -> Sandbox {
    let req = SandboxCreate { warm_pool: Some("obs".into()), ..Default::default() };
    cp.client.create_sandbox(&req).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_use_is_served() {
    let cp = busy_server(|_| {}).await;
    let hit = checkout(&cp).await;
    assert!(hit.warm_pool_checkout.as_ref().unwrap().hit);
    let miss = checkout(&cp).await;
    assert!(!miss.warm_pool_checkout.as_ref().unwrap().hit);
    cp.wait_status("obs", "refilled", |s| s.ready == 1).await;
    let pool = cp.client.get_pool("obs").await.unwrap();
    let mut used = metric_names(&std::fs::read_to_string(rules_path()).unwrap());
    used.extend(metric_names(&std::fs::read_to_string(dashboard_path()).unwrap()));
    assert!(used.len() >= 15, "the parser found too few names: {used:?}");
    // Pool gauges are published within a second of a pass.
    let deadline = Instant::now() + Duration::from_secs(10);
    let exposition = loop {
        let exposition = cp.client.metrics().await.unwrap();
        let missing: Vec<_> = used.difference(&served_names(&exposition)).cloned().collect();
        if missing.is_empty() && exposition.contains(r#"state="ready"} 1"#) {
            break exposition;
        }
        assert!(Instant::now() < deadline, "used by deploy/ but not served: {missing:?}\n{exposition}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The labels the contract names (in the exposition's order), and pool names beside ids.
    for needle in [
        format!(
            r#"warmpool_checkouts_total{{fallback_reason="",mode="prefer",pool="{}",pool_name="obs",source="warm_pool"}} 1"#,
            pool.id
        ),
        format!(
            r#"warmpool_checkouts_total{{fallback_reason="no_ready_inventory",mode="prefer",pool="{}",pool_name="obs",source="cold"}} 1"#,
            pool.id
        ),
        format!(r#"warmpool_pool_target{{pool="{}",pool_name="obs"}} 1"#, pool.id),
        format!(r#"warmpool_pool_degraded{{pool="{}",pool_name="obs",reason="drain_active"}} 0"#, pool.id),
        r#"warmpool_builds_total{status="ready"} 1"#.to_string(),
        r#"warmpool_http_requests_total{method="GET",route="/v1/template-warm-pools/:id",status="200"}"#
            .to_string(),
    ] {
        assert!(exposition.contains(&needle), "missing {needle}\n{exposition}");
    }
    let degraded = exposition.lines().filter(|l| l.starts_with("warmpool_pool_degraded{")).count();
    assert_eq!(degraded, 7, "a series per reason");
    // Route templates, never raw paths (a series per sandbox id would grow without end).
    assert!(!exposition.contains(hit.id.as_str()), "a sandbox id leaked into a label");
    let unmatched = reqwest::get(format!("{}/no/such/{}", cp.url, hit.id)).await.unwrap();
    assert_eq!(unmatched.status(), 404);
    let exposition = cp.client.metrics().await.unwrap();
    assert!(exposition.contains(r#"method="GET",route="unmatched",status="404""#), "{exposition}");
    assert!(!exposition.contains(hit.id.as_str()));
    for s in [hit, miss] {
        cp.client.delete_sandbox(&s.id).await.unwrap();
    }
}

#[test]
fn promtool_accepts_the_rules() {
    let out = Command::new(tool("promtool")).arg("check").arg("rules").arg(rules_path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus of the test's own: its temp dir, a loopback port, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `target` every second and evaluates `rules` every second.
    fn start(target: &str, rules: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
                 rule_files: [rules.yml]\n\
                 scrape_configs:\n  - job_name: warmpool\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    async fn get(&self, path: &str) -> Option<serde_json::Value> {
        let response = reqwest::get(format!("{}{path}", self.url)).await.ok()?;
        response.status().is_success().then_some(())?;
        response.json().await.ok()
    }

    /// An instant query's samples: `(labels, value)`.
    async fn query(&self, expr: &str) -> Vec<(serde_json::Value, f64)> {
        let path = format!("/api/v1/query?query={}", urlencode(expr));
        let Some(body) = self.get(&path).await else { return Vec::new() };
        body["data"]["result"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some((r["metric"].clone(), r["value"][1].as_str()?.parse().ok()?)))
            .collect()
    }

    /// Polls `expr` until a sample satisfies `ok`; panics naming `what` after 60 s.
    async fn wait_for(&self, what: &str, expr: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let samples = self.query(expr).await;
            if let Some((_, v)) = samples.iter().find(|(_, v)| ok(*v)) {
                return *v;
            }
            assert!(Instant::now() < deadline, "{what}: {expr} never held (last: {samples:?})");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

/// The shipped rules with every `for:` shortened to 2 s: the expressions are the shipped ones, evaluated every
/// second, and an alert needs no five-minute wait in a test.
fn rules_for_test() -> String {
    let shipped = std::fs::read_to_string(rules_path()).unwrap();
    let text: String = shipped
        .lines()
        .map(|l| match l.trim_start().strip_prefix("for: ") {
            Some(_) => format!("{}for: 2s", &l[..l.len() - l.trim_start().len()]),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.matches("for: 2s").count() >= 3, "the rules' `for:` clauses moved: {text}");
    text
}

/// A real Prometheus scrapes a real server while its pool fills and misses: the recording rules produce the hit
/// ratio, the misses by reason and the gap to target; when the pool is made to degrade (its target above what
/// the host may run), `WarmpoolPoolDegraded` fires for it, naming the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_the_rules_against_a_real_server() {
    let cp = busy_server(|args| args.max_sandboxes = 4).await;
    let prometheus = Prometheus::start(cp.url.trim_start_matches("http://"), &rules_for_test());
    prometheus.wait_for("the server is scraped", r#"up{job="warmpool"}"#, |v| v == 1.0).await;

    // Counters move between scrapes, so rate() sees each step: two checkouts back to back take the one ready
    // sandbox and miss; once scraped and refilled, again.
    let mut sandboxes = Vec::new();
    let hits = r#"warmpool_checkouts_total{pool_name="obs",source="warm_pool"}"#;
    let misses = r#"warmpool_checkouts_total{pool_name="obs",source="cold"}"#;
    sandboxes.push(checkout(&cp).await);
    sandboxes.push(checkout(&cp).await);
    prometheus.wait_for("the first hit is scraped", hits, |v| v == 1.0).await;
    prometheus.wait_for("the first miss is scraped", misses, |v| v == 1.0).await;
    cp.wait_status("obs", "refilled", |s| s.ready == 1).await;
    // The host takes four sandboxes: the first two go before the next two come.
    for s in sandboxes.drain(..) {
        cp.client.delete_sandbox(&s.id).await.unwrap();
    }
    sandboxes.push(checkout(&cp).await);
    sandboxes.push(checkout(&cp).await);
    prometheus.wait_for("the next hit is scraped", hits, |v| v == 2.0).await;
    prometheus.wait_for("the next miss is scraped", misses, |v| v == 2.0).await;

    let ratio = prometheus
        .wait_for("a hit ratio between 0 and 1", r#"warmpool:pool_hit_ratio:rate5m{pool_name="obs"}"#, |v| {
            v > 0.0 && v < 1.0
        })
        .await;
    assert!(ratio > 0.0 && ratio < 1.0);
    let reason = r#"warmpool:pool_misses:rate5m{pool_name="obs",fallback_reason="no_ready_inventory"}"#;
    prometheus.wait_for("misses by reason", reason, |v| v > 0.0).await;
    prometheus
        .wait_for("claims per second", r#"warmpool:pool_claims:rate5m{pool_name="obs"}"#, |v| v > 0.0)
        .await;
    prometheus
        .wait_for("the gap to target", r#"warmpool:pool_unavailable{pool_name="obs"}"#, |v| v >= 0.0)
        .await;
    prometheus
        .wait_for("warm checkout p99", r#"warmpool:checkout_seconds:p99_5m{source="warm_pool"}"#, |v| v > 0.0)
        .await;
    prometheus
        .wait_for("HTTP by route", r#"warmpool:http_requests:rate5m{route="/v1/sandboxes"}"#, |v| v > 0.0)
        .await;
    let degraded_alert = r#"ALERTS{alertname="WarmpoolPoolDegraded",pool_name="obs",alertstate="firing"}"#;
    assert!(prometheus.query(degraded_alert).await.is_empty(), "a healthy pool alerts");

    // Degrade it: the host takes four sandboxes, two are checked out, the pool wants six.
    let patch = WarmPoolPatch { min_ready: Some(6), max_ready: Some(6), ..Default::default() };
    cp.client.update_pool("obs", &patch).await.unwrap();
    cp.wait_status("obs", "no_eligible_hosts", |s| {
        s.degraded_reasons.contains(&DegradedReason::NoEligibleHosts)
    })
    .await;
    prometheus
        .wait_for(
            "the degraded alert fires",
            r#"ALERTS{alertname="WarmpoolPoolDegraded",pool_name="obs",reason="no_eligible_hosts",alertstate="firing"}"#,
            |v| v == 1.0,
        )
        .await;
    let alerts = prometheus.get("/api/v1/alerts").await.unwrap();
    let firing: Vec<_> = alerts["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(firing.contains(&"WarmpoolPoolDegraded".to_string()), "{alerts}");
    assert!(!firing.contains(&"WarmpoolStoreUnavailable".to_string()), "{alerts}");
    for s in sandboxes {
        cp.client.delete_sandbox(&s.id).await.unwrap();
    }
}

/// Demand in a pool's status: claims per minute, hit ratio, warm-up p90 and the recommended ready count with the
/// arithmetic's inputs; autoscale raises the target to it within max_ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demand_shows_in_status_and_autoscale_follows_it() {
    let cp = TestControlPlane::start().await;
    // Ready 2 s after start: Little's law then asks for more than one ready sandbox at a few claims a minute.
    let mut spec = quick_template("obs");
    // (The build's own start check leaves a ready.flag in the artifact: each sandbox removes it first.)
    spec.start_cmd = Some("rm -f ready.flag; sleep 2; touch ready.flag; exec sleep infinity".into());
    cp.client.create_template(&spec).await.unwrap();
    assert_eq!(cp.build("obs", &["stable"]).await.status, BuildStatus::Ready);
    cp.client.create_pool(&pool_spec("obs", "obs:stable", 1, 1)).await.unwrap();
    cp.wait_status("obs", "ready 1", |s| s.ready == 1).await;
    let before = cp.client.pool_status("obs").await.unwrap();
    assert_eq!(before.demand.claims, 0);
    assert_eq!(before.demand.hit_ratio, None);
    assert!(before.demand.warm_seconds_p90.is_some_and(|p| p > 0.0), "{:?}", before.demand);
    assert_eq!(before.demand.window_seconds, 600);

    let mut sandboxes = Vec::new();
    for _ in 0..4 {
        sandboxes.push(checkout(&cp).await);
    }
    let s = cp.client.pool_status("obs").await.unwrap();
    let d = &s.demand;
    assert_eq!(d.claims, 4, "{d:?}");
    assert!(d.hits >= 1 && d.hits < 4, "{d:?}");
    assert_eq!(d.hit_ratio, Some(d.hits as f64 / 4.0));
    assert!((d.claims_per_minute - 4.0 * 60.0 / 600.0).abs() < 1e-9, "{d:?}");
    // The rate used is the larger of the window's and the recent one: the claims of the last 15 s (the last one was
    // just made) over the seconds they span, at least 5.
    assert!(d.recent_claims_per_minute > d.claims_per_minute, "{d:?}");
    assert!((d.claims_per_second * 60.0 - d.recent_claims_per_minute).abs() < 1e-9, "{d:?}");
    assert!(d.claims_per_second <= 4.0 / 5.0 + 1e-9, "{d:?}");
    let p90 = d.warm_seconds_p90.unwrap();
    assert_eq!(d.recommended_ready, (d.claims_per_second * p90 * 1.2 - 1e-9).ceil() as u32);
    assert_eq!(s.target, 1, "autoscale is off: the target is min_ready");

    // Autoscale with a headroom that makes the recommendation large: the target follows it, capped at max_ready.
    let patch = WarmPoolPatch {
        max_ready: Some(3),
        autoscale: Some(Autoscale { enabled: true, headroom: Some(10.0), ..Default::default() }),
        ..Default::default()
    };
    let pool = cp.client.update_pool("obs", &patch).await.unwrap();
    assert!(pool.autoscale.enabled);
    let s = cp.client.pool_status("obs").await.unwrap();
    let want = s.demand.recommended_ready.clamp(1, 3);
    assert_eq!(s.target, want, "{:?}", s.demand);
    // At least one recent claim over at most 15 s × ≥ 2 s × 10 ≥ 1.3: more than min_ready.
    assert!(s.target >= 2, "{:?}", s.demand);
    cp.wait_status("obs", "filled to the autoscaled target", |s| s.ready + s.warming >= want).await;

    // Bad input names the field.
    let bad = WarmPoolPatch {
        autoscale: Some(Autoscale { enabled: true, window_seconds: Some(1), ..Default::default() }),
        ..Default::default()
    };
    let e = cp.client.update_pool("obs", &bad).await.unwrap_err();
    assert_eq!(e.code(), Some("invalid_request"));
    assert!(e.to_string().contains("autoscale.window_seconds"), "{e}");
    let e = cp
        .client
        .update_pool("obs", &WarmPoolPatch { max_starts_per_second: Some(Some(0.0)), ..Default::default() })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("max_starts_per_second"), "{e}");
    for s in sandboxes {
        cp.client.delete_sandbox(&s.id).await.unwrap();
    }
}

/// `max_starts_per_second` shapes a fill: 6 sandboxes at 2 starts/s take at least 2 s to be started, where the
/// unlimited pool starts them at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_starts_per_second_shapes_the_fill() {
    let cp = TestControlPlane::start().await;
    cp.ready_template("obs").await;
    let spec = WarmPoolSpec { max_starts_per_second: Some(2.0), ..pool_spec("slow", "obs:stable", 6, 6) };
    let started = Instant::now();
    cp.client.create_pool(&spec).await.unwrap();
    // Right after creation only the bucket's first second of starts may be under way.
    let early = cp.client.pool_status("slow").await.unwrap();
    assert!(early.ready + early.warming <= 2, "{early:?}");
    cp.wait_status("slow", "all 6 started", |s| s.ready + s.warming == 6).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(2), "6 starts at 2/s went in {took:?}");
    cp.wait_status("slow", "ready 6", |s| s.ready == 6).await;
    let pool = cp.client.get_pool("slow").await.unwrap();
    assert_eq!(pool.max_starts_per_second, Some(2.0));
    // null makes it unlimited again.
    let patch = WarmPoolPatch { max_starts_per_second: Some(None), ..Default::default() };
    assert_eq!(cp.client.update_pool("slow", &patch).await.unwrap().max_starts_per_second, None);
}
