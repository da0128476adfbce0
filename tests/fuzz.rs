//! Arbitrary bytes and arbitrary JSON values at every body-carrying route of
//! both surfaces (and at body-less routes): the gateway never panics, every
//! answer is well-formed in its surface, and nothing reaches the upstream
//! that was not judged (every body the upstream saw is the canonical
//! re-serialization of a strictly parsed value; on the v2 surface, of the
//! very value the caller sent).

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use reqwest::Method;
use serde_json::{Map, Value};
use toastgate::body::{parse_strict, to_upstream_bytes};

/// Routes as (method, path); `{id}` is a real server of the web project.
const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v2/web/servers"),
    ("PUT", "/v2/web/servers/{id}"),
    ("POST", "/v2/web/servers/{id}/action"),
    ("POST", "/v2/web/os-keypairs"),
    ("POST", "/v2/web/servers/{id}/os-volume_attachments"),
    ("GET", "/v2/web/servers/detail"),
    ("GET", "/v2/web/servers/detail?limit=2&status=ACTIVE"),
    ("GET", "/v2/web/servers?name=x&limit=abc"),
    ("DELETE", "/v2/web/os-keypairs/none"),
    (
        "DELETE",
        "/v2/web/servers/{id}/os-volume_attachments/b1c2d3e4-0000-4000-8000-000000000001",
    ),
    (
        "POST",
        "/v2/web/servers/{id}/os-volume_attachments/b1c2d3e4-0000-4000-8000-000000000001",
    ),
    ("POST", "/v1.0/appkeys/WebAppKey0001/instances"),
    (
        "POST",
        "/v1.0/appkeys/WebAppKey0001/instances/{id}/attachments",
    ),
    ("POST", "/v1.0/appkeys/WebAppKey0001/instances/{id}/action"),
    ("POST", "/v1.0/appkeys/WebAppKey0001/keypairs"),
    ("GET", "/v1.0/appkeys/WebAppKey0001/flavors"),
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        "[a-zA-Z0-9 _.:/-]{0,12}".prop_map(Value::String),
        prop_oneof![Just("SOFT"), Just("HARD"), Just("k"), Just("bld-1")]
            .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Keys the routes read, so that generated bodies get past the shape checks
/// and reach deeper (and sometimes the upstream).
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("server".to_string()),
        Just("name".to_string()),
        Just("min_count".to_string()),
        Just("max_count".to_string()),
        Just("flavorRef".to_string()),
        Just("reboot".to_string()),
        Just("os-stop".to_string()),
        Just("type".to_string()),
        Just("keypair".to_string()),
        Just("volumeAttachment".to_string()),
        Just("volumeId".to_string()),
        Just("instance".to_string()),
        Just("action".to_string()),
        Just("parameters".to_string()),
        Just("attachment".to_string()),
        "[a-z]{1,8}",
    ]
}

/// Bodies a route accepts, with generated values: these reach the upstream.
fn plausible() -> impl Strategy<Value = Value> {
    let name = "[a-z][a-z0-9-]{0,10}";
    prop_oneof![
        name.prop_map(|n| serde_json::json!({"server": {"name": n}})),
        name.prop_map(|n| serde_json::json!({"keypair": {"name": n}})),
        prop_oneof![Just("SOFT"), Just("HARD"), Just("soft")]
            .prop_map(|t| serde_json::json!({"reboot": {"type": t}})),
        Just(serde_json::json!({"os-stop": null})),
        Just(serde_json::json!({"os-start": null})),
        prop_oneof![Just("stop"), Just("start"), Just("reboot")]
            .prop_map(|a| serde_json::json!({"action": a, "parameters": {"type": "HARD"}})),
        name.prop_map(|n| serde_json::json!({"keypair": {"name": n, "publicKey": null}})),
    ]
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        plausible().prop_map(|v| serde_json::to_vec_pretty(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        // JSON with a twist parsers disagree on.
        (
            json_value(),
            prop_oneof![
                Just(&b" NaN"[..]),
                Just(&b"\xEF\xBB\xBF"[..]),
                Just(&b"{\"a\":1,\"a\":2}"[..]),
                Just(&b"1e999"[..]),
            ]
        )
            .prop_map(|(v, twist)| {
                let mut b = twist.to_vec();
                b.extend(serde_json::to_vec(&v).unwrap());
                b
            }),
    ]
}

fn assert_well_formed(route: &str, status: u16, body: &Value) -> Result<(), TestCaseError> {
    if route.starts_with("/v1.0/") {
        prop_assert_eq!(status, 200);
        let h = &body["header"];
        prop_assert!(h["isSuccessful"].is_boolean(), "{}", body);
        prop_assert!(h["resultCode"].is_i64(), "{}", body);
        prop_assert!(h["resultMessage"].is_string(), "{}", body);
        prop_assert_ne!(
            h["resultCode"].as_i64(),
            Some(-2),
            "an unexpected failure: {}",
            body
        );
    } else if status >= 400 {
        let obj = body.as_object();
        prop_assert!(
            obj.is_some_and(|o| o.len() == 1),
            "not a Nova error: {status} {body}"
        );
        let fault = obj.unwrap().values().next().unwrap();
        prop_assert_eq!(fault["code"].as_u64(), Some(u64::from(status)), "{}", body);
        prop_assert!(fault["message"].is_string(), "{}", body);
        prop_assert_ne!(status, 500, "an internal error: {}", body);
    }
    Ok(())
}

/// A v2 request reaches the upstream at most once, and with a body only if
/// the caller's was strict JSON: then exactly that value, re-serialized.
fn assert_forwarded_as_judged(
    seen: &[toastgate::simulator::RecordedRequest],
    sent: &[u8],
) -> Result<(), TestCaseError> {
    prop_assert!(seen.len() <= 1, "one request became {}", seen.len());
    if let Some(forwarded) = seen.first().filter(|r| !r.body.is_empty()) {
        let judged = parse_strict(sent);
        prop_assert!(
            judged.is_ok(),
            "a body that is not strict JSON was forwarded: {:?}",
            String::from_utf8_lossy(sent)
        );
        prop_assert_eq!(
            &to_upstream_bytes(&judged.unwrap()),
            &forwarded.body,
            "the upstream got other than the caller's judged value"
        );
    }
    Ok(())
}

#[test]
fn arbitrary_bodies_are_judged_or_refused_never_passed_through() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (env, id) = rt.block_on(async {
        let env = common::Env::start().await;
        let id = env.web_u2_server("platform", "k", "f").await;
        (env, id)
    });
    env.sim.clear_requests();
    let token = format!("Bearer {}", env.token("platform"));
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 1000,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let strategy = (0..ROUTES.len(), body(), any::<bool>());
    // Every request the upstream saw, over all cases.
    let all_seen = std::sync::Mutex::new(Vec::new());
    runner
        .run(&strategy, |(route, body, json_type)| {
            let (method, path) = ROUTES[route];
            let path = path.replace("{id}", &id);
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            let content_type = if json_type {
                "application/json"
            } else {
                "text/plain"
            };
            env.sim.clear_requests();
            let (status, _, answer) = rt.block_on(env.raw(
                method,
                &path,
                &[("authorization", &token), ("content-type", content_type)],
                body.clone(),
            ));
            assert_well_formed(&path, status, &answer)?;
            let seen = env.compute_requests();
            if path.starts_with("/v2/") {
                assert_forwarded_as_judged(&seen, &body)?;
            }
            all_seen.lock().unwrap().extend(seen);
            Ok(())
        })
        .unwrap();

    // Nothing unjudged reached the upstream.
    let seen = all_seen.into_inner().unwrap();
    assert!(
        seen.iter().any(|r| !r.body.is_empty()),
        "no generated body ever reached the upstream: the test judged nothing"
    );
    for r in &seen {
        if r.body.is_empty() {
            continue;
        }
        let value = parse_strict(&r.body)
            .unwrap_or_else(|e| panic!("the upstream got a body that is not strict JSON: {e}"));
        assert_eq!(
            to_upstream_bytes(&value),
            r.body,
            "the upstream got bytes other than the judged value's"
        );
    }
    rt.block_on(env.stop());
}
