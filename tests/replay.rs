//! `toastgate replay`: a new config judged against the audit log a real
//! gateway wrote. The exit status gates a config change in CI: 1 when any
//! request would newly be refused.

mod common;

use std::path::Path;
use std::process::Output;

use common::fixtures;
use common::process::toastgate;
use common::tempdir::TempDir;
use common::{Env, fast_sim};
use serde_json::{Value, json};

/// The fixture config with `extra` merged, written to `dir/name` (for the
/// replay: its upstream URLs and secrets are never used).
fn config_file(dir: &TempDir, name: &str, extra: Value) -> String {
    let config = fixtures::gateway_config("http://127.0.0.1:9", &[], extra);
    let path = dir.join(name);
    std::fs::write(&path, fixtures::to_text(&config)).unwrap();
    path.display().to_string()
}

fn replay(config: &str, log: &Path) -> (i32, String) {
    let out: Output = toastgate(["replay", "--config", config, log.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test]
async fn a_config_change_is_judged_against_last_weeks_traffic() {
    let dir = TempDir::new("replay");
    let log = dir.join("audit.jsonl");
    let env =
        Env::start_with_overlays(fast_sim(), &[], json!({"audit": {"file": {"path": log}}})).await;
    for i in 0..3 {
        let (s, _) = env.create_keypair("web-team", &format!("kp-{i}")).await;
        assert_eq!(s, 200);
    }
    // Refused then: web-team may not use the batch project.
    let (s, _) = env
        .post(
            "web-team",
            "/v2/batch/os-keypairs",
            json!({"keypair": {"name": "other"}}),
        )
        .await;
    assert_eq!(s, 403);
    // A v1.0 create: the same Action, judged the same.
    let b = env
        .v1(
            "web-team",
            reqwest::Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "b1"}})),
        )
        .await;
    assert_eq!(b["header"]["isSuccessful"], true, "{b}");
    env.stop().await;

    // The same rules: nothing changes, exit 0.
    let same = config_file(&dir, "same.yaml", json!({}));
    let (code, text) = replay(&same, &log);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("compared 5 request(s); 0 newly refused, 0 newly allowed"),
        "{text}"
    );

    // web-team loses keypair.create: its four creates would be refused.
    let narrower = config_file(
        &dir,
        "narrower.yaml",
        json!({"teams": {"web-team": {"allow": [{"actions": ["read", "instance.*"]}]}}}),
    );
    let (code, text) = replay(&narrower, &log);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("4 newly refused, 0 newly allowed"), "{text}");
    assert!(
        text.contains("team web-team, keypair.create: 4 allowed -> refused"),
        "{text}"
    );
    assert!(text.contains("now policy:action"), "{text}");
    assert!(text.contains("... and 1 more"), "3 examples shown: {text}");

    // A rate limit replayed on the recorded times: 2 an hour lets 2 of 4 pass.
    let limited = config_file(
        &dir,
        "limited.yaml",
        json!({"teams": {"web-team": {"rate_limits": [
            {"name": "creates", "actions": ["keypair.create"], "rate": "2/h", "burst": 2}
        ]}}}),
    );
    let (code, text) = replay(&limited, &log);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("team web-team, keypair.create: 2 allowed -> refused"),
        "{text}"
    );
    assert!(text.contains("now rate_limit:creates"), "{text}");

    // web-team gets the batch project: the refusal would now pass, exit 0.
    let wider = config_file(
        &dir,
        "wider.yaml",
        json!({"teams": {"web-team": {"projects": ["web", "batch"]}}}),
    );
    let (code, text) = replay(&wider, &log);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("0 newly refused, 1 newly allowed"), "{text}");
    assert!(
        text.contains("team web-team, keypair.create: 1 refused -> allowed"),
        "{text}"
    );
    assert!(text.contains("was policy:project"), "{text}");

    // A log that is not an audit log: exit 2, naming the line.
    let junk = dir.join("junk.jsonl");
    std::fs::write(&junk, "not json\n").unwrap();
    let (code, text) = replay(&same, &junk);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("junk.jsonl:1"), "{text}");
}
