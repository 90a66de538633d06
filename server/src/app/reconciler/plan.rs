//! The reconciler's pure half: what a pool should do now, from what it wants and what is observed. No I/O;
//! tested with tables and properties.

use warmpool_api::{DegradedReason, PoolState, SandboxId};

use crate::app::lifecycle::StopCause;
use crate::store::Lifecycle;

/// A pool's unclaimed sandbox as the planner sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub id: SandboxId,
    pub generation: u64,
    /// `warming`, `ready`, `draining` or `failed` (claimed sandboxes are no longer members).
    pub lifecycle: Lifecycle,
    /// Seconds since it became ready.
    pub ready_for_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: PoolState,
    pub target: u32,
    pub generation: u64,
    /// The resolved build is ready to start sandboxes from.
    pub build_ready: bool,
    /// Filling stopped after repeated prewarm failures.
    pub fill_stopped: bool,
    pub members: Vec<Member>,
    pub idle_timeout_seconds: Option<u64>,
    /// More warm sandboxes the account's quota allows (None: unlimited).
    pub quota_headroom: Option<u32>,
    /// More sandboxes the runtime takes.
    pub capacity: u32,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub start: u32,
    pub stop: Vec<(SandboxId, StopCause)>,
    /// Why fewer sandboxes are started than the target needs.
    pub blocked: Vec<DegradedReason>,
}

/// Desired + observed → actions. Pure: no I/O, tested with tables.
pub fn plan(o: &Observed) -> Plan {
    let mut p = Plan::default();
    let live: Vec<&Member> =
        o.members.iter().filter(|m| matches!(m.lifecycle, Lifecycle::Warming | Lifecycle::Ready)).collect();
    if o.state == PoolState::Draining {
        p.stop = live.iter().map(|m| (m.id.clone(), StopCause::Drain)).collect();
        return p;
    }
    let mut current_ready = Vec::new();
    let mut current_warming = Vec::new();
    let mut old_ready = Vec::new();
    for m in &live {
        let expired = m.lifecycle == Lifecycle::Ready
            && o.idle_timeout_seconds.zip(m.ready_for_secs).is_some_and(|(limit, age)| age >= limit);
        if expired {
            p.stop.push((m.id.clone(), StopCause::Expired));
        } else if m.generation == o.generation {
            if m.lifecycle == Lifecycle::Ready {
                current_ready.push(*m)
            } else {
                current_warming.push(*m)
            }
        } else if m.lifecycle == Lifecycle::Ready {
            old_ready.push(*m);
        } else {
            p.stop.push((m.id.clone(), StopCause::Rollout));
        }
    }
    if o.state == PoolState::Disabled {
        // Disabled keeps its inventory (old generations included) and starts nothing.
        p.stop.retain(|(_, r)| *r == StopCause::Expired);
        return p;
    }
    let target = o.target as usize;
    // Old ready sandboxes keep serving until the new generation has enough ready ones.
    let keep_old = target.saturating_sub(current_ready.len()).min(old_ready.len());
    p.stop.extend(old_ready[keep_old..].iter().map(|m| (m.id.clone(), StopCause::Rollout)));
    // Above target: stop warming ones first, then the newest ready.
    let alive = current_ready.len() + current_warming.len();
    if alive > target {
        let mut excess = alive - target;
        for m in current_warming.iter().chain(current_ready.iter().rev()) {
            if excess == 0 {
                break;
            }
            p.stop.push((m.id.clone(), StopCause::ScaleDown));
            excess -= 1;
        }
        return p;
    }
    if !o.build_ready || o.fill_stopped {
        return p;
    }
    let want = (target - alive) as u32;
    let mut start = want;
    if let Some(headroom) = o.quota_headroom {
        if headroom < start {
            start = headroom;
            p.blocked.push(DegradedReason::QuotaExceeded);
        }
    }
    if o.capacity < start {
        start = o.capacity;
        p.blocked.push(DegradedReason::NoEligibleHosts);
    }
    p.start = start;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Member `sbx_<id>`.
    fn member(id: &str, generation: u64, lifecycle: Lifecycle, age: Option<u64>) -> Member {
        Member { id: SandboxId::from_suffix(id), generation, lifecycle, ready_for_secs: age }
    }

    fn observed(target: u32, members: Vec<Member>) -> Observed {
        Observed {
            state: PoolState::Enabled,
            target,
            generation: 2,
            build_ready: true,
            fill_stopped: false,
            members,
            idle_timeout_seconds: None,
            quota_headroom: None,
            capacity: 1000,
        }
    }

    /// The stopped members, by the `id` given to [`member`].
    fn stops(p: &Plan) -> Vec<(&str, StopCause)> {
        p.stop.iter().map(|(id, r)| (&id[SandboxId::PREFIX.len()..], *r)).collect()
    }

    #[test]
    fn planner_table() {
        use Lifecycle::*;
        use StopCause::{Drain, Expired, Rollout, ScaleDown as Excess};
        struct Case {
            name: &'static str,
            o: Observed,
            start: u32,
            stop: Vec<(&'static str, StopCause)>,
            blocked: Vec<DegradedReason>,
        }
        let cases = vec![
            Case {
                name: "empty pool fills to target",
                o: observed(3, vec![]),
                start: 3,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "warming counts toward target",
                o: observed(3, vec![member("a", 2, Warming, None), member("b", 2, Ready, Some(1))]),
                start: 1,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "excess stops warming first, then newest ready",
                o: observed(
                    1,
                    vec![
                        member("a", 2, Ready, Some(9)),
                        member("b", 2, Ready, Some(1)),
                        member("c", 2, Warming, None),
                    ],
                ),
                start: 0,
                stop: vec![("c", Excess), ("b", Excess)],
                blocked: vec![],
            },
            Case {
                name: "rollout keeps old ready until new ones are ready",
                o: observed(
                    2,
                    vec![
                        member("o1", 1, Ready, Some(5)),
                        member("o2", 1, Ready, Some(5)),
                        member("ow", 1, Warming, None),
                    ],
                ),
                start: 2,
                stop: vec![("ow", Rollout)],
                blocked: vec![],
            },
            Case {
                name: "rollout drains old ready as new ones become ready",
                o: observed(
                    2,
                    vec![
                        member("o1", 1, Ready, Some(5)),
                        member("o2", 1, Ready, Some(5)),
                        member("n1", 2, Ready, Some(0)),
                    ],
                ),
                start: 1,
                stop: vec![("o2", Rollout)],
                blocked: vec![],
            },
            Case {
                name: "draining stops everything and starts nothing",
                o: Observed {
                    state: PoolState::Draining,
                    ..observed(
                        0,
                        vec![
                            member("a", 2, Ready, Some(1)),
                            member("b", 2, Warming, None),
                            member("c", 2, Draining, None),
                        ],
                    )
                },
                start: 0,
                stop: vec![("a", Drain), ("b", Drain)],
                blocked: vec![],
            },
            Case {
                name: "disabled keeps inventory",
                o: Observed {
                    state: PoolState::Disabled,
                    ..observed(0, vec![member("a", 2, Ready, Some(1)), member("o", 1, Ready, Some(1))])
                },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "idle timeout expires stale ready sandboxes and replaces them",
                o: Observed {
                    idle_timeout_seconds: Some(60),
                    ..observed(2, vec![member("old", 2, Ready, Some(61)), member("new", 2, Ready, Some(3))])
                },
                start: 1,
                stop: vec![("old", Expired)],
                blocked: vec![],
            },
            Case {
                name: "quota caps the fill",
                o: Observed { quota_headroom: Some(1), ..observed(3, vec![]) },
                start: 1,
                stop: vec![],
                blocked: vec![DegradedReason::QuotaExceeded],
            },
            Case {
                name: "no capacity",
                o: Observed { capacity: 0, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![DegradedReason::NoEligibleHosts],
            },
            Case {
                name: "build not ready: nothing starts",
                o: Observed { build_ready: false, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
            Case {
                name: "prewarm failures stop filling",
                o: Observed { fill_stopped: true, ..observed(3, vec![]) },
                start: 0,
                stop: vec![],
                blocked: vec![],
            },
        ];
        for c in cases {
            let p = plan(&c.o);
            assert_eq!(p.start, c.start, "{}: start", c.name);
            assert_eq!(stops(&p), c.stop, "{}: stop", c.name);
            assert_eq!(p.blocked, c.blocked, "{}: blocked", c.name);
        }
    }

    proptest::proptest! {
        /// Whatever is observed, an enabled pool never plans more live sandboxes of the current generation than
        /// its target, and never stops a sandbox twice.
        #[test]
        fn planner_never_overshoots(target in 0u32..20, slots in proptest::collection::vec((0u64..3, 0u8..3, proptest::option::of(0u64..100)), 0..30)) {
            let members: Vec<Member> = slots.iter().enumerate().map(|(i, (g, s, age))| {
                let slot = match s { 0 => Lifecycle::Warming, 1 => Lifecycle::Ready, _ => Lifecycle::Draining };
                member(&format!("m{i}"), *g, slot, *age)
            }).collect();
            let o = Observed { idle_timeout_seconds: Some(50), ..observed(target, members.clone()) };
            let p = plan(&o);
            let stopped: std::collections::HashSet<_> = p.stop.iter().map(|(id, _)| id.clone()).collect();
            proptest::prop_assert_eq!(stopped.len(), p.stop.len());
            let current_live = members.iter().filter(|m| m.generation == 2 && m.lifecycle != Lifecycle::Draining && !stopped.contains(&m.id)).count();
            proptest::prop_assert!(current_live + p.start as usize <= (target as usize).max(current_live.min(target as usize)));
        }
    }
}
