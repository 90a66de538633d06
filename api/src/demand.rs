//! A pool's demand (always computed, shown in its status) and the `autoscale` settings that let it set the
//! pool's target.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::FieldError;

/// The window demand is measured over unless `autoscale.window_seconds` says otherwise.
pub const DEMAND_WINDOW_SECONDS_DEFAULT: u64 = 600;
/// The headroom over Little's law unless `autoscale.headroom` says otherwise.
pub const DEMAND_HEADROOM_DEFAULT: f64 = 1.2;

/// `autoscale` of a pool: off by default. On, the pool's target is
/// `min(max_ready, max(min_ready + leases, recommended_ready))`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscale {
    pub enabled: bool,
    /// Multiplies Little's law (claims/s × warm-up p90); default 1.2, between 1 and 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 10)]
    pub headroom: Option<f64>,
    /// The window claims are counted over; default 600, between 10 and 86400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 10, maximum = 86400)]
    pub window_seconds: Option<u64>,
    /// With no claim for this long, `recommended_ready` falls to 0 (`min_ready` still holds). At most 604800.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 604800)]
    pub scale_to_zero_after_seconds: Option<u64>,
}

impl Autoscale {
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if let Some(h) = self.headroom {
            if !(1.0..=10.0).contains(&h) {
                return Err(FieldError::new(format!("{field}.headroom"), "must be between 1 and 10"));
            }
        }
        if let Some(w) = self.window_seconds {
            if !(10..=86_400).contains(&w) {
                return Err(FieldError::new(
                    format!("{field}.window_seconds"),
                    "must be between 10 and 86400",
                ));
            }
        }
        if let Some(s) = self.scale_to_zero_after_seconds {
            if !(1..=604_800).contains(&s) {
                return Err(FieldError::new(
                    format!("{field}.scale_to_zero_after_seconds"),
                    "must be between 1 and 604800",
                ));
            }
        }
        Ok(())
    }

    pub fn effective_headroom(&self) -> f64 {
        self.headroom.unwrap_or(DEMAND_HEADROOM_DEFAULT)
    }

    pub fn effective_window_seconds(&self) -> u64 {
        self.window_seconds.unwrap_or(DEMAND_WINDOW_SECONDS_DEFAULT)
    }
}

/// The slowest `max_starts_per_second`: one start in 1,000 s.
pub const MAX_STARTS_PER_SECOND_MIN: f64 = 0.001;
/// The fastest `max_starts_per_second`.
pub const MAX_STARTS_PER_SECOND_MAX: f64 = 10_000.0;

/// Checks `max_starts_per_second`: 0.001 to 10,000 starts per second.
pub fn validate_max_starts_per_second(value: Option<f64>) -> Result<(), FieldError> {
    match value {
        Some(v) if !(MAX_STARTS_PER_SECOND_MIN..=MAX_STARTS_PER_SECOND_MAX).contains(&v) => {
            Err(FieldError::new(
                "max_starts_per_second",
                format!(
                    "must be between {MAX_STARTS_PER_SECOND_MIN} and {MAX_STARTS_PER_SECOND_MAX} (got {v})"
                ),
            ))
        }
        _ => Ok(()),
    }
}

/// A pool's demand: how fast it is claimed, how often warm, how long its sandboxes take to warm up, and the ready
/// count that keeps that claim rate served warm (Little's law):
/// `recommended_ready = ceil(claims_per_second × warm_seconds_p90 × headroom)`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PoolDemand {
    /// Checkouts that named the pool (hits and misses) per minute, over the last `window_seconds`.
    pub claims_per_minute: f64,
    /// Hits / claims over the window (null before any claim).
    pub hit_ratio: Option<f64>,
    /// Start-to-ready time of the pool's recent sandboxes, 90th percentile (null before any became ready).
    pub warm_seconds_p90: Option<f64>,
    /// `ceil(claims_per_second × warm_seconds_p90 × headroom)`.
    pub recommended_ready: u32,
    pub window_seconds: u64,
    pub headroom: f64,
    /// Claims and hits counted in the window.
    pub claims: u64,
    pub hits: u64,
    /// Claims per minute of the last 15 s (over the time they span, at least 5 s, when they began after a quiet
    /// spell): a burst shows here within seconds, before the window's average moves.
    pub recent_claims_per_minute: f64,
    /// The rate the recommendation uses: the larger of the window's and the recent one, per second.
    pub claims_per_second: f64,
    pub last_claim_at: Option<DateTime<Utc>>,
    /// No claim for `scale_to_zero_after_seconds`: the recommendation is 0.
    pub idle: bool,
}

/// A PATCH field that `null` clears: absent → `None`, `null` → `Some(None)`, a value → `Some(Some(v))`.
pub fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}
