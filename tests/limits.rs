//! Nobody ties the gateway up: slow and half-open connections are closed on
//! their timeouts while good requests are served, the connection cap holds,
//! HTTP/2 streams are capped per connection and idle HTTP/2 connections
//! closed, while a slow request is never cut by the idle timeout;
//! every upstream exchange ends within its deadline (a body that never
//! finishes, an identity service that never answers), and while identity
//! hangs callers get a prompt 503, not one timeout each.

mod common;

use std::time::Duration;

use common::{
    Env, assert_nova_error, assert_v1_failure, closed_by_server, fast_sim, h2_handshake, metrics,
};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn slow_and_half_open_connections_are_closed_and_good_requests_still_served() {
    let env =
        Env::start_with_overlays(fast_sim(), &["overlays/connection-limits.yaml"], json!({})).await;
    let addr = env.gw.trim_start_matches("http://").to_string();

    // 40 connections that never complete a request: silent ones, half a
    // request head, and one header line at a time (bytes keep moving, the
    // head never completes).
    let mut slow = Vec::new();
    for i in 0..40 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => c
                .write_all(b"GET /v2/web/flavors HTTP/1.1\r\nHost: gw\r\n")
                .await
                .unwrap(),
            _ => c
                .write_all(b"GET /v2/web/flavors HTTP/1.1\r\n")
                .await
                .unwrap(),
        }
        slow.push(c);
    }
    let dribbler = tokio::spawn({
        let addr = addr.clone();
        async move {
            let mut c = TcpStream::connect(&addr).await.unwrap();
            c.write_all(b"GET /v2/web/flavors HTTP/1.1\r\n")
                .await
                .unwrap();
            for i in 0..100 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if c.write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return true;
                }
            }
            false
        }
    });

    // A good request is served (it may wait for a slot while the slow ones
    // time out: the cap is 16).
    let (s, b) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(s, 200, "{b}");
    let m = env.metrics().await;
    assert!(
        metrics::value(&m, "toastgate_open_connections") <= 16.0,
        "{m}"
    );

    // Every slow connection is closed by the gateway, none left hanging.
    for (i, c) in slow.iter_mut().enumerate() {
        assert!(
            closed_by_server(c, Duration::from_secs(30)).await,
            "slow connection {i} was never closed"
        );
    }
    assert!(
        dribbler.await.unwrap(),
        "the dribbling connection was never closed"
    );

    // An idle keep-alive connection is closed too, after its request.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    let token = env.token("web-team");
    idle.write_all(
        format!(
            "GET /v2/web/flavors HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    assert!(closed_by_server(&mut idle, Duration::from_secs(30)).await);
    let m = env.metrics().await;
    assert!(
        metrics::value(&m, "toastgate_open_connections") <= 16.0,
        "{m}"
    );
    env.stop().await;
}

/// An upstream that answers the head and a few bytes of a body it promised
/// to be much longer, then holds the connection.
async fn truncating_upstream() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let _ = c.read(&mut buf).await;
                let _ = c
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"flavors\"",
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(120)).await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn an_upstream_body_that_never_finishes_ends_within_the_deadline() {
    let upstream = truncating_upstream().await;
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/short-upstream-timeout.yaml"],
        json!({"upstream": {"compute_url": upstream}}),
    )
    .await;
    let (s, b) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(s, 504, "{b}");
    assert_nova_error(&b, "computeFault", 504);
    let b = env.v1("web-team", Method::GET, "/flavors", None).await;
    assert_v1_failure(&b, 10504);
    let m = env.metrics().await;
    assert!(
        m.contains(r#"toastgate_upstream_errors_total{action="flavor.list",kind="timeout"} 1"#),
        "{m}"
    );
    env.stop().await;
}

/// An identity service that accepts connections and never answers; counts them.
async fn hanging_identity() -> (String, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(c);
        }
    });
    (format!("http://{addr}"), accepted)
}

#[tokio::test]
async fn while_identity_hangs_callers_get_a_prompt_503_not_one_timeout_each() {
    let (identity, accepted) = hanging_identity().await;
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/slow-identity-retries.yaml"],
        json!({"upstream": {"identity_url": identity}}),
    )
    .await;
    // The first wave finds no token and nothing known: it waits once, for
    // the one identity call in flight.
    let first: Vec<_> = (0..10)
        .map(|_| {
            let (http, url, token) = (
                env.http.clone(),
                env.url("/v2/web/flavors"),
                env.token("web-team"),
            );
            tokio::spawn(async move {
                let r = http.get(url).bearer_auth(token).send().await.unwrap();
                (r.status().as_u16(), r.headers().contains_key("retry-after"))
            })
        })
        .collect();
    for t in first {
        assert_eq!(t.await.unwrap(), (503, true));
    }
    let waits = metrics::sum(&env.metrics().await, "toastgate_token_waits_total");
    assert!(
        waits >= 1.0,
        "the cold requests waited for the identity call"
    );

    // Now the failure is known: every request is answered from it at once,
    // nobody waits on identity again.
    for _ in 0..20 {
        let (s, b) = env.get("web-team", "/v2/web/flavors").await;
        assert_eq!(s, 503, "{b}");
        assert!(assert_nova_error(&b, "serviceUnavailable", 503).contains("identity"));
    }
    let b = env.v1("web-team", Method::GET, "/flavors", None).await;
    assert_v1_failure(&b, 10503);
    let m = env.metrics().await;
    assert_eq!(
        metrics::sum(&m, "toastgate_token_waits_total"),
        waits,
        "a request waited on a hanging identity service: {m}"
    );
    // /readyz answers from what is known (no identity call of its own).
    let (status, body) = env.readyz().await;
    assert_eq!(status, 503);
    assert_eq!(body["status"], "not ready");
    // One attempt at a time, paced by the backoff (>= 2 s): far fewer
    // identity connections than requests.
    let n = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..10).contains(&n),
        "{n} identity connections for 31 requests"
    );
    env.stop().await;
}

/// Waits until the simulator has recorded `n` compute requests.
async fn until_upstream_has(env: &Env, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while env.compute_requests().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream never got {n} requests"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_request_in_flight_longer_than_the_idle_timeout_is_still_answered() {
    // The upstream deadline is longer than the hold below.
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/connection-limits.yaml"],
        json!({"upstream": {"request_timeout": "60s"}, "server": {"request_timeout": "60s"}}),
    )
    .await;
    let addr = env.gw.trim_start_matches("http://").to_string();
    env.sim.clear_requests();
    env.sim.hold_compute(true);
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    let token = env.token("web-team");
    conn.write_all(
        format!(
            "GET /v2/web/flavors HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    until_upstream_has(&env, 1).await;
    // Three idle timeouts (3 s each) with the request in flight: a
    // connection judged idle would be shut down, then dropped, by now.
    tokio::time::sleep(Duration::from_secs(10)).await;
    env.sim.hold_compute(false);
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&answer).contains("\"flavors\"") {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            other => panic!(
                "no answer ({other:?}); got {:?}",
                String::from_utf8_lossy(&answer)
            ),
        }
    }
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    env.stop().await;
}

fn h2_get(token: &str, path: &str) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
    hyper::Request::get(format!("http://gw{path}"))
        .header("authorization", format!("Bearer {token}"))
        .body(http_body_util::Full::default())
        .unwrap()
}

#[tokio::test]
async fn http2_streams_are_capped_per_connection_and_an_idle_http2_connection_is_closed() {
    let env = Env::start_with_overlays(
        fast_sim(),
        &["overlays/connection-limits.yaml"],
        json!({"server": {"http2_max_streams": 2}}),
    )
    .await;
    let addr = env.gw.trim_start_matches("http://").to_string();
    let token = env.token("web-team");
    let (mut send, driver) = h2_handshake(TcpStream::connect(&addr).await.unwrap()).await;
    // One exchange first: the client has the gateway's SETTINGS by then.
    send.ready().await.unwrap();
    let first = send
        .send_request(h2_get(&token, "/v2/web/flavors"))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    env.sim.clear_requests();
    env.sim.hold_compute(true);
    let calls: Vec<_> = (0..5)
        .map(|_| {
            let mut send = send.clone();
            let req = h2_get(&token, "/v2/web/flavors");
            tokio::spawn(async move {
                send.ready().await.unwrap();
                send.send_request(req).await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Two streams reach the upstream; the other three wait for a free
    // stream (the client obeys the advertised limit): however long we
    // look, no third one arrives while the two are held.
    until_upstream_has(&env, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.compute_requests().len(), 2);
    env.sim.hold_compute(false);
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap(), 200);
    }
    assert_eq!(env.compute_requests().len(), 5);

    // No new request for the idle timeout (3 s): GOAWAY, the connection ends.
    tokio::time::timeout(Duration::from_secs(30), driver)
        .await
        .expect("the idle HTTP/2 connection was never closed")
        .unwrap()
        .expect("the idle HTTP/2 connection ended cleanly");
    drop(send);
    env.stop().await;
}

/// `toastgate serve` limited to `files` open files, `extra` merged onto the
/// connection-limits overlay; 160 connections that send half a request
/// head; then a good request. Every slow connection must be closed by the
/// gateway; returns the good request's status and the accept errors counted.
async fn half_open_flood_under_a_file_limit(files: u32, extra: serde_json::Value) -> (u16, f64) {
    let sim = common::start_sim(fast_sim()).await;
    let dir = common::tempdir::TempDir::new("limits-files");
    let nofile = format!("--nofile={files}");
    let (_gateway, gw, admin) = common::process::serve(
        dir.path(),
        &sim,
        &["overlays/connection-limits.yaml"],
        extra,
        &["prlimit", &nofile],
    );
    let http = reqwest::Client::new();
    common::wait_ready(&http, &admin).await;
    let addr = gw.trim_start_matches("http://").to_string();
    let mut slow = Vec::new();
    for _ in 0..160 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v2/web/flavors HTTP/1.1\r\n")
            .await
            .unwrap();
        slow.push(c);
    }
    let token = common::process::team_token(dir.path(), "web-team");
    let good = http
        .get(format!("{gw}/v2/web/flavors"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the good request was answered")
        .status()
        .as_u16();
    for (i, c) in slow.iter_mut().enumerate() {
        assert!(
            closed_by_server(c, Duration::from_secs(60)).await,
            "slow connection {i} was never closed"
        );
    }
    let m = metrics::fetch(&http, &admin).await;
    sim.shutdown();
    (good, metrics::value(&m, "toastgate_accept_errors_total"))
}

/// With the process limited to 128 open files and no `max_connections`
/// set, the default cap stays below the limit: 160 half-open connections
/// never exhaust the descriptors (no accept error), they wait in the
/// backlog, time out in turn, and a good request is served.
#[tokio::test]
async fn the_default_connection_cap_stays_below_the_file_limit() {
    let (good, accept_errors) =
        half_open_flood_under_a_file_limit(128, json!({"server": {"max_connections": null}})).await;
    assert_eq!(good, 200);
    assert_eq!(accept_errors, 0.0);
}

/// A cap set just under the file limit leaves no room for the gateway's
/// other descriptors: accepting fails with EMFILE. The loop backs off (5 ms
/// doubling to 1 s) instead of spinning, and serves again once the slow
/// connections have timed out.
#[tokio::test]
async fn out_of_descriptors_the_accept_loop_backs_off_and_recovers() {
    let (good, accept_errors) =
        half_open_flood_under_a_file_limit(128, json!({"server": {"max_connections": 127}})).await;
    assert_eq!(good, 200);
    assert!(accept_errors >= 1.0, "EMFILE never happened");
    // Backing off, the loop tries at most about once per 5 ms while the
    // descriptors are out, and the flood lasts seconds; a spinning loop
    // counts millions.
    assert!(accept_errors < 10_000.0, "{accept_errors} accept errors");
}

/// A client that stops reading its answers (HTTP/1.1: pipelined requests
/// until the socket is full) holds them unsent: closed once none has been
/// taken for `idle_timeout` (3 s here), with no token needed to try it.
#[tokio::test]
async fn a_client_that_stops_reading_its_answers_is_closed() {
    let env =
        Env::start_with_overlays(fast_sim(), &["overlays/connection-limits.yaml"], json!({})).await;
    let addr: std::net::SocketAddr = env.gw.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let conn = socket.connect(addr).await.unwrap();
    let (mut reader, mut writer) = conn.into_split();
    // Far more answers (the versions document, ~0.5 KiB each) than any
    // socket buffers hold.
    const PIPELINED: usize = 20_000;
    let writing = tokio::spawn(async move {
        let request = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n".repeat(PIPELINED);
        // Stops when the gateway stops reading, and fails once it closes.
        let _ = writer.write_all(&request).await;
        writer
    });
    assert!(
        metrics::gauge_becomes(&env.http, &env.admin, "toastgate_open_connections", 0).await,
        "a connection whose answers are never read stays open"
    );
    // What had been sent, then the end: not every answer.
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), reader.read_to_end(&mut received)).await;
    let answers = received
        .windows(b"HTTP/1.1 200".len())
        .filter(|w| *w == b"HTTP/1.1 200")
        .count();
    assert!(answers < PIPELINED, "{answers} answers");
    writing.abort();
    // Good requests are served meanwhile and after.
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    env.stop().await;
}

/// The same over HTTP/2: a client that never opens its stream window gets
/// its answer's head and never its body; closed once nothing has been
/// taken for `idle_timeout`.
#[tokio::test]
async fn an_http2_client_that_never_opens_its_window_is_closed() {
    let env =
        Env::start_with_overlays(fast_sim(), &["overlays/connection-limits.yaml"], json!({})).await;
    let addr = env.gw.trim_start_matches("http://").to_string();
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(&addr).await.unwrap());
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .handshake(io)
            .await
            .unwrap();
    let driver = tokio::spawn(conn);
    send.ready().await.unwrap();
    // No token needed: the versions document.
    let answer = send
        .send_request(
            hyper::Request::get("http://gw/")
                .body(http_body_util::Full::<bytes::Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    tokio::time::timeout(Duration::from_secs(30), driver)
        .await
        .expect("a connection holding an answer its client never takes stayed open")
        .unwrap()
        .ok();
    drop(answer);
    assert!(metrics::gauge_becomes(&env.http, &env.admin, "toastgate_open_connections", 0).await);
    env.stop().await;
}
