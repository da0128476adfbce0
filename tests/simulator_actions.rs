//! The simulator's server actions and their state machine: stop, start,
//! reboot, resize, createImage, floating IPs and security groups.

mod common;

use common::sim::{
    BATCH, WEB, fast_with_access_key, fault_message, observable, observable_actions, wait_steps,
    with_access_key,
};
use serde_json::{Value, json};
use toastgate::simulator;

#[tokio::test]
async fn stop_start_and_reboot_follow_the_spec_state_rules() {
    let (sim, t) = with_access_key(observable_actions()).await;
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

    wait_steps(&sim, 1).await;
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
    wait_steps(&sim, 1).await;
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
    wait_steps(&sim, 1).await;
    assert_eq!(sim.server(&t, &id).await["status"], "ACTIVE");

    assert_eq!(
        sim.action(&t, &id, json!({"os-stop": null})).await.status,
        202
    );
    wait_steps(&sim, 1).await;
    assert_eq!(
        sim.action(&t, &id, json!({"os-start": null})).await.status,
        202
    );
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "SHUTOFF");
    assert_eq!(s["OS-EXT-STS:task_state"], "powering-on");
    wait_steps(&sim, 1).await;
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
    let (sim, t) = fast_with_access_key().await;
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
    let (sim, t) = with_access_key(observable_actions()).await;
    let id = sim.spec_server(&t).await;

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

    wait_steps(&sim, 1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "VERIFY_RESIZE");
    assert_eq!(s["OS-EXT-STS:vm_state"], "resized");
    assert_eq!(s["OS-EXT-STS:task_state"], Value::Null);
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_M2_C2M4);
    let stop = sim.action(&t, &id, json!({"os-stop": null})).await;
    assert!(fault_message(&stop, "conflictingRequest", 409).contains("vm_state resized"));

    wait_steps(&sim, 1).await;
    let s = sim.server(&t, &id).await;
    assert_eq!(s["status"], "ACTIVE");
    assert_eq!(s["flavor"]["id"], simulator::FLAVOR_M2_C2M4);
    assert_eq!(s["OS-DCF:diskConfig"], "AUTO");

    // A stopped server may be resized too and stays stopped.
    assert_eq!(
        sim.action(&t, &id, json!({"os-stop": null})).await.status,
        202
    );
    wait_steps(&sim, 1).await;
    let a = sim
        .action(
            &t,
            &id,
            json!({"resize": {"flavorRef": simulator::FLAVOR_C2_C2M2}}),
        )
        .await;
    assert_eq!(a.status, 202);
    wait_steps(&sim, 2).await;
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
    let (sim, t) = with_access_key(observable()).await;
    let id = sim.u2_server(&t, "golden").await;

    // Still building: 409.
    let early = sim
        .action(&t, &id, json!({"createImage": {"name": "foo-image"}}))
        .await;
    assert!(fault_message(&early, "conflictingRequest", 409).contains("vm_state building"));
    wait_steps(&sim, 1).await;

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

    wait_steps(&sim, 1).await;
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
    let m2 = sim.spec_server(&t).await;
    wait_steps(&sim, 1).await;
    let refused = sim
        .action(&t, &m2, json!({"createImage": {"name": "nope"}}))
        .await;
    assert!(fault_message(&refused, "badRequest", 400).contains("u2"));
}

#[tokio::test]
async fn floating_ips_attach_to_a_nic_and_detach() {
    let (sim, t) = fast_with_access_key().await;
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
    let (sim, t) = fast_with_access_key().await;
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
