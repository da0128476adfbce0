//! The simulator on its own: identity, every compute endpoint of the v2 spec, the server
//! state machine and the test hooks, over real HTTP on an ephemeral port.

use std::time::Duration;

use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use toastgate::simulator::{
    self, DEMO_BATCH_TENANT_ID, DEMO_WEB_TENANT_ID, ErrorInjection, SimConfig, SimHandle, Simulator,
};

const WEB: &str = DEMO_WEB_TENANT_ID;
const BATCH: &str = DEMO_BATCH_TENANT_ID;

struct Sim {
    h: SimHandle,
    http: reqwest::Client,
    base: String,
}

struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

fn fast() -> SimConfig {
    SimConfig {
        build_delay: Duration::ZERO,
        action_delay: Duration::ZERO,
        ..SimConfig::demo()
    }
}

/// Delays short enough for tests, long enough to observe each transitional state.
/// The delay of every transition in the state machine tests: long enough that a busy
/// 2-core CI machine still observes the transitional state right after an action.
const STEP: Duration = Duration::from_millis(300);

/// Waits until `steps` transitions have surely completed.
async fn wait_steps(steps: u32) {
    tokio::time::sleep(STEP * steps + Duration::from_millis(60)).await;
}

fn observable() -> SimConfig {
    SimConfig {
        build_delay: STEP,
        action_delay: STEP,
        ..SimConfig::demo()
    }
}

async fn start(config: SimConfig) -> Sim {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = Simulator::start(listener, config).await.unwrap();
    let base = h.base_url();
    Sim {
        h,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
        base,
    }
}

impl Sim {
    async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("simulator answers");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn call(&self, method: Method, path: &str, token: &str, body: Option<Value>) -> Answer {
        self.raw(method, path, Some(token), body, &[]).await
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        self.call(Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Answer {
        self.call(Method::POST, path, token, Some(body)).await
    }

    async fn keystone(&self, tenant: &str, user: &str, password: &str) -> Answer {
        let body = json!({"auth": {"tenantId": tenant,
            "passwordCredentials": {"username": user, "password": password}}});
        self.raw(Method::POST, "/v2.0/tokens", None, Some(body), &[])
            .await
    }

    async fn web_token(&self) -> String {
        let a = self
            .keystone(
                WEB,
                simulator::DEMO_WEB_USERNAME,
                simulator::DEMO_WEB_API_PASSWORD,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["access"]["token"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn batch_token(&self) -> String {
        let a = self
            .keystone(
                BATCH,
                simulator::DEMO_BATCH_USERNAME,
                simulator::DEMO_BATCH_API_PASSWORD,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["access"]["token"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn keypair(&self, token: &str, tenant: &str, name: &str) {
        let a = self
            .post(
                &format!("/v2/{tenant}/os-keypairs"),
                token,
                json!({"keypair": {"name": name}}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    /// Creates a u2 server (local disk, no block device mapping) and returns its id.
    async fn u2_server(&self, token: &str, name: &str) -> String {
        let a = self
            .post(
                &format!("/v2/{WEB}/servers"),
                token,
                json!({"server": {
                    "name": name,
                    "imageRef": simulator::IMAGE_CENTOS_7_8,
                    "flavorRef": simulator::FLAVOR_U2_C1M1,
                    "networks": [{"uuid": simulator::NETWORK_VPC1}],
                    "key_name": "access-key"
                }}),
            )
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
        a.body["server"]["id"].as_str().unwrap().to_string()
    }

    async fn server(&self, token: &str, id: &str) -> Value {
        let a = self.get(&format!("/v2/{WEB}/servers/{id}"), token).await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["server"].clone()
    }

    async fn action(&self, token: &str, id: &str, body: Value) -> Answer {
        self.post(&format!("/v2/{WEB}/servers/{id}/action"), token, body)
            .await
    }
}

/// The spec's create example, verbatim (key pair `access-key` must exist).
fn spec_create_example() -> Value {
    json!({
      "server": {
        "name": "DB-Master",
        "imageRef": "9956f822-29c9-4f81-9410-0c392d9c8c24",
        "flavorRef": "a4b6a0f7-aeff-4d78-a8d5-7de9f007012d",
        "networks": [{
          "subnet": "b83863ff-0355-4c73-8c10-0bdf66a69aab"
        }],
        "availability_zone": "kr-pub-a",
        "key_name": "access-key",
        "max_count": 1,
        "min_count": 1,
        "block_device_mapping_v2": [{
          "uuid": "9956f822-29c9-4f81-9410-0c392d9c8c24",
          "boot_index": 0,
          "volume_size": 1000,
          "device_name": "vda",
          "source_type": "image",
          "destination_type": "volume",
          "delete_on_termination": 1
        }],
        "security_groups": [{
          "name": "default"
        }]
      }
    })
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

fn matches(re: &str, s: &str) -> bool {
    regex::Regex::new(re).unwrap().is_match(s)
}

const Z_TIME: &str = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$";
const MICRO_TIME: &str = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}$";

fn assert_unauthorized(a: &Answer) {
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body,
        json!({"error": {"message": "The request you have made requires authentication.",
                         "code": 401, "title": "Unauthorized"}})
    );
}

fn fault_message(a: &Answer, fault: &str, status: u16) -> String {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body[fault]["code"], status, "{}", a.body);
    a.body[fault]["message"].as_str().unwrap().to_string()
}

// ---- identity -----------------------------------------------------------------------

#[tokio::test]
async fn keystone_issues_tenant_scoped_tokens_in_the_documented_shape() {
    let sim = start(fast()).await;
    let a = sim
        .keystone(
            WEB,
            simulator::DEMO_WEB_USERNAME,
            simulator::DEMO_WEB_API_PASSWORD,
        )
        .await;
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
    let sim = start(fast()).await;
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
    let down = sim
        .keystone(
            WEB,
            simulator::DEMO_WEB_USERNAME,
            simulator::DEMO_WEB_API_PASSWORD,
        )
        .await;
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
    let sim = start(fast()).await;
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
        token_lifetime: Duration::from_millis(1000),
        ..fast()
    })
    .await;
    let token = sim.web_token().await;
    assert_eq!(
        sim.get(&format!("/v2/{WEB}/flavors"), &token).await.status,
        200
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_unauthorized(&sim.get(&format!("/v2/{WEB}/flavors"), &token).await);

    let sim = start(fast()).await;
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
    let sim = start(fast()).await;
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
    let sim = start(fast()).await;
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

// ---- flavors, zones -----------------------------------------------------------------

#[tokio::test]
async fn flavors_match_the_spec_and_filter_and_paginate() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    let detail = sim.get(&format!("/v2/{WEB}/flavors/detail"), &t).await;
    assert_eq!(detail.status, 200);
    let flavors = detail.body["flavors"].as_array().unwrap();
    let x1 = flavors.iter().find(|f| f["name"] == "x1.c32m256").unwrap();
    let id = "97604802-a090-43fa-a5ce-c7cfd737fbba";
    assert_eq!(
        *x1,
        json!({
            "name": "x1.c32m256",
            "links": [
                {"href": format!("{}/v2/{WEB}/flavors/{id}", sim.base), "rel": "self"},
                {"href": format!("{}/{WEB}/flavors/{id}", sim.base), "rel": "bookmark"}
            ],
            "ram": 262144,
            "OS-FLV-DISABLED:disabled": false,
            "vcpus": 32,
            "extra_specs": {"flavor_type": "performance"},
            "swap": "",
            "os-flavor-access:is_public": true,
            "rxtx_factor": 1.0,
            "OS-FLV-EXT-DATA:ephemeral": 0,
            "disk": 0,
            "id": id
        })
    );
    let x1_128 = flavors.iter().find(|f| f["name"] == "x1.c32m128").unwrap();
    assert_eq!(x1_128["id"], "31fa632d-aeec-4f12-8a57-ce9d146228e5");
    assert_eq!(x1_128["ram"], 131072);
    let u2 = flavors.iter().find(|f| f["name"] == "u2.c1m1").unwrap();
    assert_eq!(u2["disk"], 20);
    let ids: Vec<&str> = flavors.iter().map(|f| f["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "flavor id order, like Nova");

    // Brief list: id, links, name only.
    let brief = sim.get(&format!("/v2/{WEB}/flavors"), &t).await;
    let first = &brief.body["flavors"][0];
    assert_eq!(first.as_object().unwrap().len(), 3);
    assert_eq!(first["id"], ids[0]);

    // Filters.
    let big = sim
        .get(&format!("/v2/{WEB}/flavors/detail?minRam=131072"), &t)
        .await;
    let names: Vec<&str> = big.body["flavors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"x1.c32m128") && names.contains(&"x1.c32m256"));
    let disk = sim.get(&format!("/v2/{WEB}/flavors?minDisk=21"), &t).await;
    assert_eq!(disk.body["flavors"].as_array().unwrap().len(), 1);
    assert_eq!(disk.body["flavors"][0]["name"], "u2.c2m4");
    let bad = sim.get(&format!("/v2/{WEB}/flavors?minRam=lots"), &t).await;
    assert_eq!(
        fault_message(&bad, "badRequest", 400),
        "Invalid minRam filter [lots]"
    );

    // Pagination: limit + marker, next link until the end.
    let mut seen = Vec::new();
    let mut url = format!("/v2/{WEB}/flavors?limit=4");
    loop {
        let page = sim.get(&url, &t).await;
        assert_eq!(page.status, 200);
        let items = page.body["flavors"].as_array().unwrap();
        seen.extend(items.iter().map(|f| f["id"].as_str().unwrap().to_string()));
        match page.body.get("flavors_links") {
            Some(links) => {
                assert_eq!(items.len(), 4);
                let href = links[0]["href"].as_str().unwrap();
                assert_eq!(links[0]["rel"], "next");
                let last = items.last().unwrap()["id"].as_str().unwrap();
                assert_eq!(
                    href,
                    format!("{}/v2/{WEB}/flavors?limit=4&marker={last}", sim.base)
                );
                url = href.trim_start_matches(&sim.base).to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let bad_marker = sim.get(&format!("/v2/{WEB}/flavors?marker=nope"), &t).await;
    assert_eq!(
        fault_message(&bad_marker, "badRequest", 400),
        "marker [nope] not found"
    );
    let bad_limit = sim.get(&format!("/v2/{WEB}/flavors?limit=x"), &t).await;
    fault_message(&bad_limit, "badRequest", 400);

    let one = sim
        .get(
            &format!("/v2/{WEB}/flavors/{}", simulator::FLAVOR_M2_C1M2),
            &t,
        )
        .await;
    assert_eq!(one.body["flavor"]["name"], "m2.c1m2");
    let missing = sim.get(&format!("/v2/{WEB}/flavors/nope"), &t).await;
    fault_message(&missing, "itemNotFound", 404);
}

#[tokio::test]
async fn availability_zones_are_exactly_the_spec_example() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    let a = sim
        .get(&format!("/v2/{WEB}/os-availability-zone"), &t)
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.body,
        json!({"availabilityZoneInfo": [
            {"zoneState": {"available": true}, "hosts": null, "zoneName": "kr-pub-a"},
            {"zoneState": {"available": true}, "hosts": null, "zoneName": "kr-pub-b"}
        ]})
    );
}

// ---- key pairs ----------------------------------------------------------------------

#[tokio::test]
async fn keypairs_generate_import_list_show_and_delete() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    let path = format!("/v2/{WEB}/os-keypairs");

    let generated = sim
        .post(&path, &t, json!({"keypair": {"name": "gen key_1"}}))
        .await;
    assert_eq!(generated.status, 200);
    let kp = &generated.body["keypair"];
    assert_eq!(kp["name"], "gen key_1");
    assert_eq!(kp["user_id"], simulator::DEMO_WEB_USER_ID);
    assert!(
        kp["public_key"]
            .as_str()
            .unwrap()
            .starts_with("ssh-rsa AAAA")
    );
    let private = kp["private_key"].as_str().unwrap();
    assert!(private.starts_with("-----BEGIN RSA PRIVATE KEY-----\n"));
    assert!(
        private
            .trim_end()
            .ends_with("-----END RSA PRIVATE KEY-----")
    );
    assert!(matches(
        r"^([0-9a-f]{2}:){15}[0-9a-f]{2}$",
        kp["fingerprint"].as_str().unwrap()
    ));

    // Import: Nova's MD5 fingerprint of the key blob; no private key.
    let public =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAABAgMEBQYHCAkKCwwNDg8QERITFBUWFxgZGhscHR4f me@host";
    let imported = sim
        .post(
            &path,
            &t,
            json!({"keypair": {"name": "access-key", "public_key": public}}),
        )
        .await;
    assert_eq!(imported.status, 200);
    assert_eq!(
        imported.body,
        json!({"keypair": {"fingerprint": "0f:a2:0a:d7:38:3e:65:45:08:6b:63:84:1c:ff:dc:ba",
                           "name": "access-key", "public_key": public,
                           "user_id": simulator::DEMO_WEB_USER_ID}})
    );

    let list = sim.get(&path, &t).await;
    assert_eq!(list.status, 200);
    assert_eq!(
        list.body["keypairs"][0],
        json!({"keypair": {"public_key": public, "name": "access-key",
                           "fingerprint": "0f:a2:0a:d7:38:3e:65:45:08:6b:63:84:1c:ff:dc:ba"}})
    );
    assert_eq!(list.body["keypairs"].as_array().unwrap().len(), 2);

    let show = sim.get(&format!("{path}/access-key"), &t).await;
    let k = &show.body["keypair"];
    assert_eq!(k["public_key"], public);
    assert_eq!(k["user_id"], simulator::DEMO_WEB_USER_ID);
    assert_eq!(k["name"], "access-key");
    assert_eq!(k["deleted"], false);
    assert!(matches(MICRO_TIME, k["created_at"].as_str().unwrap()));
    assert_eq!(k["updated_at"], Value::Null);
    assert_eq!(k["deleted_at"], Value::Null);
    assert!(k["id"].is_u64());
    assert_eq!(k.as_object().unwrap().len(), 9);
    // Names with spaces travel percent-encoded.
    assert_eq!(
        sim.get(&format!("{path}/gen%20key_1"), &t).await.status,
        200
    );

    let dup = sim
        .post(&path, &t, json!({"keypair": {"name": "access-key"}}))
        .await;
    assert_eq!(
        dup.body,
        json!({"conflictingRequest": {"code": 409,
                                      "message": "Key pair 'access-key' already exists."}})
    );
    let bad_name = sim
        .post(&path, &t, json!({"keypair": {"name": "no/slash"}}))
        .await;
    fault_message(&bad_name, "badRequest", 400);
    let empty_name = sim.post(&path, &t, json!({"keypair": {"name": ""}})).await;
    fault_message(&empty_name, "badRequest", 400);
    let long_name = sim
        .post(&path, &t, json!({"keypair": {"name": "k".repeat(256)}}))
        .await;
    fault_message(&long_name, "badRequest", 400);
    let bad_key = sim
        .post(
            &path,
            &t,
            json!({"keypair": {"name": "x", "public_key": "ssh-dss AAAA"}}),
        )
        .await;
    fault_message(&bad_key, "badRequest", 400);
    let no_name = sim.post(&path, &t, json!({"keypair": {}})).await;
    fault_message(&no_name, "badRequest", 400);

    // Key pairs are per account.
    let b = sim.batch_token().await;
    let other = sim.get(&format!("/v2/{BATCH}/os-keypairs"), &b).await;
    assert_eq!(other.body, json!({"keypairs": []}));

    let del = sim
        .call(Method::DELETE, &format!("{path}/access-key"), &t, None)
        .await;
    assert_eq!(del.status, 202);
    assert_eq!(del.body, Value::Null);
    let gone = sim.get(&format!("{path}/access-key"), &t).await;
    fault_message(&gone, "itemNotFound", 404);
    let again = sim
        .call(Method::DELETE, &format!("{path}/access-key"), &t, None)
        .await;
    fault_message(&again, "itemNotFound", 404);
}

// ---- servers ------------------------------------------------------------------------

#[tokio::test]
async fn the_spec_create_example_builds_a_server_with_every_documented_field() {
    let sim = start(observable()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;

    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, spec_create_example())
        .await;
    assert_eq!(created.status, 202, "{}", created.body);
    let id = created.body["server"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        created.body,
        json!({"server": {
            "security_groups": [{"name": "default"}],
            "OS-DCF:diskConfig": "MANUAL",
            "id": id,
            "links": [
                {"href": format!("{}/v2/{WEB}/servers/{id}", sim.base), "rel": "self"},
                {"href": format!("{}/{WEB}/servers/{id}", sim.base), "rel": "bookmark"}
            ]
        }})
    );
    assert_eq!(
        created.headers["location"].to_str().unwrap(),
        format!("{}/v2/{WEB}/servers/{id}", sim.base)
    );

    let building = sim.server(&t, &id).await;
    assert_eq!(building["status"], "BUILD");
    assert_eq!(building["OS-EXT-STS:vm_state"], "building");
    let task = building["OS-EXT-STS:task_state"].as_str().unwrap();
    assert!(task == "scheduling" || task == "spawning", "{task}");
    assert_eq!(building["OS-EXT-STS:power_state"], 0);
    assert_eq!(building["OS-SRV-USG:launched_at"], Value::Null);

    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(s["OS-EXT-STS:vm_state"], "active");
    assert_eq!(s["OS-EXT-STS:task_state"], Value::Null);
    assert_eq!(s["OS-EXT-STS:power_state"], 1);
    assert!(matches(
        MICRO_TIME,
        s["OS-SRV-USG:launched_at"].as_str().unwrap()
    ));
    assert!(matches(Z_TIME, s["updated"].as_str().unwrap()));
    assert!(matches(Z_TIME, s["created"].as_str().unwrap()));
    assert!(is_hex(s["hostId"].as_str().unwrap(), 56));
    let vpc1 = s["addresses"]["vpc1"].as_array().unwrap();
    assert_eq!(vpc1.len(), 1);
    assert!(matches(
        r"^fa:16:3e(:[0-9a-f]{2}){3}$",
        vpc1[0]["OS-EXT-IPS-MAC:mac_addr"].as_str().unwrap()
    ));
    assert_eq!(vpc1[0]["version"], 4);
    assert!(vpc1[0]["addr"].as_str().unwrap().starts_with("192.168.0."));
    assert_eq!(vpc1[0]["OS-EXT-IPS:type"], "fixed");
    assert_eq!(
        s["links"],
        json!([
            {"href": format!("{}/v2/{WEB}/servers/{id}", sim.base), "rel": "self"},
            {"href": format!("{}/{WEB}/servers/{id}", sim.base), "rel": "bookmark"}
        ])
    );
    assert_eq!(s["key_name"], "access-key");
    let image = simulator::IMAGE_CENTOS_7_8;
    assert_eq!(
        s["image"],
        json!({"id": image, "links": [
            {"href": format!("{}/{WEB}/images/{image}", sim.base), "rel": "bookmark"}]})
    );
    let flavor = simulator::FLAVOR_R2_C2M4;
    assert_eq!(
        s["flavor"],
        json!({"id": flavor, "links": [
            {"href": format!("{}/{WEB}/flavors/{flavor}", sim.base), "rel": "bookmark"}]})
    );
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["security_groups"], json!([{"name": "default"}]));
    assert_eq!(s["OS-SRV-USG:terminated_at"], Value::Null);
    assert_eq!(s["OS-EXT-AZ:availability_zone"], "kr-pub-a");
    assert_eq!(s["user_id"], simulator::DEMO_WEB_USER_ID);
    assert_eq!(s["name"], "DB-Master");
    assert_eq!(s["tenant_id"], WEB);
    assert_eq!(s["OS-DCF:diskConfig"], "MANUAL");
    assert_eq!(s["accessIPv4"], "");
    assert_eq!(s["accessIPv6"], "");
    assert_eq!(s["progress"], 0);
    assert_eq!(s["config_drive"], "");
    assert_eq!(s["metadata"]["os_distro"], "CentOS");
    assert_eq!(s["metadata"]["login_username"], "centos");
    // Exactly the keys of the spec's example.
    let mut keys: Vec<&str> = s.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut spec_keys = vec![
        "status",
        "updated",
        "hostId",
        "addresses",
        "links",
        "key_name",
        "image",
        "OS-EXT-STS:task_state",
        "OS-EXT-STS:vm_state",
        "OS-SRV-USG:launched_at",
        "flavor",
        "id",
        "security_groups",
        "OS-SRV-USG:terminated_at",
        "OS-EXT-AZ:availability_zone",
        "user_id",
        "name",
        "created",
        "tenant_id",
        "OS-DCF:diskConfig",
        "os-extended-volumes:volumes_attached",
        "accessIPv4",
        "accessIPv6",
        "progress",
        "OS-EXT-STS:power_state",
        "config_drive",
        "metadata",
    ];
    spec_keys.sort_unstable();
    assert_eq!(keys, spec_keys);

    // The root volume is listed in both places, as /dev/vda.
    let volumes = s["os-extended-volumes:volumes_attached"]
        .as_array()
        .unwrap();
    assert_eq!(volumes.len(), 1);
    let root = volumes[0]["id"].as_str().unwrap();
    let atts = sim
        .get(&format!("/v2/{WEB}/servers/{id}/os-volume_attachments"), &t)
        .await;
    assert_eq!(
        atts.body,
        json!({"volumeAttachments": [
            {"device": "/dev/vda", "id": root, "serverId": id, "volumeId": root}]})
    );
}

#[tokio::test]
async fn windows_servers_carry_the_spec_metadata_and_rules() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let mut body = spec_create_example();
    body["server"]["name"] = json!("Web-Server");
    body["server"]["imageRef"] = json!(simulator::IMAGE_WINDOWS_2012_R2);
    body["server"]["flavorRef"] = json!(simulator::FLAVOR_M2_C2M4);
    body["server"]["networks"] = json!([{"uuid": simulator::NETWORK_VPC2}]);
    body["server"]["availability_zone"] = json!("kr-pub-b");
    body["server"]["block_device_mapping_v2"][0]["uuid"] = json!(simulator::IMAGE_WINDOWS_2012_R2);
    body["server"]["block_device_mapping_v2"][0]["volume_size"] = json!(50);
    body["server"]["metadata"] = json!({"team": "web"});
    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, body.clone())
        .await;
    assert_eq!(created.status, 202, "{}", created.body);
    let s = sim
        .server(&t, created.body["server"]["id"].as_str().unwrap())
        .await;
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(
        s["metadata"],
        json!({
            "os_distro": "Windows",
            "description": "Windows 2012 R2 STD (2020.02.18)",
            "os_version": "2012 R2 STD",
            "project_domain": "NORMAL",
            "hypervisor_type": "qemu",
            "monitoring_agent": "sysmon",
            "image_name": "Windows 2012 R2 STD (2020.02.18) EN",
            "volume_size": "50",
            "os_architecture": "amd64",
            "login_username": "Administrator",
            "os_type": "Windows",
            "tc_env": "sysmon",
            "team": "web"
        })
    );
    assert!(
        s["addresses"]["vpc2"][0]["addr"]
            .as_str()
            .unwrap()
            .starts_with("172.16.0.")
    );
    assert_eq!(s["OS-EXT-AZ:availability_zone"], "kr-pub-b");

    let mut long_name = body.clone();
    long_name["server"]["name"] = json!("Windows-Name-Too-Long");
    let a = sim.post(&format!("/v2/{WEB}/servers"), &t, long_name).await;
    fault_message(&a, "badRequest", 400);
    let mut small_root = body.clone();
    small_root["server"]["block_device_mapping_v2"][0]["volume_size"] = json!(40);
    let a = sim
        .post(&format!("/v2/{WEB}/servers"), &t, small_root)
        .await;
    fault_message(&a, "badRequest", 400);
    let mut small_ram = body;
    small_ram["server"]["flavorRef"] = json!(simulator::FLAVOR_T2_C1M1);
    let a = sim.post(&format!("/v2/{WEB}/servers"), &t, small_ram).await;
    fault_message(&a, "badRequest", 400);
}

#[tokio::test]
async fn create_validates_its_input_with_nova_bad_requests() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let path = format!("/v2/{WEB}/servers");
    type Edit = Box<dyn Fn(&mut Value)>;
    fn edit(f: impl Fn(&mut Value) + 'static) -> Edit {
        Box::new(f)
    }
    let cases: Vec<(&str, Edit)> = vec![
        ("no server", edit(|b| *b = json!({"srv": {}}))),
        (
            "no name",
            edit(|b| {
                b["server"].as_object_mut().unwrap().remove("name");
            }),
        ),
        ("empty name", edit(|b| b["server"]["name"] = json!(""))),
        (
            "long name",
            edit(|b| b["server"]["name"] = json!("n".repeat(256))),
        ),
        (
            "unknown image",
            edit(|b| {
                b["server"]["imageRef"] = json!("00000000-0000-4000-8000-000000000000");
                b["server"]["block_device_mapping_v2"][0]
                    .as_object_mut()
                    .unwrap()
                    .remove("uuid");
            }),
        ),
        (
            "unknown flavor",
            edit(|b| b["server"]["flavorRef"] = json!("nope")),
        ),
        (
            "no networks",
            edit(|b| {
                b["server"].as_object_mut().unwrap().remove("networks");
            }),
        ),
        (
            "empty networks",
            edit(|b| b["server"]["networks"] = json!([])),
        ),
        (
            "two keys in a network",
            edit(|b| {
                b["server"]["networks"] =
                    json!([{"uuid": simulator::NETWORK_VPC1, "subnet": simulator::SUBNET_VPC1}]);
            }),
        ),
        (
            "unknown network",
            edit(|b| b["server"]["networks"] = json!([{"uuid": "nope"}])),
        ),
        (
            "no key_name",
            edit(|b| {
                b["server"].as_object_mut().unwrap().remove("key_name");
            }),
        ),
        (
            "unknown key_name",
            edit(|b| b["server"]["key_name"] = json!("nope")),
        ),
        (
            "unknown zone",
            edit(|b| b["server"]["availability_zone"] = json!("kr-pub-z")),
        ),
        (
            "max < min",
            edit(|b| {
                b["server"]["min_count"] = json!(3);
                b["server"]["max_count"] = json!(2);
            }),
        ),
        (
            "no bdm on m2",
            edit(|b| {
                b["server"]
                    .as_object_mut()
                    .unwrap()
                    .remove("block_device_mapping_v2");
            }),
        ),
        (
            "root too small",
            edit(|b| {
                b["server"]["block_device_mapping_v2"][0]["volume_size"] = json!(5);
            }),
        ),
        (
            "root too large",
            edit(|b| {
                b["server"]["block_device_mapping_v2"][0]["volume_size"] = json!(1001);
            }),
        ),
        (
            "root from volume",
            edit(|b| {
                b["server"]["block_device_mapping_v2"][0]["source_type"] = json!("volume");
            }),
        ),
        (
            "metadata value too long",
            edit(|b| {
                b["server"]["metadata"] = json!({"k": "v".repeat(256)});
            }),
        ),
        (
            "metadata value not a string",
            edit(|b| b["server"]["metadata"] = json!({"k": 1})),
        ),
        (
            "user_data not base64",
            edit(|b| b["server"]["user_data"] = json!("%%%")),
        ),
        (
            "user_data too long",
            edit(|b| {
                b["server"]["user_data"] = json!("A".repeat(65536));
            }),
        ),
        (
            "unknown security group",
            edit(|b| {
                b["server"]["security_groups"] = json!([{"name": "nope"}]);
            }),
        ),
        (
            "unknown property",
            edit(|b| b["server"]["flavor_ref"] = json!("x")),
        ),
    ];
    for (what, change) in cases {
        let mut body = spec_create_example();
        change(&mut body);
        let a = sim.post(&path, &t, body).await;
        assert_eq!(a.status, 400, "{what}: {}", a.body);
        assert_eq!(a.body["badRequest"]["code"], 400, "{what}");
        assert!(a.body["badRequest"]["message"].is_string(), "{what}");
    }
    let malformed = sim
        .raw(
            Method::POST,
            &path,
            Some(&t),
            None,
            &[("content-type", "application/json")],
        )
        .await;
    assert_eq!(
        malformed.body,
        json!({"badRequest": {"code": 400, "message": "Malformed request body"}})
    );
    // Nothing was created by any of them.
    let list = sim.get(&path, &t).await;
    assert_eq!(list.body, json!({"servers": []}));

    // The valid forms of the optional fields are accepted.
    let mut ok = spec_create_example();
    ok["server"]["user_data"] = json!("IyEvYmluL2Jhc2gKZWNobyBoaQo=");
    ok["server"]["personality"] = json!([{"path": "/etc/motd", "contents": "aGk="}]);
    ok["server"]["metadata"] = json!({"team": "web"});
    ok["server"]["networks"] =
        json!([{"fixed_ip": "192.168.0.77"}, {"port": simulator::PORT_VPC1_A}]);
    let a = sim.post(&path, &t, ok.clone()).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let s = sim
        .server(&t, a.body["server"]["id"].as_str().unwrap())
        .await;
    let addrs: Vec<&str> = s["addresses"]["vpc1"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["addr"].as_str().unwrap())
        .collect();
    assert_eq!(addrs, vec!["192.168.0.77", "192.168.0.200"]);
    // That fixed IP and that port are now taken.
    let a = sim.post(&path, &t, ok).await;
    assert!(a.status == 400 || a.status == 409, "{}", a.body);
}

#[tokio::test]
async fn multi_create_lists_newest_first_with_filters_and_pagination() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let mut body = spec_create_example();
    body["server"]["name"] = json!("web");
    body["server"]["min_count"] = json!(2);
    body["server"]["max_count"] = json!(4);
    let a = sim.post(&format!("/v2/{WEB}/servers"), &t, body).await;
    assert_eq!(a.status, 202);
    let first = a.body["server"]["id"].as_str().unwrap().to_string();
    let u2 = sim.u2_server(&t, "batch-job").await;

    let all = sim.get(&format!("/v2/{WEB}/servers"), &t).await;
    let names: Vec<&str> = all.body["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["batch-job", "web-4", "web-3", "web-2", "web-1"]);
    assert_eq!(all.body["servers"][4]["id"], first.as_str());
    assert_eq!(
        all.body["servers"][0],
        json!({"id": u2, "name": "batch-job", "links": [
            {"href": format!("{}/v2/{WEB}/servers/{u2}", sim.base), "rel": "self"},
            {"href": format!("{}/{WEB}/servers/{u2}", sim.base), "rel": "bookmark"}]})
    );

    // Pages of two, following next links.
    let mut seen = Vec::new();
    let mut url = format!("/v2/{WEB}/servers/detail?limit=2");
    loop {
        let page = sim.get(&url, &t).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let items = page.body["servers"].as_array().unwrap();
        assert!(items.iter().all(|s| s["status"] == "ACTIVE"));
        seen.extend(
            items
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string()),
        );
        match page.body.get("servers_links") {
            Some(links) => {
                let href = links[0]["href"].as_str().unwrap();
                let last = items.last().unwrap()["id"].as_str().unwrap();
                assert_eq!(
                    href,
                    format!("{}/v2/{WEB}/servers/detail?limit=2&marker={last}", sim.base)
                );
                url = href.trim_start_matches(&sim.base).to_string();
            }
            None => break,
        }
    }
    assert_eq!(seen, names);

    let filter = |q: &str| {
        let sim = &sim;
        let t = &t;
        let q = q.to_string();
        async move {
            let a = sim.get(&format!("/v2/{WEB}/servers?{q}"), t).await;
            assert_eq!(a.status, 200, "{q}: {}", a.body);
            a.body["servers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(filter("name=^web-[12]$").await, vec!["web-2", "web-1"]);
    assert_eq!(filter("name=job").await, vec!["batch-job"]);
    assert_eq!(
        filter(&format!("flavor={}", simulator::FLAVOR_U2_C1M1)).await,
        vec!["batch-job"]
    );
    assert_eq!(
        filter(&format!("image={}", simulator::IMAGE_CENTOS_7_8))
            .await
            .len(),
        5
    );
    assert_eq!(
        filter(&format!("image={}", simulator::IMAGE_UBUNTU_20_04))
            .await
            .len(),
        0
    );
    assert_eq!(filter("status=active").await.len(), 5);
    assert_eq!(filter("status=SHUTOFF").await.len(), 0);
    assert_eq!(filter("changes-since=2000-01-01T00:00:00Z").await.len(), 5);
    assert_eq!(filter("changes-since=2999-01-01T00:00:00Z").await.len(), 0);

    let bad = |q: &'static str| {
        let sim = &sim;
        let t = &t;
        async move {
            let a = sim.get(&format!("/v2/{WEB}/servers?{q}"), t).await;
            fault_message(&a, "badRequest", 400)
        }
    };
    assert_eq!(bad("marker=nope").await, "marker [nope] not found");
    bad("limit=-1").await;
    bad("limit=two").await;
    bad("changes-since=yesterday").await;
    bad("name=(").await;

    // Another tenant sees none of them, and cannot read them by id.
    let b = sim.batch_token().await;
    assert_eq!(
        sim.get(&format!("/v2/{BATCH}/servers"), &b).await.body,
        json!({"servers": []})
    );
    let other = sim.get(&format!("/v2/{BATCH}/servers/{u2}"), &b).await;
    assert_eq!(
        other.body,
        json!({"itemNotFound": {"code": 404,
                                "message": format!("Instance {u2} could not be found.")}})
    );
}

#[tokio::test]
async fn rename_updates_and_validates() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "old").await;
    let path = format!("/v2/{WEB}/servers/{id}");
    let a = sim
        .call(
            Method::PUT,
            &path,
            &t,
            Some(json!({"server": {"name": "new-server-test"}})),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["server"]["name"], "new-server-test");
    assert_eq!(a.body["server"]["id"], id.as_str());
    assert_eq!(a.body["server"]["status"], "ACTIVE");
    for bad in [
        json!({"server": {"name": ""}}),
        json!({"server": {"name": "n".repeat(256)}}),
        json!({"server": {"name": 7}}),
        json!({"server": {"flavorRef": "x"}}),
        json!({"name": "x"}),
    ] {
        let a = sim.call(Method::PUT, &path, &t, Some(bad.clone())).await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
    }
    let missing = sim
        .call(
            Method::PUT,
            &format!("/v2/{WEB}/servers/nope"),
            &t,
            Some(json!({"server": {"name": "x"}})),
        )
        .await;
    fault_message(&missing, "itemNotFound", 404);
}

#[tokio::test]
async fn stop_start_and_reboot_follow_the_spec_state_rules() {
    let sim = start(SimConfig {
        build_delay: Duration::ZERO,
        action_delay: STEP,
        ..SimConfig::demo()
    })
    .await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "vm").await;
    let launched = sim.server(&t, &id).await["OS-SRV-USG:launched_at"].clone();

    // os-start on an ACTIVE server: 409 with Nova's wording.
    let a = sim.action(&t, &id, json!({"os-start": null})).await;
    assert_eq!(
        a.body,
        json!({"conflictingRequest": {"code": 409, "message":
            format!("Cannot 'os-start' instance {id} while it is in vm_state active")}})
    );

    let a = sim.action(&t, &id, json!({"os-stop": null})).await;
    assert_eq!(a.status, 202);
    assert_eq!(a.body, Value::Null);
    let s = sim.server(&t, &id).await;
    assert_eq!(
        (
            &s["status"],
            &s["OS-EXT-STS:task_state"],
            &s["OS-EXT-STS:power_state"]
        ),
        (&json!("ACTIVE"), &json!("powering-off"), &json!(1))
    );
    // Busy: another action is refused on the task state.
    let busy = sim
        .action(&t, &id, json!({"reboot": {"type": "HARD"}}))
        .await;
    let msg = fault_message(&busy, "conflictingRequest", 409);
    assert!(msg.contains("task_state powering-off"), "{msg}");

    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "SHUTOFF");
    assert_eq!(s["OS-EXT-STS:vm_state"], "stopped");
    assert_eq!(s["OS-EXT-STS:task_state"], Value::Null);
    assert_eq!(s["OS-EXT-STS:power_state"], 4);

    let a = sim.action(&t, &id, json!({"os-stop": null})).await;
    assert_eq!(
        a.body,
        json!({"conflictingRequest": {"code": 409, "message":
            format!("Cannot 'os-stop' instance {id} while it is in vm_state stopped")}})
    );
    let soft = sim
        .action(&t, &id, json!({"reboot": {"type": "SOFT"}}))
        .await;
    fault_message(&soft, "conflictingRequest", 409);

    // HARD reboot is allowed from SHUTOFF.
    assert_eq!(
        sim.action(&t, &id, json!({"reboot": {"type": "HARD"}}))
            .await
            .status,
        202
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "HARD_REBOOT");
    assert_eq!(s["OS-EXT-STS:task_state"], "reboot_started_hard");
    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(s["OS-EXT-STS:power_state"], 1);

    assert_eq!(
        sim.action(&t, &id, json!({"reboot": {"type": "SOFT"}}))
            .await
            .status,
        202
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "REBOOT");
    assert_eq!(s["OS-EXT-STS:task_state"], "rebooting");
    wait_steps(1).await;
    assert_eq!(sim.server(&t, &id).await["status"], "ACTIVE");

    assert_eq!(
        sim.action(&t, &id, json!({"os-stop": null})).await.status,
        202
    );
    wait_steps(1).await;
    assert_eq!(
        sim.action(&t, &id, json!({"os-start": null})).await.status,
        202
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "SHUTOFF");
    assert_eq!(s["OS-EXT-STS:task_state"], "powering-on");
    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    // launched_at is the boot of the build, not of a start.
    assert_eq!(s["OS-SRV-USG:launched_at"], launched);

    // Bad bodies.
    for bad in [
        json!({"reboot": {}}),
        json!({"reboot": {"type": "WARM"}}),
        json!({"reboot": null}),
        json!({"os-start": null, "os-stop": null}),
        json!({}),
        json!({"hibernate": null}),
        json!([1]),
    ] {
        let a = sim.action(&t, &id, bad.clone()).await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert_eq!(a.body["badRequest"]["code"], 400);
    }
    let unknown = sim.action(&t, &id, json!({"hibernate": null})).await;
    assert_eq!(
        unknown.body["badRequest"]["message"],
        "There is no such action: hibernate"
    );
    let missing = sim
        .post(
            &format!("/v2/{WEB}/servers/nope/action"),
            &t,
            json!({"os-stop": null}),
        )
        .await;
    fault_message(&missing, "itemNotFound", 404);
}

#[tokio::test]
async fn an_errored_server_can_be_stopped_or_hard_rebooted_only() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "vm").await;
    assert!(sim.h.fail_server(&id));
    assert!(!sim.h.fail_server("nope"));
    assert_eq!(sim.server(&t, &id).await["status"], "ERROR");
    let soft = sim
        .action(&t, &id, json!({"reboot": {"type": "SOFT"}}))
        .await;
    assert!(fault_message(&soft, "conflictingRequest", 409).contains("vm_state error"));
    assert_eq!(
        sim.action(&t, &id, json!({"reboot": {"type": "HARD"}}))
            .await
            .status,
        202
    );
    assert_eq!(sim.server(&t, &id).await["status"], "ACTIVE");
    assert!(sim.h.fail_server(&id));
    assert_eq!(
        sim.action(&t, &id, json!({"os-stop": null})).await.status,
        202
    );
    assert_eq!(sim.server(&t, &id).await["status"], "SHUTOFF");
}

#[tokio::test]
async fn resize_goes_through_verify_resize_and_confirms_by_itself() {
    let sim = start(SimConfig {
        build_delay: Duration::ZERO,
        action_delay: STEP,
        ..SimConfig::demo()
    })
    .await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, spec_create_example())
        .await;
    let id = created.body["server"]["id"].as_str().unwrap().to_string();

    let same = sim
        .action(
            &t,
            &id,
            json!({"resize": {"flavorRef": simulator::FLAVOR_R2_C2M4}}),
        )
        .await;
    assert_eq!(
        fault_message(&same, "badRequest", 400),
        "When resizing, instances must change flavor!"
    );
    let unknown = sim
        .action(&t, &id, json!({"resize": {"flavorRef": "nope"}}))
        .await;
    fault_message(&unknown, "badRequest", 400);
    let missing = sim.action(&t, &id, json!({"resize": {}})).await;
    fault_message(&missing, "badRequest", 400);
    let bad_dc = sim
        .action(
            &t,
            &id,
            json!({"resize": {"flavorRef": simulator::FLAVOR_M2_C2M4, "OS-DCF:diskConfig": "x"}}),
        )
        .await;
    fault_message(&bad_dc, "badRequest", 400);

    let a = sim
        .action(
            &t,
            &id,
            json!({"resize": {"flavorRef": simulator::FLAVOR_M2_C2M4, "OS-DCF:diskConfig": "AUTO"}}),
        )
        .await;
    assert_eq!(a.status, 202);
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "RESIZE");
    assert_eq!(s["OS-EXT-STS:task_state"], "resize_migrating");
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_R2_C2M4);

    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "VERIFY_RESIZE");
    assert_eq!(s["OS-EXT-STS:vm_state"], "resized");
    assert_eq!(s["OS-EXT-STS:task_state"], Value::Null);
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_M2_C2M4);
    let stop = sim.action(&t, &id, json!({"os-stop": null})).await;
    assert!(fault_message(&stop, "conflictingRequest", 409).contains("vm_state resized"));

    wait_steps(1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_M2_C2M4);
    assert_eq!(s["OS-DCF:diskConfig"], "AUTO");

    // A stopped server may be resized too and stays stopped.
    assert_eq!(
        sim.action(&t, &id, json!({"os-stop": null})).await.status,
        202
    );
    wait_steps(1).await;
    let a = sim
        .action(
            &t,
            &id,
            json!({"resize": {"flavorRef": simulator::FLAVOR_C2_C2M2}}),
        )
        .await;
    assert_eq!(a.status, 202);
    wait_steps(2).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "SHUTOFF");
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_C2_C2M2);

    // A u2 server (local disk) cannot shrink to a volume-backed flavor.
    let u2 = sim.u2_server(&t, "local").await;
    let a = sim
        .action(
            &t,
            &u2,
            json!({"resize": {"flavorRef": simulator::FLAVOR_M2_C1M2}}),
        )
        .await;
    fault_message(&a, "badRequest", 400);
    let a = sim
        .action(
            &t,
            &u2,
            json!({"resize": {"flavorRef": simulator::FLAVOR_U2_C2M4}}),
        )
        .await;
    assert_eq!(a.status, 202);
}

#[tokio::test]
async fn create_image_makes_a_snapshot_that_can_boot_a_server() {
    let sim = start(SimConfig {
        build_delay: STEP,
        action_delay: STEP,
        ..SimConfig::demo()
    })
    .await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "golden").await;

    // Still building: 409.
    let early = sim
        .action(&t, &id, json!({"createImage": {"name": "foo-image"}}))
        .await;
    assert!(fault_message(&early, "conflictingRequest", 409).contains("vm_state building"));
    wait_steps(1).await;

    let missing_name = sim.action(&t, &id, json!({"createImage": {}})).await;
    fault_message(&missing_name, "badRequest", 400);

    let a = sim
        .action(
            &t,
            &id,
            json!({"createImage": {"name": "foo-image", "metadata": {"meta_var": "meta_val"}}}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let image_id = a.body["image_id"].as_str().unwrap().to_string();
    assert_eq!(a.body.as_object().unwrap().len(), 1);
    assert_eq!(
        a.headers["location"].to_str().unwrap(),
        format!("{}/v2/{WEB}/images/{image_id}", sim.base)
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    let task = s["OS-EXT-STS:task_state"].as_str().unwrap();
    assert!(
        task == "image_snapshot" || task == "image_uploading",
        "{task}"
    );
    let image = sim.get(&format!("/v2/{WEB}/images/{image_id}"), &t).await;
    assert_eq!(image.body["image"]["status"], "SAVING");
    assert_eq!(image.body["image"]["name"], "foo-image");
    assert_eq!(image.body["image"]["metadata"]["meta_var"], "meta_val");

    wait_steps(1).await;
    let image = sim.get(&format!("/v2/{WEB}/images/{image_id}"), &t).await;
    assert_eq!(image.body["image"]["status"], "ACTIVE");
    assert_eq!(
        sim.server(&t, &id).await["OS-EXT-STS:task_state"],
        Value::Null
    );

    // The snapshot boots a new server; it is private to the tenant.
    let from_snapshot = sim
        .post(
            &format!("/v2/{WEB}/servers"),
            &t,
            json!({"server": {"name": "clone", "imageRef": image_id,
                "flavorRef": simulator::FLAVOR_U2_C1M1,
                "networks": [{"uuid": simulator::NETWORK_VPC1}], "key_name": "access-key"}}),
        )
        .await;
    assert_eq!(from_snapshot.status, 202, "{}", from_snapshot.body);
    let b = sim.batch_token().await;
    let hidden = sim.get(&format!("/v2/{BATCH}/images/{image_id}"), &b).await;
    assert_eq!(hidden.status, 404);

    // Only u2 instances may create an image through this API.
    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, spec_create_example())
        .await;
    let m2 = created.body["server"]["id"].as_str().unwrap().to_string();
    wait_steps(1).await;
    let refused = sim
        .action(&t, &m2, json!({"createImage": {"name": "nope"}}))
        .await;
    assert!(fault_message(&refused, "badRequest", 400).contains("u2"));
}

#[tokio::test]
async fn delete_shows_deleting_then_the_server_is_gone() {
    let sim = start(SimConfig {
        build_delay: Duration::ZERO,
        action_delay: STEP,
        ..SimConfig::demo()
    })
    .await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, spec_create_example())
        .await;
    let id = created.body["server"]["id"].as_str().unwrap().to_string();
    let root = sim.server(&t, &id).await["os-extended-volumes:volumes_attached"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let data = simulator::WEB_VOLUMES[0];
    let a = sim
        .post(
            &format!("/v2/{WEB}/servers/{id}/os-volume_attachments"),
            &t,
            json!({"volumeAttachment": {"volumeId": data}}),
        )
        .await;
    assert_eq!(a.status, 200);
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);

    let path = format!("/v2/{WEB}/servers/{id}");
    let a = sim.call(Method::DELETE, &path, &t, None).await;
    assert_eq!(a.status, 204);
    assert_eq!(a.body, Value::Null);
    let s = sim.server(&t, &id).await;
    assert_eq!(s["OS-EXT-STS:task_state"], "deleting");
    let stop = sim.action(&t, &id, json!({"os-stop": null})).await;
    assert!(fault_message(&stop, "conflictingRequest", 409).contains("task_state deleting"));
    assert_eq!(sim.call(Method::DELETE, &path, &t, None).await.status, 204);

    wait_steps(1).await;
    let gone = sim.get(&path, &t).await;
    assert_eq!(
        gone.body,
        json!({"itemNotFound": {"code": 404,
                                "message": format!("Instance {id} could not be found.")}})
    );
    assert_eq!(sim.call(Method::DELETE, &path, &t, None).await.status, 404);
    assert_eq!(
        sim.get(&format!("/v2/{WEB}/servers"), &t).await.body,
        json!({"servers": []})
    );

    // changes-since reports the deletion, like Nova.
    let since = before.format("%Y-%m-%dT%H:%M:%SZ");
    let changed = sim
        .get(
            &format!("/v2/{WEB}/servers/detail?changes-since={since}"),
            &t,
        )
        .await;
    let s = &changed.body["servers"][0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["status"], "DELETED");
    assert_eq!(s["OS-EXT-STS:vm_state"], "deleted");
    assert!(s["OS-SRV-USG:terminated_at"].is_string());

    // The data volume is available again (the root volume was deleted with the server).
    let other = sim.u2_server(&t, "next").await;
    let a = sim
        .post(
            &format!("/v2/{WEB}/servers/{other}/os-volume_attachments"),
            &t,
            json!({"volumeAttachment": {"volumeId": data}}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let a = sim
        .post(
            &format!("/v2/{WEB}/servers/{other}/os-volume_attachments"),
            &t,
            json!({"volumeAttachment": {"volumeId": root}}),
        )
        .await;
    assert_eq!(a.status, 404);
}

// ---- volume attachments, floating IPs, security groups -------------------------------

#[tokio::test]
async fn volume_attachments_follow_nova_rules() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let created = sim
        .post(&format!("/v2/{WEB}/servers"), &t, spec_create_example())
        .await;
    let id = created.body["server"]["id"].as_str().unwrap().to_string();
    let base = format!("/v2/{WEB}/servers/{id}/os-volume_attachments");
    let [v1, v2, v3] = simulator::WEB_VOLUMES;

    let a = sim
        .post(&base, &t, json!({"volumeAttachment": {"volumeId": v1}}))
        .await;
    assert_eq!(
        a.body,
        json!({"volumeAttachment": {"device": "/dev/vdb", "id": v1, "serverId": id,
                                    "volumeId": v1}})
    );
    // The spec's path form.
    let a = sim
        .post(
            &format!("{base}/{v2}"),
            &t,
            json!({"volumeAttachment": {"volumeId": v2}}),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body["volumeAttachment"]["device"], "/dev/vdc");
    let mismatch = sim
        .post(
            &format!("{base}/{v3}"),
            &t,
            json!({"volumeAttachment": {"volumeId": v2}}),
        )
        .await;
    fault_message(&mismatch, "badRequest", 400);
    let in_use = sim
        .post(&base, &t, json!({"volumeAttachment": {"volumeId": v1}}))
        .await;
    assert!(fault_message(&in_use, "badRequest", 400).starts_with("Invalid volume"));
    let unknown = sim
        .post(&base, &t, json!({"volumeAttachment": {"volumeId": "nope"}}))
        .await;
    fault_message(&unknown, "itemNotFound", 404);
    let no_body = sim.post(&base, &t, json!({"volumeId": v3})).await;
    fault_message(&no_body, "badRequest", 400);
    // Another tenant's seeded volume is not found here.
    let foreign = sim
        .post(
            &base,
            &t,
            json!({"volumeAttachment": {"volumeId": simulator::BATCH_VOLUMES[0]}}),
        )
        .await;
    fault_message(&foreign, "itemNotFound", 404);

    let list = sim.get(&base, &t).await;
    let devices: Vec<&str> = list.body["volumeAttachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, vec!["/dev/vda", "/dev/vdb", "/dev/vdc"]);
    let page = sim.get(&format!("{base}?limit=1&offset=1"), &t).await;
    assert_eq!(page.body["volumeAttachments"].as_array().unwrap().len(), 1);
    assert_eq!(page.body["volumeAttachments"][0]["volumeId"], v1);
    fault_message(
        &sim.get(&format!("{base}?offset=x"), &t).await,
        "badRequest",
        400,
    );
    let one = sim.get(&format!("{base}/{v2}"), &t).await;
    assert_eq!(
        one.body,
        json!({"volumeAttachment": {"device": "/dev/vdc", "id": v2, "serverId": id,
                                    "volumeId": v2}})
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(
        s["os-extended-volumes:volumes_attached"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let root = list.body["volumeAttachments"][0]["volumeId"]
        .as_str()
        .unwrap();
    let a = sim
        .call(Method::DELETE, &format!("{base}/{root}"), &t, None)
        .await;
    assert_eq!(
        fault_message(&a, "badRequest", 400),
        "Cannot detach a root device volume"
    );
    let a = sim
        .call(Method::DELETE, &format!("{base}/{v1}"), &t, None)
        .await;
    assert_eq!(a.status, 202);
    assert_eq!(a.body, Value::Null);
    let a = sim
        .call(Method::DELETE, &format!("{base}/{v1}"), &t, None)
        .await;
    fault_message(&a, "itemNotFound", 404);
    let s = sim.server(&t, &id).await;
    let ids: Vec<&str> = s["os-extended-volumes:volumes_attached"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![root, v2]);
    // The freed device name is reused.
    let a = sim
        .post(&base, &t, json!({"volumeAttachment": {"volumeId": v3}}))
        .await;
    assert_eq!(a.body["volumeAttachment"]["device"], "/dev/vdb");

    // A building server refuses attachments.
    let slow = start(observable()).await;
    let t = slow.web_token().await;
    slow.keypair(&t, WEB, "access-key").await;
    let id = slow.u2_server(&t, "building").await;
    let a = slow
        .post(
            &format!("/v2/{WEB}/servers/{id}/os-volume_attachments"),
            &t,
            json!({"volumeAttachment": {"volumeId": v1}}),
        )
        .await;
    assert!(fault_message(&a, "conflictingRequest", 409).contains("vm_state building"));
}

#[tokio::test]
async fn floating_ips_attach_to_a_nic_and_detach() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "edge").await;
    let fixed = sim.server(&t, &id).await["addresses"]["vpc1"][0]["addr"]
        .as_str()
        .unwrap()
        .to_string();

    let a = sim
        .action(
            &t,
            &id,
            json!({"addFloatingIp": {"address": "133.186.1.10", "fixed_address": fixed}}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let s = sim.server(&t, &id).await;
    let vpc1 = s["addresses"]["vpc1"].as_array().unwrap();
    assert_eq!(vpc1.len(), 2);
    assert_eq!(vpc1[1]["addr"], "133.186.1.10");
    assert_eq!(vpc1[1]["OS-EXT-IPS:type"], "floating");
    assert_eq!(vpc1[1]["version"], 4);
    assert_eq!(
        vpc1[1]["OS-EXT-IPS-MAC:mac_addr"],
        vpc1[0]["OS-EXT-IPS-MAC:mac_addr"]
    );

    let not_mine = sim
        .action(
            &t,
            &id,
            json!({"addFloatingIp": {"address": "133.186.1.11", "fixed_address": "10.9.9.9"}}),
        )
        .await;
    fault_message(&not_mine, "badRequest", 400);
    let bad = sim
        .action(&t, &id, json!({"addFloatingIp": {"address": "not-an-ip"}}))
        .await;
    fault_message(&bad, "badRequest", 400);
    let missing = sim.action(&t, &id, json!({"addFloatingIp": {}})).await;
    fault_message(&missing, "badRequest", 400);

    let a = sim
        .action(
            &t,
            &id,
            json!({"removeFloatingIp": {"address": "133.186.1.10"}}),
        )
        .await;
    assert_eq!(a.status, 202);
    assert_eq!(
        sim.server(&t, &id).await["addresses"]["vpc1"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let again = sim
        .action(
            &t,
            &id,
            json!({"removeFloatingIp": {"address": "133.186.1.10"}}),
        )
        .await;
    fault_message(&again, "badRequest", 400);
}

#[tokio::test]
async fn security_groups_are_added_and_removed() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "sg").await;

    let a = sim
        .action(&t, &id, json!({"addSecurityGroup": {"name": "test"}}))
        .await;
    assert_eq!(a.status, 202);
    assert_eq!(
        sim.server(&t, &id).await["security_groups"],
        json!([{"name": "default"}, {"name": "test"}])
    );
    let dup = sim
        .action(&t, &id, json!({"addSecurityGroup": {"name": "test"}}))
        .await;
    fault_message(&dup, "badRequest", 400);
    let unknown = sim
        .action(&t, &id, json!({"addSecurityGroup": {"name": "nope"}}))
        .await;
    fault_message(&unknown, "itemNotFound", 404);
    let no_name = sim.action(&t, &id, json!({"addSecurityGroup": {}})).await;
    fault_message(&no_name, "badRequest", 400);

    let a = sim
        .action(&t, &id, json!({"removeSecurityGroup": {"name": "test"}}))
        .await;
    assert_eq!(a.status, 202);
    assert_eq!(
        sim.server(&t, &id).await["security_groups"],
        json!([{"name": "default"}])
    );
    let not_on = sim
        .action(&t, &id, json!({"removeSecurityGroup": {"name": "web"}}))
        .await;
    fault_message(&not_on, "itemNotFound", 404);
}

// ---- hooks and the HTTP surface -----------------------------------------------------

#[tokio::test]
async fn injected_errors_answer_matching_compute_requests_then_stop() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
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
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    let path = format!("/v2/{WEB}/flavors");
    let h = |a: &Answer, k: &str| a.headers[k].to_str().unwrap().to_string();

    let a = sim.get(&path, &t).await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.1");
    assert_eq!(h(&a, "x-openstack-nova-api-version"), "2.1");
    assert_eq!(
        h(&a, "vary"),
        "OpenStack-API-Version, X-OpenStack-Nova-API-Version"
    );
    assert!(h(&a, "x-compute-request-id").starts_with("req-"));

    let a = sim
        .raw(
            Method::GET,
            &path,
            Some(&t),
            None,
            &[
                ("OpenStack-API-Version", "compute 2.60"),
                ("X-OpenStack-Nova-API-Version", "2.60"),
            ],
        )
        .await;
    assert_eq!(h(&a, "openstack-api-version"), "compute 2.60");
    assert_eq!(h(&a, "x-openstack-nova-api-version"), "2.60");
    let a = sim
        .raw(
            Method::GET,
            &path,
            Some(&t),
            None,
            &[("X-OpenStack-Nova-API-Version", "2.3")],
        )
        .await;
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
    let sim = start(fast()).await;
    let t = sim.web_token().await;
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
    let sim = start(fast()).await;
    let t = sim.web_token().await;
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
    sim.h.shutdown();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(format!("{}/", sim.base)).send().await.is_err());
}

#[tokio::test]
async fn public_url_is_used_in_links_and_the_catalog() {
    let sim = start(SimConfig {
        public_url: Some("https://compute.example.test/".into()),
        ..fast()
    })
    .await;
    let a = sim
        .keystone(
            WEB,
            simulator::DEMO_WEB_USERNAME,
            simulator::DEMO_WEB_API_PASSWORD,
        )
        .await;
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

#[test]
fn seeded_volume_ids_are_stable() {
    assert_eq!(
        simulator::seeded_volume_ids(WEB),
        simulator::WEB_VOLUMES.map(String::from).to_vec()
    );
    let other = simulator::seeded_volume_ids("0123456789abcdef0123456789abcdef");
    assert_eq!(other.len(), 3);
    assert_eq!(
        other,
        simulator::seeded_volume_ids("0123456789abcdef0123456789abcdef")
    );
    assert!(other.iter().all(|v| v.len() == 36));
}

#[tokio::test]
async fn malformed_input_anywhere_gets_a_4xx_never_a_crash() {
    let sim = start(fast()).await;
    let t = sim.web_token().await;
    sim.keypair(&t, WEB, "access-key").await;
    let id = sim.u2_server(&t, "target").await;
    let vol = simulator::WEB_VOLUMES[0];
    let endpoints = [
        (Method::POST, format!("/v2/{WEB}/servers")),
        (Method::PUT, format!("/v2/{WEB}/servers/{id}")),
        (Method::POST, format!("/v2/{WEB}/servers/{id}/action")),
        (Method::POST, format!("/v2/{WEB}/os-keypairs")),
        (
            Method::POST,
            format!("/v2/{WEB}/servers/{id}/os-volume_attachments"),
        ),
        (
            Method::POST,
            format!("/v2/{WEB}/servers/{id}/os-volume_attachments/{vol}"),
        ),
    ];
    let deep = format!("{}1{}", "[".repeat(500), "]".repeat(500));
    let bodies: Vec<String> = vec![
        String::new(),
        "null".into(),
        "[]".into(),
        "\"x\"".into(),
        "12".into(),
        "{".into(),
        deep,
        r#"{"server": null}"#.into(),
        r#"{"server": []}"#.into(),
        r#"{"server": {"name": ["x"], "networks": "all"}}"#.into(),
        r#"{"server": {"name": "x", "imageRef": 5, "flavorRef": {}, "networks": [[]]}}"#.into(),
        r#"{"server": {"name": "x", "block_device_mapping_v2": [{"boot_index": "zero"}]}}"#.into(),
        r#"{"server": {"name": "x", "min_count": 99999999999999999999}}"#.into(),
        r#"{"keypair": {"name": null, "public_key": 7}}"#.into(),
        r#"{"volumeAttachment": {"volumeId": 7}}"#.into(),
        r#"{"volumeAttachment": []}"#.into(),
        r#"{"reboot": "HARD"}"#.into(),
        r#"{"resize": {"flavorRef": null}}"#.into(),
        r#"{"createImage": {"name": "x", "metadata": {"k": {}}}}"#.into(),
        r#"{"addFloatingIp": {"address": "1.2.3.4", "fixed_address": 9}}"#.into(),
        r#"{"removeSecurityGroup": "default"}"#.into(),
        r#"{"os-stop": {"force": [1, 2, {"x": null}]}}"#.into(),
        "{\"server\": {\"name\": \"\u{1F600}\u{0000}\"}}".into(),
    ];
    for (method, path) in &endpoints {
        for body in &bodies {
            let resp = sim
                .http
                .request(method.clone(), format!("{}{path}", sim.base))
                .header("X-Auth-Token", &t)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{method} {path} {body}: no answer: {e}"));
            let status = resp.status().as_u16();
            assert!(
                (200..500).contains(&status),
                "{method} {path} {body}: {status}"
            );
        }
    }
    // Still serving, and the target still exists (the `os-stop` with odd arguments did
    // stop it: Nova ignores the value of `os-stop`).
    assert_eq!(sim.server(&t, &id).await["status"], "SHUTOFF");
}
