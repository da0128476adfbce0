//! The compute API's connection pool, seen from the upstream's side: a
//! relay in front of the simulator counts the connections the gateway opens
//! and closes, answers over TLS with HTTP/2 or HTTP/1.1 as ALPN decides, and
//! can cut every connection it holds.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::tempdir::TempDir;
use common::{Env, assert_nova_error, assert_v1_failure, fast_sim, metrics, secrets, start_sim};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{CertificateParams, KeyPair};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

const TEAM: &str = "web-team";

/// A relayed request's protocol version and `Host`.
type Seen = (http::Version, Option<String>);

/// An HTTP relay to the simulator (`upstream`), optionally over TLS.
struct Relay {
    url: String,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    /// The protocol version and `Host` of every request relayed.
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    /// Bumped to close every connection open at that moment.
    cut: watch::Sender<u64>,
    /// Whether requests go on to the simulator (false: each waits until
    /// it is true again).
    gate: watch::Sender<bool>,
}

impl Relay {
    async fn start(upstream: String, tls: Option<tokio_rustls::TlsAcceptor>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let relay = Relay {
            url: format!("{scheme}://127.0.0.1:{}", addr.port()),
            accepted: Arc::default(),
            closed: Arc::default(),
            seen: Arc::default(),
            cut: watch::channel(0).0,
            gate: watch::channel(true).0,
        };
        let (accepted, closed, seen) = (
            relay.accepted.clone(),
            relay.closed.clone(),
            relay.seen.clone(),
        );
        let cut = relay.cut.clone();
        let gate = relay.gate.clone();
        let client = reqwest::Client::new();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (closed, seen, client, upstream, tls) = (
                    closed.clone(),
                    seen.clone(),
                    client.clone(),
                    upstream.clone(),
                    tls.clone(),
                );
                let mut cut = cut.subscribe();
                let gate = gate.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let host = req.headers().get(http::header::HOST);
                        let host = host.map(|h| h.to_str().unwrap().to_string());
                        seen.lock().unwrap().push((req.version(), host));
                        let mut gate = gate.subscribe();
                        let (client, upstream) = (client.clone(), upstream.clone());
                        async move {
                            let _ = gate.wait_for(|open| *open).await;
                            forward(client, upstream, req).await
                        }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let served = async {
                        match tls {
                            Some(acceptor) => {
                                let Ok(stream) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                            None => {
                                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
                            }
                        }
                    };
                    tokio::select! {
                        () = served => {}
                        _ = cut.changed() => {}
                    }
                    closed.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        relay
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// What every request relayed was: its version and `Host`.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Holds every request from now on (and those arriving) until `release`.
    fn hold(&self) {
        self.gate.send_replace(false);
    }

    fn release(&self) {
        self.gate.send_replace(true);
    }

    /// `n` HTTP/1.1 requests carrying this relay's `Host`.
    fn http1_requests(&self, n: usize) -> Vec<Seen> {
        let host = self.url.split_once("://").unwrap().1.to_string();
        vec![(http::Version::HTTP_11, Some(host)); n]
    }

    /// Closes every connection open now, and waits until they are.
    async fn cut_connections(&self) {
        let open = self.accepted() - self.closed();
        let target = self.closed() + open;
        self.cut.send_modify(|n| *n += 1);
        wait_until("the relay closed its connections", || {
            self.closed() >= target
        })
        .await;
    }
}

async fn forward(
    client: reqwest::Client,
    upstream: String,
    req: http::Request<Incoming>,
) -> Result<http::Response<Full<Bytes>>, std::convert::Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = parts.headers.clone();
    headers.remove(http::header::HOST);
    let answer = client
        .request(parts.method, format!("{upstream}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap();
    let mut resp = http::Response::builder().status(answer.status());
    for (name, value) in answer.headers() {
        if name != http::header::CONNECTION && name != http::header::TRANSFER_ENCODING {
            resp = resp.header(name, value);
        }
    }
    Ok(resp.body(Full::new(answer.bytes().await.unwrap())).unwrap())
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

/// The gateway, its compute calls through a relay to the simulator.
async fn through_relay(tls: Option<tokio_rustls::TlsAcceptor>, upstream: Value) -> (Env, Relay) {
    let sim = start_sim(fast_sim()).await;
    let relay = Relay::start(sim.base_url(), tls).await;
    let mut upstream = upstream;
    upstream["compute_url"] = json!(relay.url);
    let env = Env::start_on(sim, &[], json!({ "upstream": upstream }), &secrets()).await;
    (env, relay)
}

async fn servers_detail(env: &Env) -> Value {
    let (status, body) = env.get(TEAM, "/v2/web/servers/detail").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn one_connection_carries_request_after_request() {
    let (env, relay) = through_relay(None, json!({})).await;
    for _ in 0..10 {
        servers_detail(&env).await;
    }
    assert_eq!(relay.accepted(), 1, "one kept-alive connection");
    assert_eq!(relay.seen(), relay.http1_requests(10));
    env.stop().await;
}

#[tokio::test]
async fn no_connection_is_kept_when_none_may_idle() {
    let (env, relay) = through_relay(None, json!({"pool_max_idle_per_host": 0})).await;
    for _ in 0..5 {
        servers_detail(&env).await;
    }
    assert_eq!(relay.accepted(), 5);
    wait_until("every connection was closed", || relay.closed() == 5).await;
    env.stop().await;
}

#[tokio::test]
async fn a_connection_idle_past_the_timeout_is_closed_and_replaced() {
    let (env, relay) = through_relay(None, json!({"pool_idle_timeout": "300ms"})).await;
    servers_detail(&env).await;
    // Closed by the gateway while nothing is asked of it.
    wait_until("the idle connection was closed", || relay.closed() == 1).await;
    servers_detail(&env).await;
    assert_eq!(relay.accepted(), 2);
    env.stop().await;
}

#[tokio::test]
async fn connections_the_upstream_closed_while_idle_are_replaced_without_a_failed_request() {
    let (env, relay) = through_relay(None, json!({})).await;
    // Several connections idle at once.
    let concurrent: Vec<_> = (0..6).map(|_| servers_detail(&env)).collect();
    futures_util::future::join_all(concurrent).await;
    let opened = relay.accepted();
    assert!(opened >= 1);
    relay.cut_connections().await;
    for _ in 0..3 {
        servers_detail(&env).await;
    }
    assert_eq!(relay.accepted(), opened + 1, "one new connection, reused");
    env.stop().await;
}

/// A TLS relay whose certificate the gateway trusts through
/// `upstream.ca_file`, offering `alpn`.
fn tls_acceptor(dir: &TempDir, alpn: &[&[u8]]) -> (tokio_rustls::TlsAcceptor, Value) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
        )
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        json!({ "ca_file": ca_file }),
    )
}

#[tokio::test]
async fn over_tls_with_http2_every_request_shares_one_connection() {
    let dir = TempDir::new("upstream-pool-h2");
    let (acceptor, upstream) = tls_acceptor(&dir, &[b"h2", b"http/1.1"]);
    let (env, relay) = through_relay(Some(acceptor), upstream).await;
    let (status, body) = env.get(TEAM, "/v2/web/flavors").await;
    assert_eq!(status, 200, "{body}");
    let href = body["flavors"][0]["links"][0]["href"]
        .as_str()
        .unwrap_or_default();
    assert!(
        href.starts_with(&env.gw),
        "links point at the gateway: {href}"
    );
    let concurrent: Vec<_> = (0..8).map(|_| servers_detail(&env)).collect();
    futures_util::future::join_all(concurrent).await;
    assert_eq!(relay.accepted(), 1, "one HTTP/2 connection for all");
    // `:authority` alone: no `host` next to it.
    assert_eq!(relay.seen(), vec![(http::Version::HTTP_2, None); 9]);

    // Cut. A request that meets the dying connection before the gateway
    // has seen it close was written to it, and is not sent twice: it may
    // fail (502). The next request opens another connection, which the
    // ones after it share.
    relay.cut_connections().await;
    let (status, body) = env.get(TEAM, "/v2/web/servers/detail").await;
    assert!(status == 200 || status == 502, "{status}: {body}");
    let relayed_before = relay.seen().len();
    servers_detail(&env).await;
    let concurrent: Vec<_> = (0..4).map(|_| servers_detail(&env)).collect();
    futures_util::future::join_all(concurrent).await;
    assert_eq!(relay.accepted(), 2);
    let seen = relay.seen();
    assert_eq!(seen.len(), relayed_before + 5);
    assert!(
        seen.iter().all(|s| *s == (http::Version::HTTP_2, None)),
        "{seen:?}"
    );
    env.stop().await;
}

#[tokio::test]
async fn over_tls_with_http2_an_idle_connection_expires_and_none_is_shared_with_no_idling() {
    let dir = TempDir::new("upstream-pool-h2-idle");
    let (acceptor, mut upstream) = tls_acceptor(&dir, &[b"h2"]);
    upstream["pool_idle_timeout"] = json!("300ms");
    let (env, relay) = through_relay(Some(acceptor), upstream).await;
    servers_detail(&env).await;
    wait_until("the idle HTTP/2 connection was closed", || {
        relay.closed() == 1
    })
    .await;
    servers_detail(&env).await;
    assert_eq!(relay.accepted(), 2);
    env.stop().await;

    let (acceptor, mut upstream) = tls_acceptor(&dir, &[b"h2"]);
    upstream["pool_max_idle_per_host"] = json!(0);
    let (env, relay) = through_relay(Some(acceptor), upstream).await;
    for _ in 0..3 {
        servers_detail(&env).await;
    }
    assert_eq!(relay.accepted(), 3, "a connection per call");
    wait_until("every connection was closed", || relay.closed() == 3).await;
    assert_eq!(relay.seen(), vec![(http::Version::HTTP_2, None); 3]);
    env.stop().await;
}

#[tokio::test]
async fn over_tls_with_http1_connections_are_reused() {
    let dir = TempDir::new("upstream-pool-h1");
    let (acceptor, upstream) = tls_acceptor(&dir, &[b"http/1.1"]);
    let (env, relay) = through_relay(Some(acceptor), upstream).await;
    for _ in 0..5 {
        servers_detail(&env).await;
    }
    assert_eq!(relay.accepted(), 1);
    assert_eq!(relay.seen(), relay.http1_requests(5));
    env.stop().await;
}

/// `upstream.max_connections: 2` and six concurrent calls while the
/// upstream holds every request: two connections open and carry a call
/// each, four calls queue; once the upstream answers, the queued calls take
/// the two connections in turn. Every call succeeds, on two connections in
/// all. (Timeouts far beyond the test's own waits: only the cap decides.)
#[tokio::test]
async fn calls_beyond_max_connections_queue_for_a_connection_and_all_succeed() {
    let (env, relay) = through_relay(
        None,
        json!({"max_connections": 2, "request_timeout": "120s", "queue_timeout": "100s"}),
    )
    .await;
    relay.hold();
    let calls = futures_util::future::join_all(
        (0..6).map(|_| env.request(TEAM, reqwest::Method::GET, "/v2/web/servers/detail", None)),
    );
    let release = async {
        wait_until("two calls reached the upstream", || relay.seen().len() == 2).await;
        assert!(
            metrics::gauge_becomes(
                &env.http,
                &env.admin,
                "toastgate_upstream_connection_waits_total",
                4
            )
            .await,
            "four calls queued: {}",
            env.metrics().await
        );
        let text = env.metrics().await;
        assert_eq!(metrics::value(&text, "toastgate_upstream_connections"), 2.0);
        assert_eq!(relay.accepted(), 2, "no third connection");
        assert_eq!(relay.seen().len(), 2, "the queued calls were not sent");
        relay.release();
    };
    let (answers, ()) = tokio::join!(calls, release);
    for a in answers {
        assert_eq!(a.status, 200, "{}", a.body);
    }
    assert_eq!(relay.seen().len(), 6);
    assert_eq!(
        relay.accepted(),
        2,
        "never more than upstream.max_connections"
    );
    let text = env.metrics().await;
    assert_eq!(metrics::value(&text, "toastgate_upstream_connections"), 2.0);
    assert_eq!(
        metrics::sum(&text, "toastgate_upstream_errors_total"),
        0.0,
        "no call failed"
    );
    env.stop().await;
}

/// `upstream.max_connections: 1`: while a call holds the one connection
/// longer than `upstream.queue_timeout`, the next calls are refused, never
/// sent: v2 503 `serviceUnavailable` with `Retry-After: 1`, v1.0 `10503`,
/// and a create's `Idempotency-Key` is left free for its retry. The call
/// holding the connection still succeeds.
#[tokio::test]
async fn a_call_that_finds_every_connection_busy_past_the_queue_timeout_is_refused_unsent() {
    let (env, relay) = through_relay(
        None,
        json!({"max_connections": 1, "queue_timeout": "200ms", "request_timeout": "120s"}),
    )
    .await;
    let create_with_key = || {
        env.http
            .post(env.url("/v2/web/os-keypairs"))
            .bearer_auth(env.token(TEAM))
            .header("Idempotency-Key", "busy-then-retried")
            .json(&json!({"keypair": {"name": "busy-key"}}))
            .send()
    };
    servers_detail(&env).await;
    relay.hold();
    let held = env.request(TEAM, reqwest::Method::GET, "/v2/web/servers/detail", None);
    let refused = async {
        wait_until("the held call reached the upstream", || {
            relay.seen().len() == 2
        })
        .await;
        let a = env
            .request(TEAM, reqwest::Method::GET, "/v2/web/flavors", None)
            .await;
        assert_eq!(a.status, 503, "{}", a.body);
        let message = assert_nova_error(&a.body, "serviceUnavailable", 503);
        assert!(
            message.contains("all 1 upstream connections (upstream.max_connections) stayed busy")
                && message.contains("not sent"),
            "{message}"
        );
        assert_eq!(a.headers["retry-after"], "1");
        let v1 = env.v1(TEAM, reqwest::Method::GET, "/instances", None).await;
        let message = assert_v1_failure(&v1, 10503);
        assert!(message.contains("stayed busy"), "{message}");
        let create = create_with_key().await.unwrap();
        assert_eq!(create.status(), 503);
        assert_eq!(relay.seen().len(), 2, "the refused calls were never sent");
        relay.release();
    };
    let (a, ()) = tokio::join!(held, refused);
    assert_eq!(a.status, 200, "{}", a.body);
    // The key was freed: the retry runs (not a replay of the 503).
    let retry = create_with_key().await.unwrap();
    assert_eq!(retry.status(), 200);
    assert!(retry.headers().get("idempotent-replayed").is_none());
    let body: Value = retry.json().await.unwrap();
    assert_eq!(body["keypair"]["name"], "busy-key", "{body}");
    assert_eq!(relay.seen().len(), 3);
    assert_eq!(relay.accepted(), 1);
    let text = env.metrics().await;
    // The v2 calls and at least one of the v1.0 surface's calls.
    let busy = metrics::sum(&text, r#"toastgate_upstream_outcomes_total{class="busy"}"#);
    assert!(busy >= 3.0, "{text}");
    assert_eq!(metrics::sum(&text, "toastgate_upstream_errors_total"), busy);
    assert!(
        text.contains(r#"toastgate_upstream_errors_total{action="flavor.list",kind="busy"} 1"#),
        "{text}"
    );
    env.stop().await;
}
