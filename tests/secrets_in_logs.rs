//! No secret in any log line of a whole gateway session at TRACE level:
//! cloud passwords and access keys, upstream tokens, caller JWTs, the JWT
//! key, generated private keys.

mod common;

use common::logs::Capture;
use common::{BATCH_SECRET_KEY, Env, JWT_SECRET, WEB_API_PASSWORD};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn no_secret_appears_in_trace_logs() {
    let capture = Capture::install_logs("trace");

    let env = Env::start().await;
    let jwt = env.token("platform");
    let mut seen_jwts = vec![jwt.clone()];
    // Normal traffic on both credential kinds.
    assert_eq!(env.get("platform", "/v2/web/servers/detail").await.0, 200);
    assert_eq!(env.get("platform", "/v2/batch/flavors").await.0, 200);
    // A generated private key travels back to the caller.
    let (s, b) = env
        .post(
            "platform",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "k1"}}),
        )
        .await;
    assert_eq!(s, 200);
    let private_key = b["keypair"]["private_key"].as_str().unwrap().to_string();
    // And on the v1.0 surface, as `privateKey`.
    let (_, _, v1) = env
        .raw(
            Method::POST,
            "/v1.0/appkeys/WebAppKey0001/keypairs",
            &[("X-Auth-Token", &jwt), ("content-type", "application/json")],
            json!({"keypair": {"name": "k2"}}).to_string().into_bytes(),
        )
        .await;
    let v1_private_key = v1["keypair"]["privateKey"].as_str().unwrap().to_string();
    // A revoked token: 401, refresh, retry.
    env.sim.revoke_all_tokens();
    assert_eq!(env.get("platform", "/v2/web/flavors").await.0, 200);
    // Rejected callers.
    let bad = format!("{jwt}x");
    seen_jwts.push(bad.clone());
    let (s, _, _) = env
        .raw(
            Method::GET,
            "/v2/web/flavors",
            &[("X-Auth-Token", &bad)],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 401);
    let other = env.token("batch-team");
    seen_jwts.push(other.clone());
    let (s, _, _) = env
        .raw(
            Method::GET,
            "/v2/web/flavors",
            &[("authorization", &format!("Bearer {other}"))],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 403);

    let upstream_tokens: Vec<String> = env
        .sim
        .requests()
        .iter()
        .filter_map(|r| {
            r.headers
                .iter()
                .find(|(k, _)| k == "x-auth-token")
                .map(|(_, v)| v.clone())
        })
        .collect();
    assert!(upstream_tokens.len() >= 4);
    env.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("obtained upstream token"),
        "logs were not captured"
    );
    assert!(logs.len() > 10_000, "suspiciously little logging at TRACE");
    let private_key_body: String = private_key.lines().nth(1).unwrap_or_default().to_string();
    let mut secrets: Vec<(&str, String)> = vec![
        ("web API password", WEB_API_PASSWORD.to_string()),
        ("batch secret access key", BATCH_SECRET_KEY.to_string()),
        ("JWT HS secret", JWT_SECRET.to_string()),
        ("private key", private_key_body),
        (
            "v1.0 private key",
            v1_private_key
                .lines()
                .nth(1)
                .unwrap_or_default()
                .to_string(),
        ),
    ];
    for t in &upstream_tokens {
        secrets.push(("upstream token", t.clone()));
    }
    for j in &seen_jwts {
        // The signature part alone is enough to recognise a leaked JWT.
        secrets.push(("caller JWT", j.rsplit('.').next().unwrap().to_string()));
    }
    for (what, secret) in secrets {
        assert!(secret.len() >= 16, "{what} too short to search for");
        assert!(!logs.contains(&secret), "{what} appears in the logs");
    }
}
