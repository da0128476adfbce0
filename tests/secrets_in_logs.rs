//! No secret in any log line of a whole gateway session at TRACE level:
//! cloud passwords and access keys, upstream tokens, caller JWTs, the JWT
//! key, generated private keys.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{BATCH_SECRET_KEY, Env, JWT_SECRET, WEB_API_PASSWORD};
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn no_secret_appears_in_trace_logs() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(capture.clone())
        .with_ansi(false)
        .init();

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
    let v1: serde_json::Value = env
        .http
        .post(env.url("/v1.0/appkeys/WebAppKey0001/keypairs"))
        .header("X-Auth-Token", &jwt)
        .json(&json!({"keypair": {"name": "k2"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let v1_private_key = v1["keypair"]["privateKey"].as_str().unwrap().to_string();
    // A revoked token: 401, refresh, retry.
    env.sim.revoke_all_tokens();
    assert_eq!(env.get("platform", "/v2/web/flavors").await.0, 200);
    // Rejected callers.
    let bad = format!("{jwt}x");
    seen_jwts.push(bad.clone());
    let resp = env
        .http
        .get(env.url("/v2/web/flavors"))
        .header("X-Auth-Token", &bad)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let other = env.token("batch-team");
    seen_jwts.push(other.clone());
    let resp = env
        .http
        .get(env.url("/v2/web/flavors"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);

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

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
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
