//! Per-team rate limits: GCRA (the generic cell rate algorithm) per
//! (team, rule) and one global budget, decided in process (governor) or
//! shared by every replica through Redis.
//!
//! # The algorithm
//! Each limit has an emission interval `T = per / count` and lets `burst`
//! requests through at once (tolerance `tau = T * (burst - 1)`). Its state is
//! one instant, the theoretical arrival time `tat`. A request at `now` is
//! allowed iff `tat - now <= tau`; then `tat = max(tat, now) + T`. After an
//! allowed request, `remaining = floor((tau + T - (tat - now)) / T)` more
//! requests would be allowed at once and the quota is whole again after
//! `reset = tat - now`; a refusal may retry after `tat - tau - now`.
//!
//! # One decision
//! Every team rule whose `actions` contain the request's Action, in config
//! order, then the global budget. A refusal stops there (later limits are
//! neither consulted nor charged; earlier ones stay charged).
//!
//! # Backends
//! - local: governor keyed limiters, one per distinct (T, burst); each
//!   (team, rule) slot is a precomputed integer key, so the hot path neither
//!   formats nor locks.
//! - Redis: one Lua script per decision evaluates every applied limit
//!   atomically on the server's clock (`TIME`), so replicas with skewed
//!   clocks agree; keys `{prefix}:rl:{team}:{rule}` and `{prefix}:rl:global`
//!   expire when their quota is whole again. The call is bounded by
//!   `rate_limit.redis.timeout`; on a timeout or an error, an Action in
//!   `rate_limit.fail_open` is decided by a local limiter at
//!   `count / replicas`, `burst / replicas` (`degraded`), any other gets
//!   [`Outcome::Unavailable`]. After a failure, Redis is skipped for a second
//!   (no request waits on a dead Redis twice); then a background probe checks
//!   it and decisions go back through Redis by themselves.

mod local;
mod remote;

pub(crate) use remote::RedisBackend;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};

use crate::action::Action;
use crate::config::{Backend, Config, RateRule};
use crate::shutdown::Stop;

use local::{Gcra, LocalPool, LocalSlot, Step};
use remote::{RemoteSlot, Verdict};

/// `RateLimit-Policy` (draft-ietf-httpapi-ratelimit-headers-11).
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit` (draft-ietf-httpapi-ratelimit-headers-11).
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The name of the global budget, in outcomes, headers and stats.
pub const GLOBAL_RULE: &str = "global";

/// The team name under which global refusals of teams absent from the
/// config are counted in [`RateLimitStats::refused_by`].
pub const UNKNOWN_TEAM: &str = "*";

/// How often idle local keys are swept.
const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RateLimitSetupError {
    /// The Redis URL is unusable. The message never holds the URL itself.
    #[error("rate_limit.redis: {0}")]
    RedisUrl(String),
    /// A rate whose GCRA parameters cannot be represented: more than 10^9
    /// requests per second, or `burst` times the interval over a century.
    #[error("{rule}: rate {count} per {per:?} with burst {burst} cannot be enforced")]
    Unrepresentable {
        rule: String,
        count: u32,
        per: Duration,
        burst: u32,
    },
}

/// The rate limits of every team and the global budget.
pub struct RateLimiter {
    /// foldhash: the keys are the config's team names, and the lookup is
    /// on every request.
    teams: HashMap<String, TeamLimits, foldhash::fast::RandomState>,
    global: Option<Slot>,
    /// Indexed by `Action as usize`: decided locally when Redis cannot answer.
    fail_open: Box<[bool]>,
    redis: Option<Arc<RedisBackend>>,
    /// Every distinct governor limiter, for the sweep.
    limiters: Vec<Arc<local::Keyed>>,
    decisions: AtomicU64,
    refused: AtomicU64,
    degraded: AtomicU64,
    unavailable: AtomicU64,
    unknown_team_refused: AtomicU64,
}

struct TeamLimits {
    rules: Box<[Slot]>,
    /// Indexed by `Action as usize`: the positions in `rules` that apply.
    by_action: Box<[Box<[usize]>]>,
    /// Refusals per rule, then of the global budget.
    refused: Box<[AtomicU64]>,
}

/// One limit: a team rule or the global budget.
struct Slot {
    /// Shared with every decision's [`PolicyStatus`], not copied.
    name: Arc<str>,
    quota: u32,
    window: Duration,
    /// The limit itself (local backend) or the fail-open fallback at
    /// count/replicas (Redis backend).
    local: LocalSlot,
    /// Redis backend only.
    remote: Option<RemoteSlot>,
    /// Units one request takes, by `Action as usize` (mostly 1).
    costs: Box<[u32]>,
}

impl Slot {
    fn cost_of(&self, action: Action) -> u32 {
        self.costs.get(action as usize).copied().unwrap_or(1)
    }

    fn status(&self, remaining: u32, reset: Duration) -> PolicyStatus {
        PolicyStatus {
            name: self.name.clone(),
            quota: self.quota,
            window: self.window,
            remaining,
            reset,
        }
    }
}

/// The outcome of [`RateLimiter::check`].
#[derive(Debug, Clone)]
pub struct Decision {
    pub outcome: Outcome,
    /// One entry per limit consulted, in order (none when no rule applied).
    pub policies: Vec<PolicyStatus>,
    /// Redis could not answer and the Action is in `fail_open`: decided by
    /// this replica's local share of the limits.
    pub degraded: bool,
    /// How long the Redis script call took, when one was sent.
    pub redis_round_trip: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    /// `rule` is the team rule's name, or `global`.
    Limited {
        rule: String,
        retry_after: Duration,
    },
    /// Redis failed and the Action is not in `fail_open`: fail closed.
    /// `rule` is the first limit that applied.
    Unavailable {
        rule: String,
        retry_after: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyStatus {
    pub name: Arc<str>,
    /// Requests per `window` (the rule's rate count).
    pub quota: u32,
    pub window: Duration,
    /// Requests still allowed at once.
    pub remaining: u32,
    /// Until the quota is fully restored.
    pub reset: Duration,
}

/// Counters since start; [`RateLimiter::stats`] takes a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    /// Every call of `check`.
    pub decisions: u64,
    /// `Outcome::Limited` (degraded ones included).
    pub refused: u64,
    /// Decided locally because Redis could not answer (fail-open Actions).
    pub degraded: u64,
    /// `Outcome::Unavailable` (fail-closed Actions while Redis could not answer).
    pub unavailable: u64,
    /// Failed or timed-out Redis calls, probes included.
    pub redis_errors: u64,
    /// Decisions sent to Redis (one script call each).
    pub redis_calls: u64,
    /// (team, rule) -> `Outcome::Limited` count, non-zero entries only,
    /// sorted; a team absent from the config counts as [`UNKNOWN_TEAM`].
    pub refused_by: Vec<((String, String), u64)>,
}

impl Decision {
    /// No rule applied.
    fn unlimited() -> Decision {
        Decision {
            outcome: Outcome::Allowed,
            policies: Vec::new(),
            degraded: false,
            redis_round_trip: None,
        }
    }

    pub fn allowed(&self) -> bool {
        self.outcome == Outcome::Allowed
    }

    /// Sets `RateLimit-Policy` and `RateLimit`
    /// (draft-ietf-httpapi-ratelimit-headers-11), one list member per limit
    /// consulted, e.g. `"reads";q=20;w=1, "global";q=50;w=1` and
    /// `"reads";r=17;t=1, "global";r=44;t=1`, plus `Retry-After` (whole
    /// seconds, rounded up, at least 1) when refused. Nothing when no rule applied.
    pub fn apply_headers(&self, headers: &mut HeaderMap) {
        if self.policies.is_empty() {
            return;
        }
        let mut policy = String::with_capacity(24 * self.policies.len());
        let mut limit = String::with_capacity(24 * self.policies.len());
        for (i, p) in self.policies.iter().enumerate() {
            if i > 0 {
                policy.push_str(", ");
                limit.push_str(", ");
            }
            // Pushed piece by piece: `write!` costs more than the rest of
            // the rate-limit decision.
            push_sf_string(&mut policy, &p.name);
            policy.push_str(";q=");
            push_decimal(&mut policy, p.quota.into());
            policy.push_str(";w=");
            push_decimal(&mut policy, ceil_secs(p.window).max(1));
            push_sf_string(&mut limit, &p.name);
            limit.push_str(";r=");
            push_decimal(&mut limit, p.remaining.into());
            limit.push_str(";t=");
            push_decimal(&mut limit, ceil_secs(p.reset));
        }
        if let Ok(v) = HeaderValue::try_from(policy) {
            headers.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::try_from(limit) {
            headers.insert(RATELIMIT, v);
        }
        match &self.outcome {
            Outcome::Allowed => {}
            Outcome::Limited { retry_after, .. } | Outcome::Unavailable { retry_after, .. } => {
                headers.insert(
                    RETRY_AFTER,
                    HeaderValue::from(ceil_secs(*retry_after).max(1)),
                );
            }
        }
    }
}

/// `n` in decimal.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // ASCII digits: always valid UTF-8.
    if let Ok(text) = std::str::from_utf8(&digits[start..]) {
        out.push_str(text);
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u64::MAX)
}

/// A structured-field sf-string (RFC 8941): quoted, `"` and `\` escaped,
/// anything outside printable ASCII dropped. Rule names are already plain.
fn push_sf_string(out: &mut String, s: &str) {
    out.push('"');
    if s.bytes()
        .all(|b| matches!(b, b' '..=b'~') && b != b'"' && b != b'\\')
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => {}
        }
    }
    out.push('"');
}

/// The limits one decision consults, in order.
struct Applied<'a> {
    /// What the request does (its cost in each limit).
    action: Action,
    team: Option<&'a TeamLimits>,
    rules: &'a [usize],
    global: Option<&'a Slot>,
}

impl<'a> Applied<'a> {
    fn len(&self) -> usize {
        self.rules.len() + usize::from(self.global.is_some())
    }

    fn slots(&self) -> impl Iterator<Item = &'a Slot> + use<'a> {
        let team_rules: &'a [Slot] = self.team.map_or(&[], |t| &t.rules[..]);
        self.rules
            .iter()
            .filter_map(move |&i| team_rules.get(i))
            .chain(self.global)
    }

    /// Decides with each limit's local limiter.
    fn decide_local(&self, degraded: bool) -> (Decision, Option<usize>) {
        let mut policies = Vec::with_capacity(self.len());
        for (pos, slot) in self.slots().enumerate() {
            match slot.local.check(slot.cost_of(self.action)) {
                Step::Allowed { remaining, reset } => policies.push(slot.status(remaining, reset)),
                Step::Refused { retry_after, reset } => {
                    policies.push(slot.status(0, reset));
                    let outcome = Outcome::Limited {
                        rule: slot.name.to_string(),
                        retry_after,
                    };
                    return (
                        Decision {
                            outcome,
                            policies,
                            degraded,
                            redis_round_trip: None,
                        },
                        Some(pos),
                    );
                }
            }
        }
        let decision = Decision {
            outcome: Outcome::Allowed,
            policies,
            degraded,
            redis_round_trip: None,
        };
        (decision, None)
    }

    /// Turns Redis's verdicts (one per limit consulted) into a decision.
    fn decide_by_verdicts(&self, verdicts: &[Verdict]) -> (Decision, Option<usize>) {
        let mut policies = Vec::with_capacity(verdicts.len());
        for (pos, (slot, v)) in self.slots().zip(verdicts).enumerate() {
            policies.push(slot.status(v.remaining, v.reset));
            if !v.allowed {
                let outcome = Outcome::Limited {
                    rule: slot.name.to_string(),
                    retry_after: v.retry_after,
                };
                return (
                    Decision {
                        outcome,
                        policies,
                        degraded: false,
                        redis_round_trip: None,
                    },
                    Some(pos),
                );
            }
        }
        let decision = Decision {
            outcome: Outcome::Allowed,
            policies,
            degraded: false,
            redis_round_trip: None,
        };
        (decision, None)
    }
}

impl RateLimiter {
    /// Builds limiters for every team rule and the global budget. Connects
    /// nothing and needs no runtime: the Redis connection is made by the
    /// first decision (or by [`RateLimiter::spawn_maintenance`]).
    pub fn new(config: &Config) -> Result<Arc<Self>, RateLimitSetupError> {
        let mut pool = LocalPool::default();
        let (redis, replicas, prefix) = match &config.rate_limit.backend {
            Backend::Local => (None, 1, ""),
            Backend::Redis {
                url,
                timeout,
                replicas,
                key_prefix,
                cluster,
                tls,
            } => (
                Some(Arc::new(RedisBackend::new(
                    &remote::Target {
                        url,
                        cluster: *cluster,
                        tls: tls.as_ref(),
                    },
                    *timeout,
                )?)),
                (*replicas).max(1),
                key_prefix.as_str(),
            ),
        };
        let mut build = |team: Option<&str>,
                         rule: &RateRule|
         -> Result<Slot, RateLimitSetupError> {
            let label = match team {
                Some(t) => format!("teams.{t}.rate_limits.{}", rule.name),
                None => "rate_limit.global".to_string(),
            };
            let unrepresentable = |count: u32, burst: u32| RateLimitSetupError::Unrepresentable {
                rule: label.clone(),
                count,
                per: rule.rate.per,
                burst,
            };
            let (count, per, burst) = (rule.rate.count, rule.rate.per, rule.burst);
            let gcra = Gcra::new(count, per, burst).ok_or_else(|| unrepresentable(count, burst))?;
            let (local, remote) = if redis.is_some() {
                let (c, b) = ((count / replicas).max(1), (burst / replicas).max(1));
                let share = Gcra::new(c, per, b).ok_or_else(|| unrepresentable(c, b))?;
                // One hash tag for every key: on a Redis Cluster they all
                // live in one slot, so that one decision (the team's rules
                // and the global budget) stays one atomic script call.
                let key = match team {
                    Some(t) => format!("{{{prefix}}}:rl:{t}:{}", rule.name),
                    None => format!("{{{prefix}}}:rl:{GLOBAL_RULE}"),
                };
                (pool.slot(share), Some(RemoteSlot::new(key, gcra)))
            } else {
                (pool.slot(gcra), None)
            };
            Ok(Slot {
                name: match team {
                    Some(_) => Arc::from(rule.name.as_str()),
                    None => Arc::from(GLOBAL_RULE),
                },
                quota: count,
                window: per,
                local,
                remote,
                costs: Action::ALL.iter().map(|&a| rule.cost_of(a)).collect(),
            })
        };

        let action_slots = Action::ALL
            .iter()
            .map(|a| *a as usize + 1)
            .max()
            .unwrap_or(0);
        let mut teams = HashMap::with_capacity_and_hasher(config.teams.len(), Default::default());
        for (name, team) in &config.teams {
            if team.rate_limits.is_empty() {
                continue;
            }
            let rules = team
                .rate_limits
                .iter()
                .map(|r| build(Some(name), r))
                .collect::<Result<Box<[Slot]>, _>>()?;
            let mut by_action = vec![Vec::new(); action_slots];
            for &action in Action::ALL {
                for (i, rule) in team.rate_limits.iter().enumerate() {
                    if rule.actions.contains(&action) {
                        by_action[action as usize].push(i);
                    }
                }
            }
            teams.insert(
                name.clone(),
                TeamLimits {
                    refused: (0..=rules.len()).map(|_| AtomicU64::new(0)).collect(),
                    rules,
                    by_action: by_action.into_iter().map(Vec::into_boxed_slice).collect(),
                },
            );
        }
        let global = config
            .rate_limit
            .global
            .as_ref()
            .map(|g| build(None, g))
            .transpose()?;
        let mut fail_open = vec![false; action_slots];
        for &action in &config.rate_limit.fail_open {
            fail_open[action as usize] = true;
        }
        Ok(Arc::new(RateLimiter {
            teams,
            global,
            fail_open: fail_open.into_boxed_slice(),
            redis,
            limiters: pool.into_limiters(),
            decisions: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            degraded: AtomicU64::new(0),
            unavailable: AtomicU64::new(0),
            unknown_team_refused: AtomicU64::new(0),
        }))
    }

    /// The shared Redis, when the backend is Redis (also the idempotency
    /// store's), and the key prefix.
    pub(crate) fn redis(&self) -> Option<&Arc<RedisBackend>> {
        self.redis.as_ref()
    }

    /// One decision for one request: every team rule whose `actions` contain
    /// `action`, then the global budget if set. A refusal by an earlier
    /// limit stops there. With Redis, returns within the configured timeout.
    pub async fn check(&self, team: &str, action: Action) -> Decision {
        self.decisions.fetch_add(1, Ordering::Relaxed);
        let team_limits = self.teams.get(team);
        let rules: &[usize] = team_limits
            .and_then(|t| t.by_action.get(action as usize))
            .map_or(&[], |r| &r[..]);
        if rules.is_empty() && self.global.is_none() {
            return Decision::unlimited();
        }
        let applied = Applied {
            action,
            team: team_limits,
            rules,
            global: self.global.as_ref(),
        };
        let (decision, refused_at) = match &self.redis {
            None => applied.decide_local(false),
            Some(redis) => {
                let sent = std::time::Instant::now();
                // Boxed: only this path needs the Redis call's state, and
                // held in place it would be stored (twice, rust-lang/rust#62958)
                // in every request's future, copied whole when it is boxed.
                let answer = Box::pin(
                    redis.decide(
                        applied
                            .slots()
                            .filter_map(|s| s.remote.as_ref().map(|r| (r, s.cost_of(action)))),
                    ),
                )
                .await;
                let round_trip = match answer {
                    Err(remote::Failure::CircuitOpen) => None,
                    _ => Some(sent.elapsed()),
                };
                let (mut decision, refused_at) = match answer {
                    Ok(verdicts) => applied.decide_by_verdicts(&verdicts),
                    Err(_) => self.failure_mode(&applied, action),
                };
                decision.redis_round_trip = round_trip;
                (decision, refused_at)
            }
        };
        if let Some(pos) = refused_at {
            self.refused.fetch_add(1, Ordering::Relaxed);
            let counter = match team_limits {
                Some(t) => t
                    .refused
                    .get(rules.get(pos).copied().unwrap_or(t.rules.len())),
                None => Some(&self.unknown_team_refused),
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        decision
    }

    /// Redis could not answer: fail open (local share) or closed.
    fn failure_mode(&self, applied: &Applied<'_>, action: Action) -> (Decision, Option<usize>) {
        if self
            .fail_open
            .get(action as usize)
            .copied()
            .unwrap_or(false)
        {
            self.degraded.fetch_add(1, Ordering::Relaxed);
            return applied.decide_local(true);
        }
        self.unavailable.fetch_add(1, Ordering::Relaxed);
        let retry_after = remote::RETRY_INTERVAL;
        let policies: Vec<PolicyStatus> =
            applied.slots().map(|s| s.status(0, retry_after)).collect();
        let rule = policies
            .first()
            .map(|p| p.name.to_string())
            .unwrap_or_default();
        let decision = Decision {
            outcome: Outcome::Unavailable { rule, retry_after },
            policies,
            degraded: false,
            redis_round_trip: None,
        };
        (decision, None)
    }

    /// Background upkeep until `stop` (or until the limiter is dropped):
    /// connects to Redis and loads the script at once (so the first requests
    /// do not pay for it, and a Redis down at startup is noticed before
    /// them), then sweeps idle local keys every 30 s. Call it once at startup,
    /// inside the runtime.
    pub fn spawn_maintenance(self: &Arc<Self>, stop: Stop) {
        let weak = Arc::downgrade(self);
        let redis = self.redis.clone();
        tokio::spawn(async move {
            if let Some(redis) = redis {
                redis.startup().await;
            }
            while !stop.sleep(SWEEP_INTERVAL).await {
                let Some(this) = weak.upgrade() else { break };
                this.sweep();
            }
        });
    }

    /// Forgets local keys whose quota is whole again (their state equals a fresh one).
    fn sweep(&self) {
        for limiter in &self.limiters {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Number of local keys currently held (for tests and diagnostics).
    fn local_keys(&self) -> usize {
        self.limiters.iter().map(|l| l.len()).sum()
    }

    pub fn stats(&self) -> RateLimitStats {
        let mut refused_by = Vec::new();
        for (team, limits) in &self.teams {
            for (i, counter) in limits.refused.iter().enumerate() {
                let n = counter.load(Ordering::Relaxed);
                if n > 0 {
                    let rule = limits.rules.get(i).map_or(GLOBAL_RULE, |s| &*s.name);
                    refused_by.push(((team.clone(), rule.to_string()), n));
                }
            }
        }
        let n = self.unknown_team_refused.load(Ordering::Relaxed);
        if n > 0 {
            refused_by.push(((UNKNOWN_TEAM.to_string(), GLOBAL_RULE.to_string()), n));
        }
        refused_by.sort();
        RateLimitStats {
            decisions: self.decisions.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            degraded: self.degraded.load(Ordering::Relaxed),
            unavailable: self.unavailable.load(Ordering::Relaxed),
            redis_errors: self.redis.as_ref().map_or(0, |r| r.errors()),
            redis_calls: self.redis.as_ref().map_or(0, |r| r.calls()),
            refused_by,
        }
    }
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The Redis URL may hold a password: only its redacted backend state.
        f.debug_struct("RateLimiter")
            .field(
                "backend",
                &if self.redis.is_some() {
                    "redis"
                } else {
                    "local"
                },
            )
            .field("teams_with_rules", &self.teams.len())
            .field("global", &self.global.as_ref().map(|g| (g.quota, g.window)))
            .field("redis", &self.redis)
            .field("local_keys", &self.local_keys())
            .finish()
    }
}

#[cfg(test)]
mod tests;
