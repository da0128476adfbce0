//! TLS on the public listener: a client that verifies the certificate gets
//! through, one that does not trust the CA is refused, links say https, and
//! a rotated certificate is served without a restart.

mod common;

use std::path::Path;
use std::time::Duration;

use common::tempdir::TempDir;
use common::{Env, fast_sim, fixtures};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use serde_json::{Value, json};

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
        // Write the key first: the gateway re-reads when either file changes.
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        cert.der().to_vec()
    }
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

    let resp = verified
        .get(format!("{https}/v2/web/flavors"))
        .bearer_auth(env.token("web-team"))
        .send()
        .await
        .unwrap();
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

    // Rotate: a new certificate is picked up without a restart.
    let second = pki.write_leaf(dir.path());
    assert_ne!(first, second);
    let mut rotated = false;
    for _ in 0..50 {
        let fresh = client(Some(&ca_pem));
        let resp = fresh.get(format!("{https}/v2/")).send().await.unwrap();
        if peer_cert(&resp) == second {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rotated, "the rotated certificate was not served");
    env.stop().await;
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
