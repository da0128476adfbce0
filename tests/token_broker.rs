//! The token broker under concurrency, expiry, revocation and outages,
//! through the real gateway against the simulator.

mod common;

use std::time::{Duration, Instant};

use common::{Env, assert_nova_error, fast_sim, metrics, start_sim};
use serde_json::json;
use toastgate::simulator::{ErrorInjection, SimConfig};

fn short_tokens(lifetime: Duration) -> SimConfig {
    SimConfig {
        token_lifetime: lifetime,
        ..fast_sim()
    }
}

#[tokio::test]
async fn two_hundred_concurrent_cold_requests_cause_one_identity_call() {
    // A slow identity service keeps the cache cold while all 200 arrive
    // (the background refresher's start-up fetch is still in flight too).
    let sim = start_sim(fast_sim()).await;
    sim.set_latency(Duration::from_millis(500));
    let env = Env::start_on(sim, &[], json!({}), &common::secrets()).await;
    for status in env
        .concurrent_statuses(200, "web-team", "/v2/web/flavors")
        .await
    {
        assert_eq!(status, 200);
    }
    // The background refresher of each project also asked for its token at
    // start-up; it shares the same single flight. `batch` adds its own one.
    let web_calls = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/v2.0/tokens")
        .count();
    assert_eq!(web_calls, 1, "one Keystone call for 200 cold requests");
    env.stop().await;
}

#[tokio::test]
async fn tokens_are_refreshed_ahead_of_expiry_without_a_failed_request() {
    let env = Env::start_with_overlays(short_tokens(Duration::from_secs(2)), &[], json!({})).await;
    let started = std::time::Instant::now();
    let mut requests = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let (status, body) = env.get("web-team", "/v2/web/servers").await;
        assert_eq!(status, 200, "request {requests} failed: {body}");
        requests += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let keystone_calls = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/v2.0/tokens")
        .count() as f64;
    // Judged against the time that actually passed, not an assumed pace:
    // every 2 s token needs a successor (at least one call per lifetime).
    // Keystone's `expires` has whole seconds while `issued_at` has
    // microseconds, so a token's lifetime as toastgate reads it is between
    // 1 and 2 s; refreshed at 75%..85% of it, that is at most one call per
    // 0.75 s, plus the first: one call per refresh, never one per request.
    assert!(
        keystone_calls >= (elapsed / 2.0).floor(),
        "only {keystone_calls} identity calls in {elapsed:.1}s of 2s tokens"
    );
    assert!(
        keystone_calls <= (elapsed / 0.75).ceil() + 1.0,
        "{keystone_calls} identity calls in {elapsed:.1}s ({requests} requests): refresh storm"
    );
    env.stop().await;
}

fn token_waits(text: &str) -> f64 {
    metrics::sum(text, "toastgate_token_waits_total")
}

/// No caller ever waits on identity while a valid token exists: across
/// several short token lifetimes, with a slow identity service, and after a
/// 401 replaced the token (the refresher follows the replacement).
#[tokio::test]
async fn the_refresher_follows_replaced_tokens_and_no_caller_waits() {
    let env = Env::start_with_overlays(
        short_tokens(Duration::from_secs(6)),
        &["overlays/token-refresh-at-half.yaml"],
        json!({}),
    )
    .await;
    env.wait_ready().await;
    // Identity answers slowly from now on: a caller that waited would be seen.
    env.sim.set_latency(Duration::from_millis(300));
    let run = |secs: u64| {
        let env = &env;
        async move {
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(secs) {
                let (status, body) = env.get("web-team", "/v2/web/flavors").await;
                assert_eq!(status, 200, "{body}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // Two lifetimes: refreshed ahead each time, nobody waits.
    run(13).await;
    assert_eq!(
        token_waits(&env.metrics().await),
        0.0,
        "a caller waited while a token was valid"
    );
    // A 401 (API password changed) drops the token: exactly one wait, for
    // the replacement...
    env.sim.revoke_all_tokens();
    let (status, _) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(status, 200);
    let after_revoke = token_waits(&env.metrics().await);
    assert!(
        after_revoke <= 1.0,
        "{after_revoke} waits for one revocation"
    );
    // ...and the refresher renews the replacement ahead of its expiry too.
    run(13).await;
    assert_eq!(
        token_waits(&env.metrics().await),
        after_revoke,
        "the refresher did not follow the replaced token"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_upstream_401_refreshes_once_and_retries() {
    let env = Env::start().await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    let before = env.sim.identity_calls();
    env.sim.revoke_all_tokens();

    // 50 requests all holding the revoked token: one refresh between them.
    for status in env
        .concurrent_statuses(50, "web-team", "/v2/web/flavors")
        .await
    {
        assert_eq!(status, 200);
    }
    assert_eq!(
        env.sim.identity_calls() - before,
        1,
        "exactly one identity call after the revocation"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_request_with_a_body_is_replayed_after_a_401() {
    let env = Env::start().await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    env.sim.revoke_all_tokens();
    env.sim.clear_requests();
    let (s, b) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "replayed"}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let posts: Vec<_> = env
        .compute_requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/os-keypairs"))
        .collect();
    assert_eq!(posts.len(), 2, "the refused try and its replay");
    assert_eq!(posts[0].body, posts[1].body, "the same body both times");
    let (s, b) = env.get("web-team", "/v2/web/os-keypairs").await;
    assert_eq!(s, 200);
    assert_eq!(b["keypairs"].as_array().unwrap().len(), 1, "created once");
    env.stop().await;
}

#[tokio::test]
async fn a_second_401_is_an_error_not_a_loop() {
    let env = Env::start().await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    env.sim.clear_requests();
    env.sim.inject_error(ErrorInjection {
        method: None,
        path_contains: "/flavors".into(),
        status: 401,
        body: r#"{"error":{"message":"The request you have made requires authentication.","code":401,"title":"Unauthorized"}}"#.into(),
        times: 1000,
    });
    let (status, body) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(status, 502, "{body}");
    let msg = assert_nova_error(&body, "computeFault", 502);
    assert!(msg.contains("refused a freshly obtained token"), "{msg}");
    let flavor_calls = env
        .compute_requests()
        .iter()
        .filter(|r| r.path.ends_with("/flavors"))
        .count();
    assert_eq!(flavor_calls, 2, "the original try and exactly one retry");
    let identity = env
        .sim
        .requests()
        .iter()
        .filter(|r| r.path == "/v2.0/tokens")
        .count();
    assert_eq!(identity, 1, "one refresh between the two tries");
    env.stop().await;
}

#[tokio::test]
async fn identity_outage_is_invisible_while_the_token_is_valid_then_a_clear_503() {
    // 20 s tokens, refreshed at half their life: the token held when the
    // outage begins (obtained at startup) keeps serving for many seconds
    // after its refresh has failed, however slow the machine.
    let lifetime = Duration::from_secs(20);
    let env = Env::start_with_overlays(
        short_tokens(lifetime),
        &["overlays/token-refresh-at-half.yaml"],
        json!({}),
    )
    .await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    let failures_before = web_token_failures(&env).await;
    env.sim.set_identity_outage(true);
    // Every token the gateway holds was issued before this: none is
    // usable `lifetime` after it.
    let outage_began = Instant::now();

    // Valid token: requests keep working, also once a refresh has failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
        if web_token_failures(&env).await > failures_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the web project's token was never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        env.get("web-team", "/v2/web/flavors").await.0,
        200,
        "a failed refresh dropped a valid token"
    );

    // Past the end of its life (and of any token issued before the outage):
    // a clear 503.
    tokio::time::sleep_until((outage_began + lifetime + Duration::from_secs(1)).into()).await;
    let (status, body) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(status, 503, "{body}");
    let msg = assert_nova_error(&body, "serviceUnavailable", 503);
    assert!(msg.contains("no cloud token for project `web`"), "{msg}");
    assert!(!msg.contains(common::WEB_API_PASSWORD));

    // The identity service comes back: so does the gateway, by itself.
    env.sim.set_identity_outage(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.get("web-team", "/v2/web/flavors").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "gateway did not recover after the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    env.stop().await;
}

/// Failed identity calls for the web project, as `/readyz` reports them.
async fn web_token_failures(env: &Env) -> u64 {
    let (_, body) = env.readyz().await;
    body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["project"] == "web")
        .and_then(|t| t["failures"].as_u64())
        .unwrap_or_else(|| panic!("no web token failures in {body}"))
}

#[tokio::test]
async fn appkey_token_api_credentials_work() {
    let env = Env::start().await;
    let (status, body) = env.get("batch-team", "/v2/batch/flavors").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        env.sim
            .requests()
            .iter()
            .any(|r| r.path == "/v1.0/appkeys/BatchAppKey002/tokens" && r.method == "POST"),
        "the batch project's token came from the v1.0 appkey token API"
    );
    env.stop().await;
}

#[tokio::test]
async fn readyz_shows_token_state_per_project() {
    let env = Env::start().await;
    env.wait_ready().await;
    let (status, body) = env.readyz().await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ready");
    let tokens = body["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    for t in tokens {
        assert_eq!(t["state"], "valid", "{t}");
        assert!(t["expires_at"].is_string());
    }
    assert!(!body.to_string().contains(common::WEB_API_PASSWORD));
    env.stop().await;
}

#[tokio::test]
async fn readyz_is_unready_when_a_project_cannot_get_a_token() {
    let env =
        Env::start_with_overlays(fast_sim(), &["overlays/unknown-web-user.yaml"], json!({})).await;
    // `/readyz` answers from what the refreshers know: poll until the web
    // project's refresher has been refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let web = loop {
        let (status, body) = env.readyz().await;
        assert_eq!(status, 503);
        let web = body["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["project"] == "web")
            .unwrap()
            .clone();
        if !web["last_error"].is_null() {
            break web;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no identity answer in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(web["state"], "absent");
    assert!(
        web["last_error"]
            .as_str()
            .unwrap()
            .contains("refused the project's credentials"),
        "{web}"
    );
    env.stop().await;
}
