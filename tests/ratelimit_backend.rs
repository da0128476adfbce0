//! The Redis rate-limit backend against a real `redis-server` (started here
//! on a free 127.0.0.1 port, killed on drop): exact limits, one limit shared
//! by two replicas, fail-open / fail-closed while Redis is gone or hung, and
//! recovery by itself when it is back.
//!
//! Needs `redis-server` on PATH (`apt-get install redis-server`): without it
//! these tests fail, they never skip (see tests/common/redis.rs).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fixtures;
use common::redis::RedisServer;
use serde_json::json;
use toastgate::action::Action;
use toastgate::config::Config;
use toastgate::ratelimit::{Decision, Outcome, RateLimiter};

const PASSWORD: &str = "rl-test-password";

/// The Redis call's timeout in most of these tests: the most the config
/// allows. A limiter's first decision also connects, authenticates and
/// loads the script (the connection is made lazily), which a busy machine
/// may not do within the 100 ms of overlays/redis-rate-limits.yaml; a
/// decision that times out is degraded, and these tests count those.
const ROOMY_TIMEOUT: &str = "2s";

/// The test config with `overlays` and then `extra`, Redis at `redis`.
fn parse(redis: &RedisServer, overlays: &[&str], extra: serde_json::Value) -> Config {
    let secrets = common::secrets().with_override("TG_REDIS_URL", &redis.url());
    fixtures::parse_config(overlays, extra, &secrets).expect("test config is valid")
}

/// reads: 5/h burst 4; writes: 2/h burst 2 (nothing refills while a test
/// runs); fail_open: read; in Redis under `prefix` for `replicas` replicas,
/// within [`ROOMY_TIMEOUT`]; with the global budget (6/h burst 6) if asked.
fn config(redis: &RedisServer, prefix: &str, replicas: u32, global: bool) -> Config {
    let mut overlays = vec![
        "overlays/web-reads-and-writes-per-hour.yaml",
        "overlays/redis-rate-limits.yaml",
    ];
    if global {
        overlays.push("overlays/global-6-per-hour.yaml");
    }
    let extra = json!({"rate_limit": {"redis": {
        "replicas": replicas, "key_prefix": prefix, "timeout": ROOMY_TIMEOUT,
    }}});
    parse(redis, &overlays, extra)
}

/// A decision, with a bound on how long it may take: a hang guard (beyond
/// any Redis timeout here), not a speed check.
async fn timed(rl: &RateLimiter, team: &str, action: Action) -> Decision {
    tokio::time::timeout(Duration::from_secs(10), rl.check(team, action))
        .await
        .expect("a rate-limit decision hung")
}

/// [`timed`], with the instants it was asked at and answered at: Redis made
/// the decision between them.
async fn timed_between(
    rl: &RateLimiter,
    team: &str,
    action: Action,
) -> (Decision, Instant, Instant) {
    let asked = Instant::now();
    let d = timed(rl, team, action).await;
    (d, asked, Instant::now())
}

fn remaining(d: &Decision) -> Vec<u32> {
    d.policies.iter().map(|p| p.remaining).collect()
}

fn limited_by(d: &Decision, rule: &str) -> Duration {
    match &d.outcome {
        Outcome::Limited {
            rule: r,
            retry_after,
        } if r == rule => *retry_after,
        _ => panic!("expected Limited by {rule}: {d:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_limits_through_redis() {
    let redis = RedisServer::start_with_password(PASSWORD);
    let rl = RateLimiter::new(&config(&redis, "exact", 1, true)).expect("builds");
    assert!(!format!("{rl:?}").contains(PASSWORD));

    // reads: T = 720 s, burst 4; global: T = 600 s, burst 6. Nothing
    // refills between these decisions, so each count is exact.
    let interval = Duration::from_secs(720);
    let start = Instant::now();
    for expected in [[3, 5], [2, 4], [1, 3], [0, 2]] {
        let d = timed(&rl, "web-team", Action::InstanceList).await;
        assert!(d.allowed() && !d.degraded, "{d:?}");
        assert_eq!(remaining(&d), expected);
    }
    let d = timed(&rl, "web-team", Action::InstanceGet).await;
    let elapsed = start.elapsed();
    let retry_after = limited_by(&d, "reads");
    // tat = first + 4T; retry at tat - 3T = first + T, where `first` (the
    // server's time of the first decision) is after `start`.
    assert!(
        retry_after <= interval
            && retry_after + Duration::from_millis(1) >= interval.saturating_sub(elapsed),
        "retry_after {retry_after:?} after {elapsed:?}"
    );
    assert_eq!(
        d.policies.len(),
        1,
        "the refusal stops before the global budget"
    );

    // The key lives until its quota is whole again: tat - now <= 4T.
    let ttl = redis.pttl("{exact}:rl:web-team:reads");
    assert!(ttl > 0 && ttl <= 4 * 720_000, "PTTL {ttl}");
    assert!(redis.pttl("{exact}:rl:global") > 0);

    // Writes have their own budget; a team without rules meets only the global one.
    let d = timed(&rl, "web-team", Action::InstanceReboot).await;
    assert_eq!(
        d.policies.iter().map(|p| &*p.name).collect::<Vec<_>>(),
        ["writes", "global"]
    );
    let d = timed(&rl, "batch-team", Action::InstanceCreate).await;
    assert_eq!(
        d.policies.iter().map(|p| &*p.name).collect::<Vec<_>>(),
        ["global"]
    );

    let stats = rl.stats();
    assert_eq!(
        (stats.degraded, stats.unavailable, stats.redis_errors),
        (0, 0, 0)
    );
    assert_eq!(stats.refused, 1);
}

/// After a refusal one slot comes back at `retry_after`, and only one, and
/// the key vanishes once its quota is whole again. That needs a rule that
/// refills while the test runs: reads at 1 a second, burst 2, on a limiter
/// of its own. Whether two decisions come within a second of each other is
/// up to the machine: what each step may claim is judged against the time
/// that actually passed (on a machine that does not stall for a second, the
/// claims are exact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_slot_back_after_retry_after_through_redis() {
    let redis = RedisServer::start_with_password(PASSWORD);
    let extra = json!({
        "teams": {"web-team": {"rate_limits": [
            {"name": "reads", "actions": ["read"], "rate": "1/s", "burst": 2},
        ]}},
        "rate_limit": {"redis": {"key_prefix": "refill", "timeout": ROOMY_TIMEOUT}},
    });
    let config = parse(&redis, &["overlays/redis-rate-limits.yaml"], extra);
    let rl = RateLimiter::new(&config).expect("builds");
    let interval = Duration::from_secs(1);
    // Clocks: Redis decides on its own; ours measures. A margin for the
    // difference in their rates over a few seconds.
    let clocks = Duration::from_millis(1);

    // Use up the burst: the third decision is refused, or a later one if
    // the machine stalled a second between two.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut refusals = 1;
    let (refused_asked, retry_after) = loop {
        let (d, asked, _) = timed_between(&rl, "web-team", Action::InstanceList).await;
        assert!(!d.degraded, "{d:?}");
        if !d.allowed() {
            break (asked, limited_by(&d, "reads"));
        }
        assert!(Instant::now() < deadline, "the burst was never used up");
    };
    assert!(retry_after <= interval, "retry_after {retry_after:?}");

    tokio::time::sleep(retry_after + Duration::from_millis(30)).await;
    let (d, back_asked, back_answered) = timed_between(&rl, "web-team", Action::InstanceList).await;
    assert!(d.allowed() && !d.degraded, "one slot back: {d:?}");
    // Only that one: the next comes back an interval after it, and this
    // decision was made less than an interval after it unless the machine
    // stalled (then as many more as the stall allows).
    let late = (back_answered.duration_since(refused_asked) + clocks).saturating_sub(retry_after);
    let more = u32::try_from(late.as_micros() / interval.as_micros()).unwrap();
    assert!(
        remaining(&d)[0] <= more,
        "{d:?}, decided at most {late:?} after retry_after"
    );

    // And it is taken: the next decision may go only `reset - tau` after
    // this one (tau = one interval at burst 2); one made before is refused.
    let next_slot = d.policies[0].reset.saturating_sub(interval);
    let (d, _, answered) = timed_between(&rl, "web-team", Action::InstanceList).await;
    assert!(!d.degraded, "{d:?}");
    if answered.duration_since(back_asked) + clocks < next_slot {
        limited_by(&d, "reads");
        refusals += 1;
    }

    // Idle keys vanish by themselves once their quota is whole again,
    // within burst x interval.
    let ttl = redis.pttl("{refill}:rl:web-team:reads");
    assert!(ttl > 0 && ttl <= 2_000, "PTTL {ttl}");
    tokio::time::sleep(Duration::from_millis(2_000 + 50)).await;
    assert_eq!(redis.pttl("{refill}:rl:web-team:reads"), -2, "expired");

    let stats = rl.stats();
    assert_eq!(
        (stats.degraded, stats.unavailable, stats.redis_errors),
        (0, 0, 0)
    );
    assert_eq!(stats.refused, refusals);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hold_one_combined_limit() {
    let redis = RedisServer::start_with_password(PASSWORD);
    let a = RateLimiter::new(&config(&redis, "shared", 2, false)).expect("builds");
    let b = RateLimiter::new(&config(&redis, "shared", 2, false)).expect("builds");
    // burst 4 in all, whichever replica serves (5/h: none comes back meanwhile).
    for (i, rl) in [&a, &b, &a, &b].into_iter().enumerate() {
        let d = timed(rl, "web-team", Action::InstanceList).await;
        assert!(d.allowed() && !d.degraded, "{d:?}");
        assert_eq!(remaining(&d), [3 - i as u32]);
    }
    limited_by(&timed(&b, "web-team", Action::InstanceList).await, "reads");
    limited_by(&timed(&a, "web-team", Action::InstanceList).await, "reads");
    // Another prefix is another limit.
    let c = RateLimiter::new(&config(&redis, "other", 2, false)).expect("builds");
    assert!(timed(&c, "web-team", Action::InstanceList).await.allowed());
    assert_eq!(a.stats().refused + b.stats().refused, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut redis = RedisServer::start_with_password(PASSWORD);
    let rl: Arc<RateLimiter> =
        RateLimiter::new(&config(&redis, "outage", 2, false)).expect("builds");
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    assert!(d.allowed() && !d.degraded, "{d:?}");

    redis.kill();
    // reads are fail-open: decided locally at 5/2 -> 2/h, burst 4/2 = 2.
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    assert!(d.allowed() && d.degraded, "{d:?}");
    assert_eq!(remaining(&d), [1]);
    let d = timed(&rl, "web-team", Action::InstanceGet).await;
    assert!(d.allowed() && d.degraded, "{d:?}");
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    limited_by(&d, "reads");
    assert!(d.degraded);
    // writes are fail-closed.
    let d = timed(&rl, "web-team", Action::InstanceCreate).await;
    assert!(
        matches!(&d.outcome, Outcome::Unavailable { rule, retry_after } if rule == "writes" && *retry_after >= Duration::from_secs(1)),
        "{d:?}"
    );
    let stats = rl.stats();
    assert!(stats.redis_errors >= 1, "{stats:?}");
    assert_eq!((stats.degraded, stats.unavailable), (3, 1), "{stats:?}");

    // Back on the same port: decisions go through Redis again by themselves.
    redis.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let d = timed(&rl, "web-team", Action::InstanceCreate).await;
        if d.allowed() {
            assert!(!d.degraded);
            break;
        }
        assert!(matches!(d.outcome, Outcome::Unavailable { .. }), "{d:?}");
        assert!(
            Instant::now() < deadline,
            "Redis did not come back into use: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        redis.pttl("{outage}:rl:web-team:writes") > 0,
        "decided by the new Redis"
    );
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    assert!(d.allowed() && !d.degraded, "{d:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_costs_one_timeout_then_recovers() {
    let redis = RedisServer::start_with_password(PASSWORD);
    // The overlay's 100 ms Redis timeout, and limits that refill (reads:
    // 5/s burst 4; writes: 2/s burst 2): whatever the warm-up below takes
    // comes back.
    let overlays = [
        "overlays/web-reads-and-writes.yaml",
        "overlays/redis-rate-limits.yaml",
    ];
    let extra = json!({"rate_limit": {"redis": {"replicas": 1, "key_prefix": "hung"}}});
    let rl = RateLimiter::new(&parse(&redis, &overlays, extra)).expect("builds");
    // Redis decides. (The first call also connects and loads the script,
    // which may take a busy machine more than 100 ms: that call times out,
    // and Redis comes back into use by itself. Writes fail closed, so the
    // warm-up takes nothing from the local fail-open share of reads.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while timed(&rl, "web-team", Action::InstanceDelete).await.outcome != Outcome::Allowed {
        assert!(Instant::now() < deadline, "Redis never decided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    redis.signal("-STOP");
    let start = Instant::now();
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    let took = start.elapsed();
    assert!(d.allowed() && d.degraded, "{d:?}");
    assert!(
        took >= Duration::from_millis(90),
        "waited for the 100 ms timeout: {took:?}"
    );
    // The circuit is open: the next decisions do not go to Redis at all
    // (so they cannot wait for it).
    let calls = rl.stats().redis_calls;
    let d = timed(&rl, "web-team", Action::InstanceDelete).await;
    assert!(matches!(d.outcome, Outcome::Unavailable { .. }), "{d:?}");
    assert_eq!(
        rl.stats().redis_calls,
        calls,
        "a decision went to a hung Redis"
    );

    redis.signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(10);
    while timed(&rl, "web-team", Action::InstanceDelete).await.outcome != Outcome::Allowed {
        assert!(
            Instant::now() < deadline,
            "Redis did not come back into use"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rl.stats().redis_errors >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_warms_up_and_notices_a_missing_redis() {
    let mut redis = RedisServer::start_with_password(PASSWORD);
    let rl = RateLimiter::new(&config(&redis, "warm", 1, false)).expect("builds");
    redis.kill();
    let (handle, stop) = toastgate::shutdown::stop_pair();
    rl.spawn_maintenance(stop);
    // The startup probe finds no Redis: the first request does not wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while rl.stats().redis_errors == 0 {
        assert!(Instant::now() < deadline, "startup probe did not run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = rl.stats().redis_calls;
    let d = timed(&rl, "web-team", Action::InstanceList).await;
    assert!(d.degraded, "{d:?}");
    assert_eq!(
        rl.stats().redis_calls,
        calls,
        "the first request tried the missing Redis"
    );
    handle.stop();
}

/// The Redis script takes each request's cost: a create costs 4 of 10 an
/// hour, a read 1; a request that does not fit takes nothing. Two limiters
/// (replicas) share the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_costs_through_redis() {
    let redis = RedisServer::start();
    let extra = json!({
        "teams": {"web-team": {"rate_limits": [{
            "name": "budget", "actions": ["*"], "rate": "10/h", "burst": 10,
            "costs": [{"actions": ["instance.create"], "cost": 4}],
        }]}},
        "rate_limit": {"redis": {"key_prefix": "weighted", "replicas": 2, "timeout": ROOMY_TIMEOUT}},
    });
    let config = parse(&redis, &["overlays/redis-rate-limits.yaml"], extra);
    let a = RateLimiter::new(&config).expect("builds");
    let b = RateLimiter::new(&config).expect("builds");
    let steps = [
        (&a, Action::InstanceCreate, Some(6)),
        (&b, Action::InstanceList, Some(5)),
        (&b, Action::InstanceCreate, Some(1)),
        (&a, Action::InstanceCreate, None),
        (&a, Action::InstanceGet, Some(0)),
        (&b, Action::InstanceGet, None),
    ];
    for (i, (rl, action, expected)) in steps.into_iter().enumerate() {
        let d = timed(rl, "web-team", action).await;
        assert!(!d.degraded, "step {i}: {d:?}");
        match expected {
            Some(left) => {
                assert!(d.allowed(), "step {i}: {d:?}");
                assert_eq!(remaining(&d), [left], "step {i}");
            }
            None => {
                limited_by(&d, "budget");
            }
        }
    }
    assert!(redis.pttl("{weighted}:rl:web-team:budget") > 0);
}
