//! Allowlists and constraints through both surfaces: the same Action gets
//! the same decision on v1.0 and v2, refusals name team, Action and reason,
//! and nothing refused reaches the upstream.

mod common;

use common::{Env, assert_nova_error, fast_sim};
use reqwest::Method;
use serde_json::json;
use toastgate::simulator::{FLAVOR_R2_C2M4, FLAVOR_U2_C1M1, IMAGE_CENTOS_7_8, NETWORK_VPC1};

async fn env() -> Env {
    Env::start_with_overlays(
        fast_sim(),
        &[
            "overlays/readers-team.yaml",
            "overlays/builders-team.yaml",
            "overlays/builders-one-flavor.yaml",
        ],
        json!({}),
    )
    .await
}

#[tokio::test]
async fn a_read_only_team_reads_but_cannot_act_on_either_surface() {
    let env = env().await;
    let id = env.web_u2_server("platform", "k", "bld-0").await;
    env.sim.clear_requests();

    assert_eq!(env.get("readers", "/v2/web/servers/detail").await.0, 200);
    let b = env
        .v1("readers", Method::GET, "/instances-detail", None)
        .await;
    assert_eq!(b["header"]["isSuccessful"], true);

    let (s, b) = env
        .post(
            "readers",
            &format!("/v2/web/servers/{id}/action"),
            json!({"reboot": {"type": "SOFT"}}),
        )
        .await;
    assert_eq!(s, 403);
    let v2_msg = assert_nova_error(&b, "forbidden", 403);
    assert_eq!(
        v2_msg,
        "team `readers` may not do `instance.reboot` on project `web`: no allow rule covers it"
    );

    let b = env
        .v1(
            "readers",
            Method::POST,
            &format!("/instances/{id}/action"),
            Some(json!({"action": "reboot", "parameters": {"type": "SOFT"}})),
        )
        .await;
    assert_eq!(b["header"]["isSuccessful"], false);
    assert_eq!(b["header"]["resultCode"], -3);
    assert_eq!(
        b["header"]["resultMessage"],
        v2_msg.as_str(),
        "same decision, same words"
    );

    let b = env
        .v1(
            "readers",
            Method::DELETE,
            &format!("/instances?id={id}"),
            None,
        )
        .await;
    assert_eq!(b["header"]["resultCode"], -3);
    let (s, _) = env
        .call(
            "readers",
            Method::DELETE,
            &format!("/v2/web/servers/{id}"),
            None,
        )
        .await;
    assert_eq!(s, 403);

    let mutating: Vec<_> = env
        .compute_requests()
        .into_iter()
        .filter(|r| r.method != "GET")
        .collect();
    assert!(
        mutating.is_empty(),
        "a refused action reached the upstream: {mutating:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn constraints_hold_on_both_surfaces() {
    let env = env().await;
    env.web_keypair("builders", "bk").await;
    env.sim.clear_requests();
    let v2_create = |flavor: &str, count: i64, name: &str| {
        json!({"server": {"name": name, "imageRef": IMAGE_CENTOS_7_8, "flavorRef": flavor,
                          "networks": [{"uuid": NETWORK_VPC1}], "key_name": "bk", "min_count": count, "max_count": count}})
    };
    let v1_create = |flavor: &str, count: i64, name: &str| {
        json!({"instance": {"name": name, "image": IMAGE_CENTOS_7_8, "flavor": flavor,
                            "networks": [{"id": NETWORK_VPC1}], "keyName": "bk", "count": count}})
    };
    let refused: &[(&str, i64, &str, &str)] = &[
        (
            FLAVOR_R2_C2M4,
            1,
            "bld-1",
            "is not among the team's allowed flavors",
        ),
        (
            FLAVOR_U2_C1M1,
            3,
            "bld-1",
            "count 3 exceeds the team's maximum of 2",
        ),
        (FLAVOR_U2_C1M1, 1, "web-1", "must start with `bld-`"),
    ];
    for (flavor, count, name, why) in refused {
        let (s, b) = env
            .post(
                "builders",
                "/v2/web/servers",
                v2_create(flavor, *count, name),
            )
            .await;
        assert_eq!(s, 403, "{b}");
        assert!(assert_nova_error(&b, "forbidden", 403).contains(why));
        let b = env
            .v1(
                "builders",
                Method::POST,
                "/instances",
                Some(v1_create(flavor, *count, name)),
            )
            .await;
        assert_eq!(b["header"]["resultCode"], -3, "{b}");
        assert!(
            b["header"]["resultMessage"].as_str().unwrap().contains(why),
            "{b}"
        );
    }
    assert!(
        env.compute_requests().is_empty(),
        "a refused create reached the upstream"
    );

    let (s, b) = env
        .post(
            "builders",
            "/v2/web/servers",
            v2_create(FLAVOR_U2_C1M1, 2, "bld-ok"),
        )
        .await;
    assert_eq!(s, 202, "{b}");
    let b = env
        .v1(
            "builders",
            Method::POST,
            "/instances",
            Some(v1_create(FLAVOR_U2_C1M1, 1, "bld-ok1")),
        )
        .await;
    assert_eq!(b["header"]["isSuccessful"], true, "{b}");
    env.stop().await;
}

#[tokio::test]
async fn a_team_without_allow_rules_may_do_nothing() {
    let env = Env::start_with_overlays(fast_sim(), &["overlays/idle-team.yaml"], json!({})).await;
    let (s, b) = env.get("idle", "/v2/web/flavors").await;
    assert_eq!(s, 403);
    assert!(
        assert_nova_error(&b, "forbidden", 403).contains("team `idle` may not do `flavor.list`")
    );
    env.stop().await;
}

/// The upstream decodes `%64` to `d` before it routes: the gateway judges
/// the route the upstream will run, however its words are spelled, and
/// sends the plain spelling it judged.
#[tokio::test]
async fn a_percent_encoded_route_word_is_judged_as_the_route_it_spells() {
    let env = Env::start_with_overlays(
        fast_sim(),
        &[],
        json!({"teams": {"one-server": {
            "projects": ["web"],
            "allow": [{"actions": ["instance.get"]}]
        }}}),
    )
    .await;
    let id = env.web_u2_server("platform", "k", "enc-0").await;
    env.sim.clear_requests();

    let (s, b) = env.get("one-server", "/v2/web/servers/%64etail").await;
    assert_eq!(s, 403, "{b}");
    let msg = assert_nova_error(&b, "forbidden", 403);
    assert!(msg.contains("`instance.list_detail`"), "{msg}");
    assert!(
        env.compute_requests().is_empty(),
        "a refused listing reached the upstream: {:?}",
        env.compute_requests()
    );

    // What the team may do still works, escapes or not, and goes upstream
    // spelled plainly.
    let (s, b) = env
        .get("one-server", &format!("/v2/web/%73ervers/{id}"))
        .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["server"]["id"], id.as_str());
    let paths: Vec<String> = env.compute_requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        [format!("/v2/6cdebe3eb0094910bc41f1d42ebe4cb7/servers/{id}")]
    );

    // A team allowed to list gets the listing the escapes spell.
    let (s, b) = env.get("platform", "/v2/web/servers/%64etail").await;
    assert_eq!(s, 200, "{b}");
    assert!(b["servers"][0]["status"].is_string(), "{b}");
    env.stop().await;
}
