//! Prometheus metrics, registered once per server on their own registry. The names and labels are a contract
//! (the shipped dashboard and alerting rules under `deploy/` use them, and so do operators' own): `pool` is a
//! pool's id and `pool_name` its name wherever `pool` appears. Per-pool gauges are published by the replica that
//! reconciles the pool, within a second of each pass ([`Metrics::publish_pool`]), and removed when it lets the pool
//! go.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use warmpool_api::{DegradedReason, PoolStatus};

pub struct Metrics {
    registry: Registry,
    /// `pool, pool_name, mode, source, fallback_reason` (empty for a hit).
    pub checkouts_total: IntCounterVec,
    pub checkout_seconds: HistogramVec,
    pub pool_sandboxes: IntGaugeVec,
    pub sandbox_start_seconds: HistogramVec,
    pub reconcile_seconds: HistogramVec,
    pub pool_target: IntGaugeVec,
    pub pool_recommended_ready: IntGaugeVec,
    pub pool_leases: IntGaugeVec,
    pub pool_degraded: IntGaugeVec,
    pub pool_failures_total: IntCounterVec,
    pub builds_total: IntCounterVec,
    pub build_seconds: HistogramVec,
    pub http_requests_total: IntCounterVec,
    pub http_request_seconds: HistogramVec,
    /// The name each pool's series were published under, so a rename or a release removes the old ones.
    published: Mutex<HashMap<String, String>>,
}

/// Every reason a pool can be degraded for: each pool has a `warmpool_pool_degraded` series for each.
pub const DEGRADED_REASONS: [DegradedReason; 7] = [
    DegradedReason::NoEligibleHosts,
    DegradedReason::ArtifactNotReady,
    DegradedReason::ArtifactPrewarmFailed,
    DegradedReason::QuotaExceeded,
    DegradedReason::TemplateBuildUnavailable,
    DegradedReason::ControllerDisabled,
    DegradedReason::DrainActive,
];

/// The pool sandbox states `warmpool_pool_sandboxes` counts.
const POOL_STATES: [&str; 4] = ["ready", "warming", "claimed", "draining"];

const BUILD_BUCKETS: &[f64] = &[1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0];

const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

impl Default for Metrics {
    fn default() -> Self {
        let registry = Registry::new();
        let checkouts_total = IntCounterVec::new(
            Opts::new(
                "warmpool_checkouts_total",
                "Sandbox creates that named a warm pool, by mode and source",
            ),
            &["pool", "pool_name", "mode", "source", "fallback_reason"],
        )
        .expect("metric");
        let checkout_seconds = HistogramVec::new(
            HistogramOpts::new("warmpool_checkout_seconds", "Time to serve a sandbox create, by source")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["source"],
        )
        .expect("metric");
        let pool_sandboxes = IntGaugeVec::new(
            Opts::new("warmpool_pool_sandboxes", "Sandboxes of a pool, by state"),
            &["pool", "pool_name", "state"],
        )
        .expect("metric");
        let sandbox_start_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warmpool_sandbox_start_seconds",
                "Time from start to readiness of a sandbox, whole (phase total) and by phase",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("metric");
        let reconcile_seconds = HistogramVec::new(
            HistogramOpts::new("warmpool_reconcile_seconds", "Duration of a reconciler pass")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &[],
        )
        .expect("metric");
        let pool_gauge = |name: &str, help: &str, extra: &[&str]| {
            let labels: Vec<&str> = ["pool", "pool_name"].iter().chain(extra).copied().collect();
            IntGaugeVec::new(Opts::new(name, help), &labels).expect("metric")
        };
        let pool_target = pool_gauge("warmpool_pool_target", "Ready sandboxes the pool aims at", &[]);
        let pool_recommended_ready = pool_gauge(
            "warmpool_pool_recommended_ready",
            "Ready sandboxes that keep the pool's recent claim rate served warm (its demand)",
            &[],
        );
        let pool_leases = pool_gauge("warmpool_pool_leases", "Active leases of the pool", &[]);
        let pool_degraded = pool_gauge(
            "warmpool_pool_degraded",
            "1 while the pool is degraded for this reason, else 0",
            &["reason"],
        );
        let pool_failures_total = IntCounterVec::new(
            Opts::new(
                "warmpool_pool_failures_total",
                "Sandboxes of the pool that failed (starts and ready ones)",
            ),
            &["pool", "pool_name"],
        )
        .expect("metric");
        let builds_total = IntCounterVec::new(
            Opts::new("warmpool_builds_total", "Template builds that finished, by status"),
            &["status"],
        )
        .expect("metric");
        let build_seconds = HistogramVec::new(
            HistogramOpts::new("warmpool_build_seconds", "Duration of a template build")
                .buckets(BUILD_BUCKETS.to_vec()),
            &[],
        )
        .expect("metric");
        let http_requests_total = IntCounterVec::new(
            Opts::new("warmpool_http_requests_total", "HTTP requests answered, by route template"),
            &["route", "method", "status"],
        )
        .expect("metric");
        let http_request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "warmpool_http_request_seconds",
                "Time to answer an HTTP request (until the response head), by route template",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("metric");
        for m in [
            Box::new(checkouts_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(checkout_seconds.clone()),
            Box::new(pool_sandboxes.clone()),
            Box::new(sandbox_start_seconds.clone()),
            Box::new(reconcile_seconds.clone()),
            Box::new(pool_target.clone()),
            Box::new(pool_recommended_ready.clone()),
            Box::new(pool_leases.clone()),
            Box::new(pool_degraded.clone()),
            Box::new(pool_failures_total.clone()),
            Box::new(builds_total.clone()),
            Box::new(build_seconds.clone()),
            Box::new(http_requests_total.clone()),
            Box::new(http_request_seconds.clone()),
        ] {
            registry.register(m).expect("register metric");
        }
        Metrics {
            registry,
            checkouts_total,
            checkout_seconds,
            pool_sandboxes,
            sandbox_start_seconds,
            reconcile_seconds,
            pool_target,
            pool_recommended_ready,
            pool_leases,
            pool_degraded,
            pool_failures_total,
            builds_total,
            build_seconds,
            http_requests_total,
            http_request_seconds,
            published: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// Publishes a pool's gauges from its status (and its lease count), replacing the series of an older name.
    pub fn publish_pool(&self, pool: &str, name: &str, status: &PoolStatus, leases: usize) {
        let renamed = {
            let mut published = self.published.lock().expect("published pools");
            published.insert(pool.to_string(), name.to_string()).filter(|old| old != name)
        };
        if let Some(old) = renamed {
            self.remove_series(pool, &old);
        }
        let labels = [pool, name];
        self.pool_target.with_label_values(&labels).set(status.target.into());
        self.pool_recommended_ready.with_label_values(&labels).set(status.demand.recommended_ready.into());
        self.pool_leases.with_label_values(&labels).set(leases as i64);
        for reason in DEGRADED_REASONS {
            let on = status.degraded_reasons.contains(&reason);
            self.pool_degraded.with_label_values(&[pool, name, reason.as_str()]).set(on.into());
        }
        for (state, n) in
            POOL_STATES.iter().zip([status.ready, status.warming, status.claimed, status.draining])
        {
            self.pool_sandboxes.with_label_values(&[pool, name, state]).set(n.into());
        }
        // Present from the start (at 0), so `rate()` and `increase()` see the first failure.
        self.pool_failures_total.with_label_values(&labels);
    }

    /// Removes a pool's gauges (deleted, or reconciled by another replica now).
    pub fn forget_pool(&self, pool: &str) {
        let name = self.published.lock().expect("published pools").remove(pool);
        if let Some(name) = name {
            self.remove_series(pool, &name);
        }
    }

    fn remove_series(&self, pool: &str, name: &str) {
        let labels = [pool, name];
        let _ = self.pool_target.remove_label_values(&labels);
        let _ = self.pool_recommended_ready.remove_label_values(&labels);
        let _ = self.pool_leases.remove_label_values(&labels);
        for reason in DEGRADED_REASONS {
            let _ = self.pool_degraded.remove_label_values(&[pool, name, reason.as_str()]);
        }
        for state in POOL_STATES {
            let _ = self.pool_sandboxes.remove_label_values(&[pool, name, state]);
        }
    }

    /// Counts a checkout that named a pool. `source` is `warm_pool` (a hit), `cold` (a miss served by a cold
    /// create) or `unavailable` (a `require` miss refused with `warm_pool_unavailable`).
    pub fn checkout(&self, pool: &str, name: &str, mode: &str, source: &str, fallback_reason: &str) {
        self.checkouts_total.with_label_values(&[pool, name, mode, source, fallback_reason]).inc();
    }

    pub fn pool_failure(&self, pool: &str, name: &str) {
        self.pool_failures_total.with_label_values(&[pool, name]).inc();
    }

    pub fn build_finished(&self, status: &str, seconds: f64) {
        self.builds_total.with_label_values(&[status]).inc();
        self.build_seconds.with_label_values(&[]).observe(seconds);
    }

    pub fn http_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        self.http_requests_total.with_label_values(&[route, method, &status.to_string()]).inc();
        self.http_request_seconds.with_label_values(&[route]).observe(seconds);
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("encode metrics");
        let mut text = String::from_utf8(buf).expect("utf-8 metrics");
        // The server's own CPU time, under the standard name (what `warmpool bench pools` reads).
        text.push_str(&format!(
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n",
            process_cpu_seconds()
        ));
        if let Some(bytes) = resident_memory_bytes() {
            text.push_str(&format!(
                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
                 # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {bytes}\n"
            ));
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            text.push_str(&format!(
                "# HELP process_open_fds Number of open file descriptors.\n\
                 # TYPE process_open_fds gauge\nprocess_open_fds {}\n",
                fds.count()
            ));
        }
        text
    }
}

/// Resident set size of this process (`/proc/self/statm`'s second field, in pages).
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}

/// User + system CPU time of this process so far.
fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; zeroed is a valid initial value for it.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
