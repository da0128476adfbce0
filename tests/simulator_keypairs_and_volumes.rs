//! The simulator's key pairs and volume attachments against the v2 spec.

mod common;

use common::fast_sim;
use common::sim::{
    BATCH, MICRO_TIME, WEB, fast_with_access_key, fault_message, matches, observable,
    with_access_key, with_web_token,
};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator;

#[tokio::test]
async fn keypairs_generate_import_list_show_and_delete() {
    let (sim, t) = with_web_token(fast_sim()).await;
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

#[tokio::test]
async fn volume_attachments_follow_nova_rules() {
    let (sim, t) = fast_with_access_key().await;
    let id = sim.spec_server(&t).await;
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
    let (slow, t) = with_access_key(observable()).await;
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
