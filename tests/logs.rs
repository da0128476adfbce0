//! One log line per request, at the level its outcome deserves: a success
//! or a caller's mistake at INFO, a failure of the gateway, identity or the
//! upstream at WARN, with what went wrong; and no second line from the trace
//! layer for a 5xx.

mod common;

use common::logs::Capture;
use common::tempdir::TempDir;
use common::{Env, fast_sim};
use serde_json::json;

#[tokio::test]
async fn one_line_per_request_at_the_right_level() {
    let capture = Capture::install_logs("info");
    let dir = TempDir::new("logs");
    let file = dir.join("audit.jsonl");
    let env =
        Env::start_with_overlays(fast_sim(), &[], json!({"audit": {"file": {"path": file}}})).await;

    let request_id =
        |resp: &reqwest::Response| resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let ok = env
        .http
        .get(env.url("/v2/web/flavors"))
        .bearer_auth(env.token("web-team"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
    let ok_id = request_id(&ok);

    // The audit sink cannot write: a fail-closed 503, many times over.
    std::fs::remove_dir_all(dir.path()).unwrap();
    let mut failed_ids = Vec::new();
    for i in 0..5 {
        let r = env
            .http
            .post(env.url("/v2/web/os-keypairs"))
            .bearer_auth(env.token("web-team"))
            .json(&json!({"keypair": {"name": format!("k{i}")}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 503);
        failed_ids.push(request_id(&r));
    }
    env.stop().await;

    let lines = capture.lines_with(&ok_id);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].contains(" INFO ") && lines[0].contains("status=200"),
        "{}",
        lines[0]
    );
    for id in &failed_ids {
        let lines = capture.lines_with(id);
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(
            lines[0].contains(" WARN ") && lines[0].contains("reason=\"audit_unavailable\"")
                || lines[0].contains(" WARN ") && lines[0].contains("reason=audit_unavailable"),
            "{}",
            lines[0]
        );
        // The operator reads what went wrong on the same line.
        assert!(
            lines[0].contains("error=\"the audit log cannot record this action"),
            "{}",
            lines[0]
        );
    }
    assert!(
        capture.lines_with("response failed").is_empty(),
        "the trace layer logged a 5xx of its own"
    );
    // The sink's outage is said once, not once per request.
    assert_eq!(
        capture.lines_with("audit: records cannot be written").len(),
        1
    );
}

/// `toastgate serve` with its text log going to a file (not a terminal):
/// no colour escape codes, and one line saying it is up and where.
#[tokio::test]
async fn a_log_written_to_a_file_has_no_colour_and_one_ready_line() {
    let sim = common::start_sim(fast_sim()).await;
    let dir = TempDir::new("ready-line");
    let (_gateway, gw, admin) =
        common::process::serve_logged(dir.path(), &sim, &[], json!({}), "info");
    let http = reqwest::Client::new();
    common::wait_ready(&http, &admin).await;
    let token = common::process::team_token(dir.path(), "web-team");
    let status = http
        .get(format!("{gw}/v2/web/flavors"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answered")
        .status();
    assert_eq!(status, 200);

    let log = std::fs::read_to_string(dir.join("toastgate.log")).unwrap();
    assert!(!log.contains('\x1b'), "escape codes in a file:\n{log}");
    let ready: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("toastgate ready: serving"))
        .collect();
    assert_eq!(ready.len(), 1, "{log}");
    for expected in [
        format!("public={}", gw.trim_start_matches("http://")),
        format!("admin={}", admin.trim_start_matches("http://")),
        "tls=false".to_string(),
    ] {
        assert!(ready[0].contains(&expected), "{expected} in {}", ready[0]);
    }
    // The request's own line came after it, in the stock text format's
    // shape (written by `logs::FastText`, whose unit tests compare it with
    // the stock format byte for byte).
    let request: Vec<&str> = log.lines().filter(|l| l.contains("flavor.list")).collect();
    assert_eq!(request.len(), 1, "{log}");
    let (timestamp, rest) = request[0].split_once(' ').unwrap();
    assert!(
        timestamp.len() == 27 && timestamp.ends_with('Z') && timestamp.as_bytes()[10] == b'T',
        "{}",
        request[0]
    );
    assert!(
        rest.starts_with(" INFO toastgate::exchange: request request_id="),
        "{}",
        request[0]
    );
    let expected = r#" surface="v2" team="web-team" action="flavor.list" project="web" status=200 upstream_status=200 outcome="ok" reason="-" error="-" latency_ms="#;
    assert!(rest.contains(expected), "{expected} in {}", request[0]);
    sim.shutdown();
}

#[tokio::test]
async fn json_lines_are_one_object_each_with_every_documented_field() {
    let sim = common::start_sim(fast_sim()).await;
    let dir = TempDir::new("json-lines");
    let (_gateway, gw, admin) =
        common::process::serve_logged_json(dir.path(), &sim, json!({}), "info");
    let http = reqwest::Client::new();
    common::wait_ready(&http, &admin).await;
    let token = common::process::team_token(dir.path(), "web-team");
    for path in ["/v2/web/flavors", "/v2/web/no-such-route"] {
        http.get(format!("{gw}{path}"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("answered");
    }

    let log = std::fs::read_to_string(dir.join("toastgate.log")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let requests: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["message"] == "request").collect();
    assert_eq!(requests.len(), 2, "{log}");
    for line in &requests {
        for field in [
            "timestamp",
            "level",
            "request_id",
            "surface",
            "team",
            "action",
            "project",
            "status",
            "upstream_status",
            "outcome",
            "reason",
            "error",
            "latency_ms",
            "target",
        ] {
            assert!(!line[field].is_null(), "{field} in {line}");
        }
        assert_eq!(line["target"], "toastgate::exchange");
        assert!(line["latency_ms"].is_f64(), "{line}");
    }
    assert_eq!(requests[0]["level"], "INFO");
    assert_eq!(requests[0]["status"], 200);
    assert_eq!(requests[0]["action"], "flavor.list");
    assert_eq!(requests[1]["status"], 404, "{}", requests[1]);
    let ready = |l: &serde_json::Value| {
        l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("toastgate ready: serving"))
    };
    assert!(lines.iter().any(ready), "{log}");
    sim.shutdown();
}
