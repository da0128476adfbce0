//! The simulator's flavors and availability zones against the v2 spec.

mod common;

use common::fast_sim;
use common::sim::{WEB, fault_message, with_web_token};
use serde_json::json;
use toastgate::simulator;

#[tokio::test]
async fn flavors_match_the_spec_and_filter_and_paginate() {
    let (sim, t) = with_web_token(fast_sim()).await;
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
    let (sim, t) = with_web_token(fast_sim()).await;
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
