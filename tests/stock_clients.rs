//! A stock OpenStack client against the gateway, as the README tells a team
//! to configure one: openstacksdk with the gateway as its compute endpoint
//! and the team JWT as its token, through version discovery, flavors (the
//! SDK's `is_public=None` included), key pairs, a server's whole life,
//! volume attachments, a policy refusal, and the appkey-credentialed
//! project. (Needs python3 with openstacksdk: .ci/run installs it.)

mod common;

use std::time::Duration;

use common::Env;
use serde_json::{Value, json};
use toastgate::simulator::{FLAVOR_T2_C1M1, IMAGE_UBUNTU_20_04, NETWORK_VPC1, WEB_VOLUMES};

const SCENARIO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/clients/openstacksdk_scenario.py"
);

async fn run_scenario(env: &Env) -> Value {
    let run = tokio::process::Command::new("python3")
        .arg(SCENARIO)
        .args([
            env.gw.as_str(),
            &env.token("platform"),
            &env.token("readers"),
            IMAGE_UBUNTU_20_04,
            FLAVOR_T2_C1M1,
            NETWORK_VPC1,
            WEB_VOLUMES[0],
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .expect("the openstacksdk scenario ends within 180 s")
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scenario failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}): {stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openstacksdk_works_unmodified_through_the_gateway() {
    let env = Env::start_with_overlays(
        common::fast_sim(),
        &["overlays/readers-team.yaml"],
        json!({}),
    )
    .await;
    common::wait_ready(&env.http, &env.admin).await;
    let steps = run_scenario(&env).await;
    let ok = |name: &str| -> &Value {
        let step = &steps[name];
        assert!(step.get("ok").is_some(), "{name}: {step}");
        &step["ok"]
    };

    assert!(
        ok("flavors")
            .as_array()
            .unwrap()
            .contains(&json!("t2.c1m1")),
        "{steps}"
    );
    assert!(ok("flavors_brief").as_u64().unwrap() > 0);
    assert_eq!(ok("flavor_by_name"), FLAVOR_T2_C1M1);
    assert_eq!(ok("flavor_get"), "t2.c1m1");
    // The flavor's own link points at the gateway, and is served there.
    assert_eq!(
        ok("flavor_link"),
        &json!([format!("{}/v2/web/flavors/{FLAVOR_T2_C1M1}", env.gw)])
    );
    assert_eq!(ok("zones"), &json!(["kr-pub-a", "kr-pub-b"]));
    assert_eq!(ok("keypair_create"), true);
    assert_eq!(ok("keypair_get"), "sdk-key");

    assert_eq!(ok("server_active"), "ACTIVE");
    assert_eq!(ok("server_by_name"), true);
    assert_eq!(ok("server_listed"), &json!(["sdk-vm"]));
    assert_eq!(ok("server_addresses"), &json!(["vpc1"]));
    assert_eq!(ok("stop"), "SHUTOFF");
    assert_eq!(ok("start"), "ACTIVE");
    assert_eq!(ok("reboot"), "ACTIVE");
    assert_eq!(ok("rename"), "sdk-vm-2");
    assert_eq!(ok("attach"), WEB_VOLUMES[0]);
    assert!(
        ok("attachments")
            .as_array()
            .unwrap()
            .contains(&json!(WEB_VOLUMES[0])),
        "{steps}"
    );
    ok("detach");

    assert_eq!(ok("readers_list"), 1);
    // The SDK raises the gateway's refusal with its Nova-style message.
    let refused = &steps["readers_delete"];
    assert_eq!(refused["error"], "ForbiddenException", "{refused}");
    assert_eq!(refused["status"], 403, "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("readers") && message.contains("instance.delete"),
        "{message}"
    );

    ok("delete");
    ok("deleted");
    assert_eq!(ok("gone"), true);
    ok("keypair_delete");
    assert!(ok("batch_flavors").as_u64().unwrap() > 0);
    assert_eq!(ok("batch_servers"), 0);

    // The SDK's `is_public=None` was judged and left out: the upstream saw
    // no query it did not define.
    let flavor_lists: Vec<_> = env
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.contains("/flavors"))
        .collect();
    assert!(!flavor_lists.is_empty());
    for r in &flavor_lists {
        assert!(
            r.query.as_deref().is_none_or(|q| !q.contains("is_public")),
            "{} {}?{:?}",
            r.method,
            r.path,
            r.query
        );
    }
}
