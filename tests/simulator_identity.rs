//! The simulator's identity services on their own: Keystone v2.0 tokens,
//! the v1.0 appkey token API, expiry and revocation, and the versions document.

mod common;

use std::time::Duration;

use common::fast_sim;
use common::sim::{
    Answer, BATCH, MICRO_TIME, WEB, Z_TIME, assert_unauthorized, is_hex, matches, start,
};
use reqwest::Method;
use serde_json::json;
use toastgate::simulator::{self, SimConfig};

#[tokio::test]
async fn keystone_issues_tenant_scoped_tokens_in_the_documented_shape() {
    let sim = start(fast_sim()).await;
    let a = sim.web_keystone().await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers["content-type"].to_str().unwrap(),
        "application/json"
    );
    let access = &a.body["access"];
    let token = &access["token"];
    assert!(is_hex(token["id"].as_str().unwrap(), 32));
    assert!(matches(Z_TIME, token["expires"].as_str().unwrap()));
    assert!(matches(MICRO_TIME, token["issued_at"].as_str().unwrap()));
    let expires = chrono::DateTime::parse_from_rfc3339(token["expires"].as_str().unwrap()).unwrap();
    let in_an_hour = chrono::Utc::now() + chrono::Duration::hours(1);
    assert!((in_an_hour - expires.to_utc()).num_seconds().abs() <= 2);
    assert_eq!(
        token["tenant"],
        json!({"id": WEB, "name": "web", "enabled": true, "description": null})
    );
    assert_eq!(
        access["serviceCatalog"],
        json!([
            {"type": "compute", "name": "nova",
             "endpoints": [{"publicURL": format!("{}/v2/{WEB}", sim.base), "region": "KR1"}],
             "endpoints_links": []},
            {"type": "identity", "name": "keystone",
             "endpoints": [{"publicURL": format!("{}/v2.0", sim.base), "region": "KR1"}],
             "endpoints_links": []}
        ])
    );
    assert_eq!(
        access["user"],
        json!({"id": simulator::DEMO_WEB_USER_ID, "username": "web-admin@example.com",
               "name": "web-admin@example.com", "roles": [{"name": "_member_"}],
               "roles_links": []})
    );
    assert_eq!(access["metadata"], json!({"is_admin": 0, "roles": []}));

    // tenantName works too, and the token is accepted on the compute API.
    let by_name = sim
        .raw(
            Method::POST,
            "/v2.0/tokens",
            None,
            Some(
                json!({"auth": {"tenantName": "batch", "passwordCredentials":
                {"username": "batch-admin@example.com", "password": "demo-batch-api-password"}}}),
            ),
            &[],
        )
        .await;
    assert_eq!(by_name.status, 200);
    assert_eq!(by_name.body["access"]["token"]["tenant"]["id"], BATCH);
    let t = by_name.body["access"]["token"]["id"].as_str().unwrap();
    assert_eq!(
        sim.get(&format!("/v2/{BATCH}/flavors"), t).await.status,
        200
    );
    assert_eq!(sim.h.identity_calls(), 2);
}

#[tokio::test]
async fn keystone_refuses_bad_credentials_malformed_bodies_and_fails_in_an_outage() {
    let sim = start(fast_sim()).await;
    let wrong_pw = sim
        .keystone(WEB, simulator::DEMO_WEB_USERNAME, "not-the-password")
        .await;
    assert_unauthorized(&wrong_pw);
    // Right user and password, wrong tenant.
    assert_unauthorized(
        &sim.keystone(
            BATCH,
            simulator::DEMO_WEB_USERNAME,
            simulator::DEMO_WEB_API_PASSWORD,
        )
        .await,
    );

    let malformed = sim
        .raw(
            Method::POST,
            "/v2.0/tokens",
            None,
            Some(json!({"auth": {"tenantId": WEB}})),
            &[],
        )
        .await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["error"]["code"], 400);
    assert_eq!(malformed.body["error"]["title"], "Bad Request");
    assert!(
        malformed.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("passwordCredentials")
    );

    sim.h.set_identity_outage(true);
    let down = sim.web_keystone().await;
    assert_eq!(down.status, 503);
    assert_eq!(
        down.body,
        json!({"error": {"message": "Service Unavailable", "code": 503,
                         "title": "Service Unavailable"}})
    );
    sim.h.set_identity_outage(false);
    sim.web_token().await;
    // Every POST counts, failed or not; GET / does not.
    sim.raw(Method::GET, "/", None, None, &[]).await;
    assert_eq!(sim.h.identity_calls(), 5);
}

#[tokio::test]
async fn v1_token_api_answers_in_the_envelope_and_its_tokens_work_on_v2() {
    let sim = start(fast_sim()).await;
    let path = format!("/v1.0/appkeys/{}/tokens", simulator::DEMO_BATCH_APPKEY);
    let good = json!({"auth": {"username": simulator::DEMO_BATCH_ACCESS_KEY_ID,
                               "password": simulator::DEMO_BATCH_SECRET_ACCESS_KEY}});
    let a = sim
        .raw(Method::POST, &path, None, Some(good.clone()), &[])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body["header"],
        json!({"isSuccessful": true, "resultCode": 0, "resultMessage": "SUCCESS"})
    );
    let token = a.body["access"]["token"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(matches(
        Z_TIME,
        a.body["access"]["token"]["expires"].as_str().unwrap()
    ));
    assert!(matches(
        MICRO_TIME,
        a.body["access"]["token"]["issued_at"].as_str().unwrap()
    ));
    assert_eq!(
        a.body["access"]["user"],
        json!({"id": simulator::DEMO_BATCH_USER_ID, "roles": [{"name": "_member_"}]})
    );

    // Token info.
    let info = sim
        .raw(Method::GET, &format!("{path}?id={token}"), None, None, &[])
        .await;
    assert_eq!(info.body["header"]["isSuccessful"], true);
    assert_eq!(info.body["access"], a.body["access"]);
    let unknown = sim
        .raw(Method::GET, &format!("{path}?id=nope"), None, None, &[])
        .await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.body["header"]["isSuccessful"], false);

    // Valid on its own tenant's v2 API only.
    assert_eq!(
        sim.get(&format!("/v2/{BATCH}/servers"), &token)
            .await
            .status,
        200
    );
    assert_unauthorized(&sim.get(&format!("/v2/{WEB}/servers"), &token).await);

    let code = |a: &Answer| {
        assert_eq!(a.status, 200);
        assert_eq!(a.body["header"]["isSuccessful"], false);
        assert!(
            !a.body["header"]["resultMessage"]
                .as_str()
                .unwrap()
                .is_empty()
        );
        a.body["header"]["resultCode"].as_i64().unwrap()
    };
    let bad_creds = json!({"auth": {"username": simulator::DEMO_BATCH_ACCESS_KEY_ID,
                                    "password": "wrong"}});
    assert_eq!(
        code(
            &sim.raw(Method::POST, &path, None, Some(bad_creds), &[])
                .await
        ),
        50401
    );
    // Another account's keys on this appkey.
    let web_keys = json!({"auth": {"username": simulator::DEMO_WEB_ACCESS_KEY_ID,
                                   "password": simulator::DEMO_WEB_SECRET_ACCESS_KEY}});
    assert_eq!(
        code(
            &sim.raw(Method::POST, &path, None, Some(web_keys), &[])
                .await
        ),
        50401
    );
    assert_eq!(
        code(
            &sim.raw(Method::POST, &path, None, Some(json!({"auth": {}})), &[])
                .await
        ),
        50400
    );
    assert_eq!(
        code(
            &sim.raw(
                Method::POST,
                "/v1.0/appkeys/NoSuchKey/tokens",
                None,
                Some(good.clone()),
                &[]
            )
            .await
        ),
        50404
    );
    sim.h.set_identity_outage(true);
    assert_eq!(
        code(&sim.raw(Method::POST, &path, None, Some(good), &[]).await),
        50503
    );
    assert_eq!(sim.h.identity_calls(), 6);
}

#[tokio::test]
async fn tokens_expire_and_can_be_revoked() {
    let sim = start(SimConfig {
        token_lifetime: Duration::from_secs(60),
        ..fast_sim()
    })
    .await;
    let token = sim.web_token().await;
    assert_eq!(
        sim.get(&format!("/v2/{WEB}/flavors"), &token).await.status,
        200
    );
    // The simulator's clock, not the machine's: however slow the calls
    // above, the token is used before and after its expiry.
    sim.h.advance(Duration::from_secs(61));
    assert_unauthorized(&sim.get(&format!("/v2/{WEB}/flavors"), &token).await);

    let sim = start(fast_sim()).await;
    let old = sim.web_token().await;
    let batch = sim.batch_token().await;
    sim.h.revoke_all_tokens();
    assert_unauthorized(&sim.get(&format!("/v2/{WEB}/flavors"), &old).await);
    assert_unauthorized(&sim.get(&format!("/v2/{BATCH}/flavors"), &batch).await);
    let new = sim.web_token().await;
    assert_eq!(
        sim.get(&format!("/v2/{WEB}/flavors"), &new).await.status,
        200
    );
}

#[tokio::test]
async fn compute_requires_a_valid_token_of_the_path_tenant() {
    let sim = start(fast_sim()).await;
    let path = format!("/v2/{WEB}/servers");
    let missing = sim.raw(Method::GET, &path, None, None, &[]).await;
    assert_unauthorized(&missing);
    assert_eq!(
        missing.headers["www-authenticate"].to_str().unwrap(),
        format!("Keystone uri=\"{}/v2.0\"", sim.base)
    );
    assert_unauthorized(&sim.get(&path, "0123456789abcdef0123456789abcdef").await);
    let batch = sim.batch_token().await;
    assert_unauthorized(&sim.get(&path, &batch).await);
    // Auth comes before routing, as with keystonemiddleware.
    assert_unauthorized(
        &sim.raw(Method::GET, &format!("/v2/{WEB}/nope"), None, None, &[])
            .await,
    );
}

#[tokio::test]
async fn root_lists_identity_versions_like_the_spec() {
    let sim = start(fast_sim()).await;
    let a = sim.raw(Method::GET, "/", None, None, &[]).await;
    assert_eq!(a.status, 200);
    let values = &a.body["versions"]["values"];
    assert_eq!(values[0]["id"], "v3.4");
    assert_eq!(values[0]["status"], "stable");
    assert_eq!(values[0]["updated"], "2015-03-30T00:00:00Z");
    assert_eq!(
        values[0]["media-types"],
        json!([{"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}])
    );
    assert_eq!(
        values[0]["links"],
        json!([{"href": format!("{}/v3/", sim.base), "rel": "self"}])
    );
    assert_eq!(values[1]["id"], "v2.0");
    assert_eq!(
        values[1]["links"],
        json!([{"href": format!("{}/v2.0/", sim.base), "rel": "self"},
               {"href": "http://docs.openstack.org/", "type": "text/html", "rel": "describedby"}])
    );
}
