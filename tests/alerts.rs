//! The alert rules of helm/toastgate/files/alerts.yaml (the chart's
//! PrometheusRule and the README's alerts): valid for `promtool check
//! rules`, right under `promtool test rules` (tests/fixtures/alerts-test.yaml),
//! and seen live: a real Prometheus scraping a real gateway puts the
//! upstream-error alert into `pending` once the upstream is killed.
//!
//! Needs `promtool` and `prometheus` (Debian package `prometheus`; .ci/run
//! installs it): without them these tests fail, they never skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use common::tempdir::TempDir;
use serde_json::Value;

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str], dir: &Path) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `promtool` ({e}): install the Debian package `prometheus`; .ci/run does"
            )
        })
}

fn assert_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let rules = repo_file("helm/toastgate/files/alerts.yaml");
    let out = promtool(
        &["check", "rules", rules.to_str().unwrap()],
        &repo_file("."),
    );
    assert_ok("promtool check rules", &out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS: 6 rules found"));
    let out = promtool(
        &["test", "rules", "alerts-test.yaml"],
        &repo_file("tests/fixtures"),
    );
    assert_ok("promtool test rules", &out);
}

/// `prometheus` on a free port, scraping `target` and evaluating the rule
/// file every second; killed on drop.
struct Prometheus {
    url: String,
    child: Child,
    _dir: TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = TempDir::new("prometheus");
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n\
             \x20 - job_name: toastgate\n\
             \x20   static_configs: [{{ targets: [{target:?}] }}]\n",
            rules = repo_file("helm/toastgate/files/alerts.yaml")
                .display()
                .to_string(),
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = common::free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `prometheus` ({e}): install the Debian package `prometheus`; .ci/run does"
                )
            });
        Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    /// GET `path` of the HTTP API; its `data`.
    async fn api(&self, http: &reqwest::Client, path: &str) -> Option<Value> {
        let answer = http.get(format!("{}{path}", self.url)).send().await.ok()?;
        let body: Value = answer.json().await.ok()?;
        (body["status"] == "success").then(|| body["data"].clone())
    }

    /// Polls `check` on the API's `path` every 250 ms until it holds (up to
    /// 60 s: scrapes and evaluations are every second).
    async fn wait_for(
        &self,
        http: &reqwest::Client,
        path: &str,
        what: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let data = self.api(http, path).await;
            if let Some(data) = data.as_ref().filter(|d| check(d)) {
                return data.clone();
            }
            assert!(Instant::now() < deadline, "{what}: last answer {data:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The state of alert `name` in `/api/v1/alerts` (`None`: not active).
fn alert_state(alerts: &Value, name: &str) -> Option<String> {
    alerts["alerts"]
        .as_array()?
        .iter()
        .find(|a| a["labels"]["alertname"] == name)
        .map(|a| a["state"].as_str().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_prometheus_raises_the_upstream_alert_when_the_upstream_dies() {
    let env = Env::start().await;
    let prometheus = Prometheus::start(env.admin.trim_start_matches("http://"));
    let http = reqwest::Client::new();

    // Healthy traffic, scraped: the rule is loaded, the alert inactive.
    for _ in 0..3 {
        assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    }
    prometheus
        .wait_for(
            &http,
            "/api/v1/query?query=toastgate_upstream_outcomes_total%7Bclass%3D%222xx%22%7D%3E%3D3",
            "Prometheus never scraped the gateway's 2xx calls",
            |d| d["result"].as_array().is_some_and(|r| !r.is_empty()),
        )
        .await;
    let rules = prometheus
        .wait_for(&http, "/api/v1/rules", "the rule file never loaded", |d| {
            d["groups"].as_array().is_some_and(|g| !g.is_empty())
        })
        .await;
    assert!(
        rules.to_string().contains("ToastgateUpstreamErrors"),
        "{rules}"
    );
    let alerts = prometheus
        .api(&http, "/api/v1/alerts")
        .await
        .expect("alerts");
    assert_eq!(
        alert_state(&alerts, "ToastgateUpstreamErrors"),
        None,
        "{alerts}"
    );

    // The upstream dies: calls fail without any answer (no 5xx is ever
    // received), and the alert's expression becomes true. `for: 10m` keeps
    // it pending, which is the rule evaluating true.
    env.sim.stop().await;
    let mut failed = 0;
    while failed < 10 {
        let (status, body) = env.get("web-team", "/v2/web/flavors").await;
        assert!(status == 502 || status == 503, "{status} {body}");
        failed += 1;
    }
    let alerts = prometheus
        .wait_for(
            &http,
            "/api/v1/alerts",
            "ToastgateUpstreamErrors never became pending",
            |d| alert_state(d, "ToastgateUpstreamErrors").is_some(),
        )
        .await;
    assert_eq!(
        alert_state(&alerts, "ToastgateUpstreamErrors").as_deref(),
        Some("pending"),
        "{alerts}"
    );
    let ratio = prometheus
        .api(
            &http,
            "/api/v1/query?query=sum(rate(toastgate_upstream_outcomes_total%7Bclass%3D~%225xx%7Ctimeout%7Cunreachable%7Cbody%22%7D%5B5m%5D))%2Fsum(rate(toastgate_upstream_outcomes_total%5B5m%5D))",
        )
        .await
        .expect("query");
    let value: f64 = ratio["result"][0]["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("a ratio");
    assert!(value > 0.05, "{ratio}");
    env.stop().await;
}
