//! The simulator's test hooks and HTTP surface: injected errors, microversion
//! headers, refused paths, methods and bodies, recorded requests, latency,
//! shutdown and the public URL.

mod common;

use std::time::Duration;

use common::fast_sim;
use common::sim::{Answer, WEB, start, with_web_token};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{self, ErrorInjection, SimConfig};

#[tokio::test]
async fn injected_errors_answer_matching_compute_requests_then_stop() {
    let (sim, t) = with_web_token(fast_sim()).await;
    sim.h.inject_error(ErrorInjection {
        method: Some(http::Method::GET),
        path_contains: "/servers".into(),
        status: 500,
        body: r#"{"computeFault":{"code":500,"message":"boom"}}"#.into(),
        times: 2,
    });
    let path = format!("/v2/{WEB}/servers");
    for _ in 0..2 {
        let a = sim.get(&path, &t).await;
        assert_eq!(a.status, 500);
        assert_eq!(
            a.body,
            json!({"computeFault": {"code": 500, "message": "boom"}})
        );
    }
    assert_eq!(sim.get(&path, &t).await.status, 200);

    // Method and path must both match; identity is never affected.
    sim.h.inject_error(ErrorInjection {
        method: Some(http::Method::POST),
        path_contains: "/flavors".into(),
        status: 503,
        body: "overloaded".into(),
        times: 1,
    });
    assert_eq!(sim.get(&format!("/v2/{WEB}/flavors"), &t).await.status, 200);
    sim.h.inject_error(ErrorInjection {
        method: None,
        path_contains: "tokens".into(),
        status: 500,
        body: String::new(),
        times: 1,
    });
    sim.web_token().await;
    // Injection comes before authentication.
    sim.h.inject_error(ErrorInjection {
        method: None,
        path_contains: "/os-keypairs".into(),
        status: 429,
        body: "slow down".into(),
        times: 1,
    });
    let a = sim
        .raw(
            Method::GET,
            &format!("/v2/{WEB}/os-keypairs"),
            None,
            None,
            &[],
        )
        .await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body, json!("slow down"));
}

#[tokio::test]
async fn microversion_headers_are_echoed_or_defaulted() {
    let (sim, t) = with_web_token(fast_sim()).await;
    let path = format!("/v2/{WEB}/flavors");
    let h = |a: &Answer, k: &str| a.headers[k].to_str().unwrap().to_string();
    let get_with = |headers: &'static [(&'static str, &'static str)]| {
        sim.raw(Method::GET, &path, Some(&t), None, headers)
    };

    let a = sim.get(&path, &t).await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.1");
    assert_eq!(h(&a, "x-openstack-nova-api-version"), "2.1");
    assert_eq!(
        h(&a, "vary"),
        "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
    );
    assert!(h(&a, "x-compute-request-id").starts_with("req-"));

    let a = get_with(&[
        ("OpenStack-API-Version", "compute 2.60"),
        ("X-OpenStack-Nova-API-Version", "2.60"),
    ])
    .await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.60");
    assert_eq!(h(&a, "x-openstack-nova-api-version"), "2.60");
    let a = get_with(&[("X-OpenStack-Nova-API-Version", "2.3")]).await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.3");
    assert_eq!(h(&a, "x-openstack-nova-api-version"), "2.3");
    // Errors carry them too; identity answers do not.
    let a = sim.get(&format!("/v2/{WEB}/servers/nope"), &t).await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.1");
    let a = sim
        .keystone(WEB, simulator::DEMO_WEB_USERNAME, "wrong")
        .await;
    assert!(a.headers.get("openstack-api-version").is_none());
}

#[tokio::test]
async fn unknown_paths_methods_media_types_and_big_bodies_are_refused() {
    let (sim, t) = with_web_token(fast_sim()).await;
    let a = sim.raw(Method::GET, "/nothing/here", None, None, &[]).await;
    assert_eq!(
        a.body,
        json!({"itemNotFound": {"code": 404, "message": "The resource could not be found."}})
    );
    let a = sim.get(&format!("/v2/{WEB}/os-hypervisors"), &t).await;
    assert_eq!(a.status, 404);
    assert_eq!(
        a.body["itemNotFound"]["message"],
        "The resource could not be found."
    );

    let a = sim
        .call(Method::DELETE, &format!("/v2/{WEB}/flavors"), &t, None)
        .await;
    assert_eq!(a.status, 405);
    assert_eq!(a.headers["allow"].to_str().unwrap(), "GET");
    assert_eq!(a.body["badMethod"]["code"], 405);
    let a = sim.raw(Method::GET, "/v2.0/tokens", None, None, &[]).await;
    assert_eq!(a.status, 405);

    let a = sim
        .raw(
            Method::POST,
            &format!("/v2/{WEB}/os-keypairs"),
            Some(&t),
            None,
            &[("content-type", "text/plain")],
        )
        .await;
    // An empty body is not inspected; a non-JSON one is refused by media type.
    assert_eq!(a.status, 400);
    let a = sim
        .http
        .post(format!("{}/v2/{WEB}/os-keypairs", sim.base))
        .header("X-Auth-Token", &t)
        .header("content-type", "text/plain")
        .body("name=x")
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 415);

    let big = "x".repeat(simulator::BODY_LIMIT + 1);
    let a = sim
        .http
        .post(format!("{}/v2/{WEB}/servers", sim.base))
        .header("X-Auth-Token", &t)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(a.status().as_u16(), 413);
    let body: Value = a.json().await.unwrap();
    assert_eq!(body["overLimit"]["code"], 413);

    // Garbage in odd places never breaks the simulator.
    for path in [
        "/v2/%ff/servers",
        "/v2/",
        "/v2",
        "/v1.0/appkeys/x/tokens?id=%zz",
        "/v2/x/servers/../../etc",
    ] {
        let a = sim.raw(Method::GET, path, Some(&t), None, &[]).await;
        assert!(
            a.status >= 400 || path.starts_with("/v1.0"),
            "{path}: {}",
            a.status
        );
    }
    assert_eq!(sim.get(&format!("/v2/{WEB}/flavors"), &t).await.status, 200);
}

#[tokio::test]
async fn requests_are_recorded_latency_applies_and_shutdown_stops_the_server() {
    let (sim, t) = with_web_token(fast_sim()).await;
    sim.h.clear_requests();
    sim.raw(
        Method::POST,
        &format!("/v2/{WEB}/os-keypairs?dry=1"),
        Some(&t),
        Some(json!({"keypair": {"name": "rec"}})),
        &[("X-Trace", "abc")],
    )
    .await;
    let recorded = sim.h.requests();
    assert_eq!(recorded.len(), 1);
    let r = &recorded[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, format!("/v2/{WEB}/os-keypairs"));
    assert_eq!(r.query.as_deref(), Some("dry=1"));
    assert_eq!(r.header("x-auth-token"), Some(t.as_str()));
    assert_eq!(r.header("X-Trace"), Some("abc"));
    let body: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body, json!({"keypair": {"name": "rec"}}));

    sim.h.set_latency(Duration::from_millis(200));
    let started = std::time::Instant::now();
    assert_eq!(sim.get(&format!("/v2/{WEB}/flavors"), &t).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    sim.h.set_latency(Duration::ZERO);
    assert_eq!(sim.h.requests().len(), 2);

    let addr = sim.h.addr();
    assert_eq!(sim.h.base_url(), format!("http://{addr}"));
    sim.h.stop().await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(format!("{}/", sim.base)).send().await.is_err());
}

#[tokio::test]
async fn public_url_is_used_in_links_and_the_catalog() {
    let sim = start(SimConfig {
        public_url: Some("https://compute.example.test/".into()),
        ..fast_sim()
    })
    .await;
    let a = sim.web_keystone().await;
    assert_eq!(
        a.body["access"]["serviceCatalog"][0]["endpoints"][0]["publicURL"],
        format!("https://compute.example.test/v2/{WEB}")
    );
    let t = a.body["access"]["token"]["id"].as_str().unwrap();
    let f = sim.get(&format!("/v2/{WEB}/flavors?limit=1"), t).await;
    assert!(
        f.body["flavors"][0]["links"][0]["href"]
            .as_str()
            .unwrap()
            .starts_with("https://compute.example.test/v2/")
    );
    assert!(
        f.body["flavors_links"][0]["href"]
            .as_str()
            .unwrap()
            .starts_with("https://compute.example.test/v2/")
    );
}
