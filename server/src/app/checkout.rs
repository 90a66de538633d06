//! How a checkout is routed: from the request's mode and shape and the pool's state to "claim ready inventory
//! (waiting so long)", "go cold, for this reason" or "refuse". Pure, so every combination is a row of a table.

use std::time::Duration;

use warmpool_api::{CheckoutMode, FallbackReason, PoolState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Claim a ready sandbox, waiting up to this long for one.
    Claim { wait: Duration },
    /// Create a cold sandbox; the checkout records why.
    Cold(FallbackReason),
    /// `require` that cannot be served warm: `warm_pool_unavailable`, naming the request field that made it
    /// unpoolable, if one did.
    Refuse { reason: FallbackReason, field: Option<&'static str> },
}

/// The route before inventory is looked at.
pub fn route(
    mode: CheckoutMode,
    unpoolable: Option<&'static str>,
    pool: PoolState,
    wait_ms: Option<u64>,
) -> Route {
    let fallback = |reason, field| match mode {
        CheckoutMode::Require => Route::Refuse { reason, field },
        _ => Route::Cold(reason),
    };
    if mode == CheckoutMode::Bypass {
        return Route::Cold(FallbackReason::Bypass);
    }
    if let Some(field) = unpoolable {
        return fallback(FallbackReason::UnpoolableShape, Some(field));
    }
    match pool {
        PoolState::Draining => fallback(FallbackReason::PoolDraining, None),
        // A disabled pool still hands out the inventory it kept, but nothing refills it: no point waiting.
        PoolState::Disabled => Route::Claim { wait: Duration::ZERO },
        PoolState::Enabled => Route::Claim { wait: Duration::from_millis(wait_ms.unwrap_or(0)) },
    }
}

/// The route when no ready sandbox came within the wait.
pub fn after_miss(mode: CheckoutMode, pool: PoolState) -> Route {
    let reason = match pool {
        PoolState::Disabled => FallbackReason::PoolDisabled,
        _ => FallbackReason::NoReadyInventory,
    };
    match mode {
        CheckoutMode::Require => Route::Refuse { reason, field: None },
        _ => Route::Cold(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CheckoutMode::{Bypass, Prefer, Require};
    use FallbackReason::*;
    use PoolState::{Disabled, Draining, Enabled};

    /// mode, unpoolable field, pool state, wait, expected route.
    type Row = (CheckoutMode, Option<&'static str>, PoolState, Option<u64>, Route);

    #[test]
    fn routes() {
        let claim = |ms| Route::Claim { wait: Duration::from_millis(ms) };
        let refuse = |reason, field| Route::Refuse { reason, field };
        #[rustfmt::skip]
        let table: &[Row] = &[
            (Prefer,  None,         Enabled,  Some(500), claim(500)),
            (Require, None,         Enabled,  None,      claim(0)),
            (Require, None,         Disabled, Some(500), claim(0)),
            (Prefer,  None,         Draining, Some(500), Route::Cold(PoolDraining)),
            (Require, None,         Draining, None,      refuse(PoolDraining, None)),
            (Bypass,  None,         Enabled,  Some(500), Route::Cold(FallbackReason::Bypass)),
            (Bypass,  Some("envs"), Draining, None,      Route::Cold(FallbackReason::Bypass)),
            (Prefer,  Some("cwd"),  Enabled,  Some(500), Route::Cold(UnpoolableShape)),
            (Require, Some("cwd"),  Enabled,  Some(500), refuse(UnpoolableShape, Some("cwd"))),
            (Require, Some("desktop"), Draining, None,   refuse(UnpoolableShape, Some("desktop"))),
        ];
        for (mode, unpoolable, pool, wait, want) in table {
            assert_eq!(
                route(*mode, *unpoolable, *pool, *wait),
                *want,
                "{mode:?} {unpoolable:?} {pool:?} {wait:?}"
            );
        }
    }

    #[test]
    fn misses() {
        #[rustfmt::skip]
        let table = [
            (Prefer,  Enabled,  Route::Cold(NoReadyInventory)),
            (Prefer,  Disabled, Route::Cold(PoolDisabled)),
            (Require, Enabled,  Route::Refuse { reason: NoReadyInventory, field: None }),
            (Require, Disabled, Route::Refuse { reason: PoolDisabled, field: None }),
        ];
        for (mode, pool, want) in table {
            assert_eq!(after_miss(mode, pool), want, "{mode:?} {pool:?}");
        }
    }
}
