//! Shared rate limits on the Redis a fleet actually gets: TLS-only servers
//! (`rediss://`, a private CA, client certificates) and a Redis Cluster of
//! three masters, each a real `redis-server` started here (see
//! tests/common/redis.rs; they never skip).

mod common;

use std::time::Duration;

use common::redis::{RedisCluster, RedisPki, RedisServer};
use common::{Env, assert_nova_error, fast_sim, secrets, start_sim};
use serde_json::{Value, json};
use toastgate::action::Action;
use toastgate::config::Config;
use toastgate::ratelimit::{Outcome, RateLimiter};

/// web-team: 2 writes an hour in all (so that no test depends on speed),
/// reads unlimited; Redis at `url` under `prefix`, writes fail closed.
fn limits(prefix: &str, redis: Value) -> Value {
    let mut block = json!({"key_prefix": prefix, "timeout": "500ms"});
    block
        .as_object_mut()
        .unwrap()
        .extend(redis.as_object().unwrap().clone());
    json!({
        "teams": {"web-team": {"rate_limits": [
            {"name": "writes", "actions": ["write"], "rate": "2/h", "burst": 2}
        ]}},
        "rate_limit": {"redis": block},
    })
}

async fn gateway(url: &str, extra: Value) -> Env {
    let sim = start_sim(fast_sim()).await;
    let s = secrets().with_override("TG_REDIS_URL", url);
    Env::start_on(sim, &["overlays/redis-rate-limits.yaml"], extra, &s).await
}

async fn create_keypair(env: &Env, name: &str) -> (u16, Value) {
    env.create_keypair("web-team", name).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_shared_through_redis_over_tls_with_a_client_certificate() {
    let pki = RedisPki::new();
    let redis = RedisServer::start_tls(&pki, true);
    let tls = json!({"tls": {
        "ca_file": pki.file("ca.pem"),
        "cert_file": pki.file("client.pem"),
        "key_file": pki.file("client.key"),
    }});
    let a = gateway(&redis.url(), limits("tls", tls.clone())).await;
    let b = gateway(&redis.url(), limits("tls", tls)).await;

    // One budget of 2 across both gateways, decided by Redis: a refusal
    // that Redis did not make would be a 503 (writes fail closed).
    assert_eq!(create_keypair(&a, "tls-1").await.0, 200);
    assert_eq!(create_keypair(&b, "tls-2").await.0, 200);
    let (status, body) = create_keypair(&a, "tls-3").await;
    assert_eq!(status, 429, "{body}");
    assert_nova_error(&body, "overLimit", 429);
    let (status, _) = create_keypair(&b, "tls-4").await;
    assert_eq!(status, 429);
    assert!(
        redis.pttl("{tls}:rl:web-team:writes") > 0,
        "the key is in the TLS Redis"
    );

    let m = a.metrics().await;
    for mode in ["fail_open", "fail_closed"] {
        let line = format!(r#"toastgate_ratelimit_degraded_total{{mode="{mode}"}} 0"#);
        assert!(m.contains(&line), "no decision without Redis: {m}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_redis_that_cannot_be_trusted_or_wants_a_certificate_fails_closed() {
    let pki = RedisPki::new();
    let redis = RedisServer::start_tls(&pki, true);
    let cases = [
        (
            "no client certificate",
            json!({"ca_file": pki.file("ca.pem")}),
        ),
        (
            "a CA that did not sign the server's certificate",
            json!({
                "ca_file": pki.file("other-ca.pem"),
                "cert_file": pki.file("client.pem"),
                "key_file": pki.file("client.key"),
            }),
        ),
        ("the system roots only", json!({})),
    ];
    for (case, tls) in cases {
        let env = gateway(&redis.url(), limits("refused", json!({"tls": tls}))).await;
        let (status, body) = create_keypair(&env, "never").await;
        assert_eq!(status, 503, "{case}: {body}");
        assert!(
            assert_nova_error(&body, "serviceUnavailable", 503)
                .contains("cannot be checked right now"),
            "{case}"
        );
        // Reads fail open: served, decided locally.
        assert_eq!(
            env.get("web-team", "/v2/web/flavors").await.0,
            200,
            "{case}"
        );
        env.stop().await;
    }
    assert_eq!(
        redis.pttl("{refused}:rl:web-team:writes"),
        -2,
        "nothing reached Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_exact_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    // Hourly rates: nothing refills while the test runs, however slowly.
    // A decision touches the team's key and the global key at once.
    let extra = json!({
        "teams": {"web-team": {"rate_limits": [
            {"name": "reads", "actions": ["read"], "rate": "4/h", "burst": 4}
        ]}},
        "rate_limit": {
            "redis": {"key_prefix": "fleet", "cluster": true, "timeout": "500ms"},
            "global": {"rate": "100/h", "burst": 6},
        },
    });
    let s = secrets().with_override("TG_REDIS_URL", &cluster.url());
    let config: Config =
        common::fixtures::parse_config(&["overlays/redis-rate-limits.yaml"], extra, &s)
            .expect("test config is valid");
    let a = RateLimiter::new(&config).expect("builds");
    let b = RateLimiter::new(&config).expect("builds");

    // Both rules' counts come from one script call per decision (keys in
    // two slots would be a CROSSSLOT error: every decision degraded).
    for (rl, expected) in [(&a, [3, 5]), (&b, [2, 4]), (&a, [1, 3]), (&b, [0, 2])] {
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            rl.check("web-team", Action::InstanceList),
        )
        .await
        .expect("a decision hung");
        assert!(d.allowed() && !d.degraded, "{d:?}");
        let names: Vec<&str> = d.policies.iter().map(|p| &*p.name).collect();
        assert_eq!(names, ["reads", "global"]);
        let remaining: Vec<u32> = d.policies.iter().map(|p| p.remaining).collect();
        assert_eq!(remaining, expected, "{d:?}");
    }
    for rl in [&a, &b] {
        let d = rl.check("web-team", Action::InstanceGet).await;
        assert!(!d.degraded, "{d:?}");
        assert!(
            matches!(&d.outcome, Outcome::Limited { rule, .. } if rule == "reads"),
            "{d:?}"
        );
    }

    // Every key sits in one slot, on the node that owns it.
    let node = cluster.node_of("{fleet}:rl:global");
    assert_eq!(node, cluster.node_of("{fleet}:rl:web-team:reads"));
    assert!(cluster.pttl_on(node, "{fleet}:rl:web-team:reads") > 0);
    assert!(cluster.pttl_on(node, "{fleet}:rl:global") > 0);
    for rl in [&a, &b] {
        let stats = rl.stats();
        assert_eq!((stats.degraded, stats.redis_errors), (0, 0), "{stats:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_budget_on_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let extra = limits("cluster", json!({"cluster": true}));
    let a = gateway(&cluster.url(), extra.clone()).await;
    let b = gateway(&cluster.url(), extra).await;
    assert_eq!(create_keypair(&a, "c-1").await.0, 200);
    assert_eq!(create_keypair(&b, "c-2").await.0, 200);
    let (status, body) = create_keypair(&b, "c-3").await;
    assert_eq!(status, 429, "{body}");
    assert_nova_error(&body, "overLimit", 429);
    let node = cluster.node_of("{cluster}:rl:web-team:writes");
    assert!(cluster.pttl_on(node, "{cluster}:rl:web-team:writes") > 0);
    a.stop().await;
    b.stop().await;
}

/// The binary as deployed: `check-config` accepts the `rediss://` config
/// that `serve` then runs with (they once disagreed: serve exited on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_serve_agree_on_a_tls_redis() {
    let pki = RedisPki::new();
    let redis = RedisServer::start_tls(&pki, true);
    let sim = start_sim(fast_sim()).await;
    let dir = common::tempdir::TempDir::new("redis-tls-serve");
    std::fs::write(dir.join("redis.url"), redis.url()).unwrap();
    let extra = limits(
        "serve",
        json!({"url_env": null, "url_file": dir.join("redis.url"), "tls": {
            "ca_file": pki.file("ca.pem"),
            "cert_file": pki.file("client.pem"),
            "key_file": pki.file("client.key"),
        }}),
    );
    let (_gateway, gw, admin) = common::process::serve(
        dir.path(),
        &sim,
        &["overlays/redis-rate-limits.yaml"],
        extra,
        &[],
    );
    let check = common::process::toastgate([
        "check-config",
        "--config",
        dir.join("toastgate.yaml").to_str().unwrap(),
    ]);
    common::process::assert_success(&check);
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "ok");

    let http = reqwest::Client::new();
    common::wait_ready(&http, &admin).await;
    let token = common::process::team_token(dir.path(), "web-team");
    let mut statuses = Vec::new();
    for i in 0..3 {
        let answer = http
            .post(format!("{gw}/v2/web/os-keypairs"))
            .bearer_auth(&token)
            .json(&json!({"keypair": {"name": format!("serve-{i}")}}))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("answered");
        statuses.push(answer.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert!(redis.pttl("{serve}:rl:web-team:writes") > 0);
    sim.shutdown();
}
