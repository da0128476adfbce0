//! The audit webhook: the audit file's records POSTed to a real HTTP
//! receiver (started here) that is up, down, slow and back. Nothing that was
//! acknowledged is lost: the file is the spool, a cursor says where the
//! shipper is, and a backlog over its bound refuses mutating requests.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tempdir::TempDir;
use common::{Env, assert_nova_error, fast_sim, secrets, start_sim};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Up,
    /// Answers 503.
    Down,
    /// Never answers: each POST ends at the gateway's webhook timeout.
    Slow,
}

#[derive(Default)]
struct Received {
    /// Every POST body the receiver accepted, with its X-Toastgate-Replica.
    batches: Vec<(String, Value)>,
    /// POSTs refused or answered too late.
    refused: usize,
}

#[derive(Clone)]
struct Receiver {
    url: String,
    mode: Arc<Mutex<Mode>>,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/audit", listener.local_addr().unwrap());
        let receiver = Receiver {
            url,
            mode: Arc::new(Mutex::new(Mode::Up)),
            received: Arc::default(),
        };
        let state = receiver.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(state.answer(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        receiver
    }

    async fn answer(
        &self,
        req: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<Full<Bytes>> {
        let mode = *self.mode.lock().unwrap();
        let replica = req
            .headers()
            .get("x-toastgate-replica")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        if mode != Mode::Up {
            // Counted on arrival: a client that gives up drops this future.
            self.received.lock().unwrap().refused += 1;
        }
        let status = match mode {
            Mode::Down => 503,
            Mode::Slow => std::future::pending().await,
            Mode::Up => 200,
        };
        if mode == Mode::Up {
            let value: Value = serde_json::from_slice(&body).expect("a JSON body");
            self.received.lock().unwrap().batches.push((replica, value));
        }
        hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Every record received, in order of arrival (duplicates included).
    fn records(&self) -> Vec<Value> {
        let received = self.received.lock().unwrap();
        received
            .batches
            .iter()
            .flat_map(|(_, b)| b["records"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn refused(&self) -> usize {
        self.received.lock().unwrap().refused
    }
}

/// Every record of the audit file, oldest first (rotated files included).
fn file_records(file: &Path) -> Vec<Value> {
    let mut paths: Vec<std::path::PathBuf> = (1..=50)
        .rev()
        .map(|n| std::path::PathBuf::from(format!("{}.{n}", file.display())))
        .filter(|p| p.exists())
        .collect();
    paths.push(file.to_path_buf());
    paths
        .iter()
        .flat_map(|p| {
            std::fs::read_to_string(p)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect()
}

fn hashes(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["hash"].as_str().expect("a hash").to_string())
        .collect()
}

/// Polls until every record of the file has reached the receiver; returns
/// the received records with duplicates dropped (first arrival kept).
async fn until_all_delivered(receiver: &Receiver, file: &Path) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let in_file = hashes(&file_records(file));
        let mut seen = std::collections::HashSet::new();
        let unique: Vec<Value> = receiver
            .records()
            .into_iter()
            .filter(|r| seen.insert(r["hash"].as_str().unwrap_or_default().to_string()))
            .collect();
        if hashes(&unique) == in_file {
            return unique;
        }
        assert!(
            Instant::now() < deadline,
            "not all delivered: {} in the file, {} received",
            in_file.len(),
            unique.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway with its audit file at `file`, shipped to `receiver` with
/// `webhook` merged onto the webhook settings. Its timeout is far beyond
/// what the receiver takes to answer, even on a busy machine: a POST that
/// times out is sent again (at least once), and a duplicate would spoil the
/// exact counts of records received.
async fn gateway(file: &Path, receiver: &Receiver, webhook: Value, overlays: &[&str]) -> Env {
    let mut block = json!({"url": receiver.url, "timeout": "10s"});
    block
        .as_object_mut()
        .unwrap()
        .extend(webhook.as_object().unwrap().clone());
    Env::start_on(
        start_sim(fast_sim()).await,
        overlays,
        json!({"audit": {"file": {"path": file}, "webhook": block}}),
        &secrets(),
    )
    .await
}

async fn create_keypair(env: &Env, name: &str) -> u16 {
    env.create_keypair("web-team", name).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_reach_the_receiver_through_an_outage_and_a_slow_spell() {
    let dir = TempDir::new("webhook-outage");
    let file = dir.join("audit.jsonl");
    let receiver = Receiver::start().await;
    let env = gateway(&file, &receiver, json!({}), &[]).await;

    // Up: both records of a v2 and of a v1.0 create arrive, as in the file.
    assert_eq!(create_keypair(&env, "up").await, 200);
    let b = env
        .v1(
            "web-team",
            reqwest::Method::POST,
            "/keypairs",
            Some(json!({"keypair": {"name": "up-v1"}})),
        )
        .await;
    assert_eq!(b["header"]["isSuccessful"], true, "{b}");
    let got = until_all_delivered(&receiver, &file).await;
    assert_eq!(got, file_records(&file), "the records exactly as written");
    assert_eq!(got.len(), 4);
    {
        let received = receiver.received.lock().unwrap();
        for (header, body) in &received.batches {
            assert!(!header.is_empty(), "X-Toastgate-Replica");
            assert_eq!(body["replica"], header.as_str());
            for record in body["records"].as_array().unwrap() {
                assert_eq!(record["replica"], header.as_str(), "{record}");
            }
        }
    }

    // Down: the gateway keeps answering 2xx (the file is the spool) and
    // keeps trying.
    receiver.set(Mode::Down);
    for i in 0..3 {
        assert_eq!(create_keypair(&env, &format!("down-{i}")).await, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.refused() < 2 {
        assert!(Instant::now() < deadline, "the receiver was never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.records().len(), 4, "nothing accepted while down");

    // Slow (no answer within the webhook timeout): still not delivered.
    receiver.set(Mode::Slow);
    assert_eq!(create_keypair(&env, "slow").await, 200);
    let refused = receiver.refused();
    let deadline = Instant::now() + Duration::from_secs(30);
    while receiver.refused() == refused {
        assert!(
            Instant::now() < deadline,
            "the slow receiver was never tried"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Back: everything arrives, in order, nothing missing.
    receiver.set(Mode::Up);
    let got = until_all_delivered(&receiver, &file).await;
    assert_eq!(got.len(), 4 + 8);
    assert_eq!(got, file_records(&file));
    let m = env.metrics().await;
    assert!(
        m.contains(r#"toastgate_audit_webhook_batches_total{result="failed"}"#),
        "{m}"
    );
    // The shipper measures the backlog before each batch: it reads 0 once
    // it has looked again after the last one was acknowledged.
    assert!(
        common::metrics::gauge_becomes(
            &env.http,
            &env.admin,
            "toastgate_audit_webhook_backlog_bytes",
            0
        )
        .await,
        "the backlog gauge never went back to 0: {}",
        env.metrics().await
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backlog_refuses_mutating_requests_until_the_receiver_catches_up() {
    let dir = TempDir::new("webhook-backlog");
    let file = dir.join("audit.jsonl");
    let receiver = Receiver::start().await;
    receiver.set(Mode::Down);
    // About two creates' worth of records.
    let env = gateway(&file, &receiver, json!({"max_backlog_bytes": 2500}), &[]).await;
    let mut statuses = Vec::new();
    for i in 0..6 {
        statuses.push(create_keypair(&env, &format!("b-{i}")).await);
    }
    let first_refusal = statuses.iter().position(|s| *s == 503);
    assert!(
        matches!(first_refusal, Some(1..=3)),
        "refused once the backlog passed 2500 bytes: {statuses:?}"
    );
    assert!(
        statuses[first_refusal.unwrap()..].iter().all(|s| *s == 503),
        "{statuses:?}"
    );
    let (status, body) = env
        .post(
            "web-team",
            "/v2/web/os-keypairs",
            json!({"keypair": {"name": "refused"}}),
        )
        .await;
    assert_eq!(status, 503);
    assert!(
        assert_nova_error(&body, "serviceUnavailable", 503).contains("backlog"),
        "{body}"
    );
    // Reads are not audited by default: still served.
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    let backlog = std::fs::metadata(&file).unwrap().len();
    assert!(
        backlog < 2500 + 2000,
        "the bound held: {backlog} bytes unsent"
    );

    // The receiver is back: the backlog drains and creates work again.
    receiver.set(Mode::Up);
    until_all_delivered(&receiver, &file).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = create_keypair(&env, &format!("after-{}", uuid::Uuid::new_v4())).await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(Instant::now() < deadline, "creates never worked again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_all_delivered(&receiver, &file).await;
    env.stop().await;
}

/// Only an admitted action's `completed` record may pass the bound: the
/// records of audited reads stop there too (served all the same), or they
/// would grow the unsent spool until rotation deleted records never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audited_reads_do_not_grow_a_full_backlog() {
    let dir = TempDir::new("webhook-reads");
    let file = dir.join("audit.jsonl");
    let receiver = Receiver::start().await;
    receiver.set(Mode::Down);
    let env = Env::start_on(
        start_sim(fast_sim()).await,
        &[],
        json!({"audit": {
            "file": {"path": file},
            "webhook": {"url": receiver.url, "timeout": "10s", "max_backlog_bytes": 2500},
            "rules": [{"actions": ["read"], "level": "metadata"}]
        }}),
        &secrets(),
    )
    .await;
    // Each read writes one record until the bound is passed.
    for _ in 0..20 {
        assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    }
    let full = std::fs::metadata(&file).unwrap().len();
    assert!(
        full >= 2500,
        "20 audited reads passed the bound: {full} bytes"
    );
    assert!(
        full < 2500 + 1000,
        "one record past it at most: {full} bytes"
    );
    // Past the bound: reads still served, nothing more appended.
    for _ in 0..20 {
        assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    }
    assert_eq!(
        std::fs::metadata(&file).unwrap().len(),
        full,
        "records were appended past a full backlog"
    );
    assert_eq!(create_keypair(&env, "past-the-bound").await, 503);
    let metrics = env.metrics().await;
    let failed = metrics
        .lines()
        .find(|l| l.starts_with("toastgate_audit_records_total{result=\"failed\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        failed >= 20.0,
        "the reads' records not written are counted: {failed}"
    );

    receiver.set(Mode::Up);
    until_all_delivered(&receiver, &file).await;
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_sends_on_from_where_it_left_off_across_rotations() {
    let dir = TempDir::new("webhook-restart");
    let file = dir.join("audit.jsonl");
    let receiver = Receiver::start().await;
    let small_files = ["overlays/audit-small-files.yaml"];
    // A POST that times out may have been taken (at-least-once): its retry
    // is a duplicate that says nothing about the restart. This test is
    // about the restart: a timeout no busy machine comes near.
    let webhook = json!({"max_backlog_bytes": 100_000, "timeout": "30s"});
    let env = gateway(&file, &receiver, webhook.clone(), &small_files).await;
    for i in 0..3 {
        assert_eq!(create_keypair(&env, &format!("first-{i}")).await, 200);
    }
    until_all_delivered(&receiver, &file).await;

    // Down, more records (the 4 KiB files rotate), then the gateway stops.
    receiver.set(Mode::Down);
    for i in 0..6 {
        assert_eq!(create_keypair(&env, &format!("second-{i}")).await, 200);
    }
    env.stop().await;
    assert!(
        Path::new(&format!("{}.1", file.display())).exists(),
        "the log rotated"
    );

    // A new gateway on the same file: it sends what was left, and only that.
    let before_restart = receiver.records().len();
    receiver.set(Mode::Up);
    let env = gateway(&file, &receiver, webhook, &small_files).await;
    let got = until_all_delivered(&receiver, &file).await;
    assert_eq!(got.len(), 18);
    let after_restart = receiver.records().split_off(before_restart);
    assert_eq!(
        hashes(&after_restart),
        hashes(&got[6..]),
        "the restarted gateway sent the 12 records left, each once, and none sent before"
    );
    assert_eq!(
        receiver.records().len(),
        18,
        "nothing sent twice (every POST before was acknowledged)"
    );
    let report = toastgate::audit::verify(&file, true).expect("readable");
    assert!(report.broken.is_none(), "{report:?}");
    env.stop().await;
}
