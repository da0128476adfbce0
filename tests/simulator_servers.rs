//! The simulator's servers against the v2 spec: create (and its validation),
//! list and filters, rename, delete, and malformed input anywhere.

mod common;

use common::sim::{
    BATCH, MICRO_TIME, WEB, Z_TIME, fast_with_access_key, fault_message, is_hex, matches,
    observable, observable_actions, spec_create_example, wait_steps, with_access_key,
};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator;

#[tokio::test]
async fn the_spec_create_example_builds_a_server_with_every_documented_field() {
    let (sim, t) = with_access_key(observable()).await;

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

    wait_steps(&sim, 1).await;
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
    let (sim, t) = fast_with_access_key().await;
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
    let (sim, t) = fast_with_access_key().await;
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
    let (sim, t) = fast_with_access_key().await;
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
    let (sim, t) = fast_with_access_key().await;
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
async fn delete_shows_deleting_then_the_server_is_gone() {
    let (sim, t) = with_access_key(observable_actions()).await;
    let id = sim.spec_server(&t).await;
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

    wait_steps(&sim, 1).await;
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

#[tokio::test]
async fn malformed_input_anywhere_gets_a_4xx_never_a_crash() {
    let (sim, t) = fast_with_access_key().await;
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
