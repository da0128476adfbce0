//! In-process GCRA limiters: governor keyed limiters, one per distinct
//! (emission interval, burst), each (team, rule) slot a precomputed `u32` key.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::Quota;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;

/// A keyed governor limiter that reports its state on every allowed cell
/// (for `remaining`) and a `NotUntil` on every refusal (for `retry_after`).
pub(super) type Keyed = governor::RateLimiter<
    u32,
    DefaultKeyedStateStore<u32>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// Smallest `retry_after` ever reported: a refusal never says "retry now".
pub(super) const MIN_RETRY: Duration = Duration::from_millis(1);

/// Longest tolerance a rule may have (governor counts nanoseconds in a u64).
const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The GCRA parameters of one limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Gcra {
    /// Emission interval T = per / count.
    pub interval: Duration,
    /// Requests allowed at once; tolerance = T * (burst - 1).
    pub burst: u32,
}

impl Gcra {
    /// `count` requests per `per`, `burst` at once. `None` when the numbers
    /// cannot be represented (an interval below 1 ns or a span over a century).
    pub fn new(count: u32, per: Duration, burst: u32) -> Option<Gcra> {
        let interval = per / count.max(1);
        let burst = burst.max(1);
        if interval.is_zero() || interval.checked_mul(burst)? > MAX_SPAN {
            return None;
        }
        Some(Gcra { interval, burst })
    }

    /// Tolerance tau = T * (burst - 1).
    pub fn tolerance(&self) -> Duration {
        // Bounded by MAX_SPAN at construction.
        self.interval.saturating_mul(self.burst - 1)
    }
}

/// What one GCRA step decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Allowed {
        remaining: u32,
        reset: Duration,
    },
    Refused {
        retry_after: Duration,
        reset: Duration,
    },
}

/// One (team, rule) limit in a shared keyed limiter.
pub(super) struct LocalSlot {
    limiter: Arc<Keyed>,
    key: u32,
    gcra: Gcra,
}

impl LocalSlot {
    /// Takes `cost` cells if the limit allows it (a cost beyond the burst,
    /// possible only in a replica's fail-open share, is always refused).
    pub fn check(&self, cost: u32) -> Step {
        let cost = NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN);
        let checked = match self.limiter.check_key_n(&self.key, cost) {
            Ok(checked) => checked,
            Err(_insufficient) => {
                let never = self.gcra.interval.saturating_mul(self.gcra.burst);
                return Step::Refused {
                    retry_after: never.max(MIN_RETRY),
                    reset: never,
                };
            }
        };
        match checked {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity().min(self.gcra.burst);
                // governor does not expose the new TAT; remaining = floor((tau + T - reset) / T)
                // bounds reset to (T * (b - 1 - remaining), T * (b - remaining)]: report the
                // upper bound (never promises the quota back earlier than it is).
                let reset = self
                    .gcra
                    .interval
                    .saturating_mul(self.gcra.burst - remaining);
                Step::Allowed { remaining, reset }
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                Step::Refused {
                    retry_after: wait.max(MIN_RETRY),
                    // earliest = tat - tau, so tat - now = wait + tau.
                    reset: wait.saturating_add(self.gcra.tolerance()),
                }
            }
        }
    }
}

/// Builds slots, sharing one keyed limiter among slots with equal parameters.
#[derive(Default)]
pub(super) struct LocalPool {
    limiters: HashMap<Gcra, Arc<Keyed>>,
    next_key: u32,
}

impl LocalPool {
    pub fn slot(&mut self, gcra: Gcra) -> LocalSlot {
        let limiter = self
            .limiters
            .entry(gcra)
            .or_insert_with(|| {
                let burst = NonZeroU32::new(gcra.burst).unwrap_or(NonZeroU32::MIN);
                // `Gcra::new` guarantees a non-zero interval; the fallback is unreachable.
                let quota = Quota::with_period(gcra.interval)
                    .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
                    .allow_burst(burst);
                Arc::new(
                    governor::RateLimiter::keyed(quota)
                        .with_middleware::<StateInformationMiddleware>(),
                )
            })
            .clone();
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        LocalSlot { limiter, key, gcra }
    }

    pub fn into_limiters(self) -> Vec<Arc<Keyed>> {
        self.limiters.into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_parameters() {
        let g = Gcra::new(5, Duration::from_secs(1), 5).unwrap();
        assert_eq!(g.interval, Duration::from_millis(200));
        assert_eq!(g.tolerance(), Duration::from_millis(800));
        assert!(
            Gcra::new(u32::MAX, Duration::from_secs(1), 1).is_none(),
            "sub-ns interval"
        );
        assert!(
            Gcra::new(1, Duration::from_secs(3600), u32::MAX).is_none(),
            "span too long"
        );
        assert_eq!(Gcra::new(1, Duration::from_secs(60), 0).unwrap().burst, 1);
    }

    #[test]
    fn equal_parameters_share_one_limiter_with_distinct_keys() {
        let mut pool = LocalPool::default();
        let g = Gcra::new(5, Duration::from_secs(1), 2).unwrap();
        let a = pool.slot(g);
        let b = pool.slot(g);
        let c = pool.slot(Gcra::new(6, Duration::from_secs(1), 2).unwrap());
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        assert_ne!(a.key, b.key);
        assert!(!Arc::ptr_eq(&a.limiter, &c.limiter));
        assert_eq!(pool.into_limiters().len(), 2);
        // Slots sharing a limiter do not share a budget.
        assert!(matches!(a.check(1), Step::Allowed { remaining: 1, .. }));
        assert!(matches!(a.check(1), Step::Allowed { remaining: 0, .. }));
        assert!(matches!(a.check(1), Step::Refused { .. }));
        assert!(matches!(b.check(1), Step::Allowed { remaining: 1, .. }));
    }

    #[test]
    fn a_request_takes_its_cost_from_the_budget() {
        let mut pool = LocalPool::default();
        // 5 an hour, burst 5: nothing refills while the test runs.
        let slot = pool.slot(Gcra::new(5, Duration::from_secs(3600), 5).unwrap());
        assert!(matches!(slot.check(3), Step::Allowed { remaining: 2, .. }));
        // 3 more do not fit in the 2 left; that refusal takes nothing.
        assert!(matches!(slot.check(3), Step::Refused { .. }));
        assert!(matches!(slot.check(2), Step::Allowed { remaining: 0, .. }));
        assert!(matches!(slot.check(1), Step::Refused { .. }));
        // Beyond the burst: never.
        let other = pool.slot(Gcra::new(5, Duration::from_secs(3600), 5).unwrap());
        match other.check(6) {
            Step::Refused { retry_after, .. } => {
                assert_eq!(retry_after, Duration::from_secs(3600))
            }
            s => panic!("{s:?}"),
        }
        assert!(matches!(other.check(5), Step::Allowed { remaining: 0, .. }));
    }
}
