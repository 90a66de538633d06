//! Prometheus metrics, registered once per server on their own registry.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub checkouts_total: IntCounterVec,
    pub checkout_seconds: HistogramVec,
    pub pool_sandboxes: IntGaugeVec,
    pub sandbox_start_seconds: HistogramVec,
    pub reconcile_seconds: HistogramVec,
}

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
            &["pool", "mode", "source"],
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
            &["pool", "state"],
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
        for m in [
            Box::new(checkouts_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(checkout_seconds.clone()),
            Box::new(pool_sandboxes.clone()),
            Box::new(sandbox_start_seconds.clone()),
            Box::new(reconcile_seconds.clone()),
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
        }
    }
}

impl Metrics {
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
        text
    }
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
