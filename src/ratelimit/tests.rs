use std::time::Instant;

use super::*;
use crate::config::SecretSource;

const BASE: &str = r#"
listen: { public: "127.0.0.1:0", admin: "127.0.0.1:0" }
upstream:
  identity_url: https://api-identity.cloud.toast.com
  compute_url: https://kr1-api-instance.infrastructure.cloud.toast.com
auth:
  issuer: https://idp.example.com
  audience: toastgate
  algorithms: [HS256]
  keys: { type: hs_secret, secret_env: JWT_SECRET }
projects:
  web:
    tenant_id: 6cdebe3eb0094910bc41f1d42ebe4cb7
    credentials: { type: keystone, username: a@example.com, password_env: WEB_PW }
teams:
  web-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
    rate_limits:
      - { name: reads, actions: [read], rate: 5/s, burst: 3 }
      - { name: writes, actions: [write], rate: 2/s, burst: 1 }
      - { name: reboots, actions: [instance.reboot], rate: 10/s, burst: 10 }
  other-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
    rate_limits:
      - { name: reads, actions: [read], rate: 5/s, burst: 1 }
  free-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
"#;

const PASSWORD: &str = "redis-pw-hunter2";

fn limiter(rate_limit: &str) -> Arc<RateLimiter> {
    let yaml = format!("{BASE}{rate_limit}");
    let secrets = SecretSource::default()
        .with_override("JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .with_override("WEB_PW", "pw")
        .with_override("REDIS_URL", &format!("redis://:{PASSWORD}@127.0.0.1:1/0"));
    let config = Config::from_yaml(&yaml, &secrets, None).expect("test config is valid");
    RateLimiter::new(&config).expect("limiter builds")
}

fn names(d: &Decision) -> Vec<&str> {
    d.policies.iter().map(|p| &*p.name).collect()
}

#[tokio::test]
async fn burst_at_once_then_refusal_with_retry_after_then_recovery() {
    let rl = limiter("");
    // 5/s, burst 3: T = 200 ms, tolerance 400 ms.
    let start = Instant::now();
    for expected_remaining in [2, 1, 0] {
        let d = rl.check("web-team", Action::InstanceList).await;
        assert_eq!(d.outcome, Outcome::Allowed);
        assert_eq!(d.policies.len(), 1);
        let p = &d.policies[0];
        assert_eq!(
            (&*p.name, p.quota, p.window),
            ("reads", 5, Duration::from_secs(1))
        );
        assert_eq!(p.remaining, expected_remaining);
        assert!(!d.degraded);
    }
    let d = rl.check("web-team", Action::InstanceGet).await;
    let elapsed = start.elapsed();
    let Outcome::Limited { rule, retry_after } = &d.outcome else {
        panic!("4th request of a burst of 3 must be limited: {d:?}");
    };
    assert_eq!(rule, "reads");
    // tat = first + 600 ms; retry at tat - 400 ms = first + 200 ms, where
    // `first` (the first decision's instant) is after `start`.
    let earliest = Duration::from_millis(200).saturating_sub(elapsed);
    assert!(
        *retry_after <= Duration::from_millis(200)
            && *retry_after + Duration::from_millis(1) >= earliest,
        "retry_after {retry_after:?} after {elapsed:?}"
    );
    assert_eq!(d.policies[0].remaining, 0);
    // reset = tat - now = retry_after + tolerance.
    assert_eq!(
        d.policies[0].reset,
        *retry_after + Duration::from_millis(400)
    );

    tokio::time::sleep(*retry_after + Duration::from_millis(20)).await;
    let d = rl.check("web-team", Action::InstanceList).await;
    assert!(d.allowed(), "one cell back after retry_after: {d:?}");
    assert_eq!(d.policies[0].remaining, 0);
    assert!(!rl.check("web-team", Action::InstanceList).await.allowed());

    // A whole period later the full burst is back.
    tokio::time::sleep(Duration::from_millis(650)).await;
    for _ in 0..3 {
        assert!(rl.check("web-team", Action::InstanceList).await.allowed());
    }
    assert!(!rl.check("web-team", Action::InstanceList).await.allowed());
}

#[tokio::test]
async fn rules_apply_by_action_only() {
    let rl = limiter("");
    let d = rl.check("web-team", Action::InstanceDelete).await;
    assert!(d.allowed());
    assert_eq!(names(&d), ["writes"]);
    // burst 1: the second write is limited, reads are untouched.
    let d = rl.check("web-team", Action::KeypairCreate).await;
    assert_eq!(
        d.outcome,
        Outcome::Limited {
            rule: "writes".into(),
            retry_after: match &d.outcome {
                Outcome::Limited { retry_after, .. } => *retry_after,
                _ => Duration::ZERO,
            }
        }
    );
    let d = rl.check("web-team", Action::FlavorList).await;
    assert!(d.allowed());
    assert_eq!(names(&d), ["reads"]);
    assert_eq!(d.policies[0].remaining, 2);
    // Two rules match instance.reboot (write and reboots), in config order;
    // writes refuses first, so reboots is neither consulted nor charged.
    let d = rl.check("web-team", Action::InstanceReboot).await;
    assert!(
        matches!(&d.outcome, Outcome::Limited { rule, .. } if rule == "writes"),
        "{d:?}"
    );
    assert_eq!(names(&d), ["writes"]);
}

#[tokio::test]
async fn global_budget_comes_after_team_rules_and_is_shared() {
    let rl = limiter("rate_limit:\n  global: { rate: 50/s, burst: 3 }\n");
    let d = rl.check("web-team", Action::InstanceList).await;
    assert!(d.allowed());
    assert_eq!(names(&d), ["reads", "global"]);
    assert_eq!((d.policies[1].quota, d.policies[1].remaining), (50, 2));
    // A team without rules, and a team absent from the config, still meet the global budget.
    let d = rl.check("free-team", Action::InstanceCreate).await;
    assert_eq!(names(&d), ["global"]);
    assert_eq!(d.policies[0].remaining, 1);
    assert!(rl.check("nobody", Action::ZoneList).await.allowed());
    let d = rl.check("web-team", Action::InstanceList).await;
    assert!(
        matches!(&d.outcome, Outcome::Limited { rule, .. } if rule == GLOBAL_RULE),
        "{d:?}"
    );
    assert_eq!(names(&d), ["reads", "global"]);
    let d = rl.check("nobody", Action::ZoneList).await;
    assert!(!d.allowed());

    let stats = rl.stats();
    assert_eq!((stats.decisions, stats.refused), (5, 2));
    assert_eq!(
        stats.refused_by,
        [
            ((UNKNOWN_TEAM.to_string(), "global".to_string()), 1),
            (("web-team".to_string(), "global".to_string()), 1),
        ]
    );
}

#[tokio::test]
async fn a_team_rule_refusal_does_not_charge_the_global_budget() {
    let rl = limiter("rate_limit:\n  global: { rate: 50/s, burst: 5 }\n");
    assert!(rl.check("other-team", Action::InstanceList).await.allowed());
    let d = rl.check("other-team", Action::InstanceList).await;
    assert!(
        matches!(&d.outcome, Outcome::Limited { rule, .. } if rule == "reads"),
        "{d:?}"
    );
    assert_eq!(names(&d), ["reads"]);
    // Only the first request took from the global budget.
    let d = rl.check("free-team", Action::InstanceList).await;
    assert_eq!(d.policies[0].remaining, 3);
    assert_eq!(
        rl.stats().refused_by,
        [(("other-team".to_string(), "reads".to_string()), 1)]
    );
}

#[tokio::test]
async fn no_rule_is_a_fast_path_without_policies() {
    let rl = limiter("");
    for (team, action) in [
        ("free-team", Action::InstanceCreate),
        ("nobody", Action::InstanceList),
        ("other-team", Action::InstanceDelete),
    ] {
        let d = rl.check(team, action).await;
        assert!(d.allowed() && !d.degraded);
        assert!(d.policies.is_empty());
        assert_eq!(d.policies.capacity(), 0, "no allocation");
        let mut headers = HeaderMap::new();
        d.apply_headers(&mut headers);
        assert!(headers.is_empty());
    }
    assert_eq!(rl.stats().decisions, 3);
    assert_eq!(rl.local_keys(), 0);
}

fn status(name: &str, quota: u32, window: u64, remaining: u32, reset_ms: u64) -> PolicyStatus {
    PolicyStatus {
        name: name.into(),
        quota,
        window: Duration::from_secs(window),
        remaining,
        reset: Duration::from_millis(reset_ms),
    }
}

fn rendered(d: &Decision) -> Vec<(String, String)> {
    let mut headers = HeaderMap::new();
    d.apply_headers(&mut headers);
    let mut out: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn headers_render_exactly() {
    let allowed = Decision {
        outcome: Outcome::Allowed,
        policies: vec![
            status("reads", 20, 1, 17, 150),
            status("global", 50, 60, 44, 7_200),
        ],
        degraded: false,
        redis_round_trip: None,
    };
    assert_eq!(
        rendered(&allowed),
        pairs(&[
            ("ratelimit", r#""reads";r=17;t=1, "global";r=44;t=8"#),
            (
                "ratelimit-policy",
                r#""reads";q=20;w=1, "global";q=50;w=60"#
            ),
        ])
    );

    let limited = Decision {
        outcome: Outcome::Limited {
            rule: "reads".into(),
            retry_after: Duration::from_millis(1_001),
        },
        policies: vec![status("reads", 20, 1, 0, 3_000)],
        degraded: false,
        redis_round_trip: None,
    };
    assert_eq!(
        rendered(&limited),
        pairs(&[
            ("ratelimit", r#""reads";r=0;t=3"#),
            ("ratelimit-policy", r#""reads";q=20;w=1"#),
            ("retry-after", "2"),
        ])
    );

    // Retry-After is at least 1 s; Unavailable refuses too.
    let unavailable = Decision {
        outcome: Outcome::Unavailable {
            rule: "writes".into(),
            retry_after: Duration::from_millis(3),
        },
        policies: vec![status("writes", 30, 3600, 0, 1_000)],
        degraded: false,
        redis_round_trip: None,
    };
    assert_eq!(
        rendered(&unavailable),
        pairs(&[
            ("ratelimit", r#""writes";r=0;t=1"#),
            ("ratelimit-policy", r#""writes";q=30;w=3600"#),
            ("retry-after", "1"),
        ])
    );

    // Headers replace earlier values rather than adding list members twice.
    let mut headers = HeaderMap::new();
    allowed.apply_headers(&mut headers);
    allowed.apply_headers(&mut headers);
    assert_eq!(headers.get_all(RATELIMIT).iter().count(), 1);

    let mut odd = String::new();
    push_sf_string(&mut odd, "a\"b\\c\u{e9}d");
    assert_eq!(odd, r#""a\"b\\cd""#);
    assert_eq!(ceil_secs(Duration::ZERO), 0);
    assert_eq!(ceil_secs(Duration::from_nanos(1)), 1);
    assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
}

#[tokio::test]
async fn decision_headers_follow_the_limiter() {
    let rl = limiter("rate_limit:\n  global: { rate: 50/s, burst: 10 }\n");
    let d = rl.check("web-team", Action::InstanceList).await;
    assert_eq!(
        rendered(&d),
        pairs(&[
            ("ratelimit", r#""reads";r=2;t=1, "global";r=9;t=1"#),
            ("ratelimit-policy", r#""reads";q=5;w=1, "global";q=50;w=1"#),
        ])
    );
}

const REDIS_DOWN: &str = "rate_limit:
  backend: redis
  redis: { url_env: REDIS_URL, timeout: 100ms, replicas: 2 }
  fail_open: [read]
";

/// `new` must neither connect nor need a runtime, and nothing may print the URL.
#[test]
fn redis_setup_is_lazy_and_debug_shows_no_password() {
    let rl = limiter(REDIS_DOWN);
    let shown = format!("{rl:?}");
    assert!(!shown.contains(PASSWORD), "{shown}");
    assert!(shown.contains("redis"), "{shown}");
    assert_eq!(rl.stats().redis_errors, 0);
}

#[tokio::test]
async fn redis_down_fails_open_locally_or_closed_within_the_timeout() {
    let rl = limiter(REDIS_DOWN);
    // reads: 5/s burst 3 over 2 replicas -> local share 2/s burst 1.
    let t = Instant::now();
    let d = rl.check("web-team", Action::InstanceList).await;
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(d.allowed() && d.degraded, "{d:?}");
    assert_eq!(
        d.policies[0].quota, 5,
        "the policy shown is the configured one"
    );
    assert_eq!(d.policies[0].remaining, 0);
    // The circuit is open now: no more waiting on Redis.
    let t = Instant::now();
    let d = rl.check("web-team", Action::InstanceGet).await;
    assert!(t.elapsed() < Duration::from_millis(50), "{:?}", t.elapsed());
    assert!(
        matches!(&d.outcome, Outcome::Limited { rule, .. } if rule == "reads"),
        "{d:?}"
    );
    assert!(d.degraded);
    // A write is not in fail_open: refused as unavailable.
    let d = rl.check("web-team", Action::InstanceCreate).await;
    assert_eq!(
        d.outcome,
        Outcome::Unavailable {
            rule: "writes".into(),
            retry_after: Duration::from_secs(1)
        }
    );
    assert!(!d.degraded);
    assert_eq!(
        rendered(&d).last().unwrap(),
        &("retry-after".to_string(), "1".to_string())
    );
    let stats = rl.stats();
    assert_eq!(
        (
            stats.decisions,
            stats.refused,
            stats.degraded,
            stats.unavailable
        ),
        (3, 1, 2, 1)
    );
    assert!(stats.redis_errors >= 1);
}

#[tokio::test]
async fn maintenance_sweeps_idle_keys_and_stops() {
    let rl = limiter("");
    assert!(rl.check("web-team", Action::InstanceList).await.allowed());
    assert!(rl.check("web-team", Action::InstanceDelete).await.allowed());
    assert_eq!(rl.local_keys(), 2);
    // governor forgets a key once its TAT is an interval in the past:
    // reads at 200 + 200 ms, writes at 500 + 500 ms.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    rl.sweep();
    assert_eq!(rl.local_keys(), 0);
    assert!(rl.check("web-team", Action::InstanceList).await.allowed());

    let (handle, stop) = crate::shutdown::stop_pair();
    rl.spawn_maintenance(stop);
    handle.stop();
    // The task ends without keeping the limiter alive.
    let weak = Arc::downgrade(&rl);
    drop(rl);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(weak.upgrade().is_none());
}

#[test]
fn limiter_is_shareable_and_check_is_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: T) {}
    let rl = limiter("");
    send_sync(&rl);
    send(rl.check("web-team", Action::InstanceList));
}

#[test]
fn numbers_and_names_are_written_as_format_would() {
    for n in [0, 7, 10, 99, 1_000_000, u64::from(u32::MAX), u64::MAX] {
        let mut out = String::from("x");
        push_decimal(&mut out, n);
        assert_eq!(out, format!("x{n}"));
    }
    for (name, quoted) in [
        ("reads", r#""reads""#),
        ("a b~", r#""a b~""#),
        (r#"say "hi""#, r#""say \"hi\"""#),
        (r"back\slash", r#""back\\slash""#),
        ("tab\tand é", r#""taband ""#),
    ] {
        let mut out = String::new();
        push_sf_string(&mut out, name);
        assert_eq!(out, quoted, "{name:?}");
    }
}
