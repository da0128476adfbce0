//! Nothing passes unjudged: bodies are parsed strictly and what goes upstream
//! is exactly what was judged, queries carry only what the spec defines, and
//! a request carries exactly one credential. On both surfaces.

mod common;

use common::{Env, assert_nova_error, assert_v1_failure, fast_sim};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1};

async fn env() -> Env {
    Env::start_with_overlays(fast_sim(), &["overlays/builders-team.yaml"], json!({})).await
}

fn bearer(env: &Env, team: &str) -> String {
    format!("Bearer {}", env.token(team))
}

#[tokio::test]
async fn bodies_that_do_not_parse_strictly_are_refused_and_never_forwarded() {
    let env = env().await;
    let id = env.web_u2_server("platform", "k", "bld-0").await;
    env.sim.clear_requests();
    let auth = bearer(&env, "builders");
    let h = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let create = |extra: &str| {
        format!(
            r#"{{"server":{{"name":"bld-1","imageRef":"{IMAGE_CENTOS_7_8}","flavorRef":"{FLAVOR_U2_C1M1}","networks":[{{"uuid":"{NETWORK_VPC1}"}}],"key_name":"k","max_count":50}}{extra}}}"#
        )
    };
    let cases: Vec<(Method, String, Vec<u8>)> = vec![
        // The issue's two: a rename past the name prefix, a count past max_count.
        (
            Method::PUT,
            format!("/v2/web/servers/{id}"),
            br#"{"server":{"name":"evil"},"x":NaN}"#.to_vec(),
        ),
        (
            Method::POST,
            "/v2/web/servers".into(),
            create(r#","x":NaN"#).into_bytes(),
        ),
        (
            Method::POST,
            "/v2/web/servers".into(),
            create(r#","x":Infinity"#).into_bytes(),
        ),
        (
            Method::POST,
            "/v2/web/servers".into(),
            create(r#","x":1e999"#).into_bytes(),
        ),
        (
            Method::POST,
            "/v2/web/servers".into(),
            [b"\xEF\xBB\xBF".to_vec(), create("").into_bytes()].concat(),
        ),
        (
            Method::POST,
            "/v2/web/servers".into(),
            format!("{} {{}}", create("")).into_bytes(),
        ),
        (
            Method::PUT,
            format!("/v2/web/servers/{id}"),
            br#"{"server":{"name":"bld-ok","name":"evil"}}"#.to_vec(),
        ),
        (
            Method::POST,
            format!("/v2/web/servers/{id}/action"),
            br#"{"reboot":{"type":"HARD","type":"SOFT"}}"#.to_vec(),
        ),
        (
            Method::GET,
            "/v2/web/servers/detail".into(),
            br#"{"smuggled":1}"#.to_vec(),
        ),
        (
            Method::DELETE,
            format!("/v2/web/servers/{id}"),
            br#"{}"#.to_vec(),
        ),
    ];
    for (method, path, body) in cases {
        let shown = String::from_utf8_lossy(&body).to_string();
        let (s, _, b) = env.raw(method.clone(), &path, &h, body).await;
        assert_eq!(s, 400, "{method} {path} {shown}: {b}");
        assert_nova_error(&b, "badRequest", 400);
    }
    assert!(
        env.compute_requests().is_empty(),
        "something unjudged reached the upstream: {:?}",
        env.compute_requests()
            .iter()
            .map(|r| (&r.method, &r.path))
            .collect::<Vec<_>>()
    );

    // The v1.0 surface: the same bodies are JSON errors (-8), never translated.
    for body in [
        r#"{"instance":{"name":"bld-1","count":NaN}}"#,
        r#"{"instance":{"name":"bld-1","name":"x"}}"#,
        "\u{feff}{\"instance\":{}}",
        r#"{"instance":{}} trailing"#,
    ] {
        let (s, _, b) = env
            .raw(
                Method::POST,
                "/v1.0/appkeys/WebAppKey0001/instances",
                &[
                    ("x-auth-token", &env.token("builders")),
                    ("content-type", "application/json"),
                ],
                body.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(s, 200);
        assert_v1_failure(&b, -8);
    }
    assert!(env.compute_requests().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn what_goes_upstream_is_the_judged_value_re_serialized() {
    let env = env().await;
    let id = env.web_u2_server("platform", "k", "bld-0").await;
    env.sim.clear_requests();
    let auth = bearer(&env, "builders");
    // Odd spacing, a text/plain content type: the upstream gets compact JSON
    // as application/json.
    let sent = b"{ \"server\" : { \"name\" :\n \"bld-renamed\" } }\n".to_vec();
    let (s, _, b) = env
        .raw(
            Method::PUT,
            &format!("/v2/web/servers/{id}"),
            &[("authorization", &auth), ("content-type", "text/plain")],
            sent,
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let seen = env.compute_requests();
    let put = seen
        .iter()
        .find(|r| r.method == "PUT")
        .expect("the rename reached the upstream");
    assert_eq!(&put.body[..], br#"{"server":{"name":"bld-renamed"}}"#);
    assert_eq!(put.header("content-type"), Some("application/json"));
    // Body-less requests go without a body or a content type.
    env.sim.clear_requests();
    let (s, _, _) = env
        .raw(
            Method::GET,
            &format!("/v2/web/servers/{id}"),
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 200);
    let get = &env.compute_requests()[0];
    assert!(get.body.is_empty());
    assert_eq!(get.header("content-type"), None);
    env.stop().await;
}

#[tokio::test]
async fn constraints_read_every_spelling_the_upstream_reads() {
    let env = env().await;
    let id = env.web_u2_server("platform", "k", "bld-0").await;
    env.sim.clear_requests();
    let base = json!({"name": "bld-1", "imageRef": IMAGE_CENTOS_7_8, "flavorRef": FLAVOR_U2_C1M1,
                      "networks": [{"uuid": NETWORK_VPC1}], "key_name": "k"});
    let with = |k: &str, v: Value| {
        let mut s = base.clone();
        s[k] = v;
        json!({ "server": s })
    };
    // min_count alone asks for that many instances (Nova starts at least min_count).
    for body in [
        with("min_count", json!(5)),
        with("max_count", json!(5)),
        with("min_count", json!("5")),
        with("max_count", json!(3.0)),
        with("name", json!("web-1")),
    ] {
        let (s, b) = env.post("builders", "/v2/web/servers", body.clone()).await;
        assert_eq!(s, 403, "{body}: {b}");
        assert!(assert_nova_error(&b, "forbidden", 403).contains("builders"));
    }
    // Rename: the name the upstream will set.
    let (s, _) = env
        .call(
            "builders",
            Method::PUT,
            &format!("/v2/web/servers/{id}"),
            Some(json!({"server": {"name": "web-x"}})),
        )
        .await;
    assert_eq!(s, 403);
    assert!(env.compute_requests().is_empty());
    // Within the limits, it passes.
    let (s, b) = env
        .post("builders", "/v2/web/servers", with("min_count", json!(2)))
        .await;
    assert_eq!(s, 202, "{b}");
    env.stop().await;
}

#[tokio::test]
async fn queries_carry_only_what_the_spec_defines() {
    let env = env().await;
    let id = env.web_u2_server("platform", "k", "bld-0").await;
    env.sim.clear_requests();
    for q in [
        "all_tenants=1",
        "all_tenants=1&project_id=9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e",
        "tenant_id=9a1f3c5e7b2d4f6a8c0e1b3d5f7a9c2e",
        "limit=1&limit=2",
        "limit=-1",
        "name=a%0Ab",
    ] {
        let (s, b) = env
            .get("platform", &format!("/v2/web/servers/detail?{q}"))
            .await;
        assert_eq!(s, 400, "{q}: {b}");
        assert!(assert_nova_error(&b, "badRequest", 400).contains("query parameter"));
    }
    let (s, _) = env
        .get("platform", &format!("/v2/web/servers/{id}?fields=all"))
        .await;
    assert_eq!(s, 400);
    assert!(
        env.compute_requests().is_empty(),
        "a refused query reached the upstream"
    );

    // What the spec defines passes, re-encoded.
    let (s, b) = env
        .get("platform", "/v2/web/servers/detail?limit=1&name=bld")
        .await;
    assert_eq!(s, 200, "{b}");
    let seen = &env.compute_requests()[0];
    assert_eq!(seen.query.as_deref(), Some("limit=1&name=bld"));

    // `is_public` (stock clients send it; not in the spec): judged, then
    // left out of the upstream query; ill-formed, refused.
    env.sim.clear_requests();
    let (s, b) = env
        .get(
            "platform",
            "/v2/web/flavors/detail?is_public=None&minRam=512",
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(!b["flavors"].as_array().unwrap().is_empty(), "{b}");
    let seen = &env.compute_requests()[0];
    assert_eq!(seen.query.as_deref(), Some("minRam=512"));
    let (s, _) = env.get("platform", "/v2/web/flavors?is_public=true").await;
    assert_eq!(s, 200);
    assert_eq!(env.compute_requests()[1].query, None);
    let (s, b) = env.get("platform", "/v2/web/flavors?is_public=maybe").await;
    assert_eq!(s, 400, "{b}");
    assert!(
        assert_nova_error(&b, "badRequest", 400)
            .contains("query parameter `is_public` must be true, false or none"),
        "{b}"
    );
    assert_eq!(
        env.compute_requests().len(),
        2,
        "a refused query reached the upstream"
    );

    // v1.0: the same rule, as -4.
    env.sim.clear_requests();
    let b = env
        .v1(
            "platform",
            Method::GET,
            &format!("/instances?id={id}&all_tenants=1"),
            None,
        )
        .await;
    assert!(assert_v1_failure(&b, -4).contains("all_tenants"));
    let b = env
        .v1("platform", Method::GET, "/flavors?minDisk=10", None)
        .await;
    assert_v1_failure(&b, -4);
    assert!(env.compute_requests().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn a_request_with_more_than_one_credential_is_refused() {
    let env = env().await;
    let web = env.token("web-team");
    let batch = env.token("batch-team");
    let (bw, bb) = (format!("Bearer {web}"), format!("Bearer {batch}"));
    let ambiguous: Vec<Vec<(&str, &str)>> = vec![
        vec![("authorization", &bw), ("authorization", "Bearer garbage")],
        vec![("authorization", &bw), ("authorization", &bb)],
        vec![("x-auth-token", &web), ("x-auth-token", &batch)],
        vec![("authorization", &bw), ("x-auth-token", &batch)],
        vec![("authorization", &bb), ("x-auth-token", &web)],
    ];
    for headers in &ambiguous {
        let (s, h, b) = env
            .raw(Method::GET, "/v2/web/flavors", headers, Vec::new())
            .await;
        assert_eq!(s, 401, "{headers:?}: {b}");
        assert!(h.contains_key("www-authenticate"));
        assert!(assert_nova_error(&b, "unauthorized", 401).contains("more than one credential"));
        let (s, _, b) = env
            .raw(
                Method::GET,
                "/v1.0/appkeys/WebAppKey0001/flavors",
                headers,
                Vec::new(),
            )
            .await;
        assert_eq!(s, 200);
        assert!(assert_v1_failure(&b, -3).contains("more than one credential"));
    }
    assert!(env.compute_requests().is_empty());
    // The same token in both headers is one credential.
    let (s, _, b) = env
        .raw(
            Method::GET,
            "/v2/web/flavors",
            &[("authorization", &bw), ("x-auth-token", &web)],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let m = env.metrics().await;
    assert!(
        m.contains(r#"toastgate_auth_failures_total{reason="ambiguous"} 10"#),
        "{m}"
    );
    env.stop().await;
}
