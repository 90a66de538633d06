//! Demand and autoscale. Every checkout that names a pool is a claim; the claims (hits and misses) and the
//! start-to-ready times of the pool's sandboxes are recorded in the store, so every replica computes the same
//! demand. From them, always:
//!
//! `recommended_ready = ceil(claims_per_second × warm_seconds_p90 × headroom)` — Little's law: the sandboxes
//! that are warming while claims keep arriving, plus headroom.
//!
//! With `autoscale` on, the pool's target is `min(max_ready, max(min_ready + leases, recommended_ready))`. The
//! decision ([`decide`]) and the rate limit of starts ([`TokenBucket`]) are pure, so they are tested with tables and
//! scripted claim streams; [`App`] only gathers the inputs and keeps the state.
//!
//! Two choices keep it useful and calm:
//! - The rate is the larger of the window's average and the recent one (the last [`RECENT`]): a burst raises the
//!   target within seconds, and the window's average lets it down gently as the burst leaves the window. The recent
//!   rate is short because an average lags a rising rate by half its span (on a ramp from 1 to 10 claims/s over
//!   two minutes a minute's average trails by 2 claims/s, 15 s's by 0.6). Claims that began after a quiet spell
//!   are a rate over the time they span (at least [`MIN_RECENT_SPAN`]): 16 claims in the 8 s since the first are
//!   2/s.
//! - Up at once, down only after the lower recommendation has held for [`scale_down_delay`] (a tenth of the window,
//!   at most 30 s): a rate hovering at a rounding edge does not stop and restart sandboxes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use warmpool_api::{Autoscale, PoolDemand, PoolId, PoolState};

use super::{App, AppResult};
use crate::store::{ClaimEvent, DemandSample, LeaseRow, PoolRow};

/// The longest a lower recommendation must hold before autoscale lowers the target.
pub const SCALE_DOWN_DELAY: Duration = Duration::from_secs(30);

/// How long a lower recommendation must hold before autoscale lowers the target: a tenth of the window, at most
/// [`SCALE_DOWN_DELAY`] (a pool measured over a short window is meant to follow quickly).
pub fn scale_down_delay(window_seconds: u64) -> Duration {
    Duration::from_secs(window_seconds / 10).min(SCALE_DOWN_DELAY)
}
/// The recent rate's window.
pub const RECENT: Duration = Duration::from_secs(15);
/// The shortest span the recent rate is taken over (a handful of claims at once is not a rate of thousands).
pub const MIN_RECENT_SPAN: Duration = Duration::from_secs(5);
/// Warm-up times the p90 is taken over (the pool's latest sandboxes).
pub const WARMUPS: u32 = 100;
/// How often an autoscaled pool is looked at while nothing else happens (its demand decays with time).
pub const AUTOSCALE_TICK: Duration = Duration::from_secs(5);
/// How often a pool's old claims are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// The 90th percentile (nearest rank) of `values`; None when empty.
pub fn p90(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() as f64) * 0.9).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A pool's demand from what the store recorded.
pub fn demand(sample: &DemandSample, autoscale: &Autoscale, now: DateTime<Utc>) -> PoolDemand {
    let window = autoscale.effective_window_seconds();
    let headroom = autoscale.effective_headroom();
    let window_rate = sample.claims as f64 / window as f64;
    let recent_window = RECENT.as_secs_f64().min(window as f64);
    // Claims that began after a quiet spell (none older in the window) are a rate over the time they span; with
    // older claims the window is full, and shortening it would make a lone claim, or the first of two leaving the
    // window, look like a burst.
    let began_recently = sample.claims == sample.recent_claims;
    let recent_span = match sample.recent_first_at.filter(|_| began_recently) {
        Some(first) => {
            let since_first = (now - first).num_milliseconds() as f64 / 1000.0;
            since_first.clamp(MIN_RECENT_SPAN.as_secs_f64().min(recent_window), recent_window)
        }
        None => recent_window,
    };
    let recent_rate = sample.recent_claims as f64 / recent_span;
    let rate = window_rate.max(recent_rate);
    let warm_p90 = p90(&sample.warm_seconds);
    let idle = match autoscale.scale_to_zero_after_seconds {
        Some(after) => sample
            .last_claim_at
            .is_none_or(|last| (now - last).num_milliseconds() >= (after as i64).saturating_mul(1000)),
        None => false,
    };
    let recommended = if idle {
        0
    } else {
        let exact = rate * warm_p90.unwrap_or(0.0) * headroom;
        // A hair under an integer is that integer (floating point), and the count is capped like a pool's size.
        ((exact - 1e-9).ceil().max(0.0) as u64).min(warmpool_api::POOL_SIZE_MAX as u64) as u32
    };
    PoolDemand {
        claims_per_minute: window_rate * 60.0,
        hit_ratio: (sample.claims > 0).then(|| sample.hits as f64 / sample.claims as f64),
        warm_seconds_p90: warm_p90,
        recommended_ready: recommended,
        window_seconds: window,
        headroom,
        claims: sample.claims,
        hits: sample.hits,
        recent_claims_per_minute: recent_rate * 60.0,
        claims_per_second: rate,
        last_claim_at: sample.last_claim_at,
        idle,
    }
}

/// What autoscale keeps between passes (in the pool's row, so a replica that takes the pool over carries on).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleState {
    /// The recommendation in effect.
    pub ready: u32,
    /// Since when a lower recommendation has held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_since: Option<DateTime<Utc>>,
}

/// The autoscale decision: the recommendation in effect (up at once, down once a lower one has held for `delay`)
/// and the target it gives, `min(max_ready, max(floor, in effect))`, where `floor` is `min_ready + leases` (capped).
pub fn decide(
    floor: u32,
    max_ready: u32,
    recommended: u32,
    state: &ScaleState,
    now: DateTime<Utc>,
    delay: Duration,
) -> (u32, ScaleState) {
    let next = if recommended >= state.ready {
        ScaleState { ready: recommended, lower_since: None }
    } else {
        match state.lower_since {
            Some(since) if (now - since).to_std().unwrap_or_default() >= delay => {
                ScaleState { ready: recommended, lower_since: None }
            }
            Some(since) => ScaleState { ready: state.ready, lower_since: Some(since) },
            None => ScaleState { ready: state.ready, lower_since: Some(now) },
        }
    };
    (max_ready.min(floor.max(next.ready)), next)
}

/// `max_starts_per_second` of one pool: a bucket of up to one second's starts (at least one), refilled at the rate.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, now: Instant) -> TokenBucket {
        TokenBucket { rate, tokens: Self::burst(rate), at: now }
    }

    fn burst(rate: f64) -> f64 {
        rate.max(1.0)
    }

    fn refill(&mut self, rate: f64, now: Instant) {
        if rate != self.rate {
            self.rate = rate;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(Self::burst(self.rate));
        self.at = now;
    }

    /// Takes up to `want` starts now; returns how many it may.
    pub fn take(&mut self, rate: f64, want: u32, now: Instant) -> u32 {
        self.refill(rate, now);
        let granted = (self.tokens.floor() as u32).min(want);
        self.tokens -= granted as f64;
        granted
    }

    /// How long until the next start may go.
    pub fn next_in(&self) -> Duration {
        if self.tokens >= 1.0 {
            return Duration::ZERO;
        }
        Duration::try_from_secs_f64((1.0 - self.tokens) / self.rate).unwrap_or(Duration::MAX)
    }
}

/// This replica's demand bookkeeping: claims not yet written, the pools' start buckets, when each was pruned, and
/// the pools whose metrics are to be published again.
#[derive(Default)]
pub struct DemandState {
    pending: Mutex<Vec<ClaimEvent>>,
    pub(super) unpublished: Mutex<std::collections::HashSet<String>>,
    buckets: Mutex<HashMap<PoolId, TokenBucket>>,
    pruned: Mutex<HashMap<PoolId, Instant>>,
}

/// Claims kept in memory while the store cannot take them, at most.
const PENDING_MAX: usize = 100_000;

impl App {
    /// Counts a checkout that named the pool. Written to the store in batches (every 200 ms, and before demand is
    /// read), so the checkout itself does not wait for a write.
    pub fn record_claim(&self, pool_id: &str, hit: bool) {
        let mut pending = self.demand.pending.lock().expect("pending claims");
        if pending.len() < PENDING_MAX {
            let id = super::new_id(|s| format!("clm_{s}"));
            pending.push(ClaimEvent { id, pool_id: pool_id.to_string(), at: Utc::now(), hit });
        }
    }

    /// Writes the claims recorded so far.
    pub async fn flush_claims(&self) {
        let claims = std::mem::take(&mut *self.demand.pending.lock().expect("pending claims"));
        if claims.is_empty() {
            return;
        }
        if let Err(e) = self.store.record_claims(&claims).await {
            tracing::warn!(
                error = &e as &dyn std::error::Error,
                claims = claims.len(),
                "Cannot record claims"
            );
            let mut pending = self.demand.pending.lock().expect("pending claims");
            let room = PENDING_MAX.saturating_sub(pending.len());
            pending.extend(claims.into_iter().take(room));
        }
    }

    /// Until the process ends: writes the claims recorded so far every 200 ms, and publishes the metrics of the
    /// pools reconciled since the last time every second (at most once a second per pool, however busy it is).
    pub async fn run_demand_loop(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        for round in 0u64.. {
            tick.tick().await;
            self.flush_claims().await;
            if round % 5 == 0 {
                let pools = std::mem::take(&mut *self.demand.unpublished.lock().expect("unpublished"));
                for pool in pools {
                    self.publish_pool_metrics(&pool).await;
                }
            }
        }
    }

    /// Records how long one of the pool's sandboxes took from start to ready.
    pub async fn record_warmup(&self, pool_id: &str, sandbox_id: &str, took: Duration) {
        let seconds = took.as_secs_f64();
        if let Err(e) = self.store.record_warmup(pool_id, sandbox_id, Utc::now(), seconds).await {
            tracing::warn!(pool = %pool_id, error = &e as &dyn std::error::Error, "Cannot record a warm-up time");
        }
    }

    /// The pool's demand now.
    pub async fn pool_demand(&self, row: &PoolRow, now: DateTime<Utc>) -> AppResult<PoolDemand> {
        self.flush_claims().await;
        let a = &row.pool.autoscale;
        let window = chrono::Duration::seconds(a.effective_window_seconds() as i64);
        let recent = chrono::Duration::seconds(RECENT.as_secs().min(a.effective_window_seconds()) as i64);
        let sample = self.store.demand_sample(&row.pool.id, now - window, now - recent, WARMUPS).await?;
        Ok(demand(&sample, a, now))
    }

    /// The pool's target now, with the autoscale state that goes with it and the demand it was decided on (None:
    /// autoscale is off, and the target does not depend on demand, which is then not read).
    pub async fn pool_target(
        &self,
        row: &PoolRow,
        leases: &[LeaseRow],
        now: DateTime<Utc>,
    ) -> AppResult<(u32, Option<PoolDemand>, ScaleState)> {
        let pool = &row.pool;
        let floor = super::pools::target(pool, leases, now);
        if !pool.autoscale.enabled || pool.state != PoolState::Enabled {
            return Ok((floor, None, ScaleState::default()));
        }
        let demand = self.pool_demand(row, now).await?;
        let delay = scale_down_delay(demand.window_seconds);
        let (target, state) =
            decide(floor, pool.max_ready, demand.recommended_ready, &row.ctl.autoscale, now, delay);
        Ok((target, Some(demand), state))
    }

    /// How many of `want` starts the pool's `max_starts_per_second` lets go now, and when more may.
    pub fn start_budget(&self, row: &PoolRow, want: u32) -> (u32, Option<Duration>) {
        let mut buckets = self.demand.buckets.lock().expect("start buckets");
        let Some(rate) = row.pool.max_starts_per_second else {
            buckets.remove(&row.pool.id);
            return (want, None);
        };
        let now = Instant::now();
        let bucket = buckets.entry(row.pool.id.clone()).or_insert_with(|| TokenBucket::new(rate, now));
        let granted = bucket.take(rate, want, now);
        (granted, (granted < want).then(|| bucket.next_in()))
    }

    /// Deletes the pool's claims that no window needs any more (at most once a minute per pool).
    pub async fn prune_demand(&self, row: &PoolRow) -> AppResult<()> {
        let now = Instant::now();
        {
            let mut pruned = self.demand.pruned.lock().expect("pruned");
            if pruned.get(&row.pool.id).is_some_and(|at| now.duration_since(*at) < PRUNE_EVERY) {
                return Ok(());
            }
            pruned.insert(row.pool.id.clone(), now);
        }
        let a = &row.pool.autoscale;
        let keep = a.effective_window_seconds().max(a.scale_to_zero_after_seconds.unwrap_or(0));
        let before = Utc::now() - chrono::Duration::seconds(keep as i64);
        self.store.prune_demand(&row.pool.id, before, WARMUPS).await?;
        Ok(())
    }

    /// Forgets a pool's in-memory demand state (deleted, or reconciled elsewhere now).
    pub fn forget_demand(&self, pool_id: &str) {
        self.demand.buckets.lock().expect("start buckets").remove(pool_id);
        self.demand.pruned.lock().expect("pruned").remove(pool_id);
        self.demand.unpublished.lock().expect("unpublished").remove(pool_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sample whose recent claims span the whole recent window.
    fn sample(claims: u64, hits: u64, recent: u64, last_ago: Option<i64>, warm: &[f64]) -> DemandSample {
        DemandSample {
            claims,
            hits,
            recent_claims: recent,
            recent_first_at: (recent > 0).then(|| t0() - chrono::Duration::seconds(RECENT.as_secs() as i64)),
            last_claim_at: last_ago.map(|s| t0() - chrono::Duration::seconds(s)),
            warm_seconds: warm.to_vec(),
        }
    }

    /// A sample of `recent` claims that began `began_ago` seconds ago after a quiet spell.
    fn began(recent: u64, began_ago: i64, warm: &[f64]) -> DemandSample {
        DemandSample {
            recent_first_at: Some(t0() - chrono::Duration::seconds(began_ago)),
            ..sample(recent, recent, recent, Some(0), warm)
        }
    }

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).unwrap()
    }

    fn on(window: u64, stz: Option<u64>) -> Autoscale {
        Autoscale {
            enabled: true,
            headroom: None,
            window_seconds: Some(window),
            scale_to_zero_after_seconds: stz,
        }
    }

    #[test]
    fn p90_is_nearest_rank() {
        assert_eq!(p90(&[]), None);
        assert_eq!(p90(&[4.0]), Some(4.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(p90(&ten), Some(9.0));
        let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(p90(&hundred), Some(90.0));
    }

    #[test]
    fn demand_table() {
        struct Case {
            name: &'static str,
            sample: DemandSample,
            autoscale: Autoscale,
            per_minute: f64,
            hit_ratio: Option<f64>,
            p90: Option<f64>,
            recommended: u32,
            idle: bool,
        }
        let cases = [
            Case {
                name: "no claims, no warm-ups",
                sample: sample(0, 0, 0, None, &[]),
                autoscale: Autoscale::default(),
                per_minute: 0.0,
                hit_ratio: None,
                p90: None,
                recommended: 0,
                idle: false,
            },
            Case {
                // 600 claims in 600 s = 1/s; × 2 s × 1.2 = 2.4 → 3.
                name: "steady 1/s with 2 s warm-ups",
                sample: sample(600, 540, 15, Some(1), &[2.0; 20]),
                autoscale: Autoscale::default(),
                per_minute: 60.0,
                hit_ratio: Some(0.9),
                p90: Some(2.0),
                recommended: 3,
                idle: false,
            },
            Case {
                // The window says 0.1/s, the last 15 s 5/s: 5 × 1 × 1.2 = 6.
                name: "a burst shows in the recent rate first",
                sample: sample(60, 10, 75, Some(0), &[1.0]),
                autoscale: Autoscale::default(),
                per_minute: 6.0,
                hit_ratio: Some(10.0 / 60.0),
                p90: Some(1.0),
                recommended: 6,
                idle: false,
            },
            Case {
                // 16 claims over the last 8 s are 2/s, not 16 in 15 s: 2 × 2 × 1.2 = 4.8 → 5.
                name: "a rate that began seconds ago is taken over its own span",
                sample: began(16, 8, &[2.0]),
                autoscale: Autoscale::default(),
                per_minute: 1.6,
                hit_ratio: Some(1.0),
                p90: Some(2.0),
                recommended: 5,
                idle: false,
            },
            Case {
                // With older claims in the window the recent one is over the whole 15 s: 1/15 × 10 × 1.2 = 0.8.
                name: "a lone claim after older ones is not a burst",
                sample: DemandSample { recent_first_at: Some(t0()), ..sample(10, 10, 1, Some(0), &[10.0]) },
                autoscale: Autoscale::default(),
                per_minute: 1.0,
                hit_ratio: Some(1.0),
                p90: Some(10.0),
                recommended: 1,
                idle: false,
            },
            Case {
                // 4 claims at once are 4 over 5 s: 0.8 × 2 × 1.2 = 1.92 → 2.
                name: "claims at one instant are spread over the shortest span",
                sample: began(4, 0, &[2.0]),
                autoscale: Autoscale::default(),
                per_minute: 0.4,
                hit_ratio: Some(1.0),
                p90: Some(2.0),
                recommended: 2,
                idle: false,
            },
            Case {
                name: "exact products do not round up",
                sample: sample(120, 120, 0, Some(30), &[5.0]),
                autoscale: Autoscale { headroom: Some(1.0), ..on(120, None) },
                per_minute: 60.0,
                hit_ratio: Some(1.0),
                p90: Some(5.0),
                recommended: 5,
                idle: false,
            },
            Case {
                name: "idle past scale_to_zero_after_seconds",
                sample: sample(30, 30, 0, Some(301), &[2.0]),
                autoscale: on(600, Some(300)),
                per_minute: 3.0,
                hit_ratio: Some(1.0),
                p90: Some(2.0),
                recommended: 0,
                idle: true,
            },
            Case {
                name: "not idle yet",
                sample: sample(30, 30, 0, Some(299), &[2.0]),
                autoscale: on(600, Some(300)),
                per_minute: 3.0,
                hit_ratio: Some(1.0),
                p90: Some(2.0),
                recommended: 1,
                idle: false,
            },
            Case {
                name: "never claimed counts as idle",
                sample: sample(0, 0, 0, None, &[2.0]),
                autoscale: on(600, Some(300)),
                per_minute: 0.0,
                hit_ratio: None,
                p90: Some(2.0),
                recommended: 0,
                idle: true,
            },
        ];
        for c in cases {
            let d = demand(&c.sample, &c.autoscale, t0());
            assert!((d.claims_per_minute - c.per_minute).abs() < 1e-9, "{}: {}", c.name, d.claims_per_minute);
            assert_eq!(d.hit_ratio, c.hit_ratio, "{}", c.name);
            assert_eq!(d.warm_seconds_p90, c.p90, "{}", c.name);
            assert_eq!(d.recommended_ready, c.recommended, "{}", c.name);
            assert_eq!(d.idle, c.idle, "{}", c.name);
        }
    }

    #[test]
    fn decide_table() {
        let s = |ready, lower: Option<i64>| ScaleState {
            ready,
            lower_since: lower.map(|ago| t0() - chrono::Duration::seconds(ago)),
        };
        // (floor, max_ready, recommended, state) → (target, state)
        let cases = [
            ("up at once", (2, 10, 6, s(3, None)), (6, s(6, None))),
            ("floor holds", (4, 10, 1, s(1, None)), (4, s(1, None))),
            ("max_ready caps", (2, 5, 9, s(0, None)), (5, s(9, None))),
            ("floor above max_ready is capped", (8, 5, 0, s(0, None)), (5, s(0, None))),
            ("down waits", (2, 10, 3, s(6, None)), (6, s(6, Some(0)))),
            ("still waiting", (2, 10, 3, s(6, Some(29))), (6, s(6, Some(29)))),
            ("down after the delay", (2, 10, 3, s(6, Some(30))), (3, s(3, None))),
            ("a new high cancels the wait", (2, 10, 6, s(6, Some(10))), (6, s(6, None))),
        ];
        for (name, (floor, max, rec, state), (target, next)) in cases {
            assert_eq!(decide(floor, max, rec, &state, t0(), SCALE_DOWN_DELAY), (target, next), "{name}");
        }
    }

    #[test]
    fn scale_down_waits_a_tenth_of_the_window_at_most_30_s() {
        assert_eq!(scale_down_delay(600), SCALE_DOWN_DELAY);
        assert_eq!(scale_down_delay(120), Duration::from_secs(12));
        assert_eq!(scale_down_delay(10), Duration::from_secs(1));
    }

    #[test]
    fn token_bucket_shapes_starts() {
        let t = Instant::now();
        let mut b = TokenBucket::new(2.0, t);
        assert_eq!(b.take(2.0, 5, t), 2, "a second's worth at once");
        assert_eq!(b.take(2.0, 5, t), 0);
        assert_eq!(b.next_in(), Duration::from_millis(500));
        assert_eq!(b.take(2.0, 5, t + Duration::from_millis(500)), 1);
        assert_eq!(b.take(2.0, 5, t + Duration::from_secs(60)), 2, "never more than the burst");
        let mut slow = TokenBucket::new(0.5, t);
        assert_eq!(slow.take(0.5, 3, t), 1, "at least one start at once");
        assert_eq!(slow.take(0.5, 3, t + Duration::from_secs(1)), 0);
        assert_eq!(slow.take(0.5, 3, t + Duration::from_secs(2)), 1);
        let mut stalled = TokenBucket::new(1e-300, t);
        assert_eq!(stalled.take(1e-300, 2, t), 1);
        assert_eq!(stalled.next_in(), Duration::MAX, "a wait too long to count is no panic");
    }

    /// A scripted pool: claims arrive by a script, sandboxes take scripted times to warm up, a claim takes a ready
    /// sandbox when there is one. Each step (one simulated second) the demand is computed from the recorded events
    /// exactly as the server does and the decision applied; the pool then starts or stops towards the target.
    mod simulation {
        use super::*;
        use proptest::prelude::*;

        struct Pool {
            min_ready: u32,
            max_ready: u32,
            leases: u32,
            autoscale: Autoscale,
            state: ScaleState,
            claims: Vec<(i64, bool)>,
            warmups: Vec<f64>,
            /// Warming sandboxes: when each becomes ready.
            warming: Vec<i64>,
            ready: u32,
        }

        impl Pool {
            fn sample(&self, now: i64) -> DemandSample {
                let window = self.autoscale.effective_window_seconds() as i64;
                let recent = RECENT.as_secs() as i64;
                let inside: Vec<_> = self.claims.iter().filter(|(at, _)| *at >= now - window).collect();
                DemandSample {
                    claims: inside.len() as u64,
                    hits: inside.iter().filter(|(_, hit)| *hit).count() as u64,
                    recent_claims: self.claims.iter().filter(|(at, _)| *at >= now - recent).count() as u64,
                    recent_first_at: self
                        .claims
                        .iter()
                        .find(|(at, _)| *at >= now - recent)
                        .map(|(at, _)| t0() + chrono::Duration::seconds(*at)),
                    last_claim_at: self.claims.last().map(|(at, _)| t0() + chrono::Duration::seconds(*at)),
                    warm_seconds: self.warmups.iter().rev().take(WARMUPS as usize).copied().collect(),
                }
            }

            /// One second: claims arrive, warm-ups finish, the target is decided and applied. Returns the target.
            fn step(&mut self, now: i64, claims: u32, warm_secs: u32) -> u32 {
                for _ in 0..claims {
                    let hit = self.ready > 0;
                    self.ready -= hit as u32;
                    self.claims.push((now, hit));
                }
                let done = self.warming.iter().filter(|at| **at <= now).count() as u32;
                self.warming.retain(|at| *at > now);
                self.ready += done;
                let at = t0() + chrono::Duration::seconds(now);
                let d = demand(&self.sample(now), &self.autoscale, at);
                let floor = (self.min_ready + self.leases).min(self.max_ready);
                let delay = scale_down_delay(d.window_seconds);
                let (target, state) =
                    decide(floor, self.max_ready, d.recommended_ready, &self.state, at, delay);
                self.state = state;
                let alive = self.ready + self.warming.len() as u32;
                if alive < target {
                    for _ in alive..target {
                        self.warming.push(now + warm_secs as i64);
                        self.warmups.push(warm_secs as f64);
                    }
                } else {
                    // Warming ones stop first, then ready ones (as the planner does).
                    let mut excess = alive - target;
                    while excess > 0 && !self.warming.is_empty() {
                        self.warming.pop();
                        excess -= 1;
                    }
                    self.ready -= excess.min(self.ready);
                }
                target
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
            /// Thousands of steps of scripted claim streams and start times: the target never leaves
            /// [min_ready + leases, max_ready], and once the claims stop (or hold steady) it settles and stays.
            #[test]
            fn autoscale_stays_in_bounds_and_settles(
                min_ready in 0u32..4,
                extra in 0u32..30,
                leases in 0u32..3,
                window in 10u64..300,
                headroom in 1.0f64..3.0,
                stz in proptest::option::of(10u64..200),
                script in proptest::collection::vec((0u32..15, 1u32..8, 1u32..60), 1..40),
                steady in 0u32..4,
            ) {
                let max_ready = min_ready + extra;
                let mut pool = Pool {
                    min_ready,
                    max_ready,
                    leases,
                    autoscale: Autoscale {
                        enabled: true,
                        headroom: Some(headroom),
                        window_seconds: Some(window),
                        scale_to_zero_after_seconds: stz,
                    },
                    state: ScaleState::default(),
                    claims: Vec::new(),
                    warmups: Vec::new(),
                    warming: Vec::new(),
                    ready: 0,
                };
                let floor = (min_ready + leases).min(max_ready);
                let mut now = 0i64;
                // Phases of (claims per second, warm-up seconds, duration).
                for (rate, warm, secs) in script {
                    for _ in 0..secs {
                        let target = pool.step(now, rate, warm);
                        prop_assert!(target <= max_ready, "target {target} > max_ready {max_ready}");
                        prop_assert!(target >= floor, "target {target} < floor {floor}");
                        now += 1;
                    }
                }
                // Then a steady stream (maybe none) for long enough for every window and delay to pass, and for
                // the steady stream's starts to replace the warm-up times the p90 is taken over: the target stops
                // moving and stays within bounds.
                let settle = window as i64
                    + stz.unwrap_or(0) as i64
                    + 2 * scale_down_delay(window).as_secs() as i64
                    + WARMUPS as i64
                    + 10;
                let mut last = None;
                let mut changes_late = 0;
                for i in 0..(settle + 300) {
                    let target = pool.step(now, steady, 2);
                    prop_assert!(target <= max_ready && target >= floor);
                    if i >= settle {
                        if last.is_some_and(|l| l != target) {
                            changes_late += 1;
                        }
                        last = Some(target);
                    }
                    now += 1;
                }
                prop_assert_eq!(changes_late, 0, "the target kept moving under a steady stream");
                if steady == 0 && stz.is_some() {
                    prop_assert_eq!(last, Some(floor), "an idle pool goes back to min_ready + leases");
                }
            }
        }
    }
}
