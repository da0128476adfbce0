//! The audit log through the gateway: one completed record per mutating
//! Action on both surfaces, refusals recorded, fail-closed when the sink
//! cannot write, nothing lost across rotation, secrets redacted.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::process::{assert_success, toastgate};
use common::tempdir::TempDir;
use common::{Env, fast_sim, first_fixed_ip, metrics};
use reqwest::Method;
use serde_json::{Value, json};
use toastgate::simulator::{FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1, WEB_VOLUMES};

/// The gateway with `overlays` and its audit file at `file`.
async fn audited(file: &Path, overlays: &[&str]) -> Env {
    Env::start_with_overlays(
        fast_sim(),
        overlays,
        json!({"audit": {"file": {"path": file}}}),
    )
    .await
}

fn records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn completed<'a>(recs: &'a [Value], action: &str) -> Vec<&'a Value> {
    recs.iter()
        .filter(|r| r["stage"] == "completed" && r["action"] == action)
        .collect()
}

#[tokio::test]
async fn every_mutating_action_of_both_surfaces_has_exactly_one_completed_record() {
    let dir = TempDir::new("audit-all");
    let file = dir.join("audit.jsonl");
    let env = audited(&file, &[]).await;
    let team = "web-team";

    // v2: keypair, create, update, every server action, attach/detach, delete.
    assert_eq!(
        env.post(
            team,
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "k2"}})
        )
        .await
        .0,
        200
    );
    let (s, b) = env
        .post(team, "/v2/web/servers", json!({"server": {"name": "a-1", "imageRef": IMAGE_CENTOS_7_8, "flavorRef": FLAVOR_U2_C1M1, "networks": [{"uuid": NETWORK_VPC1}], "key_name": "k2"}}))
        .await;
    assert_eq!(s, 202, "{b}");
    let id = b["server"]["id"].as_str().unwrap().to_string();
    let act = |body: Value| {
        let env = &env;
        let id = id.clone();
        async move {
            env.post(team, &format!("/v2/web/servers/{id}/action"), body)
                .await
                .0
        }
    };
    assert_eq!(
        env.call(
            team,
            Method::PUT,
            &format!("/v2/web/servers/{id}"),
            Some(json!({"server": {"name": "a-2"}}))
        )
        .await
        .0,
        200
    );
    assert_eq!(act(json!({"os-stop": null})).await, 202);
    assert_eq!(act(json!({"os-start": null})).await, 202);
    assert_eq!(act(json!({"reboot": {"type": "HARD"}})).await, 202);
    assert_eq!(
        act(json!({"resize": {"flavorRef": "1b8e6c44-52a5-4f0e-8c2d-6a7e9f0b3c31"}})).await,
        202
    );
    assert_eq!(act(json!({"createImage": {"name": "img"}})).await, 202);
    assert_eq!(act(json!({"addSecurityGroup": {"name": "web"}})).await, 202);
    assert_eq!(
        act(json!({"removeSecurityGroup": {"name": "web"}})).await,
        202
    );
    let (_, detail) = env.get(team, &format!("/v2/web/servers/{id}")).await;
    let fixed = first_fixed_ip(&detail["server"]);
    assert_eq!(
        act(json!({"addFloatingIp": {"address": "133.186.9.9", "fixed_address": fixed}})).await,
        202
    );
    assert_eq!(
        act(json!({"removeFloatingIp": {"address": "133.186.9.9"}})).await,
        202
    );
    let vol = WEB_VOLUMES[2];
    assert_eq!(
        env.post(
            team,
            &format!("/v2/web/servers/{id}/os-volume_attachments"),
            json!({"volumeAttachment": {"volumeId": vol}})
        )
        .await
        .0,
        200
    );
    assert_eq!(
        env.call(
            team,
            Method::DELETE,
            &format!("/v2/web/servers/{id}/os-volume_attachments/{vol}"),
            None
        )
        .await
        .0,
        202
    );
    assert_eq!(
        env.call(team, Method::DELETE, &format!("/v2/web/servers/{id}"), None)
            .await
            .0,
        204
    );
    assert_eq!(
        env.call(team, Method::DELETE, "/v2/web/os-keypairs/k2", None)
            .await
            .0,
        202
    );

    // v1.0: keypair, create, actions, delete.
    assert_eq!(
        env.v1(
            "web-team",
            Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "k1"}}))
        )
        .await["header"]["isSuccessful"],
        true
    );
    let b = env.v1("web-team", Method::POST, "/instances", Some(json!({"instance": {"name": "b-1", "image": IMAGE_CENTOS_7_8, "flavor": FLAVOR_U2_C1M1, "networks": [{"id": NETWORK_VPC1}], "keyName": "k1", "count": 2}}))).await;
    let v1_id = b["instance"]["id"].as_str().unwrap().to_string();
    let v1_detail = env
        .v1(
            "web-team",
            Method::GET,
            &format!("/instances-detail?id={v1_id}"),
            None,
        )
        .await;
    let v1_fixed = v1_detail["instances"][0]["addresses"][0]["ipAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let v1_actions = [
        json!({"action": "stop"}),
        json!({"action": "start"}),
        json!({"action": "reboot", "parameters": {"type": "SOFT"}}),
        json!({"action": "resize", "parameters": {"flavor": "1b8e6c44-52a5-4f0e-8c2d-6a7e9f0b3c31"}}),
        json!({"action": "addSecurityGroup", "parameters": {"name": "web"}}),
        json!({"action": "removeSecurityGroup", "parameters": {"name": "web"}}),
        json!({"action": "addFloatingIp", "parameters": {"address": "133.186.9.8", "ipAddress": v1_fixed}}),
        json!({"action": "removeFloatingIp", "parameters": {"address": "133.186.9.8"}}),
        json!({"action": "uploadImage", "parameters": {"name": "v1img"}}),
    ];
    for body in v1_actions {
        let b = env
            .v1(
                "web-team",
                Method::POST,
                &format!("/instances/{v1_id}/action"),
                Some(body.clone()),
            )
            .await;
        assert_eq!(b["header"]["isSuccessful"], true, "{body}: {b}");
    }
    let vol = WEB_VOLUMES[1];
    for (method, path, body) in [
        (
            Method::POST,
            format!("/instances/{v1_id}/attachments"),
            Some(json!({"attachment": {"volumeId": vol}})),
        ),
        (
            Method::DELETE,
            format!("/instances/{v1_id}/attachments?volumeId={vol}"),
            None,
        ),
        (Method::DELETE, format!("/instances?id={v1_id}"), None),
    ] {
        let b = env.v1("web-team", method, &path, body).await;
        assert_eq!(b["header"]["isSuccessful"], true, "{b}");
    }
    assert_eq!(
        env.v1("web-team", Method::DELETE, "/keypairs?name=k1", None)
            .await["header"]["isSuccessful"],
        true
    );
    // Reads are not recorded by default.
    assert_eq!(env.get(team, "/v2/web/servers/detail").await.0, 200);
    env.stop().await;

    let recs = records(&file);
    let expected_v2 = [
        "keypair.create",
        "instance.create",
        "instance.update",
        "instance.stop",
        "instance.start",
        "instance.reboot",
        "instance.resize",
        "instance.create_image",
        "instance.add_security_group",
        "instance.remove_security_group",
        "instance.add_floating_ip",
        "instance.remove_floating_ip",
        "volume.attach",
        "volume.detach",
        "instance.delete",
        "keypair.delete",
    ];
    let mut per_action: HashMap<(String, String), usize> = HashMap::new();
    for r in recs.iter().filter(|r| r["stage"] == "completed") {
        *per_action
            .entry((
                r["surface"].as_str().unwrap().to_string(),
                r["action"].as_str().unwrap().to_string(),
            ))
            .or_default() += 1;
    }
    for a in expected_v2 {
        assert_eq!(
            per_action.get(&("v2".to_string(), a.to_string())),
            Some(&1),
            "v2 {a}: {per_action:?}"
        );
    }
    // The v1.0 surface has every mutating Action but instance.update.
    for a in expected_v2.iter().filter(|a| **a != "instance.update") {
        assert_eq!(
            per_action.get(&("v1.0".to_string(), a.to_string())),
            Some(&1),
            "v1.0 {a}: {per_action:?}"
        );
    }
    assert!(
        completed(&recs, "instance.list_detail").is_empty(),
        "reads are not audited by default"
    );

    // Each completed record has its received twin and the fields of the schema.
    for r in recs.iter().filter(|r| r["stage"] == "completed") {
        let twin = recs
            .iter()
            .filter(|o| o["stage"] == "received" && o["request_id"] == r["request_id"])
            .count();
        assert_eq!(twin, 1, "received record for {r}");
        for key in [
            "time",
            "event_id",
            "request_id",
            "team",
            "subject",
            "client",
            "surface",
            "action",
            "project",
            "decision",
            "latency_ms",
            "hash",
            "prev_hash",
            // The judged request summary, on every forwarded mutation
            // (`{}` for those without a body).
            "request",
        ] {
            assert!(
                r.get(key).is_some_and(|v| !v.is_null()),
                "{key} missing in {r}"
            );
        }
        assert_eq!(r["team"], "web-team");
        assert_eq!(r["subject"], "web-team-user");
        assert_eq!(r["project"], "web");
        assert_eq!(r["decision"], "allowed");
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
        assert!(r["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    }
    let create = completed(&recs, "instance.create");
    let v2_create = create.iter().find(|r| r["surface"] == "v2").unwrap();
    assert_eq!(v2_create["result"]["instance_id"], id.as_str());
    assert_eq!(v2_create["upstream_status"], 202);
    assert_eq!(v2_create["request"]["name"], "a-1");
    // Two instances: the name read back after the create is not its outcome.
    let v1_create = create.iter().find(|r| r["surface"] == "v1.0").unwrap();
    assert_eq!(v1_create["upstream_status"], 202, "{v1_create}");
    assert_eq!(v1_create["result"]["instance_id"], v1_id.as_str());
    let image = completed(&recs, "instance.create_image");
    assert!(
        image.iter().all(|r| r["result"]["image_id"].is_string()),
        "{image:?}"
    );
    let reboot = completed(&recs, "instance.reboot")[0];
    assert_eq!(reboot["target"], id.as_str());

    // The chain verifies.
    assert_success(&toastgate([
        "audit",
        "verify",
        "--file",
        file.to_str().unwrap(),
    ]));
}

#[tokio::test]
async fn refusals_are_recorded() {
    let dir = TempDir::new("audit-refusals");
    let file = dir.join("audit.jsonl");
    let env = audited(
        &file,
        &[
            "overlays/batch-team-read-only.yaml",
            "overlays/batch-team-one-read-a-minute.yaml",
        ],
    )
    .await;
    // auth
    let resp = env
        .http
        .post(env.url("/v2/web/servers/x/action"))
        .header("X-Auth-Token", "garbage")
        .json(&json!({"os-stop": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // policy (project, then action)
    assert_eq!(
        env.post(
            "batch-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "x"}})
        )
        .await
        .0,
        403
    );
    assert_eq!(
        env.post(
            "batch-team",
            "/v2/batch/os-keypairs",
            json!({"keypair": {"name": "x"}})
        )
        .await
        .0,
        403
    );
    // rate limit
    assert_eq!(env.get("batch-team", "/v2/batch/flavors").await.0, 200);
    assert_eq!(env.get("batch-team", "/v2/batch/flavors").await.0, 429);
    env.stop().await;

    let recs = records(&file);
    let refused: Vec<&Value> = recs.iter().filter(|r| r["decision"] == "refused").collect();
    let reasons: Vec<&str> = refused
        .iter()
        .map(|r| r["reason"].as_str().unwrap())
        .collect();
    assert_eq!(
        reasons,
        vec![
            "auth:malformed",
            "policy:project",
            "policy:action",
            "rate_limit:reads"
        ],
        "{refused:?}"
    );
    assert!(refused.iter().all(|r| r["stage"] == "completed"));
    assert_eq!(refused[3]["action"], "flavor.list");
    assert_eq!(refused[1]["team"], "batch-team");
    assert!(refused[0]["team"].is_null(), "unauthenticated: no team");
}

/// A flood of refused requests (no JWT needed to send one) writes at most
/// `audit.refusal_records` per caller; the rest are counted, in the next
/// record written or, once the caller is quiet, in its last refusal: the
/// records and their counts add up to every refusal. Another caller's
/// refusals are recorded meanwhile.
#[tokio::test]
async fn a_refusal_flood_is_recorded_at_a_bounded_rate_and_every_refusal_counted() {
    let dir = TempDir::new("audit-refusal-flood");
    let file = dir.join("audit.jsonl");
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/batch-team-read-only.yaml"],
        json!({"audit": {
            "file": {"path": file},
            "refusal_records": {"rate": "1/h", "burst": 5}
        }}),
    )
    .await;
    const FLOOD: u64 = 60;
    for _ in 0..FLOOD {
        let resp = env
            .http
            .get(env.url("/v2/web/servers"))
            .header("X-Auth-Token", "garbage")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 401);
    }
    // A team's refusal has a budget of its own.
    let (s, _) = env
        .post(
            "batch-team",
            "/v2/batch/os-keypairs",
            json!({"keypair": {"name": "x"}}),
        )
        .await;
    assert_eq!(s, 403);
    let unauthenticated = |recs: &[Value]| -> Vec<Value> {
        recs.iter()
            .filter(|r| r["decision"] == "refused" && r["team"].is_null())
            .cloned()
            .collect()
    };
    let now = records(&file);
    let written = unauthenticated(&now);
    assert_eq!(written.len(), 5, "the burst, then held back: {written:?}");
    assert!(
        now.iter()
            .any(|r| r["team"] == "batch-team" && r["reason"] == "policy:action"),
        "the team's refusal is recorded at once"
    );

    // Quiet for a second: the last held-back refusal is written, carrying
    // the count of the others.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let written = loop {
        let written = unauthenticated(&records(&file));
        if written.len() > 5 {
            break written;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the held-back refusals were never written"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(written.len(), 6, "{written:?}");
    assert_eq!(written[5]["suppressed"], FLOOD - 6);
    assert_eq!(written[5]["reason"], "auth:malformed");
    let counted: u64 = written
        .iter()
        .map(|r| 1 + r["suppressed"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, FLOOD, "every refusal is in a record or a count");
    // The metrics say the same: the records written, and the refusals
    // they stand for besides themselves.
    let metrics = env.metrics().await;
    let series = |result: &str| {
        metrics::value(
            &metrics,
            &format!("toastgate_audit_records_total{{result=\"{result}\"}}"),
        )
    };
    assert_eq!(series("suppressed"), (FLOOD - 6) as f64, "{metrics}");
    assert_eq!(
        series("written"),
        7.0,
        "6 unauthenticated refusals and the team's one: {metrics}"
    );
    env.stop().await;
}

#[tokio::test]
async fn an_audit_sink_that_cannot_write_blocks_mutating_requests() {
    let dir = TempDir::new("audit-failclosed");
    let file = dir.join("sub").join("audit.jsonl");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let env = audited(&file, &["overlays/audit-fsync-always.yaml"]).await;
    assert_eq!(
        env.post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "ok"}})
        )
        .await
        .0,
        200
    );

    // The sink's folder disappears: mutating requests are refused and never reach the upstream.
    std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
    env.sim.clear_requests();
    let (s, b) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "lost"}}),
        )
        .await;
    assert_eq!(s, 503, "{b}");
    assert!(
        common::assert_nova_error(&b, "serviceUnavailable", 503)
            .contains("audit log cannot record")
    );
    let b = env
        .v1(
            "web-team",
            Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "lost-v1"}})),
        )
        .await;
    assert_eq!(b["header"]["resultCode"], 10503, "{b}");
    assert!(
        env.compute_requests().iter().all(|r| r.method == "GET"),
        "an unaudited action reached the upstream"
    );
    // Reads still work.
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    let m = env.metrics().await;
    assert!(
        !m.contains(r#"toastgate_audit_records_total{result="failed"} 0"#),
        "{m}"
    );

    // The folder comes back: so does the audit log, by itself.
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let (s, _) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "back"}}),
        )
        .await;
    assert_eq!(s, 200);
    env.stop().await;
    let recs = records(&file);
    assert!(
        completed(&recs, "keypair.create")
            .iter()
            .any(|r| r["request"]["name"] == "back")
    );
}

/// The sink fails between the `received` and the `completed` record of a
/// mutating Action: the action ran, so the caller is told exactly that,
/// never a plain success (and never a refusal that invites a blind retry).
#[tokio::test]
async fn a_completed_record_that_cannot_be_written_withholds_the_success() {
    let dir = TempDir::new("audit-boundary");
    let file = dir.join("sub").join("audit.jsonl");
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let env = audited(&file, &["overlays/audit-fsync-always.yaml"]).await;
    for (surface, name) in [("v2", "held-v2"), ("v1.0", "held-v1")] {
        env.sim.clear_requests();
        env.sim.hold_compute(true);
        let call = {
            let http = env.http.clone();
            let token = env.token("web-team");
            let (url, body, header) = if surface == "v2" {
                (
                    env.url("/v2/web/os-keypairs"),
                    json!({"keypair": {"name": name}}),
                    "authorization",
                )
            } else {
                (
                    env.url("/v1.0/appkeys/WebAppKey0001/keypairs"),
                    json!({"keypair": {"name": name}}),
                    "x-auth-token",
                )
            };
            let value = if header == "authorization" {
                format!("Bearer {token}")
            } else {
                token
            };
            tokio::spawn(async move {
                let r = http
                    .post(url)
                    .header(header, value)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            })
        };
        // The upstream has the request (so its `received` record is written);
        // the sink breaks before the answer comes back.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !env.compute_requests().iter().any(|r| r.method == "POST") {
            assert!(
                std::time::Instant::now() < deadline,
                "the request never reached the upstream"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        std::fs::remove_dir_all(file.parent().unwrap()).unwrap();
        env.sim.hold_compute(false);
        let (status, body) = call.await.unwrap();
        if surface == "v2" {
            assert_eq!(status, 500, "{body}");
            let msg = common::assert_nova_error(&body, "computeFault", 500);
            assert!(msg.contains("was performed") && msg.contains(name), "{msg}");
        } else {
            assert_eq!(status, 200);
            let msg = common::assert_v1_failure(&body, 10500);
            assert!(msg.contains("was performed") && msg.contains(name), "{msg}");
        }
        // It did run upstream.
        let (s, _) = env
            .get("web-team", &format!("/v2/web/os-keypairs/{name}"))
            .await;
        assert_eq!(s, 200);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    }
    env.stop().await;
}

#[tokio::test]
async fn nothing_is_lost_across_rotation() {
    let dir = TempDir::new("audit-rotation");
    let file = dir.join("audit.jsonl");
    let env = audited(&file, &["overlays/audit-small-files.yaml"]).await;
    let n = 40;
    for i in 0..n {
        let (s, _) = env
            .post(
                "web-team",
                "/v2/web/os-keypairs",
                json!({"keypair": {"name": format!("rot-{i}")}}),
            )
            .await;
        assert_eq!(s, 200);
    }
    env.stop().await;
    let mut all = Vec::new();
    let mut files = 1;
    all.extend(records(&file));
    for i in 1..=50 {
        let rotated = PathBuf::from(format!("{}.{i}", file.display()));
        if rotated.exists() {
            files += 1;
            all.extend(records(&rotated));
        }
    }
    assert!(files > 3, "the log rotated ({files} files)");
    let mut names: Vec<String> = completed(&all, "keypair.create")
        .iter()
        .map(|r| r["request"]["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        n,
        "every completed record is present exactly once"
    );
    assert_eq!(all.iter().filter(|r| r["stage"] == "completed").count(), n);
    let out = toastgate([
        "audit",
        "verify",
        "--with-rotated",
        "--file",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "chain across rotation: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn secrets_are_redacted_from_audit_records() {
    let dir = TempDir::new("audit-redaction");
    let file = dir.join("audit.jsonl");
    let env = audited(&file, &[]).await;
    let (s, b) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "gen"}}),
        )
        .await;
    assert_eq!(s, 200);
    let private_key = b["keypair"]["private_key"].as_str().unwrap().to_string();
    let v1b = env
        .v1(
            "web-team",
            Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "gen1"}})),
        )
        .await;
    let v1_private = v1b["keypair"]["privateKey"].as_str().unwrap().to_string();
    let user_data = base64_of("#!/bin/sh\necho TOP-SECRET-USER-DATA-PAYLOAD\n");
    let (s, b) = env
        .post("web-team", "/v2/web/servers", json!({"server": {"name": "r-1", "imageRef": IMAGE_CENTOS_7_8, "flavorRef": FLAVOR_U2_C1M1, "networks": [{"uuid": NETWORK_VPC1}], "key_name": "gen", "user_data": user_data, "metadata": {"db_password": "metadata-secret-value"}}}))
        .await;
    assert_eq!(s, 202, "{b}");
    env.stop().await;
    let text = std::fs::read_to_string(&file).unwrap();
    for secret in [
        private_key.lines().nth(1).unwrap(),
        v1_private.lines().nth(1).unwrap(),
        user_data.as_str(),
        "TOP-SECRET-USER-DATA-PAYLOAD",
        "metadata-secret-value",
        common::WEB_API_PASSWORD,
    ] {
        assert!(
            !text.contains(secret),
            "`{secret}` leaked into the audit log"
        );
    }
    assert!(text.contains("\"r-1\""), "safe fields are kept");
}

fn base64_of(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// One `toastgate serve` process writing its audit log to `file`, which
/// cannot grow past `limit` bytes (`None`: no limit): writes past it fail
/// as on a full disk (EFBIG, the signal that would kill the process
/// ignored), a write across it is cut short. Creates keypairs
/// (`{prefix}-{i}`, names of one length) until one is not a success, at
/// most `max`; returns every answer as (name, status, body).
async fn create_keypairs_until_refused(
    sim: &toastgate::simulator::SimHandle,
    dir: &Path,
    limit: Option<u64>,
    prefix: &str,
    max: usize,
) -> Vec<(String, u16, Value)> {
    let file = dir.join("audit.jsonl");
    let limit_arg = limit.map(|l| l.to_string());
    let wrapper: Vec<&str> = match &limit_arg {
        None => vec![],
        Some(l) => vec![
            "sh",
            "-c",
            r#"trap "" XFSZ; exec prlimit --fsize="$0" "$@""#,
            l.as_str(),
        ],
    };
    let (_gateway, gw, admin) = common::process::serve(
        dir,
        sim,
        &["overlays/audit-fsync-always.yaml"],
        json!({"audit": {"file": {"path": file}}}),
        &wrapper,
    );
    let http = reqwest::Client::new();
    common::wait_ready(&http, &admin).await;
    let token = common::process::team_token(dir, "web-team");
    let mut answers = Vec::new();
    for i in 0..max {
        let name = format!("{prefix}-{i:02}");
        let r = http
            .post(format!("{gw}/v2/web/os-keypairs"))
            .bearer_auth(&token)
            .json(&json!({"keypair": {"name": name}}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        answers.push((name, status, r.json::<Value>().await.unwrap()));
        if status != 200 {
            break;
        }
    }
    answers
}

/// The disk fills at every point of a mutating request's two records in
/// turn (the file's size limit swept across them): a request whose
/// `received` record does not fit is refused and never performed; one whose
/// `completed` record does not fit ran, and says so (never a plain
/// success); every success has its completed record; the log is never left
/// with a torn line and its chain verifies.
#[tokio::test]
async fn a_full_disk_at_either_audit_record_never_yields_an_unrecorded_success() {
    let sim = common::start_sim(fast_sim()).await;
    // Where the records of the first and second request end, unlimited.
    let dir = TempDir::new("audit-full-measure");
    let answers = create_keypairs_until_refused(&sim, dir.path(), None, "m", 2).await;
    assert!(answers.iter().all(|a| a.1 == 200), "{answers:?}");
    let lines: Vec<usize> = std::fs::read_to_string(dir.join("audit.jsonl"))
        .unwrap()
        .lines()
        .map(|l| l.len() + 1)
        .collect();
    // Received + completed per request (a new file has no other line).
    assert_eq!(lines.len(), 4, "{lines:?}");
    let after_first: usize = lines[..2].iter().sum();
    let after_second: usize = lines.iter().sum();

    let mut refused_before = 0;
    let mut performed_unrecorded = 0;
    let steps = 12;
    for step in 0..steps {
        let limit = after_first + (after_second - after_first) * step / steps;
        let dir = TempDir::new("audit-full");
        let prefix = format!("f{step:02}");
        let answers =
            create_keypairs_until_refused(&sim, dir.path(), Some(limit as u64), &prefix, 2).await;
        let file = dir.join("audit.jsonl");
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(text.ends_with('\n'), "a torn line at {limit} bytes");
        let report = toastgate::audit::verify(&file, false).unwrap();
        assert!(report.is_intact(), "limit {limit}: {report:?}");
        let recs = records(&file);
        let kept = |name: &str| {
            sim.requests()
                .iter()
                .any(|r| r.method == "POST" && String::from_utf8_lossy(&r.body).contains(name))
        };
        for (name, status, body) in &answers {
            match status {
                200 => assert!(
                    recs.iter().any(|r| r["stage"] == "completed"
                        && r["result"].to_string().contains(name.as_str())),
                    "{name} succeeded without its completed record (limit {limit})"
                ),
                503 => {
                    common::assert_nova_error(body, "serviceUnavailable", 503);
                    assert!(!kept(name), "{name} was refused but performed");
                    refused_before += 1;
                }
                500 => {
                    let msg = common::assert_nova_error(body, "computeFault", 500);
                    assert!(
                        msg.contains("was performed") && msg.contains(name.as_str()),
                        "{msg}"
                    );
                    assert!(kept(name), "{name} said performed but was not");
                    performed_unrecorded += 1;
                }
                other => panic!("limit {limit}: {name} answered {other}: {body}"),
            }
        }
        assert_eq!(
            answers.iter().filter(|a| a.1 != 200).count(),
            1,
            "limit {limit}: the disk was full, yet: {answers:?}"
        );
    }
    // The sweep met both boundaries.
    assert!(
        refused_before > 0 && performed_unrecorded > 0,
        "refused {refused_before}, performed but unrecorded {performed_unrecorded}"
    );
    sim.shutdown();
}
