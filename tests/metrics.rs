//! /metrics on the admin listener: valid for promtool, the documented
//! families present, labels bounded under many distinct ids.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Env;
use reqwest::Method;
use serde_json::json;

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `promtool` ({e}): install the Debian package `prometheus`; .ci/run does"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every series (name + labels) in an exposition, values dropped.
fn series(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            l.rsplit_once(' ')
                .map(|(s, _)| s.to_string())
                .unwrap_or_default()
        })
        .collect()
}

#[tokio::test]
async fn metrics_pass_promtool_and_cover_the_documented_families() {
    let env = Env::start().await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    assert_eq!(env.get("batch-team", "/v2/web/flavors").await.0, 403);
    let (s, _, _) = env
        .raw(
            Method::GET,
            "/v2/web/flavors",
            &[("X-Auth-Token", "nope")],
            Vec::new(),
        )
        .await;
    assert_eq!(s, 401);
    assert_eq!(
        env.post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "m"}})
        )
        .await
        .0,
        200
    );

    let resp = env
        .http
        .get(format!("{}/metrics", env.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = resp.text().await.unwrap();
    promtool_check(&text);
    for expected in [
        r#"toastgate_requests_total{action="flavor.list",outcome="ok",status_class="2xx",surface="v2",team="web-team"} 1"#,
        r#"toastgate_requests_total{action="flavor.list",outcome="policy_refused",status_class="4xx",surface="v2",team="batch-team"} 1"#,
        r#"toastgate_requests_total{action="flavor.list",outcome="auth_refused",status_class="4xx",surface="v2",team="none"} 1"#,
        r#"toastgate_policy_refusals_total{reason="project",team="batch-team"} 1"#,
        r#"toastgate_auth_failures_total{reason="malformed"} 1"#,
        r#"toastgate_upstream_responses_total{action="keypair.create",status="200"} 1"#,
        r#"toastgate_token_refreshes_total{project="web",result="success"}"#,
        r#"toastgate_token_expiry_timestamp_seconds{project="web"}"#,
        r#"toastgate_in_flight_requests{surface="v2"} 0"#,
        r#"toastgate_audit_records_total{result="written"}"#,
        r#"toastgate_config_reloads_total{result="success"}"#,
        "toastgate_build_info{commit=",
        "toastgate_request_duration_seconds_bucket",
        r#"toastgate_request_duration_seconds_bucket{action="flavor.list",surface="v2",le="0.0001"}"#,
        r#"toastgate_gateway_overhead_seconds_bucket{surface="v2",le="0.00005"}"#,
        r#"toastgate_gateway_overhead_seconds_count{surface="v2"} 4"#,
        // Series alerts use, there before their first event.
        r#"toastgate_token_refreshes_total{project="batch",result="failure"} 0"#,
        r#"toastgate_ratelimit_degraded_total{mode="fail_closed"} 0"#,
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_cpu_seconds_total ",
        "toastgate_upstream_request_duration_seconds_bucket",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in\n{text}");
    }
    assert!(!text.contains(common::WEB_API_PASSWORD));
    env.stop().await;
}

#[tokio::test]
async fn label_cardinality_stays_fixed_under_ten_thousand_distinct_instance_ids() {
    let env = Env::start().await;
    let token = env.token("web-team");
    // Warm up every series these requests can create, on both surfaces.
    for _ in 0..3 {
        let (s, _) = env
            .get(
                "web-team",
                &format!("/v2/web/servers/{}", uuid::Uuid::new_v4()),
            )
            .await;
        assert_eq!(s, 404);
        let b = env
            .v1(
                "web-team",
                Method::GET,
                &format!("/instances?id={}", uuid::Uuid::new_v4()),
                None,
            )
            .await;
        assert_eq!(b["header"]["resultCode"], 10404);
    }
    // ... and the series a JWT naming a team that is not configured creates.
    let stranger = |n: usize| {
        let token = toastgate::auth::mint_token(
            &env.config.auth,
            &format!("team-{n}"),
            "x",
            std::time::Duration::from_secs(60),
        )
        .unwrap();
        let auth = format!("Bearer {token}");
        let env = &env;
        async move {
            env.raw(
                Method::GET,
                "/v2/web/flavors",
                &[("authorization", &auth)],
                Vec::new(),
            )
            .await
            .0
        }
    };
    assert_eq!(stranger(0).await, 403);
    let before = series(&env.metrics().await);
    for n in 1..200 {
        assert_eq!(stranger(n).await, 403);
    }
    // The v1.0 surface: ids in queries never become labels either.
    for i in 0..500 {
        let b = env
            .v1(
                "web-team",
                Method::GET,
                &format!("/instances?id=v1-{i}-{}", uuid::Uuid::new_v4()),
                None,
            )
            .await;
        assert_eq!(b["header"]["resultCode"], 10404);
    }
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let http = env.http.clone();
        let base = env.url("/v2/web/servers/");
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..625 {
                let id = format!("{worker:02}{i:04}-{}", uuid::Uuid::new_v4());
                let s = http
                    .get(format!("{base}{id}"))
                    .bearer_auth(&token)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(s.as_u16(), 404);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = env.metrics().await;
    let after = series(&text);
    assert_eq!(
        before,
        after,
        "new series appeared: {:?}",
        after.difference(&before).collect::<Vec<_>>()
    );
    assert!(text.contains(r#"toastgate_requests_total{action="instance.get",outcome="upstream_rejected",status_class="4xx",surface="v2",team="web-team"} 10003"#));
    assert!(text.contains(r#"toastgate_requests_total{action="flavor.list",outcome="policy_refused",status_class="4xx",surface="v2",team="unknown"} 200"#), "{text}");
    assert!(
        text.contains(r#"toastgate_requests_total{action="instance.get",outcome="upstream_rejected",status_class="2xx",surface="v1.0",team="web-team"} 503"#),
        "{text}"
    );
    assert!(
        !text.contains("team-1"),
        "a team name from a JWT became a label"
    );
    promtool_check(&text);
    env.stop().await;
}

/// The gateway's own time (`toastgate_gateway_overhead_seconds`) leaves out
/// the upstream's, on both surfaces: a request held upstream for at least
/// 300 ms has at least that much less overhead than duration.
#[tokio::test]
async fn overhead_excludes_time_spent_waiting_for_the_upstream() {
    let env = Env::start().await;
    for (surface, path) in [
        ("v2", "/v2/web/flavors"),
        ("v1.0", "/v1.0/appkeys/WebAppKey0001/instances"),
    ] {
        env.sim.clear_requests();
        env.sim.hold_compute(true);
        let call = {
            let token = env.token("web-team");
            let http = env.http.clone();
            let url = format!("{}{path}", env.gw);
            tokio::spawn(async move {
                http.get(url)
                    .bearer_auth(token)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while env.compute_requests().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{surface}: never reached the upstream"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.sim.hold_compute(false);
        assert_eq!(call.await.unwrap().unwrap(), 200, "{surface}");

        let text = env.metrics().await;
        let (duration, overhead) = common::metrics::duration_and_overhead(&text, surface);
        assert!(
            duration - overhead >= 0.3,
            "{surface}: duration {duration} s, overhead {overhead} s:\n{text}"
        );
    }
    env.stop().await;
}
