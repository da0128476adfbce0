//! The JWKS URL is fetched by the same HTTPS client as every upstream call:
//! an identity provider behind a private CA works once `upstream.ca_file`
//! names that CA, and is refused (keys unavailable) without it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::tempdir::TempDir;
use common::{Env, ReloadingGateway, assert_nova_error, fast_sim, fixtures, start_sim};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// A private CA, an HTTPS server on 127.0.0.1 with a leaf it signed, serving
/// one JWKS with an ES256 key; the CA's PEM is written to `dir/ca.pem`.
struct Idp {
    url: String,
    signing: KeyPair,
    /// Cleared: the IdP answers 503 (down).
    up: Arc<AtomicBool>,
}

async fn private_idp(dir: &TempDir) -> Idp {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();

    let signing = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = signing.public_key_raw();
    assert_eq!(point.len(), 65, "an uncompressed P-256 point");
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "kid": "idp-1", "alg": "ES256", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    }]});

    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![CertificateDer::from(leaf.der().to_vec())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der())),
    )
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}/jwks", listener.local_addr().unwrap());
    let body = Bytes::from(jwks.to_string());
    let up = Arc::new(AtomicBool::new(true));
    let serving = up.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body, up) = (acceptor.clone(), body.clone(), serving.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return; // a client that does not trust the CA
                };
                let service = hyper::service::service_fn(move |_req| {
                    let (body, up) = (body.clone(), up.load(Ordering::SeqCst));
                    async move {
                        let answer = if up {
                            hyper::Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(body))
                        } else {
                            hyper::Response::builder()
                                .status(503)
                                .body(Full::new(Bytes::from_static(b"down")))
                        };
                        Ok::<_, std::convert::Infallible>(answer.unwrap())
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Idp { url, signing, up }
}

/// A gateway verifying ES256 tokens against the IdP's JWKS URL.
fn jwks_auth(idp: &Idp, ca_file: Option<&std::path::Path>) -> Value {
    let mut extra = json!({"auth": {
        "algorithms": ["ES256"],
        "keys": {"type": "jwks_url", "url": idp.url, "secret_env": null},
    }});
    if let Some(ca) = ca_file {
        extra["upstream"] = json!({"ca_file": ca});
    }
    extra
}

fn es256_token(idp: &Idp, team: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("idp-1".into());
    let now = chrono::Utc::now().timestamp();
    let claims = json!({"iss": "toastgate-test", "aud": "toastgate", "team": team,
                        "sub": "someone", "iat": now, "exp": now + 600});
    let key =
        jsonwebtoken::EncodingKey::from_ec_pem(idp.signing.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

async fn flavors(env: &Env, token: &str) -> (u16, Value) {
    let r = env
        .http
        .get(env.url("/v2/web/flavors"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn a_jwks_url_behind_a_private_ca_works_with_upstream_ca_file() {
    let dir = TempDir::new("jwks-tls");
    let idp = private_idp(&dir).await;
    let env =
        Env::start_with_overlays(fast_sim(), &[], jwks_auth(&idp, Some(&dir.join("ca.pem")))).await;
    let (s, b) = flavors(&env, &es256_token(&idp, "web-team")).await;
    assert_eq!(s, 200, "{b}");
    env.stop().await;
}

#[tokio::test]
async fn without_the_ca_the_jwks_url_is_not_trusted() {
    let dir = TempDir::new("jwks-tls-untrusted");
    let idp = private_idp(&dir).await;
    let env = Env::start_with_overlays(fast_sim(), &[], jwks_auth(&idp, None)).await;
    let (s, b) = flavors(&env, &es256_token(&idp, "web-team")).await;
    assert_eq!(s, 503, "{b}");
    assert!(assert_nova_error(&b, "serviceUnavailable", 503).contains("signing keys"));
    env.stop().await;
}

/// A reload that leaves `auth` as it was keeps the keys already fetched: an
/// IdP that is down at that moment locks nobody out. One that changes
/// `auth` starts afresh, and says so by needing the IdP.
#[tokio::test]
async fn a_reload_keeps_the_fetched_keys_while_the_idp_is_down() {
    let dir = TempDir::new("jwks-reload");
    let idp = private_idp(&dir).await;
    let sim = start_sim(fast_sim()).await;
    let auth = jwks_auth(&idp, Some(&dir.join("ca.pem")));
    let text = |extra: &Value| {
        fixtures::to_text(&fixtures::gateway_config(
            &sim.base_url(),
            &[],
            extra.clone(),
        ))
    };
    let path = dir.join("toastgate.yaml");
    std::fs::write(&path, text(&auth)).unwrap();
    let gateway = ReloadingGateway::start(&path).await;
    let (gw, admin) = (gateway.gw.clone(), gateway.admin.clone());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let token = es256_token(&idp, "web-team");
    let flavors = |http: reqwest::Client, gw: String, token: String| async move {
        let r = http
            .get(format!("{gw}/v2/web/flavors"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let call = || flavors(http.clone(), gw.clone(), token.clone());
    assert_eq!(call().await.0, 200, "keys fetched while the IdP is up");

    idp.up.store(false, Ordering::SeqCst);
    // An unrelated change: a new team.
    let mut changed = auth.clone();
    changed["teams"] = json!({"new-team": {"projects": ["web"], "allow": [{"actions": ["read"]}]}});
    std::fs::write(&path, text(&changed)).unwrap();
    let reloads = |n: u32| format!("toastgate_config_reloads_total{{result=\"success\"}} {n}");
    assert!(
        common::metrics::eventually_contains(
            &http,
            &admin,
            &reloads(1),
            100,
            Duration::from_millis(100)
        )
        .await,
        "the new file was not loaded"
    );
    let (s, b) = call().await;
    assert_eq!(s, 200, "the reload dropped the keys it held: {b}");

    // `auth` itself changed (a wider leeway): a fresh key cache, which the
    // IdP, down, cannot fill.
    changed["auth"]["leeway"] = json!("45s");
    std::fs::write(&path, text(&changed)).unwrap();
    assert!(
        common::metrics::eventually_contains(
            &http,
            &admin,
            &reloads(2),
            100,
            Duration::from_millis(100)
        )
        .await,
        "the changed auth was not loaded"
    );
    let (s, b) = call().await;
    assert_eq!(s, 503, "{b}");
    idp.up.store(true, Ordering::SeqCst);

    gateway.stop().await;
    sim.shutdown();
}
