//! The v1.0 surface through the gateway against the simulator: every
//! endpoint and every action, asserting the v1.0 answer (HTTP 200 + envelope,
//! the spec's fields) and the v2 request the upstream received.

mod common;

use common::{Env, WEB_TENANT, assert_v1_failure};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{
    FLAVOR_M2_C2M4, FLAVOR_R2_C2M4, FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1, NETWORK_VPC2,
    RecordedRequest, WEB_VOLUMES,
};

const TEAM: &str = "web-team";
const BASE: &str = "/v1.0/appkeys/WebAppKey0001";

fn assert_success(b: &Value) {
    assert_eq!(
        b["header"],
        json!({"isSuccessful": true, "resultCode": 0, "resultMessage": "SUCCESS"}),
        "{b}"
    );
}

/// A failure envelope with `code` and a message; returns the message.
fn assert_failure(b: &Value, code: i64) -> String {
    let msg = assert_v1_failure(b, code);
    assert!(!msg.is_empty());
    msg
}

/// The last compute request the upstream saw.
fn last_upstream(env: &Env) -> RecordedRequest {
    env.compute_requests().pop().expect("an upstream request")
}

/// Asserts the last compute request was `method` on the web tenant's
/// `path` (after `/v2/{tenant}`); returns it.
fn assert_last_upstream(env: &Env, method: &str, path: &str) -> RecordedRequest {
    let r = last_upstream(env);
    let expected = format!("/v2/{WEB_TENANT}{path}");
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        (method, expected.as_str())
    );
    r
}

fn upstream_body(r: &RecordedRequest) -> Value {
    serde_json::from_slice(&r.body).unwrap()
}

async fn create_keypair(env: &Env, name: &str) -> Value {
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": name}})),
        )
        .await;
    assert_success(&b);
    b
}

/// Compute requests the upstream received whose path ends with `suffix`.
fn compute_calls_ending(env: &Env, suffix: &str) -> usize {
    env.compute_requests()
        .iter()
        .filter(|r| r.path.ends_with(suffix))
        .count()
}

async fn create_instance(env: &Env, name: &str, flavor: &str, volume: Option<i64>) -> String {
    create_keypair(env, &format!("{name}-key")).await;
    let mut inst = json!({
        "name": name, "image": IMAGE_CENTOS_7_8, "flavor": flavor,
        "networks": [{"id": NETWORK_VPC1}], "availabilityZone": "kr-pub-a",
        "keyName": format!("{name}-key"), "count": 1,
        "securityGroups": [{"name": "default"}]
    });
    if let Some(size) = volume {
        inst["volumes"] = json!([{"size": size}]);
    }
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/instances",
            Some(json!({"instance": inst})),
        )
        .await;
    assert_success(&b);
    b["instance"]["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn availability_zones() {
    let env = Env::start().await;
    let b = env.v1(TEAM, Method::GET, "/availability-zones", None).await;
    assert_success(&b);
    assert_eq!(
        b["zones"],
        json!([
            {"zoneName": "kr-pub-a", "zoneState": {"available": true}},
            {"zoneName": "kr-pub-b", "zoneState": {"available": true}}
        ])
    );
    assert_last_upstream(&env, "GET", "/os-availability-zone");
    env.stop().await;
}

/// The spec's URLs begin with `/compute` (its base URL is
/// `https://api-compute.cloud.toast.com/compute`): a script that only swapped
/// the host is served the same, errors included in its envelope.
#[tokio::test]
async fn the_spec_url_prefix_compute_is_served() {
    let env = Env::start().await;
    let jwt = env.token(TEAM);
    let get = |path: String| {
        let req = env.http.get(env.url(&path)).header("X-Auth-Token", &jwt);
        common::http::send(req)
    };
    let a = get(format!("/compute{BASE}/availability-zones")).await;
    assert_eq!(a.status, 200);
    assert_success(&a.body);
    assert_eq!(a.body["zones"][0]["zoneName"], "kr-pub-a", "{}", a.body);
    assert_last_upstream(&env, "GET", "/os-availability-zone");

    let a = get(format!("/compute{BASE}/instances?id=no-such-id")).await;
    assert_eq!(a.status, 200);
    assert_failure(&a.body, 10404);

    let a = get(format!("/compute{BASE}/no-such-route")).await;
    assert_eq!(a.status, 200, "a v1.0 path answers in the envelope");
    assert_failure(&a.body, -5);
    env.stop().await;
}

#[tokio::test]
async fn create_instance_translates_every_field() {
    let env = Env::start().await;
    create_keypair(&env, "db-key").await;
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/instances",
            Some(json!({"instance": {
                "name": "db-01", "image": IMAGE_CENTOS_7_8, "flavor": FLAVOR_R2_C2M4,
                "networks": [{"id": NETWORK_VPC1}], "availabilityZone": "kr-pub-b",
                "keyName": "db-key", "count": 2, "volumes": [{"size": 30}],
                "securityGroups": [{"name": "default"}, {"name": "web"}]
            }})),
        )
        .await;
    assert_success(&b);
    let inst = b["instance"].as_object().unwrap();
    assert_eq!(
        inst.keys().collect::<Vec<_>>(),
        vec!["id", "name", "status"]
    );
    assert_eq!(inst["status"], "BUILD");
    // Created with another, the instance has the name the upstream gave it
    // (read back: Nova derives it from the requested one), not the request's.
    assert_eq!(inst["name"], "db-01-1");
    let requests = env.compute_requests();
    let [.., create, read_back] = &requests[..] else {
        panic!("{requests:?}")
    };
    assert_eq!(
        (read_back.method.as_str(), read_back.path.as_str()),
        (
            "GET",
            format!("/v2/{WEB_TENANT}/servers/{}", inst["id"].as_str().unwrap()).as_str()
        )
    );
    let r = create;
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("POST", format!("/v2/{WEB_TENANT}/servers").as_str())
    );
    assert_eq!(
        upstream_body(r),
        json!({"server": {
            "name": "db-01", "imageRef": IMAGE_CENTOS_7_8, "flavorRef": FLAVOR_R2_C2M4,
            "networks": [{"uuid": NETWORK_VPC1}], "key_name": "db-key",
            "min_count": 2, "max_count": 2, "availability_zone": "kr-pub-b",
            "block_device_mapping_v2": [{
                "uuid": IMAGE_CENTOS_7_8, "boot_index": 0, "volume_size": 30, "device_name": "vda",
                "source_type": "image", "destination_type": "volume", "delete_on_termination": true
            }],
            "security_groups": [{"name": "default"}, {"name": "web"}]
        }})
    );
    // Two instances exist upstream; the answer named the one it gave the id of.
    let list = env.v1(TEAM, Method::GET, "/instances", None).await;
    let listed = list["instances"].as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let answered = listed.iter().find(|i| i["id"] == inst["id"]).unwrap();
    assert_eq!(answered["name"], inst["name"]);

    // One instance: its name is the requested one, and nothing is read back.
    let before = env.compute_requests().len();
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/instances",
            Some(json!({"instance": {
                "name": "db-02", "image": IMAGE_CENTOS_7_8, "flavor": FLAVOR_R2_C2M4,
                "networks": [{"id": NETWORK_VPC1}], "keyName": "db-key", "volumes": [{"size": 30}]
            }})),
        )
        .await;
    assert_success(&b);
    assert_eq!(b["instance"]["name"], "db-02");
    assert_eq!(env.compute_requests().len(), before + 1);
    env.stop().await;
}

#[tokio::test]
async fn instances_brief_and_detail_by_list_and_by_id() {
    let env = Env::start().await;
    let id = create_instance(&env, "web-01", FLAVOR_R2_C2M4, Some(20)).await;
    let u2 = create_instance(&env, "web-02", FLAVOR_U2_C1M1, None).await;
    // A data volume and a floating IP so every detail field has content.
    let a = env
        .v1(
            TEAM,
            Method::POST,
            &format!("/instances/{id}/attachments"),
            Some(json!({"attachment": {"volumeId": WEB_VOLUMES[0]}})),
        )
        .await;
    assert_success(&a);

    let brief = env.v1(TEAM, Method::GET, "/instances", None).await;
    assert_success(&brief);
    let list = brief["instances"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for i in list {
        assert_eq!(
            i.as_object().unwrap().len(),
            3,
            "brief has id, name, status: {i}"
        );
        assert_eq!(i["status"], "ACTIVE");
    }
    let one = env
        .v1(TEAM, Method::GET, &format!("/instances?id={id}"), None)
        .await;
    assert_eq!(
        one["instances"],
        json!([{"id": id, "name": "web-01", "status": "ACTIVE"}])
    );
    assert_eq!(
        last_upstream(&env).path,
        format!("/v2/{WEB_TENANT}/servers/{id}")
    );

    let detail = env
        .v1(
            TEAM,
            Method::GET,
            &format!("/instances-detail?id={id}"),
            None,
        )
        .await;
    assert_success(&detail);
    let d = &detail["instances"][0];
    let mut keys: Vec<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "addresses",
            "availabilityZone",
            "createdAt",
            "flavor",
            "id",
            "image",
            "keyName",
            "launchedAt",
            "metadata",
            "name",
            "securityGroups",
            "status",
            "updatedAt",
            "volumes"
        ]
    );
    let addr = &d["addresses"][0];
    assert!(
        addr["macAddress"]
            .as_str()
            .unwrap()
            .starts_with("fa:16:3e:")
    );
    assert!(
        addr["ipAddress"]
            .as_str()
            .unwrap()
            .starts_with("192.168.0.")
    );
    assert_eq!(addr["version"], 4);
    assert_eq!(addr["floatingIpAddress"], Value::Null);
    assert_eq!(d["availabilityZone"], "kr-pub-a");
    assert_eq!(
        d["flavor"],
        json!({"id": FLAVOR_R2_C2M4, "name": "r2.c2m4", "cpu": 2, "ram": 4096})
    );
    assert_eq!(d["status"], "ACTIVE");
    assert_eq!(d["image"], IMAGE_CENTOS_7_8);
    assert_eq!(d["keyName"], "web-01-key");
    assert_eq!(d["volumes"]["attachments"][0]["id"], WEB_VOLUMES[0]);
    assert_eq!(
        d["volumes"]["attachments"].as_array().unwrap().len(),
        1,
        "the root volume is not an attachment"
    );
    assert_eq!(d["securityGroups"], json!([{"name": "default"}]));
    for t in ["launchedAt", "createdAt", "updatedAt"] {
        let v = d[t].as_str().unwrap();
        assert!(
            chrono::NaiveDateTime::parse_from_str(v, "%Y-%m-%dT%H:%M:%S%.6f").is_ok(),
            "{t}: {v}"
        );
        assert_eq!(
            v.len(),
            26,
            "{t} in the spec's yyyy-mm-ddTHH:MM:SS.ffffff form: {v}"
        );
    }
    assert!(d["metadata"].is_object());

    let all = env.v1(TEAM, Method::GET, "/instances-detail", None).await;
    let u2d = all["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == u2.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        u2d["volumes"]["root"]["size"], 20,
        "u2 root disk comes from the flavor"
    );
    assert_eq!(u2d["flavor"]["name"], "u2.c1m1");
    // Flavor details are cached: one flavors/detail call for all of the above.
    assert_eq!(compute_calls_ending(&env, "/flavors/detail"), 1);
    env.stop().await;
}

#[tokio::test]
async fn delete_instance() {
    let env = Env::start().await;
    let id = create_instance(&env, "gone-01", FLAVOR_U2_C1M1, None).await;
    let b = env
        .v1(TEAM, Method::DELETE, &format!("/instances?id={id}"), None)
        .await;
    assert_success(&b);
    assert_eq!(b.as_object().unwrap().len(), 1, "only the header: {b}");
    assert_last_upstream(&env, "DELETE", &format!("/servers/{id}"));
    let b = env
        .v1(TEAM, Method::GET, &format!("/instances?id={id}"), None)
        .await;
    assert!(assert_failure(&b, 10404).contains("could not be found"));
    env.stop().await;
}

#[tokio::test]
async fn attach_and_detach_block_storage() {
    let env = Env::start().await;
    let id = create_instance(&env, "vol-01", FLAVOR_R2_C2M4, Some(20)).await;
    let vol = WEB_VOLUMES[1];
    let b = env
        .v1(
            TEAM,
            Method::POST,
            &format!("/instances/{id}/attachments"),
            Some(json!({"attachment": {"volumeId": vol}})),
        )
        .await;
    assert_success(&b);
    let a = b["attachment"].as_object().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a["volumeId"], vol);
    assert!(a["device"].as_str().unwrap().starts_with("/dev/vd"));
    assert!(a["id"].is_string());
    let r = last_upstream(&env);
    assert_eq!(
        r.path,
        format!("/v2/{WEB_TENANT}/servers/{id}/os-volume_attachments")
    );
    assert_eq!(
        upstream_body(&r),
        json!({"volumeAttachment": {"volumeId": vol}})
    );

    let b = env
        .v1(
            TEAM,
            Method::DELETE,
            &format!("/instances/{id}/attachments?volumeId={vol}"),
            None,
        )
        .await;
    assert_success(&b);
    assert_last_upstream(
        &env,
        "DELETE",
        &format!("/servers/{id}/os-volume_attachments/{vol}"),
    );
    env.stop().await;
}

#[tokio::test]
async fn every_action_of_the_common_action_endpoint() {
    let env = Env::start().await;
    let id = create_instance(&env, "act-01", FLAVOR_U2_C1M1, None).await;
    let path = format!("/instances/{id}/action");
    let detail = env
        .v1(
            TEAM,
            Method::GET,
            &format!("/instances-detail?id={id}"),
            None,
        )
        .await;
    let fixed = detail["instances"][0]["addresses"][0]["ipAddress"]
        .as_str()
        .unwrap()
        .to_string();

    let cases: Vec<(Value, Value, &str)> = vec![
        (json!({"action": "stop"}), json!({"os-stop": null}), "STOP"),
        (
            json!({"action": "start"}),
            json!({"os-start": null}),
            "ACTIVE",
        ),
        (
            json!({"action": "reboot", "parameters": {"type": "SOFT"}}),
            json!({"reboot": {"type": "SOFT"}}),
            "ACTIVE",
        ),
        (
            json!({"action": "reboot", "parameters": {"type": "HARD"}}),
            json!({"reboot": {"type": "HARD"}}),
            "ACTIVE",
        ),
        (
            json!({"action": "resize", "parameters": {"flavor": "1b8e6c44-52a5-4f0e-8c2d-6a7e9f0b3c31"}}),
            json!({"resize": {"flavorRef": "1b8e6c44-52a5-4f0e-8c2d-6a7e9f0b3c31", "OS-DCF:diskConfig": "AUTO"}}),
            "ACTIVE",
        ),
        (
            json!({"action": "addFloatingIp", "parameters": {"address": "133.186.1.20", "ipAddress": fixed}}),
            json!({"addFloatingIp": {"address": "133.186.1.20", "fixed_address": fixed}}),
            "ACTIVE",
        ),
        (
            json!({"action": "removeFloatingIp", "parameters": {"address": "133.186.1.20"}}),
            json!({"removeFloatingIp": {"address": "133.186.1.20"}}),
            "ACTIVE",
        ),
        (
            json!({"action": "addSecurityGroup", "parameters": {"name": "web"}}),
            json!({"addSecurityGroup": {"name": "web"}}),
            "ACTIVE",
        ),
        (
            json!({"action": "removeSecurityGroup", "parameters": {"name": "web"}}),
            json!({"removeSecurityGroup": {"name": "web"}}),
            "ACTIVE",
        ),
    ];
    for (body, v2, status_after) in cases {
        let b = env.v1(TEAM, Method::POST, &path, Some(body.clone())).await;
        assert_success(&b);
        assert_eq!(b.as_object().unwrap().len(), 1, "{body}: only the header");
        let r = last_upstream(&env);
        assert_eq!(
            r.path,
            format!("/v2/{WEB_TENANT}/servers/{id}/action"),
            "{body}"
        );
        assert_eq!(upstream_body(&r), v2, "{body}");
        let now = env
            .v1(TEAM, Method::GET, &format!("/instances?id={id}"), None)
            .await;
        assert_eq!(now["instances"][0]["status"], status_after, "{body}");
    }
    // The floating IP showed up in the detail while attached (checked via a fresh add).
    env.v1(TEAM, Method::POST, &path, Some(json!({"action": "addFloatingIp", "parameters": {"address": "133.186.1.21", "ipAddress": fixed}}))).await;
    let d = env
        .v1(
            TEAM,
            Method::GET,
            &format!("/instances-detail?id={id}"),
            None,
        )
        .await;
    assert_eq!(
        d["instances"][0]["addresses"][0]["floatingIpAddress"],
        "133.186.1.21"
    );

    let b = env
        .v1(
            TEAM,
            Method::POST,
            &path,
            Some(json!({"action": "uploadImage", "parameters": {"name": "act-01-img"}})),
        )
        .await;
    assert_success(&b);
    assert_eq!(b["createdImage"]["name"], "act-01-img");
    let image_id = b["createdImage"]["id"].as_str().unwrap();
    assert_eq!(image_id.len(), 36, "{b}");
    assert_eq!(
        upstream_body(&last_upstream(&env)),
        json!({"createImage": {"name": "act-01-img", "metadata": {}}})
    );
    env.stop().await;
}

#[tokio::test]
async fn conflicting_state_and_unknown_instance_map_to_instance_api_codes() {
    let env = Env::start().await;
    let id = create_instance(&env, "c-01", FLAVOR_U2_C1M1, None).await;
    let b = env
        .v1(
            TEAM,
            Method::POST,
            &format!("/instances/{id}/action"),
            Some(json!({"action": "start"})),
        )
        .await;
    let msg = assert_failure(&b, 10409);
    assert!(msg.contains("Cannot"), "{msg}");
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/instances/00000000-0000-0000-0000-000000000000/action",
            Some(json!({"action": "stop"})),
        )
        .await;
    assert_failure(&b, 10404);
    let b = env
        .v1(
            TEAM,
            Method::POST,
            &format!("/instances/{id}/action"),
            Some(json!({"action": "resize", "parameters": {"flavor": FLAVOR_U2_C1M1}})),
        )
        .await;
    assert_failure(&b, 10400);
    let _ = FLAVOR_M2_C2M4;
    env.stop().await;
}

#[tokio::test]
async fn flavors() {
    let env = Env::start().await;
    let b = env.v1(TEAM, Method::GET, "/flavors", None).await;
    assert_success(&b);
    let flavors = b["flavors"].as_array().unwrap();
    assert!(flavors.len() >= 9);
    let x1 = flavors
        .iter()
        .find(|f| f["id"] == "97604802-a090-43fa-a5ce-c7cfd737fbba")
        .unwrap();
    assert_eq!(
        x1,
        &json!({"disabled": false, "ephemeral": 0, "type": "general", "minVolumeSize": 10, "maxVolumeSize": 1000,
                "id": "97604802-a090-43fa-a5ce-c7cfd737fbba", "name": "x1.c32m256", "isPublic": true,
                "ram": 262144, "vcpus": 32})
    );
    let u2 = flavors.iter().find(|f| f["id"] == FLAVOR_U2_C1M1).unwrap();
    assert_eq!(
        (u2["minVolumeSize"].as_i64(), u2["maxVolumeSize"].as_i64()),
        (Some(20), Some(20))
    );
    for f in flavors {
        assert!(
            ["general", "compute", "memory"].contains(&f["type"].as_str().unwrap()),
            "{f}"
        );
    }
    assert_eq!(
        last_upstream(&env).path,
        format!("/v2/{WEB_TENANT}/flavors/detail")
    );
    env.stop().await;
}

#[tokio::test]
async fn keypairs_list_by_name_create_upload_delete() {
    let env = Env::start().await;
    let created = create_keypair(&env, "gen-key").await;
    let kp = created["keypair"].as_object().unwrap();
    let mut keys: Vec<&str> = kp.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, vec!["fingerprint", "name", "privateKey", "publicKey"]);
    assert!(kp["privateKey"].as_str().unwrap().contains("PRIVATE KEY"));
    assert_eq!(
        upstream_body(&last_upstream(&env)),
        json!({"keypair": {"name": "gen-key"}})
    );

    let public = kp["publicKey"].as_str().unwrap().to_string();
    let up = env
        .v1(
            TEAM,
            Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "my key", "publicKey": public}})),
        )
        .await;
    assert_success(&up);
    assert!(
        up["keypair"].get("privateKey").is_none(),
        "no private key for an upload"
    );
    assert_eq!(
        upstream_body(&last_upstream(&env)),
        json!({"keypair": {"name": "my key", "public_key": public}})
    );

    let all = env.v1(TEAM, Method::GET, "/keypairs", None).await;
    assert_success(&all);
    let list = all["keypairs"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    for k in list {
        assert!(
            k.get("createdAt").is_none(),
            "createdAt only for a lookup by name"
        );
        assert!(k["publicKey"].is_string() && k["fingerprint"].is_string());
    }
    let one = env
        .v1(TEAM, Method::GET, "/keypairs?name=my%20key", None)
        .await;
    assert_success(&one);
    assert_eq!(one["keypairs"][0]["name"], "my key");
    assert!(one["keypairs"][0]["createdAt"].is_string());
    assert_eq!(
        last_upstream(&env).path,
        format!("/v2/{WEB_TENANT}/os-keypairs/my%20key")
    );

    let del = env
        .v1(TEAM, Method::DELETE, "/keypairs?name=my%20key", None)
        .await;
    assert_success(&del);
    assert_last_upstream(&env, "DELETE", "/os-keypairs/my%20key");
    let gone = env
        .v1(TEAM, Method::GET, "/keypairs?name=my%20key", None)
        .await;
    assert_failure(&gone, 10404);
    env.stop().await;
}

#[tokio::test]
async fn the_token_api_is_refused_and_caller_keys_never_forwarded() {
    let env = Env::start().await;
    env.sim.clear_requests();
    for (method, path) in [(Method::POST, "/tokens"), (Method::GET, "/tokens?id=abc")] {
        let body = json!({"auth": {"username": "my-access-key", "password": "my-secret-key"}});
        let (s, _, b) = env
            .raw(
                method,
                &format!("{BASE}{path}"),
                &[("content-type", "application/json")],
                body.to_string().into_bytes(),
            )
            .await;
        assert_eq!(s, 200);
        let msg = assert_failure(&b, 50403);
        assert!(msg.contains("tokens are managed by toastgate"), "{msg}");
        assert!(!msg.contains("my-secret-key"));
    }
    assert!(
        env.compute_requests().is_empty(),
        "nothing went to the compute API"
    );
    for r in env.sim.requests() {
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("my-secret-key") && !body.contains("my-access-key"),
            "caller keys were forwarded to {}",
            r.path
        );
    }
    env.stop().await;
}

#[tokio::test]
async fn malformed_input_for_every_body_is_refused_before_the_upstream() {
    let env = Env::start().await;
    env.sim.clear_requests();
    let cases: Vec<(Method, &str, &str, i64)> = vec![
        (Method::POST, "/instances", "{not json", -8),
        (Method::POST, "/instances", "[]", -4),
        (Method::POST, "/instances", "", -4),
        (
            Method::POST,
            "/instances",
            r#"{"instance": {"name": "x"}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances",
            r#"{"instance": {"name": 1, "image": "i", "flavor": "f", "networks": [{"id": "n"}], "keyName": "k"}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances",
            r#"{"instance": {"name": "x", "image": "i", "flavor": "f", "networks": [{"id": "n"}], "keyName": "k", "count": 11}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances",
            r#"{"instance": {"name": "x", "image": "i", "flavor": "f", "networks": [{"id": "n"}], "keyName": "k", "count": 0}}"#,
            -4,
        ),
        (Method::POST, "/instances/abc/attachments", "{", -8),
        (
            Method::POST,
            "/instances/abc/attachments",
            r#"{"attachment": {"volumeId": 5}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/attachments",
            r#"{"attachment": "v"}"#,
            -4,
        ),
        (Method::POST, "/instances/abc/action", "nope", -8),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "explode"}"#,
            -7,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"parameters": {}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "reboot", "parameters": {"type": "GENTLE"}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "resize"}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "uploadImage", "parameters": {}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "addFloatingIp", "parameters": {"address": "not-an-ip", "ipAddress": "1.1.1.1"}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "removeFloatingIp", "parameters": {}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "addSecurityGroup", "parameters": {"name": ""}}"#,
            -4,
        ),
        (
            Method::POST,
            "/instances/abc/action",
            r#"{"action": "removeSecurityGroup"}"#,
            -4,
        ),
        (Method::POST, "/keypairs", "]", -8),
        (Method::POST, "/keypairs", r#"{"keypair": {}}"#, -4),
        (
            Method::POST,
            "/keypairs",
            r#"{"keypair": {"name": "a/b"}}"#,
            -4,
        ),
        (
            Method::POST,
            "/keypairs",
            r#"{"keypair": {"name": "k", "publicKey": 7}}"#,
            -4,
        ),
        (Method::DELETE, "/instances", "", -4),
        (Method::DELETE, "/keypairs", "", -4),
        (Method::DELETE, "/instances/abc/attachments", "", -4),
        (Method::GET, "/volumes", "", -5),
        (Method::PUT, "/instances", "", -7),
    ];
    for (method, path, body, code) in cases {
        let (s, _, b) = env
            .raw(
                method.clone(),
                &format!("{BASE}{path}"),
                &[
                    ("X-Auth-Token", &env.token(TEAM)),
                    ("Content-Type", "application/json"),
                ],
                body.as_bytes().to_vec(),
            )
            .await;
        assert_eq!(s, 200, "{method} {path} {body}");
        let msg = assert_failure(&b, code);
        assert!(msg.len() > 10, "{method} {path}: unhelpful message {msg}");
    }
    assert!(
        env.compute_requests().is_empty(),
        "a refused request reached the upstream"
    );
    env.stop().await;
}

#[tokio::test]
async fn gateway_refusals_use_the_envelope() {
    let env = Env::start().await;
    // No credential.
    let (_, _, b) = env
        .raw(Method::GET, &format!("{BASE}/flavors"), &[], Vec::new())
        .await;
    assert!(assert_failure(&b, -3).contains("authentication required"));
    // A team that may not use this project.
    let b = env.v1("batch-team", Method::GET, "/flavors", None).await;
    assert!(assert_failure(&b, -3).contains("may not use project `web`"));
    // An appkey toastgate does not know.
    let auth = format!("Bearer {}", env.token(TEAM));
    let (_, _, b) = env
        .raw(
            Method::GET,
            "/v1.0/appkeys/UnknownKey/flavors",
            &[("authorization", &auth)],
            Vec::new(),
        )
        .await;
    assert!(assert_failure(&b, -3).contains("UnknownKey"));
    // Unknown v1.0 paths.
    let (s, _, b) = env
        .raw(Method::GET, "/v1.0/projects", &[], Vec::new())
        .await;
    assert_eq!(s, 200);
    assert_failure(&b, -5);
    // Upstream unreachable.
    env.sim.stop().await;
    let b = env.v1(TEAM, Method::GET, "/flavors", None).await;
    assert_failure(&b, 10502);
    env.stop().await;
}

#[tokio::test]
async fn same_decision_for_the_same_action_on_both_surfaces() {
    let env = Env::start().await;
    // batch-team may not touch web, whichever surface it uses.
    let (s, _) = env.get("batch-team", "/v2/web/servers/detail").await;
    assert_eq!(s, 403);
    let b = env
        .v1("batch-team", Method::GET, "/instances-detail", None)
        .await;
    assert_failure(&b, -3);
    // web-team may, on both.
    assert_eq!(env.get(TEAM, "/v2/web/servers/detail").await.0, 200);
    assert_success(&env.v1(TEAM, Method::GET, "/instances-detail", None).await);
    env.stop().await;
}

/// A detailed list looks up each volume-backed server's volumes several at
/// a time. The overhead histogram counts those calls as the time at least
/// one was in flight: summed, they would exceed the request's duration and
/// leave it no overhead at all (the gateway's own time is never zero).
#[tokio::test]
async fn concurrent_upstream_calls_count_once_in_the_overhead() {
    let env = Env::start().await;
    for n in 0..3 {
        create_instance(&env, &format!("vol-{n}"), FLAVOR_U2_C1M1, Some(10)).await;
    }
    let sums = |text: &str| common::metrics::duration_and_overhead(text, "v1.0");
    let (duration_before, overhead_before) = sums(&env.metrics().await);
    // Every upstream call now takes at least 200 ms: the server list, the
    // flavor list, then the three volume look-ups at once.
    env.sim.set_latency(std::time::Duration::from_millis(200));
    let b = env.v1(TEAM, Method::GET, "/instances-detail", None).await;
    env.sim.set_latency(std::time::Duration::ZERO);
    assert_success(&b);
    assert_eq!(b["instances"].as_array().map(Vec::len), Some(3), "{b}");
    assert_eq!(compute_calls_ending(&env, "/os-volume_attachments"), 3);

    let (duration_after, overhead_after) = sums(&env.metrics().await);
    let (duration, overhead) = (
        duration_after - duration_before,
        overhead_after - overhead_before,
    );
    assert!(
        overhead > 0.0 && duration - overhead >= 0.6,
        "duration {duration} s, overhead {overhead} s"
    );
    env.stop().await;
}

/// A server's addresses are listed in its NICs' order, as the upstream's
/// `addresses` object gives them (by network, in NIC order), not sorted by
/// network name: `vpc2` first here, on both surfaces.
#[tokio::test]
async fn addresses_keep_the_nic_order() {
    let env = Env::start().await;
    create_keypair(&env, "nics-key").await;
    let b = env
        .v1(
            TEAM,
            Method::POST,
            "/instances",
            Some(json!({"instance": {
                "name": "two-nics", "image": IMAGE_CENTOS_7_8, "flavor": FLAVOR_U2_C1M1,
                "networks": [{"id": NETWORK_VPC2}, {"id": NETWORK_VPC1}],
                "keyName": "nics-key",
            }})),
        )
        .await;
    assert_success(&b);
    let id = b["instance"]["id"].as_str().unwrap().to_string();

    let (status, v2) = env.get(TEAM, &format!("/v2/web/servers/{id}")).await;
    assert_eq!(status, 200, "{v2}");
    let networks: Vec<&String> = v2["server"]["addresses"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(networks, ["vpc2", "vpc1"], "{v2}");

    let detail = env
        .v1(
            TEAM,
            Method::GET,
            &format!("/instances-detail?id={id}"),
            None,
        )
        .await;
    assert_success(&detail);
    let ips: Vec<&str> = detail["instances"][0]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["ipAddress"].as_str().unwrap())
        .collect();
    assert_eq!(ips.len(), 2, "{detail}");
    assert!(ips[0].starts_with("172.16.0."), "vpc2 first: {ips:?}");
    assert!(ips[1].starts_with("192.168.0."), "{ips:?}");
    env.stop().await;
}
