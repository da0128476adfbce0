//! Refusal records held to a rate per caller. Anyone can send requests that
//! are refused (no valid JWT needed for that), and each refusal is an audit
//! record: unbounded, a flood of them would fill the disk, rotate real
//! records away, or fill the webhook's backlog until mutating requests are
//! refused for everyone. So each caller (a team; callers without a valid
//! JWT count as one, `-`) gets `audit.refusal_records` records at most.
//!
//! Held-back records are counted, never dropped unsaid: the next record
//! written for the caller carries `suppressed: N` (how many were held back
//! since the previous one), and a caller that has been quiet for a while
//! gets its last held-back record written, carrying the count of the
//! others. Written records plus their `suppressed` counts add up to every
//! refusal.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use governor::{DefaultKeyedRateLimiter, Quota};

use super::AuditRecord;
use crate::config::RefusalRecords;

/// What a caller is counted as when it has no team (no valid JWT).
pub const NO_TEAM: &str = "-";

pub struct RefusalSampler {
    limiter: DefaultKeyedRateLimiter<String>,
    held: Mutex<HashMap<String, Held>>,
}

/// A caller's held-back records: how many, and the last one.
struct Held {
    count: u64,
    last: AuditRecord,
    at: Instant,
}

impl std::fmt::Debug for RefusalSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusalSampler").finish_non_exhaustive()
    }
}

impl RefusalSampler {
    pub fn new(limit: &RefusalRecords) -> RefusalSampler {
        RefusalSampler {
            limiter: DefaultKeyedRateLimiter::keyed(quota(limit)),
            held: Mutex::new(HashMap::new()),
        }
    }

    /// The record to write now (with the count of those held back before
    /// it), or `None`: held back, counted.
    pub fn admit(&self, caller: &str, mut record: AuditRecord) -> Option<AuditRecord> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if self.limiter.check_key(&caller.to_string()).is_ok() {
            record.suppressed = held.remove(caller).map(|h| h.count);
            return Some(record);
        }
        let now = Instant::now();
        match held.get_mut(caller) {
            Some(h) => {
                h.count += 1;
                h.last = record;
                h.at = now;
            }
            None => {
                held.insert(
                    caller.to_string(),
                    Held {
                        count: 1,
                        last: record,
                        at: now,
                    },
                );
            }
        }
        None
    }

    /// The held-back records of callers quiet for at least `quiet` (every
    /// caller's, with zero): the last of each, carrying the count of the
    /// others.
    pub fn drain(&self, quiet: Duration) -> Vec<AuditRecord> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let quiet_callers: Vec<String> = held
            .iter()
            .filter(|(_, h)| h.at.elapsed() >= quiet)
            .map(|(caller, _)| caller.clone())
            .collect();
        quiet_callers
            .into_iter()
            .filter_map(|caller| held.remove(&caller))
            .map(|h| {
                let mut record = h.last;
                record.suppressed = (h.count > 1).then_some(h.count - 1);
                record
            })
            .collect()
    }
}

fn quota(limit: &RefusalRecords) -> Quota {
    let interval = (limit.rate.per / limit.rate.count.max(1)).max(Duration::from_nanos(1));
    let burst = std::num::NonZeroU32::new(limit.burst.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::with_period(interval)
        .unwrap_or_else(|| Quota::per_second(std::num::NonZeroU32::MIN))
        .allow_burst(burst)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Decision, Stage};
    use crate::config::{AuditLevel, Rate};

    fn refusal(n: u32) -> AuditRecord {
        let mut r = AuditRecord::new(
            &format!("req-{n}"),
            Stage::Completed,
            AuditLevel::Metadata,
            "v2",
            Decision::Refused,
        );
        r.reason = Some("auth:missing".into());
        r
    }

    fn sampler(burst: u32) -> RefusalSampler {
        RefusalSampler::new(&RefusalRecords {
            rate: Rate {
                count: 1,
                per: Duration::from_secs(3600),
            },
            burst,
        })
    }

    #[test]
    fn a_flood_is_written_up_to_the_burst_then_counted() {
        let s = sampler(3);
        let written: Vec<AuditRecord> = (0..50)
            .filter_map(|n| s.admit(NO_TEAM, refusal(n)))
            .collect();
        assert_eq!(written.len(), 3);
        assert!(written.iter().all(|r| r.suppressed.is_none()));
        // Another caller has a budget of its own.
        assert!(s.admit("web-team", refusal(99)).is_some());
        // Not yet quiet: nothing drained.
        assert!(s.drain(Duration::from_secs(3600)).is_empty());
        let drained = s.drain(Duration::ZERO);
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].request_id, "req-49", "the last held back");
        assert_eq!(
            drained[0].suppressed,
            Some(46),
            "the 47 held back, less the one written"
        );
        assert!(s.drain(Duration::ZERO).is_empty(), "drained once");
    }

    #[test]
    fn the_next_record_written_carries_the_count() {
        let s = RefusalSampler::new(&RefusalRecords {
            rate: Rate {
                count: 1000,
                per: Duration::from_secs(1),
            },
            burst: 1,
        });
        assert!(s.admit(NO_TEAM, refusal(0)).is_some());
        let mut held = 0;
        let mut next = None;
        for n in 1..100_000 {
            match s.admit(NO_TEAM, refusal(n)) {
                Some(r) => {
                    next = Some(r);
                    break;
                }
                None => held += 1,
            }
            if held > 0 && n % 100 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let next = next.expect("the budget refills");
        if held == 0 {
            assert_eq!(next.suppressed, None);
        } else {
            assert_eq!(next.suppressed, Some(held));
        }
        assert!(s.drain(Duration::ZERO).is_empty());
    }
}
