//! The config fixtures the other tests start from (tests/fixtures): the
//! merge they rely on, and every overlay a mapping the base can take.

mod common;

use common::fixtures::{self, fixture_path, gateway_config, merge};
use serde_json::json;

#[test]
fn overlays_merge_maps_replace_lists_and_scalars_and_null_removes_a_key() {
    let mut base = json!({
        "auth": {"algorithms": ["HS256"], "keys": {"type": "hs_secret", "secret_env": "A"}},
        "server": {"request_timeout": "10s"},
    });
    merge(
        &mut base,
        json!({
            "auth": {"algorithms": ["HS256", "RS256"], "keys": {"secret_env": null, "secret_file": "k"}},
            "server": {"request_timeout": "1s", "drain_delay": "1s"},
            "audit": {"file": {"path": "/tmp/a"}},
        }),
    );
    assert_eq!(
        base,
        json!({
            "auth": {"algorithms": ["HS256", "RS256"], "keys": {"type": "hs_secret", "secret_file": "k"}},
            "server": {"request_timeout": "1s", "drain_delay": "1s"},
            "audit": {"file": {"path": "/tmp/a"}},
        })
    );
}

#[test]
fn the_base_config_is_valid_and_every_overlay_is_a_mapping() {
    let config = gateway_config("http://127.0.0.1:9", &[], json!({}));
    assert_eq!(config["upstream"]["compute_url"], "http://127.0.0.1:9");
    fixtures::parse_config(&[], json!({}), &common::secrets()).expect("the base config is valid");
    let mut overlays = 0;
    for entry in std::fs::read_dir(fixture_path("overlays")).unwrap() {
        let path = entry.unwrap().path();
        let value = fixtures::load(&path);
        assert!(
            value.as_object().is_some_and(|m| !m.is_empty()),
            "{} is not a non-empty mapping",
            path.display()
        );
        overlays += 1;
    }
    assert!(overlays > 0);
}
