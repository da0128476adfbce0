//! Idle HTTP/1.1 keep-alive connections are parked between requests (held
//! without hyper's buffers) and served again on the same connection: past
//! `header_read_timeout`, with pipelined requests, with a request head that
//! had begun when the connection was parked; a parked connection is closed
//! after `idle_timeout` (woken by half a head, too) and at shutdown; a head
//! dribbled right after an answer, and a client that stopped reading its
//! answers, are cut after `header_read_timeout`.

mod common;

use std::time::Duration;

use common::http::{read_http1_answer, served};
use common::logs::Capture;
use common::{Env, closed_by_server, fast_sim, metrics};
use serde_json::json;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn flavors_request(env: &Env) -> String {
    format!(
        "GET /v2/web/flavors HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\n\r\n",
        env.token("web-team")
    )
}

async fn gateway(header_read_timeout: &str, idle_timeout: &str) -> Env {
    let server = json!({"header_read_timeout": header_read_timeout, "idle_timeout": idle_timeout});
    Env::start_with_overlays(fast_sim(), &[], json!({ "server": server })).await
}

async fn connect(env: &Env) -> BufReader<TcpStream> {
    BufReader::new(
        TcpStream::connect(env.gw.trim_start_matches("http://"))
            .await
            .unwrap(),
    )
}

/// A gateway capped at two connections, parking after a second.
async fn capped_gateway() -> Env {
    let server = json!({"max_connections": 2, "header_read_timeout": "4s", "idle_timeout": "60s"});
    Env::start_with_overlays(fast_sim(), &[], json!({ "server": server })).await
}

/// Waits (at most 20 s) until the gauge reads `value`.
async fn parked_becomes(env: &Env, value: u32) -> bool {
    metrics::gauge_becomes(&env.http, &env.admin, "toastgate_parked_connections", value).await
}

#[tokio::test]
async fn an_idle_connection_is_parked_and_served_again_on_the_same_connection() {
    // Parked within half a second of its answer (a quarter of the header
    // timeout, twice).
    let env = gateway("2s", "60s").await;
    let mut conn = connect(&env).await;
    let request = flavors_request(&env);
    let first = served(&mut conn, &request).await;
    assert!(
        parked_becomes(&env, 1).await,
        "the idle connection was never parked"
    );

    // Past header_read_timeout since the answer: hyper alone would have
    // closed the connection by now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = env.metrics().await;
    assert_eq!(
        metrics::value(&m, "toastgate_parked_connections"),
        1.0,
        "{m}"
    );
    assert_eq!(metrics::value(&m, "toastgate_open_connections"), 1.0, "{m}");

    // Two requests in one write, more than a parked connection's first
    // read (512 bytes): both answered, in order, on this connection.
    let two = format!("{request}{request}");
    assert!(two.len() > 512, "{}", two.len());
    conn.get_mut().write_all(two.as_bytes()).await.unwrap();
    for _ in 0..2 {
        let (status, body) = read_http1_answer(&mut conn).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert_eq!(body, first);
    }

    // Parked again; the gateway's stop closes it and is not held up by it.
    assert!(parked_becomes(&env, 1).await, "not parked a second time");
    env.stop().await;
    assert!(closed_by_server(conn.get_mut(), Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_parked_connection_is_closed_after_the_idle_timeout() {
    let env = gateway("1s", "2s").await;
    let mut conn = connect(&env).await;
    served(&mut conn, &flavors_request(&env)).await;
    assert!(
        parked_becomes(&env, 1).await,
        "the idle connection was never parked"
    );
    assert!(
        closed_by_server(conn.get_mut(), Duration::from_secs(20)).await,
        "a parked connection outlived the idle timeout"
    );
    assert!(
        parked_becomes(&env, 0).await,
        "the gauge kept a closed connection"
    );
    let closed =
        metrics::gauge_becomes(&env.http, &env.admin, "toastgate_open_connections", 0).await;
    assert!(closed, "the closed connection is still counted open");
    env.stop().await;
}

#[tokio::test]
async fn a_woken_connection_that_never_finishes_its_head_is_closed_after_the_idle_timeout() {
    // `idle_timeout` shorter than `header_read_timeout`: a parked
    // connection woken by a few bytes of a head that never completes was
    // idle already, and gets no longer than `idle_timeout` again (hyper's
    // own header timer would give it the full minute).
    let env = gateway("60s", "2s").await;
    let mut conn = connect(&env).await;
    served(&mut conn, &flavors_request(&env)).await;
    assert!(
        parked_becomes(&env, 1).await,
        "the idle connection was never parked"
    );
    let request = flavors_request(&env);
    let line = &request[..request.find("\r\n").unwrap() + 2];
    conn.get_mut().write_all(line.as_bytes()).await.unwrap();
    assert!(parked_becomes(&env, 0).await, "the bytes did not wake it");
    assert!(
        closed_by_server(conn.get_mut(), Duration::from_secs(30)).await,
        "a woken connection with half a head outlived the idle timeout"
    );
    env.stop().await;
}

#[tokio::test]
async fn a_request_head_dribbled_after_an_answer_is_cut_after_the_header_read_timeout() {
    // Right after an answer, before the connection can be parked, a head
    // begins and never ends: one header line every 200 ms keeps bytes
    // moving. It is cut after `header_read_timeout` (2 s; plus at most a
    // few park intervals of half a second), long before `idle_timeout`
    // (60 s) or the 20 s this client would dribble for.
    let env = gateway("2s", "60s").await;
    let mut conn = connect(&env).await;
    let request = flavors_request(&env);
    served(&mut conn, &request).await;
    let line = &request[..request.find("\r\n").unwrap() + 2];
    let conn = conn.get_mut();
    let began = std::time::Instant::now();
    conn.write_all(line.as_bytes()).await.unwrap();
    let mut cut = false;
    for i in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if conn
            .write_all(format!("X-Slow-{i}: 1\r\n").as_bytes())
            .await
            .is_err()
        {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a head dribbled for 20 s after an answer was never cut"
    );
    // Never before its time (however slow the machine, a cut comes later,
    // not earlier).
    let after = began.elapsed();
    assert!(after >= Duration::from_secs(2), "cut after {after:?}");
    env.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_header_read_timeout() {
    // Pipelined requests (no token needed: the versions document) into a
    // 4 KiB receive buffer, none of their answers read: once the socket is
    // full, hyper holds an answer it cannot send, with nothing in flight
    // to count as untaken. Cut after `header_read_timeout` (2 s), as
    // hyper's own head timer did, long before `idle_timeout` (60 s).
    let env = gateway("2s", "60s").await;
    let addr: std::net::SocketAddr = env.gw.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let conn = socket.connect(addr).await.unwrap();
    let (_reader, mut writer) = conn.into_split();
    let writing = tokio::spawn(async move {
        let request = b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n".repeat(20_000);
        let _ = writer.write_all(&request).await;
        writer
    });
    assert!(
        metrics::gauge_becomes(&env.http, &env.admin, "toastgate_open_connections", 0).await,
        "a connection whose answers are never read outlived header_read_timeout by far"
    );
    writing.abort();
    env.stop().await;
}

#[tokio::test]
async fn a_request_head_begun_when_the_connection_is_parked_is_kept() {
    let logs = Capture::install_logs("toastgate::listener=debug");
    // Parked 1 to 2 s after the answer: the next request's first line,
    // sent as soon as the answer is read, is there by then.
    let env = gateway("8s", "60s").await;
    let mut conn = connect(&env).await;
    let peer = conn.get_ref().local_addr().unwrap().to_string();
    let request = flavors_request(&env);
    let first = served(&mut conn, &request).await;

    // The next request's first line only; the gateway, parking the quiet
    // connection, finds it read and not yet parsed.
    let (line, rest) = request.split_at(request.find("\r\n").unwrap() + 2);
    conn.get_mut().write_all(line.as_bytes()).await.unwrap();
    let resumed = async {
        loop {
            let lines = logs.lines_with("had part of a request head");
            if lines.iter().any(|l| l.contains(&peer)) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(20), resumed)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the connection with a head begun was never taken back from hyper: {}",
                logs.text()
            )
        });
    // The rest of the head: the request is whole, nothing lost.
    conn.get_mut().write_all(rest.as_bytes()).await.unwrap();
    let (status, body) = read_http1_answer(&mut conn).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(body, first);
    env.stop().await;
}

#[tokio::test]
async fn at_the_connection_cap_the_connection_parked_longest_gives_its_slot_up() {
    let env = capped_gateway().await;
    let request = flavors_request(&env);
    let mut first = connect(&env).await;
    served(&mut first, &request).await;
    assert!(
        parked_becomes(&env, 1).await,
        "the first connection was never parked"
    );
    let mut second = connect(&env).await;
    served(&mut second, &request).await;
    assert!(
        parked_becomes(&env, 2).await,
        "the second connection was never parked"
    );

    // Both slots are held by idle connections; a new client is served at
    // once (within the test client's 30 s, where the idle timeout is 60 s).
    let (status, body) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        closed_by_server(first.get_mut(), Duration::from_secs(5)).await,
        "the connection parked longest was not the one closed"
    );
    // The other one is still open, and still served.
    served(&mut second, &request).await;
    env.stop().await;
}

#[tokio::test]
async fn at_the_cap_a_client_waiting_gets_the_slot_of_a_connection_that_parks_later() {
    let env = capped_gateway().await;
    let request = flavors_request(&env);
    // Both slots taken by connections not parked yet (they park within a
    // second of their answers)...
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = connect(&env).await;
        served(&mut conn, &request).await;
        held.push(conn);
    }
    // ...and a third client already waiting when they park: served once
    // one of them is parked, not after the idle timeout (60 s; the test
    // client gives up after 30).
    let (status, body) = env.get("web-team", "/v2/web/flavors").await;
    assert_eq!(status, 200, "{body}");
    let mut open = 0;
    for conn in &mut held {
        if !closed_by_server(conn.get_mut(), Duration::from_secs(3)).await {
            open += 1;
        }
    }
    assert_eq!(open, 1, "exactly one parked connection gives its slot up");
    env.stop().await;
}

#[tokio::test]
async fn a_request_body_left_unread_is_never_read_as_a_request() {
    let env = gateway("2s", "60s").await;
    let mut conn = connect(&env).await;
    // Refused before its body is read (no token), with most of the body
    // still to come; what comes next looks like a request of its own.
    conn.get_mut()
        .write_all(
            b"POST /v2/web/os-keypairs HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"keypair\":",
        )
        .await
        .unwrap();
    let (status, _) = read_http1_answer(&mut conn).await;
    assert_eq!(status, 401);
    // Past the park interval, the rest of the body: a smuggled request.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let smuggled = flavors_request(&env);
    let _ = conn.get_mut().write_all(smuggled.as_bytes()).await;
    let mut rest = Vec::new();
    let read = tokio::io::AsyncReadExt::read_to_end(conn.get_mut(), &mut rest);
    let ended = tokio::time::timeout(Duration::from_secs(20), read).await;
    assert!(ended.is_ok(), "the connection was left open");
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        !rest.contains("HTTP/1.1 200"),
        "a body's bytes were served as a request: {rest}"
    );
    env.stop().await;
}
