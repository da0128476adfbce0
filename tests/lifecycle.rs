//! Running it for real: config reload (file change, SIGHUP) with no failed
//! request, a broken reload refused, SIGTERM draining slow in-flight
//! requests without losing an audit record, one outlasting the shutdown grace
//! cut, HTTP/1.1 and HTTP/2 clients told promptly that their connection
//! ends.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::process::KillOnDrop;
use common::tempdir::TempDir;
use common::{
    ReloadingGateway, fast_sim, fixtures, h2_handshake, metrics, secrets, start_sim, wait_ready,
};
use serde_json::{Value, json};
use toastgate::simulator::SimHandle;

/// batch-team limited to reads.
const BATCH_READ_ONLY: &str = "overlays/batch-team-read-only.yaml";

/// The test config text for `sim` with `overlays`.
fn config_text(sim: &SimHandle, overlays: &[&str]) -> String {
    fixtures::to_text(&fixtures::gateway_config(
        &sim.base_url(),
        overlays,
        json!({}),
    ))
}

async fn keypair(http: &reqwest::Client, gw: &str, token: &str, project: &str, name: &str) -> u16 {
    http.post(format!("{gw}/v2/{project}/os-keypairs"))
        .bearer_auth(token)
        .json(&json!({"keypair": {"name": name}}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn reload_changes_an_allowlist_mid_traffic_with_no_failed_request_and_refuses_a_broken_file()
{
    let sim = start_sim(fast_sim()).await;
    let dir = TempDir::new("life-reload");
    let path = dir.join("toastgate.yaml");
    std::fs::write(&path, config_text(&sim, &[BATCH_READ_ONLY])).unwrap();
    let gateway = ReloadingGateway::start(&path).await;
    let (gw, admin) = (gateway.gw.clone(), gateway.admin.clone());
    let mint = |team: &str| {
        toastgate::auth::mint_token(&gateway.config.auth, team, "t", Duration::from_secs(600))
            .unwrap()
    };
    let (web, batch) = (mint("web-team"), mint("batch-team"));
    let http = reqwest::Client::new();

    assert_eq!(keypair(&http, &gw, &batch, "batch", "before").await, 403);

    // Steady traffic from another team throughout the reload.
    let traffic = {
        let (http, gw, web) = (http.clone(), gw.clone(), web.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut n = 0;
            while started.elapsed() < Duration::from_secs(2) {
                let s = http
                    .get(format!("{gw}/v2/web/servers"))
                    .bearer_auth(&web)
                    .send()
                    .await
                    .unwrap()
                    .status();
                assert_eq!(s.as_u16(), 200, "request {n} failed during the reload");
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, config_text(&sim, &[])).unwrap();
    let mut allowed = false;
    for i in 0..40 {
        if keypair(&http, &gw, &batch, "batch", &format!("after-{i}")).await == 200 {
            allowed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(allowed, "the new allowlist did not take effect");
    // Requests kept flowing during the reload (how many depends on the
    // machine; that none failed is what the traffic task asserts).
    assert!(traffic.await.unwrap() > 0);

    // A broken file is refused; the running config keeps serving.
    std::fs::write(
        &path,
        config_text(
            &sim,
            &[BATCH_READ_ONLY, "overlays/misspelled-auth-key.yaml"],
        ),
    )
    .unwrap();
    let refused = metrics::eventually_contains(
        &http,
        &admin,
        r#"toastgate_config_reloads_total{result="failure"} 1"#,
        40,
        Duration::from_millis(100),
    )
    .await;
    assert!(refused, "the broken config was not noticed");
    assert_eq!(
        keypair(&http, &gw, &batch, "batch", "still-allowed").await,
        200,
        "the old config keeps serving"
    );
    let m = metrics::fetch(&http, &admin).await;
    assert!(
        m.contains(r#"toastgate_config_reloads_total{result="success"} 1"#),
        "{m}"
    );

    gateway.stop().await;
    sim.shutdown();
}

/// `toastgate serve` on the test config (see [`common::process::serve`]).
fn serve(
    dir: &Path,
    sim: &SimHandle,
    overlays: &[&str],
    extra: Value,
) -> (KillOnDrop, String, String) {
    common::process::serve(dir, sim, overlays, extra, &[])
}

#[tokio::test]
async fn sighup_reloads_the_config() {
    let sim = start_sim(fast_sim()).await;
    let dir = TempDir::new("life-hup");
    let (p, gw, admin) = serve(dir.path(), &sim, &[BATCH_READ_ONLY], json!({}));
    let http = reqwest::Client::new();
    wait_ready(&http, &admin).await;
    let batch = common::process::team_token(dir.path(), "batch-team");
    assert_eq!(keypair(&http, &gw, &batch, "batch", "a").await, 403);
    p.signal("-HUP");
    let reloaded = metrics::eventually_contains(
        &http,
        &admin,
        r#"toastgate_config_reloads_total{result="success"} 1"#,
        30,
        Duration::from_millis(100),
    )
    .await;
    assert!(
        reloaded,
        "SIGHUP did not reload (file unchanged, so only the signal can have done it)"
    );
    sim.shutdown();
}

/// Waits (at most `within`) for the gateway `p` to exit, asserts it exited
/// 0, and counts the completed `keypair.create` records in its audit file.
fn completed_creates_once_exited(p: &mut KillOnDrop, audit: &Path, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "toastgate did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    std::fs::read_to_string(audit)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"stage\":\"completed\"") && l.contains("keypair.create"))
        .count()
}

#[tokio::test]
async fn sigterm_lets_slow_in_flight_requests_finish_and_loses_no_audit_record() {
    let sim = start_sim(fast_sim()).await;
    let dir = TempDir::new("life-term");
    let audit = dir.join("audit.jsonl");
    let (mut p, gw, admin) = serve(
        dir.path(),
        &sim,
        &[],
        json!({"audit": {"file": {"path": audit}}}),
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &admin).await;
    let web = common::process::team_token(dir.path(), "web-team");

    sim.set_latency(Duration::from_millis(1500));
    let mut inflight = Vec::new();
    for i in 0..5 {
        let (http, gw, web) = (http.clone(), gw.clone(), web.clone());
        inflight.push(tokio::spawn(async move {
            keypair(&http, &gw, &web, "web", &format!("slow-{i}")).await
        }));
    }
    // In flight: the simulator has all 5 (it records a request when it
    // arrives, then holds it for the latency).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let arrived = sim
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/os-keypairs"))
            .count();
        if arrived == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {arrived} of the 5 requests reached the simulator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.signal("-TERM");
    for r in inflight {
        assert_eq!(r.await.unwrap(), 200, "an in-flight request was cut off");
    }
    assert_eq!(
        completed_creates_once_exited(&mut p, &audit, Duration::from_secs(10)),
        5,
        "every in-flight action has its completed record"
    );
    sim.shutdown();
}

/// Requests whose callers hung up go on in tasks of their own: SIGTERM
/// waits for them too (within `shutdown_grace`), so each action that ran
/// has its completed record, though no connection is left to wait for.
#[tokio::test]
async fn sigterm_waits_for_requests_whose_callers_hung_up() {
    let sim = start_sim(fast_sim()).await;
    let dir = TempDir::new("life-term-hung-up");
    let audit = dir.join("audit.jsonl");
    let (mut p, gw, admin) = serve(
        dir.path(),
        &sim,
        &[],
        json!({"audit": {"file": {"path": audit}}}),
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &admin).await;
    let web = common::process::team_token(dir.path(), "web-team");

    sim.set_latency(Duration::from_millis(2000));
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let mut gave_up = Vec::new();
    for i in 0..3 {
        let (http, gw, web) = (impatient.clone(), gw.clone(), web.clone());
        gave_up.push(tokio::spawn(async move {
            http.post(format!("{gw}/v2/web/os-keypairs"))
                .bearer_auth(&web)
                .json(&json!({"keypair": {"name": format!("hung-up-{i}")}}))
                .send()
                .await
                .is_err()
        }));
    }
    for g in gave_up {
        assert!(g.await.unwrap(), "the caller gave up");
    }
    // All three reached the upstream, which holds them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/os-keypairs"))
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "the creates never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.signal("-TERM");
    assert_eq!(
        completed_creates_once_exited(&mut p, &audit, Duration::from_secs(30)),
        3,
        "every action that ran has its completed record"
    );
    sim.shutdown();
}

#[tokio::test]
async fn readyz_turns_unready_while_the_listener_still_serves_during_the_drain_delay() {
    let sim = start_sim(fast_sim()).await;
    let env = common::Env::start_on(
        sim.clone(),
        &["overlays/drain-delay.yaml"],
        json!({}),
        &secrets(),
    )
    .await;
    env.wait_ready().await;
    assert_eq!(env.readyz().await.0, 200);
    let gw = env.gw.clone();
    let token = env.token("web-team");
    let http = env.http.clone();
    let admin = env.admin.clone();
    let stopping = tokio::spawn(env.stop_gateway());
    // Readiness goes first (the stop signal is asynchronous: poll for it).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = http.get(format!("{admin}/readyz")).send().await.unwrap();
        if r.status().as_u16() == 503 {
            break r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "readiness never turned 503"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["draining"], true);
    let s = http
        .get(format!("{gw}/v2/web/flavors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s.as_u16(), 200, "still serving during the drain delay");
    // Every answer now says the connection ends, so keep-alive clients do
    // not race the listener's close.
    let mut conn = tokio::net::TcpStream::connect(gw.trim_start_matches("http://"))
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(
        format!(
            "GET /v2/web/flavors HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after the answer")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
    stopping.await.unwrap();
    sim.shutdown();
}

#[tokio::test]
async fn draining_sends_http2_connections_a_goaway_while_the_listener_still_serves() {
    let sim = start_sim(fast_sim()).await;
    // A drain delay far longer than the test: whatever closes the HTTP/2
    // connection below, it is not the listener stopping; nor any connection
    // timeout (all far longer than the test too).
    let env = common::Env::start_on(
        sim.clone(),
        &[],
        json!({"server": {"drain_delay": "600s", "header_read_timeout": "600s", "idle_timeout": "600s"}}),
        &secrets(),
    )
    .await;
    let token = env.token("web-team");
    let tcp = tokio::net::TcpStream::connect(env.gw.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut send, driver) = h2_handshake(tcp).await;
    let req = hyper::Request::get("http://gw/v2/web/flavors")
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    send.ready().await.unwrap();
    assert_eq!(send.send_request(req).await.unwrap().status(), 200);

    let (gw, http) = (env.gw.clone(), env.http.clone());
    let _stopping = tokio::spawn(env.stop_gateway());
    tokio::time::timeout(Duration::from_secs(30), driver)
        .await
        .expect("the HTTP/2 connection got no GOAWAY")
        .unwrap()
        .expect("the HTTP/2 connection ended cleanly");
    // Still inside the drain delay: new connections are served.
    let s = http
        .get(format!("{gw}/v2/web/flavors"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(s.as_u16(), 200);
    sim.shutdown();
}

/// In-flight requests get `server.shutdown_grace` and no more: one whose
/// upstream never answers is cut when the grace runs out (its connection
/// closed), and the gateway stops, rather than waiting for the request's
/// own timeout.
#[tokio::test]
async fn a_request_still_in_flight_when_the_shutdown_grace_runs_out_is_cut() {
    let env = common::Env::start_with_overlays(
        fast_sim(),
        &[],
        json!({"server": {"shutdown_grace": "1s", "request_timeout": "300s"},
               "upstream": {"request_timeout": "300s"}}),
    )
    .await;
    env.wait_ready().await;
    let sim = env.sim.clone();
    sim.hold_compute(true);
    // No client timeout: only the gateway can end this request.
    let request = reqwest::Client::new()
        .get(env.url("/v2/web/servers/detail"))
        .bearer_auth(env.token("web-team"))
        .send();
    let in_flight = tokio::spawn(request);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sim
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/servers/detail"))
    {
        assert!(
            Instant::now() < deadline,
            "the request never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Fails the test if the gateway has not stopped within 30 s.
    env.stop_gateway().await;
    let answer = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("the client is not left waiting once the gateway stopped")
        .unwrap();
    match answer {
        Err(e) => assert!(!e.is_timeout(), "{e}"),
        Ok(resp) => panic!("answered {} after the grace ran out", resp.status()),
    }
    sim.hold_compute(false);
    sim.shutdown();
}
