//! Caller authentication and project scoping on the v2 surface: every JWT
//! rejection answers 401 with a Nova-style body, and nothing reaches the
//! upstream.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{Env, JWT_SECRET, assert_nova_error};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn good_claims() -> Value {
    json!({
        "iss": "toastgate-test",
        "aud": "toastgate",
        "sub": "alice",
        "team": "web-team",
        "iat": now(),
        "exp": now() + 600,
    })
}

fn sign(claims: &Value, secret: &str) -> String {
    // mint_token makes sure the crypto provider is in place.
    let _ = toastgate::auth::mint_token;
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

fn with(claims: Value, key: &str, value: Value) -> Value {
    let mut c = claims;
    c[key] = value;
    c
}

fn without(claims: Value, key: &str) -> Value {
    let mut c = claims;
    c.as_object_mut().unwrap().remove(key);
    c
}

fn unsigned(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

async fn call_with(env: &Env, auth_header: (&str, String)) -> (u16, Value, Option<String>) {
    let (status, headers, body) = env
        .raw(
            reqwest::Method::GET,
            "/v2/web/flavors",
            &[(auth_header.0, &auth_header.1)],
            Vec::new(),
        )
        .await;
    let www = headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, body, www)
}

#[tokio::test]
async fn every_jwt_rejection_is_a_401_with_a_nova_body_and_never_forwarded() {
    // Make sure the crypto provider is installed before signing by hand.
    let env = Env::start().await;
    let _ = env.token("web-team");
    let secret = JWT_SECRET;
    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            unsigned(json!({"alg": "none", "typ": "JWT"}), &good_claims()),
        ),
        (
            "alg none lowercase trick",
            unsigned(json!({"alg": "None"}), &good_claims()),
        ),
        (
            "algorithm not allowed (HS512 while only HS256 is)",
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &good_claims(),
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap(),
        ),
        (
            "expired",
            sign(&with(good_claims(), "exp", json!(now() - 3600)), secret),
        ),
        (
            "not yet valid",
            sign(&with(good_claims(), "nbf", json!(now() + 3600)), secret),
        ),
        (
            "wrong issuer",
            sign(&with(good_claims(), "iss", json!("someone-else")), secret),
        ),
        (
            "wrong audience",
            sign(&with(good_claims(), "aud", json!("other-api")), secret),
        ),
        (
            "bad signature",
            sign(&good_claims(), "another-secret-another-secret-0123456789"),
        ),
        ("malformed", "not-a-jwt".to_string()),
        (
            "two segments",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0".to_string(),
        ),
        (
            "exp as a string",
            sign(&with(good_claims(), "exp", json!("9999999999")), secret),
        ),
        (
            "nbf as a string",
            sign(&with(good_claims(), "nbf", json!("0")), secret),
        ),
        ("exp missing", sign(&without(good_claims(), "exp"), secret)),
        (
            "team claim missing",
            sign(&without(good_claims(), "team"), secret),
        ),
        (
            "team claim not a string",
            sign(&with(good_claims(), "team", json!(["web-team"])), secret),
        ),
    ];
    env.sim.clear_requests();
    for (name, token) in cases {
        for header in ["authorization", "x-auth-token"] {
            let value = if header == "authorization" {
                format!("Bearer {token}")
            } else {
                token.clone()
            };
            let (status, body, www) = call_with(&env, (header, value)).await;
            assert_eq!(status, 401, "{name} via {header}: {body}");
            let msg = assert_nova_error(&body, "unauthorized", 401);
            assert!(
                !msg.contains(&token),
                "{name}: the message echoes the token"
            );
            assert!(
                www.is_some_and(|w| w.starts_with("Bearer")),
                "{name}: WWW-Authenticate"
            );
        }
    }
    assert!(
        env.compute_requests().is_empty(),
        "a rejected request reached the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn missing_or_non_bearer_credentials_are_401() {
    let env = Env::start().await;
    let (status, _, body) = env
        .raw(reqwest::Method::GET, "/v2/web/flavors", &[], Vec::new())
        .await;
    assert_eq!(status, 401);
    assert!(assert_nova_error(&body, "unauthorized", 401).contains("authentication required"));
    let (status, _, _) = call_with(&env, ("authorization", "Basic dXNlcjpwdw==".into())).await;
    assert_eq!(status, 401);
    env.stop().await;
}

#[tokio::test]
async fn leeway_accepts_a_token_just_past_exp() {
    let env = Env::start().await;
    let _ = env.token("web-team");
    let token = sign(&with(good_claims(), "exp", json!(now() - 5)), JWT_SECRET);
    let (status, body, _) = call_with(&env, ("authorization", format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "{body}");
    env.stop().await;
}

#[tokio::test]
async fn unknown_team_is_403() {
    let env = Env::start().await;
    let _ = env.token("web-team");
    let token = sign(&with(good_claims(), "team", json!("ghosts")), JWT_SECRET);
    let (status, body, _) = call_with(&env, ("x-auth-token", token)).await;
    assert_eq!(status, 403, "{body}");
    let msg = assert_nova_error(&body, "forbidden", 403);
    assert!(msg.contains("team `ghosts` is not configured"), "{msg}");
    env.stop().await;
}

#[tokio::test]
async fn a_team_is_refused_another_teams_project_by_alias_or_tenant_id() {
    let env = Env::start().await;
    env.sim.clear_requests();
    for path in [
        "/v2/web/servers".to_string(),
        format!("/v2/{}/servers", common::WEB_TENANT),
    ] {
        let (status, body) = env.get("batch-team", &path).await;
        assert_eq!(status, 403, "{path}: {body}");
        let msg = assert_nova_error(&body, "forbidden", 403);
        assert!(
            msg.contains("team `batch-team` may not use project `web`"),
            "{msg}"
        );
    }
    assert!(env.compute_requests().is_empty());
    // The platform team has both.
    assert_eq!(env.get("platform", "/v2/web/servers").await.0, 200);
    assert_eq!(env.get("platform", "/v2/batch/servers").await.0, 200);
    env.stop().await;
}

#[tokio::test]
async fn unknown_project_and_unknown_route_are_refused_not_forwarded() {
    let env = Env::start().await;
    env.sim.clear_requests();
    let (status, body) = env.get("web-team", "/v2/nope/servers").await;
    assert_eq!(status, 404);
    assert!(assert_nova_error(&body, "itemNotFound", 404).contains("project `nope`"));

    let (status, body) = env.get("web-team", "/v2/web/os-hypervisors").await;
    assert_eq!(status, 404);
    assert_nova_error(&body, "itemNotFound", 404);

    let answer = env
        .request(
            "web-team",
            reqwest::Method::PATCH,
            "/v2/web/servers/x",
            None,
        )
        .await;
    assert_eq!(answer.status, 405);
    let message = assert_nova_error(&answer.body, "badMethod", 405);
    assert!(message.contains("(allowed: GET, PUT, DELETE)"), "{message}");
    // RFC 9110: a 405 names the methods the target takes.
    assert_eq!(answer.headers["allow"], "GET, PUT, DELETE");
    let answer = env
        .request(
            "web-team",
            reqwest::Method::DELETE,
            "/v2/web/servers/x/action",
            None,
        )
        .await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.headers["allow"], "POST");
    let answer = env
        .request("web-team", reqwest::Method::POST, "/v2/", None)
        .await;
    assert_eq!(answer.status, 405);
    assert_eq!(answer.headers["allow"], "GET");

    let (status, body) = env
        .post(
            "web-team",
            "/v2/web/servers/x/action",
            json!({"lock": null}),
        )
        .await;
    assert_eq!(status, 400);
    assert!(assert_nova_error(&body, "badRequest", 400).contains("`lock`"));

    let (status, body) = env.get("web-team", "/metrics").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        env.compute_requests().is_empty(),
        "refused routes reached the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn the_verified_token_cache_is_counted_and_capacity_zero_verifies_every_request() {
    for (cache, hits, misses) in [(None, 2.0, 1.0), (Some(0), 0.0, 3.0)] {
        let extra = match cache {
            Some(n) => json!({"auth": {"verified_token_cache": n}}),
            None => json!({}),
        };
        let env = Env::start_with_overlays(common::fast_sim(), &[], extra).await;
        let token = sign(&good_claims(), JWT_SECRET);
        for _ in 0..3 {
            let (status, body, _) =
                call_with(&env, ("authorization", format!("Bearer {token}"))).await;
            assert_eq!(status, 200, "{body}");
        }
        let text = env.metrics().await;
        let count = |result: &str| {
            common::metrics::sum(
                &text,
                &format!(r#"toastgate_auth_cache_total{{result="{result}"}}"#),
            )
        };
        assert_eq!(
            (count("hit"), count("miss")),
            (hits, misses),
            "cache {cache:?}:\n{text}"
        );
        env.stop().await;
    }
}

#[tokio::test]
async fn a_verified_token_is_not_accepted_past_its_exp() {
    // Verified tokens are cached; the cache must never outlive `exp`.
    let env = Env::start_with_overlays(
        common::fast_sim(),
        &["overlays/no-jwt-leeway.yaml"],
        json!({}),
    )
    .await;
    let _ = env.token("web-team");
    // Long enough that a busy machine still makes both calls before `exp`.
    let token = sign(&with(good_claims(), "exp", json!(now() + 10)), JWT_SECRET);
    let (status, _, _) = call_with(&env, ("authorization", format!("Bearer {token}"))).await;
    assert_eq!(status, 200);
    let (status, _, _) = call_with(&env, ("authorization", format!("Bearer {token}"))).await;
    assert_eq!(status, 200, "served from the cache");
    // Wait until `exp` has passed by the clock the gateway uses.
    while now() <= token_exp(&token) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, body, _) = call_with(&env, ("authorization", format!("Bearer {token}"))).await;
    assert_eq!(status, 401, "{body}");
    assert!(assert_nova_error(&body, "unauthorized", 401).contains("expired"));
    env.stop().await;
}

/// The `exp` of a token this test signed.
fn token_exp(token: &str) -> i64 {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    claims["exp"].as_i64().unwrap()
}
