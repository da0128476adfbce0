//! `Idempotency-Key` on the creating Actions, end to end: a repeat gets the
//! first answer and nothing goes upstream twice; the same key for another
//! request is refused; a repeat while the first runs is refused with 409;
//! across two replicas on one Redis, a client that times out and retries on
//! the other replica creates exactly one instance.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisServer;
use common::tempdir::TempDir;
use common::{Env, assert_nova_error, fast_sim, secrets, start_sim};
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use toastgate::simulator::{FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1};

/// A u2 server with key pair `idem-key` (made by each test first).
fn server(name: &str) -> Value {
    json!({"server": {"name": name, "imageRef": IMAGE_CENTOS_7_8, "flavorRef": FLAVOR_U2_C1M1,
                      "networks": [{"uuid": NETWORK_VPC1}], "key_name": "idem-key"}})
}

/// POST `path` as web-team with `Idempotency-Key: key`; status, headers, body.
async fn post_with_key(
    http: &reqwest::Client,
    env: &Env,
    path: &str,
    key: &str,
    body: &Value,
) -> Result<(u16, HeaderMap, Value), reqwest::Error> {
    let answer = http
        .post(env.url(path))
        .bearer_auth(env.token("web-team"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    let (status, headers) = (answer.status().as_u16(), answer.headers().clone());
    Ok((status, headers, answer.json().await.unwrap_or(Value::Null)))
}

fn creates_seen(env: &Env, path_end: &str) -> usize {
    env.compute_requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(path_end))
        .count()
}

fn audit_records(file: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_repeated_create_gets_the_first_answer_and_runs_once() {
    let dir = TempDir::new("idempotency");
    let file = dir.join("audit.jsonl");
    let env =
        Env::start_with_overlays(fast_sim(), &[], json!({"audit": {"file": {"path": file}}})).await;
    env.web_keypair("web-team", "idem-key").await;
    let http = reqwest::Client::new();
    let key = "\"5f0c1d9e-0000-4000-8000-000000000001\"";

    let (s1, h1, b1) = post_with_key(&http, &env, "/v2/web/servers", key, &server("idem-1"))
        .await
        .unwrap();
    assert_eq!(s1, 202, "{b1}");
    assert!(!h1.contains_key("idempotent-replayed"));
    let (s2, h2, b2) = post_with_key(&http, &env, "/v2/web/servers", key, &server("idem-1"))
        .await
        .unwrap();
    assert_eq!((s2, &b2), (202, &b1), "the first answer, the same id");
    assert_eq!(h2["idempotent-replayed"], "true");
    assert_eq!(h2["location"], h1["location"]);
    assert_eq!(creates_seen(&env, "/servers"), 1, "one create upstream");

    // The same key for another request: refused, nothing sent.
    let (s, _, b) = post_with_key(&http, &env, "/v2/web/servers", key, &server("idem-other"))
        .await
        .unwrap();
    assert_eq!(s, 422, "{b}");
    assert!(assert_nova_error(&b, "unprocessableEntity", 422).contains("different request"));
    // Another team's key of the same name is its own (batch-team may not
    // use web, so: the same team, another key, runs).
    let (s, _, _) = post_with_key(&http, &env, "/v2/web/servers", "other", &server("idem-1"))
        .await
        .unwrap();
    assert_eq!(s, 202);
    assert_eq!(creates_seen(&env, "/servers"), 2);

    // A key where it means nothing, or ill-formed: 400.
    let id = b1["server"]["id"].as_str().unwrap();
    let (s, _, b) = post_with_key(
        &http,
        &env,
        &format!("/v2/web/servers/{id}/action"),
        "k",
        &json!({"reboot": {"type": "SOFT"}}),
    )
    .await
    .unwrap();
    assert_eq!(s, 400, "{b}");
    assert!(assert_nova_error(&b, "badRequest", 400).contains("instance.reboot does not create"));
    let (s, _, _) = post_with_key(&http, &env, "/v2/web/servers", "a b", &server("x"))
        .await
        .unwrap();
    assert_eq!(s, 400);

    // v1.0: the same on the envelope; a generated private key is shown once.
    let v1 = |key: &'static str| {
        let http = http.clone();
        let url = env.url("/v1.0/appkeys/WebAppKey0001/keypairs");
        let token = env.token("web-team");
        async move {
            let answer = http
                .post(url)
                .header("X-Auth-Token", token)
                .header("Idempotency-Key", key)
                .json(&json!({"keypair": {"name": "idem-kp"}}))
                .send()
                .await
                .unwrap();
            let replayed = answer.headers().contains_key("idempotent-replayed");
            (replayed, answer.json::<Value>().await.unwrap())
        }
    };
    let (replayed, first) = v1("kp-1").await;
    assert!(!replayed);
    assert_eq!(first["header"]["isSuccessful"], true, "{first}");
    assert!(first["keypair"]["privateKey"].is_string(), "{first}");
    let (replayed, again) = v1("kp-1").await;
    assert!(replayed);
    assert_eq!(again["keypair"]["name"], "idem-kp");
    assert_eq!(
        again["keypair"]["fingerprint"],
        first["keypair"]["fingerprint"]
    );
    assert!(
        again["keypair"].get("privateKey").is_none(),
        "never kept: {again}"
    );
    assert_eq!(
        creates_seen(&env, "/os-keypairs"),
        2,
        "idem-key, then idem-kp once"
    );

    // Both decisions are in the audit log.
    let records = audit_records(&file);
    assert!(
        records.iter().any(|r| r["reason"] == "idempotent_replay"
            && r["action"] == "instance.create"
            && r["result"]["instance_id"] == b1["server"]["id"]),
        "{records:#?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["reason"] == "idempotency:mismatch" && r["decision"] == "refused")
    );
    env.stop().await;
}

/// Two replicas on one Redis, one upstream. A client sends a create to A
/// and gives up after 1 s (the upstream is held); it retries on B: 409 while
/// A's request runs, then A's answer. Exactly one instance exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_times_out_and_retries_on_another_replica_creates_one_instance() {
    let mut redis = RedisServer::start();
    let sim = start_sim(fast_sim()).await;
    let s = secrets().with_override("TG_REDIS_URL", &redis.url());
    let mut envs = Vec::new();
    for host in ["127.0.0.2", "127.0.0.3"] {
        let extra = json!({
            "listen": {"public": format!("{host}:0"), "admin": format!("{host}:0")},
            "rate_limit": {"redis": {"key_prefix": "idem"}},
        });
        envs.push(
            Env::start_on(sim.clone(), &["overlays/redis-rate-limits.yaml"], extra, &s).await,
        );
    }
    let (a, b) = (&envs[0], &envs[1]);
    a.web_keypair("web-team", "idem-key").await;
    let key = "retry-after-timeout-1";
    let body = server("exactly-one");

    sim.hold_compute(true);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    let gave_up = post_with_key(&impatient, a, "/v2/web/servers", key, &body).await;
    assert!(
        gave_up.is_err_and(|e| e.is_timeout()),
        "the client timed out"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while creates_seen(a, "/servers") == 0 {
        assert!(
            Instant::now() < deadline,
            "A's create never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The running marker outlasts both of A's deadlines (its phases, then
    // its audit record: `server.request_timeout` each, 10 s here), so no
    // retry can run the create again while A is still finishing.
    let mut conn = redis.connection().unwrap();
    let markers: Vec<String> = redis::cmd("KEYS")
        .arg("idem:idem:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(markers.len(), 1, "{markers:?}");
    let held_ms = redis.pttl(&markers[0]);
    assert!(
        held_ms > 2 * 10_000 + 25_000,
        "the running marker holds for {held_ms} ms only"
    );

    let http = reqwest::Client::new();
    let (s, h, b409) = post_with_key(&http, b, "/v2/web/servers", key, &body)
        .await
        .unwrap();
    assert_eq!(s, 409, "{b409}");
    assert_eq!(h["retry-after"], "1");
    assert!(assert_nova_error(&b409, "conflictingRequest", 409).contains("still in progress"));

    // A's request finishes (its task outlives the client); B answers it.
    sim.hold_compute(false);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (h, answer) = loop {
        let (s, h, body) = post_with_key(&http, b, "/v2/web/servers", key, &body)
            .await
            .unwrap();
        if s == 202 {
            break (h, body);
        }
        assert_eq!(s, 409, "{body}");
        assert!(Instant::now() < deadline, "the answer never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(h["idempotent-replayed"], "true");
    assert!(answer["server"]["id"].is_string(), "{answer}");
    assert_eq!(
        creates_seen(a, "/servers"),
        1,
        "exactly one create upstream"
    );
    let (s, list) = b.get("web-team", "/v2/web/servers").await;
    assert_eq!(s, 200);
    let named: Vec<&Value> = list["servers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["name"] == "exactly-one")
        .collect();
    assert_eq!(named.len(), 1, "{list}");
    assert_eq!(named[0]["id"], answer["server"]["id"]);

    // The shared store is gone: a request with a key is not performed.
    redis.kill();
    let (s, h, body) = post_with_key(&http, a, "/v2/web/servers", "new-key", &server("never"))
        .await
        .unwrap();
    assert_eq!(s, 503, "{body}");
    assert!(h.contains_key("retry-after"));
    assert!(assert_nova_error(&body, "serviceUnavailable", 503).contains("Idempotency-Key"));
    for env in envs {
        env.stop().await;
    }
}
