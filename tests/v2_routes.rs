//! Every v2 route of the spec through the gateway against the simulator:
//! what the caller gets, and what the upstream saw.

mod common;

use common::{Env, WEB_TENANT, assert_nova_error, first_fixed_ip};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{
    FLAVOR_M2_C2M4, FLAVOR_R2_C2M4, FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1, SUBNET_VPC1,
    WEB_VOLUMES,
};

const TEAM: &str = "web-team";

fn self_href(v: &Value) -> String {
    v["links"]
        .as_array()
        .and_then(|l| l.iter().find(|x| x["rel"] == "self"))
        .and_then(|x| x["href"].as_str())
        .unwrap_or_default()
        .to_string()
}

async fn create_server(env: &Env, name: &str) -> String {
    env.web_keypair(TEAM, &format!("{name}-key")).await;
    let (s, b) = env
        .post(
            TEAM,
            "/v2/web/servers",
            json!({"server": {
                "name": name,
                "imageRef": IMAGE_CENTOS_7_8,
                "flavorRef": FLAVOR_R2_C2M4,
                "networks": [{"subnet": SUBNET_VPC1}],
                "availability_zone": "kr-pub-a",
                "key_name": format!("{name}-key"),
                "max_count": 1,
                "min_count": 1,
                "block_device_mapping_v2": [{
                    "uuid": IMAGE_CENTOS_7_8, "boot_index": 0, "volume_size": 20,
                    "device_name": "vda", "source_type": "image",
                    "destination_type": "volume", "delete_on_termination": 1
                }],
                "security_groups": [{"name": "default"}]
            }}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    b["server"]["id"].as_str().unwrap().to_string()
}

async fn server_status(env: &Env, id: &str) -> Value {
    let (s, b) = env.get(TEAM, &format!("/v2/web/servers/{id}")).await;
    assert_eq!(s, 200, "{b}");
    b["server"].clone()
}

async fn action(env: &Env, id: &str, body: Value) -> (u16, Value) {
    env.post(TEAM, &format!("/v2/web/servers/{id}/action"), body)
        .await
}

#[tokio::test]
async fn version_documents_are_answered_by_the_gateway_without_a_token() {
    let env = Env::start().await;
    let host = env.gw.trim_start_matches("http://").to_string();
    let (_, _, v) = env.raw(Method::GET, "/", &[], Vec::new()).await;
    let first = &v["versions"][0];
    assert_eq!(first["id"], "v2.0");
    assert!(
        first["status"].is_string()
            && first["version"].is_string()
            && first["min_version"].is_string()
    );
    assert_eq!(self_href(first), format!("http://{host}/v2/"));
    for path in ["/v2/", "/v2"] {
        let (_, _, v) = env.raw(Method::GET, path, &[], Vec::new()).await;
        assert_eq!(v["version"]["id"], "v2.0", "{path}");
        assert_eq!(self_href(&v["version"]), format!("http://{host}/v2/"));
    }
    assert!(env.compute_requests().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn flavors_and_zones_pass_through_with_links_pointing_at_the_gateway() {
    let env = Env::start().await;
    let (s, b) = env.get(TEAM, "/v2/web/flavors").await;
    assert_eq!(s, 200);
    let flavors = b["flavors"].as_array().unwrap();
    assert!(flavors.len() >= 2);
    for f in flavors {
        let href = self_href(f);
        assert_eq!(
            href,
            env.url(&format!("/v2/web/flavors/{}", f["id"].as_str().unwrap()))
        );
        let bookmark = f["links"][1]["href"].as_str().unwrap();
        assert!(bookmark.starts_with(&env.gw), "bookmark {bookmark}");
    }
    assert!(
        !b.to_string().contains(&env.sim.base_url()),
        "an upstream link leaked: {b}"
    );

    let (s, b) = env
        .get(TEAM, "/v2/web/flavors/detail?minRam=131072&limit=1")
        .await;
    assert_eq!(s, 200, "{b}");
    let f = &b["flavors"][0];
    assert!(f["ram"].as_i64().unwrap() >= 131072);
    for key in [
        "OS-FLV-DISABLED:disabled",
        "vcpus",
        "os-flavor-access:is_public",
        "OS-FLV-EXT-DATA:ephemeral",
        "disk",
        "rxtx_factor",
        "extra_specs",
    ] {
        assert!(f.get(key).is_some(), "flavor detail lacks {key}: {f}");
    }
    let next = b["flavors_links"][0]["href"].as_str().unwrap();
    assert!(
        next.starts_with(&env.url("/v2/web/flavors/detail?")),
        "{next}"
    );
    // Following the next link through the gateway works.
    let next_path = next.trim_start_matches(&env.gw).to_string();
    let (s, b2) = env.get(TEAM, &next_path).await;
    assert_eq!(s, 200);
    assert_ne!(b2["flavors"][0]["id"], f["id"]);

    let (s, b) = env.get(TEAM, "/v2/web/os-availability-zone").await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"availabilityZoneInfo": [
            {"zoneState": {"available": true}, "hosts": null, "zoneName": "kr-pub-a"},
            {"zoneState": {"available": true}, "hosts": null, "zoneName": "kr-pub-b"}
        ]})
    );
    env.stop().await;
}

#[tokio::test]
async fn keypairs_create_list_show_import_delete() {
    let env = Env::start().await;
    let (s, b) = env
        .post(
            TEAM,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "gen-key"}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(
        b["keypair"]["private_key"]
            .as_str()
            .unwrap()
            .contains("PRIVATE KEY")
    );
    assert!(b["keypair"]["fingerprint"].is_string());
    let public_key = b["keypair"]["public_key"].as_str().unwrap().to_string();

    let (s, b) = env
        .post(
            TEAM,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "imported", "public_key": public_key}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert!(b["keypair"].get("private_key").is_none());

    let (s, b) = env.get(TEAM, "/v2/web/os-keypairs").await;
    assert_eq!(s, 200);
    let names: Vec<&str> = b["keypairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["keypair"]["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"gen-key") && names.contains(&"imported"),
        "{names:?}"
    );

    let (s, b) = env.get(TEAM, "/v2/web/os-keypairs/imported").await;
    assert_eq!(s, 200);
    for key in [
        "public_key",
        "user_id",
        "name",
        "deleted",
        "created_at",
        "updated_at",
        "deleted_at",
        "fingerprint",
        "id",
    ] {
        assert!(b["keypair"].get(key).is_some(), "keypair show lacks {key}");
    }

    let (s, b) = env
        .post(
            TEAM,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "imported"}}),
        )
        .await;
    assert_eq!(
        s, 409,
        "duplicate passes the upstream conflict through: {b}"
    );
    assert_nova_error(&b, "conflictingRequest", 409);

    let (s, _) = env
        .call(TEAM, Method::DELETE, "/v2/web/os-keypairs/imported", None)
        .await;
    assert_eq!(s, 202);
    let (s, b) = env.get(TEAM, "/v2/web/os-keypairs/imported").await;
    assert_eq!(s, 404);
    assert_nova_error(&b, "itemNotFound", 404);
    env.stop().await;
}

#[tokio::test]
async fn servers_lifecycle_through_every_route_and_action() {
    let env = Env::start().await;
    let id = create_server(&env, "web-01").await;

    // list, detail (with a filter), show, update
    let (s, b) = env.get(TEAM, "/v2/web/servers").await;
    assert_eq!(s, 200);
    assert_eq!(b["servers"][0]["id"], id.as_str());
    assert_eq!(
        self_href(&b["servers"][0]),
        env.url(&format!("/v2/web/servers/{id}"))
    );
    let (s, b) = env.get(TEAM, "/v2/web/servers/detail?name=web-0").await;
    assert_eq!(s, 200);
    let detail = &b["servers"][0];
    assert_eq!(detail["status"], "ACTIVE");
    assert_eq!(
        detail["tenant_id"], WEB_TENANT,
        "data fields are not rewritten"
    );
    assert_eq!(detail["OS-EXT-STS:power_state"], 1);
    let (s, b) = env.get(TEAM, "/v2/web/servers/detail?name=nomatch").await;
    assert_eq!((s, b["servers"].as_array().unwrap().len()), (200, 0));

    let (s, b) = env
        .call(
            TEAM,
            Method::PUT,
            &format!("/v2/web/servers/{id}"),
            Some(json!({"server": {"name": "web-01-renamed"}})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["server"]["name"], "web-01-renamed");

    // power actions, with the simulator's state rules passed through
    let (s, b) = action(&env, &id, json!({"os-start": null})).await;
    assert_eq!(s, 409, "start of an ACTIVE server: {b}");
    assert_nova_error(&b, "conflictingRequest", 409);
    assert_eq!(action(&env, &id, json!({"os-stop": null})).await.0, 202);
    assert_eq!(server_status(&env, &id).await["status"], "SHUTOFF");
    assert_eq!(action(&env, &id, json!({"os-start": null})).await.0, 202);
    assert_eq!(server_status(&env, &id).await["status"], "ACTIVE");
    assert_eq!(
        action(&env, &id, json!({"reboot": {"type": "SOFT"}}))
            .await
            .0,
        202
    );
    assert_eq!(
        action(&env, &id, json!({"reboot": {"type": "HARD"}}))
            .await
            .0,
        202
    );
    assert_eq!(server_status(&env, &id).await["status"], "ACTIVE");

    // resize, image, security groups, floating IPs
    assert_eq!(
        action(
            &env,
            &id,
            json!({"resize": {"flavorRef": FLAVOR_M2_C2M4, "OS-DCF:diskConfig": "AUTO"}})
        )
        .await
        .0,
        202
    );
    let after = server_status(&env, &id).await;
    assert_eq!(after["flavor"]["id"], FLAVOR_M2_C2M4, "{after}");

    // createImage: only u2 instances may (spec), so an r2 one is refused upstream...
    let (s, b) = action(
        &env,
        &id,
        json!({"createImage": {"name": "img", "metadata": {}}}),
    )
    .await;
    assert_eq!(s, 400, "{b}");
    assert_nova_error(&b, "badRequest", 400);
    // ...and a u2 one answers with the image id and a Location at the gateway.
    let u2 = env.web_u2_server(TEAM, "u2-01-key", "u2-01").await;
    let resp = env
        .request(
            TEAM,
            Method::POST,
            &format!("/v2/web/servers/{u2}/action"),
            Some(json!({"createImage": {"name": "u2-01-img", "metadata": {"k": "v"}}})),
        )
        .await;
    assert_eq!(resp.status, 202);
    let location = resp.headers["location"].to_str().unwrap().to_string();
    let body = resp.body;
    let image_id = body["image_id"].as_str().unwrap();
    assert_eq!(location, env.url(&format!("/v2/web/images/{image_id}")));

    assert_eq!(
        action(&env, &id, json!({"addSecurityGroup": {"name": "web"}}))
            .await
            .0,
        202
    );
    let sgs = server_status(&env, &id).await["security_groups"].to_string();
    assert!(sgs.contains("\"web\""), "{sgs}");
    assert_eq!(
        action(&env, &id, json!({"removeSecurityGroup": {"name": "web"}}))
            .await
            .0,
        202
    );

    let fixed = first_fixed_ip(detail);
    let (s, b) = action(
        &env,
        &id,
        json!({"addFloatingIp": {"address": "133.186.1.10", "fixed_address": fixed}}),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    assert!(
        server_status(&env, &id).await["addresses"]
            .to_string()
            .contains("133.186.1.10")
    );
    assert_eq!(
        action(
            &env,
            &id,
            json!({"removeFloatingIp": {"address": "133.186.1.10"}})
        )
        .await
        .0,
        202
    );
    assert!(
        !server_status(&env, &id).await["addresses"]
            .to_string()
            .contains("133.186.1.10")
    );

    // volume attachments, both POST forms of the spec
    let vol0 = WEB_VOLUMES[0];
    let vol1 = WEB_VOLUMES[1];
    let (s, b) = env
        .post(
            TEAM,
            &format!("/v2/web/servers/{id}/os-volume_attachments/{vol0}"),
            json!({"volumeAttachment": {"volumeId": vol0}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["volumeAttachment"]["volumeId"], vol0);
    let (s, b) = env
        .post(
            TEAM,
            &format!("/v2/web/servers/{id}/os-volume_attachments"),
            json!({"volumeAttachment": {"volumeId": vol1}}),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (s, b) = env
        .get(TEAM, &format!("/v2/web/servers/{id}/os-volume_attachments"))
        .await;
    assert_eq!(s, 200);
    let attached: Vec<&str> = b["volumeAttachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["volumeId"].as_str().unwrap())
        .collect();
    assert!(
        attached.contains(&vol0) && attached.contains(&vol1),
        "{attached:?}"
    );
    let (s, b) = env
        .get(
            TEAM,
            &format!("/v2/web/servers/{id}/os-volume_attachments/{vol0}"),
        )
        .await;
    assert_eq!(
        (s, b["volumeAttachment"]["serverId"].as_str()),
        (200, Some(id.as_str()))
    );
    let (s, _) = env
        .call(
            TEAM,
            Method::DELETE,
            &format!("/v2/web/servers/{id}/os-volume_attachments/{vol0}"),
            None,
        )
        .await;
    assert_eq!(s, 202);

    // delete
    let (s, _) = env
        .call(TEAM, Method::DELETE, &format!("/v2/web/servers/{id}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, b) = env.get(TEAM, &format!("/v2/web/servers/{id}")).await;
    assert_eq!(s, 404, "{b}");

    // Every call went to the tenant's path with the cloud token, never the caller's JWT.
    let reqs = env.compute_requests();
    assert!(reqs.len() > 25);
    let jwt = env.token(TEAM);
    for r in &reqs {
        assert!(
            r.path.starts_with(&format!("/v2/{WEB_TENANT}/")),
            "{}",
            r.path
        );
        let auth: Vec<&(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .collect();
        assert!(auth.is_empty(), "Authorization reached the upstream");
        let token = r
            .headers
            .iter()
            .find(|(k, _)| k == "x-auth-token")
            .map(|(_, v)| v.as_str())
            .unwrap();
        assert_ne!(token, jwt);
        assert!(!token.contains('.'), "a JWT reached the upstream");
    }
    env.stop().await;
}

#[tokio::test]
async fn project_by_tenant_id_keeps_tenant_id_in_links() {
    let env = Env::start().await;
    let (s, b) = env.get(TEAM, &format!("/v2/{WEB_TENANT}/flavors")).await;
    assert_eq!(s, 200);
    let href = self_href(&b["flavors"][0]);
    assert!(
        href.starts_with(&env.url(&format!("/v2/{WEB_TENANT}/flavors/"))),
        "{href}"
    );
    env.stop().await;
}

#[tokio::test]
async fn microversion_headers_pass_both_ways_and_hop_by_hop_headers_do_not() {
    let env = Env::start().await;
    env.sim.clear_requests();
    let resp = env
        .http
        .get(env.url("/v2/web/flavors"))
        .header("X-Auth-Token", env.token(TEAM))
        .header("OpenStack-API-Version", "compute 2.47")
        .header("X-OpenStack-Nova-API-Version", "2.47")
        .header("Connection", "keep-alive, X-Hop-Secret")
        .header("X-Hop-Secret", "must-not-pass")
        .header("Cookie", "session=abc")
        .header("X-Request-Id", "caller-chosen-id")
        .header("X-Roles", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["openstack-api-version"], "compute 2.47");
    assert_eq!(resp.headers()["x-openstack-nova-api-version"], "2.47");
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(
        request_id, "caller-chosen-id",
        "the gateway makes its own request ids"
    );
    assert_eq!(request_id.len(), 36);
    let seen = &env.compute_requests()[0];
    let has = |name: &str| seen.headers.iter().any(|(k, _)| k == name);
    let values = |name: &str| {
        seen.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert!(has("openstack-api-version") && has("x-openstack-nova-api-version"));
    let compute_authority = env
        .config
        .upstream
        .compute_url
        .trim_start_matches("http://");
    assert_eq!(
        values("host"),
        [compute_authority],
        "the upstream's own Host, once"
    );
    let cloud_token = values("x-auth-token");
    assert_eq!(cloud_token.len(), 1, "{cloud_token:?}");
    assert_ne!(
        cloud_token[0],
        env.token(TEAM),
        "the caller's JWT is not forwarded"
    );
    assert!(
        !has("x-hop-secret"),
        "a header named in Connection was forwarded"
    );
    assert!(!has("cookie"));
    assert!(
        !has("x-roles"),
        "only allow-listed caller headers are forwarded"
    );
    env.stop().await;
}

#[tokio::test]
async fn upstream_errors_pass_through_with_their_status_and_body() {
    let env = Env::start().await;
    let (s, b) = env
        .get(TEAM, "/v2/web/servers/00000000-0000-0000-0000-000000000000")
        .await;
    assert_eq!(s, 404);
    assert_nova_error(&b, "itemNotFound", 404);
    let (s, b) = env
        .post(TEAM, "/v2/web/servers", json!({"server": {"name": "x"}}))
        .await;
    assert_eq!(s, 400, "{b}");
    assert_nova_error(&b, "badRequest", 400);
    env.stop().await;
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_reaching_the_upstream() {
    let env = Env::start_with_overlays(
        common::fast_sim(),
        &["overlays/small-body-limit.yaml"],
        json!({}),
    )
    .await;
    env.sim.clear_requests();
    let big = "x".repeat(4096);
    let (s, b) = env
        .post(
            TEAM,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": big}}),
        )
        .await;
    assert_eq!(s, 413, "{b}");
    assert_nova_error(&b, "requestEntityTooLarge", 413);
    assert!(env.compute_requests().is_empty());
    env.stop().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_clear_502_and_a_slow_one_a_504() {
    let env = Env::start().await;
    assert_eq!(env.get(TEAM, "/v2/web/flavors").await.0, 200);
    env.sim.set_latency(std::time::Duration::from_secs(6));
    let (s, b) = env.get(TEAM, "/v2/web/flavors").await;
    assert_eq!(s, 504, "{b}");
    assert!(assert_nova_error(&b, "computeFault", 504).contains("did not answer"));
    env.sim.set_latency(std::time::Duration::ZERO);
    env.sim.stop().await;
    let (s, b) = env.get(TEAM, "/v2/web/flavors").await;
    assert_eq!(s, 502, "{b}");
    assert!(assert_nova_error(&b, "computeFault", 502).contains("unreachable"));
    env.stop().await;
}

/// `server.request_timeout` bounds the whole request, whatever the
/// upstream's own limit: a gateway allowing 1 s a request and 5 s an
/// upstream call answers a 3 s upstream with its own timeout, in each
/// surface's form (the upstream's limit is the other test's 504).
#[tokio::test]
async fn the_request_timeout_bounds_a_request_before_the_upstream_limit() {
    let env = Env::start_with_overlays(
        common::fast_sim(),
        &[],
        json!({"server": {"request_timeout": "1s"}, "upstream": {"request_timeout": "5s"}}),
    )
    .await;
    assert_eq!(env.get(TEAM, "/v2/web/flavors").await.0, 200);
    env.sim.set_latency(std::time::Duration::from_secs(3));
    let (s, b) = env.get(TEAM, "/v2/web/flavors").await;
    assert_eq!(s, 504, "{b}");
    let message = assert_nova_error(&b, "computeFault", 504);
    assert!(
        message.contains("request did not complete within 1s"),
        "{b}"
    );
    let b = env.v1(TEAM, Method::GET, "/flavors", None).await;
    let message = common::assert_v1_failure(&b, 10504);
    assert!(
        message.contains("request did not complete within 1s"),
        "{b}"
    );
    env.sim.set_latency(std::time::Duration::ZERO);
    assert_eq!(env.get(TEAM, "/v2/web/flavors").await.0, 200);
    env.stop().await;
}

/// Only links are rewritten: a URL in the caller's own data (a metadata
/// value naming the tenant, as a console or wiki URL may) comes back as it
/// was sent, next to the server's links pointing at the gateway.
#[tokio::test]
async fn urls_in_metadata_are_data_and_stay_as_sent() {
    let env = Env::start().await;
    env.web_keypair("web-team", "k").await;
    let runbook = format!("https://wiki.example.com/p/{WEB_TENANT}/runbook");
    let (s, b) = env
        .post(
            "web-team",
            "/v2/web/servers",
            json!({"server": {"name": "meta-0", "imageRef": IMAGE_CENTOS_7_8,
                              "flavorRef": FLAVOR_U2_C1M1,
                              "networks": [{"uuid": NETWORK_VPC1}], "key_name": "k",
                              "metadata": {"runbook": runbook}}}),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let id = b["server"]["id"].as_str().unwrap().to_string();
    let (s, b) = env.get("web-team", &format!("/v2/web/servers/{id}")).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["server"]["metadata"]["runbook"], runbook.as_str(), "{b}");
    let own = b["server"]["links"][0]["href"].as_str().unwrap();
    assert_eq!(own, env.url(&format!("/v2/web/servers/{id}")));
    env.stop().await;
}
