//! TLS on the public listener: a client that verifies the certificate gets
//! through, one that does not trust the CA is refused, links say https, and
//! a rotated certificate is served without a restart; HTTP/2 is negotiated
//! by ALPN; a handshake that stalls or fails is cut and gives its
//! connection slot back, and one in progress does not hold up the drain.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use std::sync::Arc;

use common::http::served;
use common::tempdir::TempDir;
use common::{Env, closed_by_server, fast_sim, fixtures, h2_handshake, metrics};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// Writes a fresh leaf for 127.0.0.1/localhost; returns its DER.
    fn write_leaf(&self, dir: &Path) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        // Each file is replaced whole (a temp file renamed over it), never
        // read half written; the key first. The gateway re-reads both when
        // either changes, so it may load the new key with the old
        // certificate in between, a pair that cannot complete a handshake,
        // until its next look.
        replace_file(&dir.join("key.pem"), key.serialize_pem().as_bytes());
        replace_file(&dir.join("cert.pem"), cert.pem().as_bytes());
        cert.der().to_vec()
    }
}

/// Writes `contents` to a temp file beside `path`, then renames it over `path`.
fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The public listener on TLS with cert.pem and key.pem in `dir`.
fn tls_in(dir: &TempDir) -> Value {
    json!({"listen": {"tls": {"cert_file": dir.join("cert.pem"), "key_file": dir.join("key.pem")}}})
}

fn client(ca_pem: Option<&str>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .https_only(true)
        .tls_info(true)
        .timeout(Duration::from_secs(10));
    if let Some(pem) = ca_pem {
        b = b
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// `GET /v2/web/flavors` as web-team, on the gateway's TLS listener.
async fn get_flavors(client: &reqwest::Client, env: &Env) -> reqwest::Response {
    let https = env.gw.replace("http://", "https://");
    client
        .get(format!("{https}/v2/web/flavors"))
        .bearer_auth(env.token("web-team"))
        .send()
        .await
        .unwrap()
}

fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .map(<[u8]>::to_vec)
        .unwrap()
}

#[tokio::test]
async fn tls_listener_serves_a_verified_certificate_and_reloads_it() {
    let dir = TempDir::new("tls");
    let pki = Pki::new();
    let first = pki.write_leaf(dir.path());
    let env = Env::start_with_overlays(fast_sim(), &[], tls_in(&dir)).await;
    let https = env.gw.replace("http://", "https://");
    let ca_pem = pki.ca.pem();
    let verified = client(Some(&ca_pem));

    let resp = get_flavors(&verified, &env).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(peer_cert(&resp), first);
    let body: serde_json::Value = resp.json().await.unwrap();
    let href = body["flavors"][0]["links"][0]["href"].as_str().unwrap();
    assert!(
        href.starts_with(&format!("{https}/v2/web/flavors/")),
        "{href}"
    );

    // Plain HTTP to the TLS port and a client that does not trust the CA both fail.
    let plain = env.http.get(format!("{}/v2/", env.gw)).send().await;
    assert!(
        !plain.map(|r| r.status().is_success()).unwrap_or(false),
        "plain HTTP must not be served on the TLS port"
    );
    assert!(
        client(None)
            .get(format!("{https}/v2/"))
            .send()
            .await
            .is_err(),
        "an unknown CA must not verify"
    );

    // Rotate: a new certificate is picked up without a restart (the
    // gateway looks every 2 s). A handshake that fails meanwhile met the
    // new key with the old certificate (see `write_leaf`): not rotated yet.
    let second = pki.write_leaf(dir.path());
    assert_ne!(first, second);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fresh = client(Some(&ca_pem));
        let served = match fresh.get(format!("{https}/v2/")).send().await {
            Ok(resp) => peer_cert(&resp) == second,
            Err(_) => false,
        };
        if served {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    env.stop().await;
}

/// A gateway on TLS with a fresh CA and leaf, `server` merged onto its
/// `server:` settings. Bind `_dir` when taking it apart: the certificate's
/// directory is removed when it is dropped.
struct TlsGateway {
    env: Env,
    pki: Pki,
    addr: String,
    _dir: TempDir,
}

async fn tls_gateway(name: &str, server: Value) -> TlsGateway {
    let dir = TempDir::new(name);
    let pki = Pki::new();
    pki.write_leaf(dir.path());
    let mut extra = tls_in(&dir);
    extra["server"] = server;
    let env = Env::start_with_overlays(fast_sim(), &[], extra).await;
    let addr = env.gw.trim_start_matches("http://").to_string();
    TlsGateway {
        env,
        pki,
        addr,
        _dir: dir,
    }
}

/// A TLS connection to `addr` that trusts only `pki`'s CA and offers `alpn`.
async fn tls_connect(
    pki: &Pki,
    addr: &str,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn http2_is_negotiated_by_alpn_and_served_over_tls() {
    let TlsGateway {
        env,
        pki,
        addr,
        _dir,
    } = tls_gateway("tlsh2", json!({})).await;

    let tls = tls_connect(&pki, &addr, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, driver) = h2_handshake(tls).await;
    let req = hyper::Request::get("https://localhost/v2/web/flavors")
        .header("authorization", format!("Bearer {}", env.token("web-team")))
        .body(http_body_util::Full::<bytes::Bytes>::default())
        .unwrap();
    send.ready().await.unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: Value = serde_json::from_slice(&body).unwrap();
    let href = body["flavors"][0]["links"][0]["href"].as_str().unwrap();
    assert!(href.starts_with("https://localhost"), "{href}");

    // A client offering only HTTP/1.1 gets HTTP/1.1.
    let tls = tls_connect(&pki, &addr, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    drop(send);
    driver.await.unwrap().unwrap();
    env.stop().await;
}

#[tokio::test]
async fn an_idle_tls_connection_is_parked_and_served_again() {
    let TlsGateway {
        env,
        pki,
        addr,
        _dir,
    } = tls_gateway("tlspark", json!({"header_read_timeout": "2s"})).await;
    let tls = tls_connect(&pki, &addr, &[b"http/1.1"]).await;
    let mut conn = tokio::io::BufReader::new(tls);
    let request = format!(
        "GET /v2/web/flavors HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
        env.token("web-team")
    );
    let first = served(&mut conn, &request).await;
    let parked =
        metrics::gauge_becomes(&env.http, &env.admin, "toastgate_parked_connections", 1).await;
    assert!(parked, "the idle TLS connection was never parked");
    // Past header_read_timeout: still open, and the same TLS session
    // carries the next request.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served(&mut conn, &request).await, first);
    env.stop().await;
}

#[tokio::test]
async fn a_tls_request_in_flight_at_shutdown_is_answered_before_the_gateway_stops() {
    let TlsGateway {
        env,
        pki,
        addr: _,
        _dir,
    } = tls_gateway("tlsstop", json!({})).await;
    let client = client(Some(&pki.ca.pem()));
    // Warm: the upstream token is held, the next call waits only on the
    // compute API's latency.
    assert_eq!(get_flavors(&client, &env).await.status(), 200);
    let flavor_lists = |sim: &toastgate::simulator::SimHandle| {
        sim.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with("/flavors"))
            .count()
    };
    let before = flavor_lists(&env.sim);
    env.sim.set_latency(Duration::from_millis(1500));
    let url = format!("{}/v2/web/flavors", env.gw.replace("http://", "https://"));
    let in_flight = tokio::spawn(client.get(url).bearer_auth(env.token("web-team")).send());
    // In flight: the simulator has it (it records a request when it
    // arrives, then holds it for the latency).
    let deadline = Instant::now() + Duration::from_secs(30);
    while flavor_lists(&env.sim) == before {
        assert!(
            Instant::now() < deadline,
            "the request never reached the simulator"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.stop().await;
    let resp = in_flight
        .await
        .unwrap()
        .expect("the request in flight was answered");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert!(
        body["flavors"].as_array().is_some_and(|f| !f.is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn a_stalled_or_failed_handshake_is_cut_and_gives_its_slot_back() {
    // One connection slot: a handshake that kept it would lock everyone out.
    let TlsGateway {
        env,
        pki,
        addr,
        _dir,
    } = tls_gateway(
        "tlsslot",
        json!({"max_connections": 1, "header_read_timeout": "1s"}),
    )
    .await;

    // A client that connects and never says hello.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(30)).await,
        "a handshake that never started was not cut"
    );
    // A client whose hello is not TLS.
    let mut garbled = TcpStream::connect(&addr).await.unwrap();
    garbled
        .write_all(b"GET /v2/ HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_by_server(&mut garbled, Duration::from_secs(30)).await,
        "a failed handshake was not closed"
    );

    // The only slot is free again: a verified client is served (were it
    // still held, this connection would wait in the backlog until the
    // client's timeout).
    let resp = get_flavors(&client(Some(&pki.ca.pem())), &env).await;
    assert_eq!(resp.status().as_u16(), 200);
    drop(resp);
    let m = env.metrics().await;
    assert!(
        metrics::value(&m, "toastgate_open_connections") <= 1.0,
        "{m}"
    );
    let failures = |reason: &str| {
        metrics::value(
            &m,
            &format!("toastgate_tls_handshake_failures_total{{reason=\"{reason}\"}}"),
        )
    };
    assert_eq!((failures("timeout"), failures("error")), (1.0, 1.0), "{m}");
    env.stop().await;
}

#[tokio::test]
async fn a_handshake_in_progress_does_not_hold_up_the_drain() {
    // The handshake's own deadline and the shutdown grace both far beyond
    // the harness's 30 s wait for the gateway to stop: only letting go of
    // the handshake when the listener stops lets it stop in time.
    let TlsGateway {
        env, addr, _dir, ..
    } = tls_gateway(
        "tlsdrain",
        json!({"header_read_timeout": "600s", "shutdown_grace": "600s"}),
    )
    .await;
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    // The gateway has the connection (its handshake has begun) before the
    // stop.
    let mut open = 0.0;
    for _ in 0..500 {
        open = metrics::value(&env.metrics().await, "toastgate_open_connections");
        if open == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open, 1.0, "the gateway never had the connection");
    env.stop().await;
    assert!(
        closed_by_server(&mut silent, Duration::from_secs(30)).await,
        "the half-open handshake was left open"
    );
}

#[test]
fn check_config_names_a_broken_certificate() {
    let dir = TempDir::new("tlsbad");
    std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
    std::fs::write(dir.join("key.pem"), "not a key").unwrap();
    let err = fixtures::parse_config(&[], tls_in(&dir), &common::secrets()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("listen.tls.cert_file: cannot read certificate file"),
        "{text}"
    );
}
