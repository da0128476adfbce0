//! Stock OpenStack clients against the gateway, as the README tells a team
//! to configure one: the gateway as the compute endpoint and the team JWT
//! as the token. openstacksdk through version discovery, flavors (the SDK's
//! `is_public=None` included), key pairs, a server's whole life, volume
//! attachments, a policy refusal, and the appkey-credentialed project;
//! novaclient finding a flavor by id and by name (as `nova boot` does) and
//! a server's life. (Needs python3 with openstacksdk and python-novaclient:
//! .ci/run installs them.)

mod common;

use std::time::Duration;

use common::Env;
use serde_json::{Value, json};
use toastgate::simulator::{FLAVOR_T2_C1M1, IMAGE_UBUNTU_20_04, NETWORK_VPC1, WEB_VOLUMES};

/// Runs `tests/clients/{script}` with `args`; what it printed.
async fn run_scenario(script: &str, args: &[&str]) -> Value {
    let path = format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR"));
    let run = tokio::process::Command::new("python3")
        .arg(path)
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .unwrap_or_else(|_| panic!("{script} ends within 180 s"))
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scenario failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("scenario printed no JSON ({e}): {stderr}"))
}

/// What step `name` of a scenario returned; fails the test if it raised.
fn succeeded<'a>(steps: &'a Value, name: &str) -> &'a Value {
    let step = &steps[name];
    assert!(step.get("ok").is_some(), "{name}: {step}");
    &step["ok"]
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
    let steps = run_scenario(
        "openstacksdk_scenario.py",
        &[
            env.gw.as_str(),
            &env.token("platform"),
            &env.token("readers"),
            IMAGE_UBUNTU_20_04,
            FLAVOR_T2_C1M1,
            NETWORK_VPC1,
            WEB_VOLUMES[0],
        ],
    )
    .await;
    let ok = |name: &str| succeeded(&steps, name);

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
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn novaclient_works_unmodified_through_the_gateway() {
    let env = Env::start().await;
    common::wait_ready(&env.http, &env.admin).await;
    let steps = run_scenario(
        "novaclient_scenario.py",
        &[
            env.gw.as_str(),
            &env.token("platform"),
            IMAGE_UBUNTU_20_04,
            FLAVOR_T2_C1M1,
            NETWORK_VPC1,
        ],
    )
    .await;
    let ok = |name: &str| succeeded(&steps, name);
    assert_eq!(ok("flavor_by_id"), "t2.c1m1");
    assert_eq!(ok("flavor_by_name"), FLAVOR_T2_C1M1);
    assert!(ok("flavors_all").as_u64().unwrap() > 0);
    assert_eq!(ok("keypair"), "nova-key");
    assert_eq!(ok("active"), "ACTIVE");
    assert_eq!(ok("listed"), &json!(["nova-vm"]));
    assert_eq!(ok("found"), true);
    assert_eq!(ok("zones"), &json!(["kr-pub-a", "kr-pub-b"]));
    ok("delete");
    ok("keypair_delete");
    // Each of the client's requests went to a route of the catalog: the
    // flavor was read by id, and the upstream saw no `is_public`.
    let seen = env.sim.requests();
    assert!(
        seen.iter()
            .any(|r| r.method == "GET" && r.path.ends_with(&format!("/flavors/{FLAVOR_T2_C1M1}"))),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|r| r.query.as_deref().is_none_or(|q| !q.contains("is_public"))),
        "{seen:?}"
    );
    env.stop().await;
}
