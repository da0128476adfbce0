//! Rate limits through the gateway: exact GCRA limits with the IETF headers
//! on both surfaces, the global upstream budget, three replicas sharing one
//! real redis-server, and Redis dying and coming back mid-traffic.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::{Env, assert_nova_error, fast_sim, secrets, start_sim};
use serde_json::{Value, json};

async fn get_with_headers(
    env: &Env,
    team: &str,
    path: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let a = env.request(team, reqwest::Method::GET, path, None).await;
    (a.status, a.headers, a.body)
}

/// web-team's reads: 5 an hour, burst 5, so that nothing refills while the
/// refusals are checked however slow the machine. Recovery needs a limit
/// that refills meanwhile: batch-team's reads, 1 a second, burst 1.
#[tokio::test]
async fn n_allowed_then_refused_with_headers_then_recovered() {
    let batch_reads = json!({"teams": {"batch-team": {"rate_limits": [
        {"name": "reads", "actions": ["read"], "rate": "1/s", "burst": 1},
    ]}}});
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/web-reads-5-per-hour.yaml"],
        batch_reads,
    )
    .await;
    let started = Instant::now();
    for i in 0..5 {
        let (s, h, _) = get_with_headers(&env, "web-team", "/v2/web/flavors").await;
        assert_eq!(s, 200, "request {i}");
        assert_eq!(h["ratelimit-policy"], r#""reads";q=5;w=3600"#);
        let rl = h["ratelimit"].to_str().unwrap();
        assert!(rl.starts_with(&format!(r#""reads";r={};"#, 4 - i)), "{rl}");
        assert!(!h.contains_key("retry-after"));
    }
    let (s, h, b) = get_with_headers(&env, "web-team", "/v2/web/flavors").await;
    let elapsed = started.elapsed();
    assert_eq!(s, 429, "{b}");
    let msg = assert_nova_error(&b, "overLimit", 429);
    assert!(msg.contains("rate limit `reads` exceeded"), "{msg}");
    // One slot comes back T = 720 s after the first request, which was sent
    // after `started`; Retry-After is in whole seconds, rounded up.
    let retry: u64 = h["retry-after"].to_str().unwrap().parse().unwrap();
    let least = 720u64.saturating_sub(elapsed.as_secs() + 1);
    assert!(
        (least..=720).contains(&retry),
        "Retry-After {retry} after {elapsed:?}"
    );
    assert!(
        h["ratelimit"].to_str().unwrap().contains("r=0"),
        "{:?}",
        h["ratelimit"]
    );

    // The same Action on the v1.0 surface shares the quota and says so in its envelope.
    let (s, h, b) = env
        .raw(
            reqwest::Method::GET,
            "/v1.0/appkeys/WebAppKey0001/flavors",
            &[("X-Auth-Token", &env.token("web-team"))],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 200);
    assert!(h.contains_key("retry-after"));
    assert!(h.contains_key("ratelimit-policy"));
    assert_eq!(b["header"]["resultCode"], 10429, "{b}");

    // Writes are not in the `reads` rule: unaffected.
    let (s, _) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "k"}}),
        )
        .await;
    assert_eq!(s, 200);

    // Recovery: once refused, the quota is back after Retry-After. Requests
    // come well within a second of each other, so the second is refused
    // (a later one if the machine stalled for a second in between).
    let deadline = Instant::now() + Duration::from_secs(30);
    let retry = loop {
        let (s, h, b) = get_with_headers(&env, "batch-team", "/v2/batch/flavors").await;
        if s == 429 {
            assert!(assert_nova_error(&b, "overLimit", 429).contains("`reads`"));
            break h["retry-after"].to_str().unwrap().parse::<u64>().unwrap();
        }
        assert_eq!(s, 200, "{b}");
        assert!(
            Instant::now() < deadline,
            "batch-team's reads were never refused"
        );
    };
    assert_eq!(retry, 1, "one slot a second");
    // Retry-After counts from the refusal, before its answer arrived; a
    // little more for the limiter's clock and ours.
    tokio::time::sleep(Duration::from_secs(retry) + Duration::from_millis(100)).await;
    let (s, _, b) = get_with_headers(&env, "batch-team", "/v2/batch/flavors").await;
    assert_eq!(s, 200, "the quota is back after Retry-After: {b}");
    let metrics = env.metrics().await;
    assert!(
        metrics.contains(r#"toastgate_ratelimit_refusals_total{rule="reads",team="web-team"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"toastgate_ratelimit_refusals_total{rule="reads",team="batch-team"} 1"#),
        "{metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_global_budget_covers_all_teams_together() {
    let env = Env::start_with_overlays(
        fast_sim(),
        &[
            "overlays/web-reads-100-per-second.yaml",
            "overlays/global-3-per-minute.yaml",
        ],
        json!({}),
    )
    .await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    assert_eq!(env.get("batch-team", "/v2/batch/flavors").await.0, 200);
    assert_eq!(env.get("platform", "/v2/web/flavors").await.0, 200);
    let (s, h, b) = get_with_headers(&env, "batch-team", "/v2/batch/flavors").await;
    assert_eq!(s, 429, "{b}");
    assert!(assert_nova_error(&b, "overLimit", 429).contains("`global`"));
    assert!(
        h["ratelimit-policy"]
            .to_str()
            .unwrap()
            .contains(r#""global";q=3;w=60"#)
    );
    env.stop().await;
}

/// Starts `n` gateways on 127.0.0.2.. sharing one simulator and one Redis,
/// with web-team's rules from the fixture `rules`, then `more` merged on.
async fn replicas(n: usize, redis: &RedisServer, rules: &str, more: Value) -> Vec<Env> {
    let sim = start_sim(fast_sim()).await;
    let s = secrets().with_override("TG_REDIS_URL", &redis.url());
    let mut out = Vec::new();
    for i in 0..n {
        let host = format!("127.0.0.{}", i + 2);
        let mut extra = json!({
            "listen": {"public": format!("{host}:0"), "admin": format!("{host}:0")},
            "rate_limit": {"redis": {"replicas": n}},
        });
        common::fixtures::merge(&mut extra, more.clone());
        let overlays = [rules, "overlays/redis-rate-limits.yaml"];
        out.push(Env::start_on(sim.clone(), &overlays, extra, &s).await);
    }
    out
}

#[tokio::test]
async fn three_replicas_on_one_redis_hold_one_limit_within_two_percent() {
    let redis = RedisServer::start();
    // 10 a second: 9 workers exceed it on any machine. A burst of 20: the
    // limiter loses nothing unless no request reaches it for 2 s, and the
    // lower bound below holds through almost as long a stall.
    let rate = 10.0;
    let burst = 20.0;
    // batch-team's reads go through Redis too, on a key of their own: they
    // warm each replica up without taking from web-team's limit. Calls to
    // Redis get the most time the config allows: a decision made without
    // Redis is not what this test is about.
    let more = json!({
        "teams": {"batch-team": {"rate_limits": [
            {"name": "warm-up", "actions": ["read"], "rate": "1000/s", "burst": 1000},
        ]}},
        "rate_limit": {"redis": {"timeout": "2s"}},
    });
    let envs = replicas(
        3,
        &redis,
        "overlays/web-reads-10-per-second-burst-20.yaml",
        more,
    )
    .await;
    for e in &envs {
        assert!(e.gw.starts_with("http://127.0.0."), "{}", e.gw);
    }
    // Each replica decides through Redis before the load starts: its
    // connection is made at startup within 1 s, and a busy machine may miss
    // that; then it decides locally until a probe finds Redis again.
    let mut degraded_before = Vec::new();
    for e in &envs {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let before = degraded(e).await;
            assert_eq!(e.get("batch-team", "/v2/batch/flavors").await.0, 200);
            let after = degraded(e).await;
            if after == before {
                degraded_before.push(after);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} never decided through Redis",
                e.gw
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let token = envs[0].token("web-team");
    let started = Instant::now();
    let run_for = Duration::from_secs(5);
    let mut workers = Vec::new();
    for w in 0..9 {
        let http = envs[w % 3].http.clone();
        let url = envs[w % 3].url("/v2/web/flavors");
        let token = token.clone();
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            while started.elapsed() < run_for {
                let sent = Instant::now();
                match http
                    .get(&url)
                    .bearer_auth(&token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                {
                    Ok(200) => tally.allowed(sent, Instant::now()),
                    Ok(429) => tally.refused += 1,
                    other => panic!("unexpected answer {other:?}"),
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for w in workers {
        all.merge(w.await.unwrap());
    }
    // Every decision of the load was made in Redis: one limit for all three.
    for (e, before) in envs.iter().zip(degraded_before) {
        assert_eq!(
            degraded(e).await,
            before,
            "{} decided without Redis during the load",
            e.gw
        );
    }
    let allowed = all.allowed as f64;
    assert!(
        all.refused > all.allowed,
        "the load must exceed the limit to test it (allowed {}, refused {})",
        all.allowed,
        all.refused
    );
    // Judged against the decisions this machine actually produced, not the
    // wall clock: the first allowed decision happened between its request's
    // send and answer, so did the last. Over that span the limit allows
    // `rate` per second (plus the burst at the start), within 2%. (The
    // lower bound leaves the burst out: it also covers the slots a stall of
    // every worker at once could waste, up to 1.9 s of them.)
    let (s_first, r_first) = (all.first_sent.unwrap(), all.first_answered.unwrap());
    let (s_last, r_last) = (all.last_sent.unwrap(), all.last_answered.unwrap());
    let most = burst + 1.0 + rate * r_last.duration_since(s_first).as_secs_f64();
    let least = rate * s_last.saturating_duration_since(r_first).as_secs_f64();
    assert!(
        allowed <= most * 1.02,
        "allowed {allowed} across 3 replicas; at most {most:.0} fit the limit (+2%)"
    );
    assert!(
        allowed >= least * 0.98,
        "allowed {allowed} across 3 replicas; the limit allows at least {least:.0} (-2%)"
    );
    for e in envs {
        e.stop_gateway().await;
    }
}

#[tokio::test]
async fn redis_dying_mid_traffic_applies_the_fail_mode_and_recovers() {
    let mut redis = RedisServer::start();
    let envs = replicas(1, &redis, "overlays/web-all-50-per-second.yaml", json!({})).await;
    let env = &envs[0];
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    let (s, _) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "before"}}),
        )
        .await;
    assert_eq!(s, 200);

    redis.kill();
    // Reads fail open (local limiter), writes fail closed. (That a decision
    // never waits for a dead Redis is shown by tests/ratelimit_backend.rs,
    // which counts the calls that reach Redis.)
    let (s, b) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "during"}}),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert!(
        assert_nova_error(&b, "serviceUnavailable", 503).contains("cannot be checked right now")
    );
    let m = env.metrics().await;
    assert!(
        m.contains(r#"toastgate_ratelimit_degraded_total{mode="fail_open"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"toastgate_ratelimit_degraded_total{mode="fail_closed"}"#),
        "{m}"
    );

    // Redis comes back on the same port: writes work again by themselves.
    redis.restart();
    let mut recovered = false;
    for _ in 0..50 {
        let (s, _) = env
            .post(
                "web-team",
                "/v2/web/os-keypairs",
                json!({"keypair": {"name": format!("after-{}", rand_suffix())}}),
            )
            .await;
        if s == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "writes did not recover after Redis came back");
    for e in envs {
        e.stop().await;
    }
}

/// Decisions `env` made without Redis so far (failure modes applied).
async fn degraded(env: &Env) -> f64 {
    common::metrics::sum(&env.metrics().await, "toastgate_ratelimit_degraded_total")
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// What one load worker saw: allowed answers with the span of their
/// decisions, and refusals.
#[derive(Default)]
struct Tally {
    allowed: u64,
    refused: u64,
    first_sent: Option<Instant>,
    first_answered: Option<Instant>,
    last_sent: Option<Instant>,
    last_answered: Option<Instant>,
}

impl Tally {
    fn allowed(&mut self, sent: Instant, answered: Instant) {
        self.allowed += 1;
        self.first_sent = Some(self.first_sent.map_or(sent, |t| t.min(sent)));
        self.first_answered = Some(self.first_answered.map_or(answered, |t| t.min(answered)));
        self.last_sent = Some(self.last_sent.map_or(sent, |t| t.max(sent)));
        self.last_answered = Some(self.last_answered.map_or(answered, |t| t.max(answered)));
    }

    fn merge(&mut self, other: Tally) {
        self.allowed += other.allowed;
        self.refused += other.refused;
        let pick =
            |a: Option<Instant>, b: Option<Instant>, f: fn(Instant, Instant) -> Instant| match (
                a, b,
            ) {
                (Some(a), Some(b)) => Some(f(a, b)),
                (a, b) => a.or(b),
            };
        self.first_sent = pick(self.first_sent, other.first_sent, Instant::min);
        self.first_answered = pick(self.first_answered, other.first_answered, Instant::min);
        self.last_sent = pick(self.last_sent, other.last_sent, Instant::max);
        self.last_answered = pick(self.last_answered, other.last_answered, Instant::max);
    }
}

/// A rule weighing Actions against one budget: a keypair create costs 4 of
/// the team's 10 an hour, a read 1, on both surfaces; a request that does not
/// fit is refused without taking anything. Hourly: nothing refills meanwhile.
#[tokio::test]
async fn weighted_actions_share_one_budget() {
    let rules = json!({"teams": {"web-team": {"rate_limits": [{
        "name": "budget", "actions": ["*"], "rate": "10/h", "burst": 10,
        "costs": [{"actions": ["keypair.create"], "cost": 4}],
    }]}}});
    let env = Env::start_with_overlays(fast_sim(), &[], rules).await;
    let remaining = |h: &reqwest::header::HeaderMap| h["ratelimit"].to_str().unwrap().to_string();

    let (s, h) = create_keypair(&env, "w1").await;
    assert_eq!(s, 200);
    assert_eq!(h["ratelimit-policy"], r#""budget";q=10;w=3600"#);
    assert!(
        remaining(&h).starts_with(r#""budget";r=6;"#),
        "{}",
        remaining(&h)
    );
    let (s, h, _) = get_with_headers(&env, "web-team", "/v2/web/flavors").await;
    assert_eq!(s, 200);
    assert!(
        remaining(&h).starts_with(r#""budget";r=5;"#),
        "{}",
        remaining(&h)
    );
    let (s, h) = create_keypair(&env, "w2").await;
    assert_eq!(s, 200);
    assert!(
        remaining(&h).starts_with(r#""budget";r=1;"#),
        "{}",
        remaining(&h)
    );

    // 4 do not fit in the 1 left: refused, and nothing taken.
    let (s, h) = create_keypair(&env, "w3").await;
    assert_eq!(s, 429);
    assert!(h.contains_key("retry-after"));
    let b = env
        .v1(
            "web-team",
            reqwest::Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "w3-v1"}})),
        )
        .await;
    assert_eq!(b["header"]["resultCode"], 10429, "{b}");
    let (s, h, _) = get_with_headers(&env, "web-team", "/v2/web/flavors").await;
    assert_eq!(s, 200, "the read still fits");
    assert!(
        remaining(&h).starts_with(r#""budget";r=0;"#),
        "{}",
        remaining(&h)
    );
    assert_eq!(
        get_with_headers(&env, "web-team", "/v2/web/flavors")
            .await
            .0,
        429
    );
    env.stop().await;
}

async fn create_keypair(env: &Env, name: &str) -> (u16, reqwest::header::HeaderMap) {
    let body = json!({"keypair": {"name": name}});
    let a = env
        .request(
            "web-team",
            reqwest::Method::POST,
            "/v2/web/os-keypairs",
            Some(body),
        )
        .await;
    (a.status, a.headers)
}
