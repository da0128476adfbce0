//! One log line per request, at the level its outcome deserves: a success
//! or a caller's mistake at INFO, a failure of the gateway, identity or the
//! upstream at WARN; and no second line from the trace layer for a 5xx.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{Env, fast_sim};
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Capture {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).to_string();
        text.lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

#[tokio::test]
async fn one_line_per_request_at_the_right_level() {
    let capture = Capture::default();
    tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(capture.clone())
        .with_ansi(false)
        .init();
    let dir = std::env::temp_dir().join(format!("toastgate-logs-{}", uuid::Uuid::new_v4()));
    let file = dir.join("audit.jsonl");
    std::fs::create_dir_all(&dir).unwrap();
    let text = format!("audit:\n  file: {{ path: \"{}\" }}\n", file.display());
    let env = Env::start_with(fast_sim(), move |y| y.push_str(&text)).await;

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
    std::fs::remove_dir_all(&dir).unwrap();
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
