//! Helpers shared by the auth unit tests: generated keys, signing, temp
//! key files and configs.

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey, Header};
use serde_json::{Value, json};

use super::mint::unix_now;
use super::{Authenticator, Identity};
use crate::config::{Auth, KeySource};
use crate::secret::Secret;

pub(super) const ISSUER: &str = "https://idp.example.com";
pub(super) const AUDIENCE: &str = "toastgate";
pub(super) const HS_SECRET: &str = "test-only-0123456789abcdef-0123456789abcdef";

pub(super) struct KeyMaterial {
    pub(super) private_pem: String,
    pub(super) public_pem: String,
}

pub(super) struct TestKeys {
    pub(super) rsa: KeyMaterial,
    pub(super) rsa_other: KeyMaterial,
    pub(super) ec: KeyMaterial,
    pub(super) ed: KeyMaterial,
}

fn generate(alg: &'static rcgen::SignatureAlgorithm) -> KeyMaterial {
    let pair = rcgen::KeyPair::generate_for(alg).expect("key generation");
    KeyMaterial {
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
    }
}

/// Generated once per test run; nothing is committed.
pub(super) fn keys() -> &'static TestKeys {
    static KEYS: OnceLock<TestKeys> = OnceLock::new();
    KEYS.get_or_init(|| TestKeys {
        rsa: generate(&rcgen::PKCS_RSA_SHA256),
        rsa_other: generate(&rcgen::PKCS_RSA_SHA256),
        ec: generate(&rcgen::PKCS_ECDSA_P256_SHA256),
        ed: generate(&rcgen::PKCS_ED25519),
    })
}

pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("toastgate-auth-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    pub(super) fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn now() -> u64 {
    unix_now()
}

pub(super) fn claims(team: &str) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "team": team,
        "iat": now(),
        "exp": now() + 300,
    })
}

pub(super) fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

pub(super) fn without(mut claims: Value, key: &str) -> Value {
    if let Some(map) = claims.as_object_mut() {
        map.remove(key);
    }
    claims
}

pub(super) fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &KeyMaterial) -> String {
    let pem = key.private_pem.as_bytes();
    let encoding = match alg.family() {
        AlgorithmFamily::Rsa => EncodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => EncodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => EncodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => panic!("use sign_hs"),
    }
    .expect("encoding key");
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, claims, &encoding).expect("sign")
}

pub(super) fn sign_hs(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("sign")
}

pub(super) fn b64(text: &str) -> String {
    URL_SAFE_NO_PAD.encode(text)
}

pub(super) fn cfg(algorithms: Vec<Algorithm>, keys: KeySource) -> Auth {
    Auth {
        issuer: ISSUER.to_string(),
        audience: vec![AUDIENCE.to_string(), "second-audience".to_string()],
        algorithms,
        team_claim: "team".to_string(),
        leeway: Duration::from_secs(30),
        verified_token_cache: 10_000,
        keys,
    }
}

pub(super) fn hs_cfg() -> Auth {
    cfg(
        vec![Algorithm::HS256],
        KeySource::HsSecret(Secret::new(HS_SECRET)),
    )
}

pub(super) fn hs_auth() -> Authenticator {
    Authenticator::new(&hs_cfg()).expect("hs authenticator")
}

/// RSA (kid rsa-1), EC (kid ec-1) and Ed25519 (no kid) public keys as PEM.
pub(super) fn pem_auth(dir: &TempDir, algorithms: Vec<Algorithm>) -> Authenticator {
    let k = keys();
    let files = vec![
        (
            dir.write("rsa.pem", &k.rsa.public_pem),
            Some("rsa-1".to_string()),
        ),
        (
            dir.write("ec.pem", &k.ec.public_pem),
            Some("ec-1".to_string()),
        ),
        (dir.write("ed.pem", &k.ed.public_pem), None),
    ];
    Authenticator::new(&cfg(algorithms, KeySource::Pem(files))).expect("pem authenticator")
}

pub(super) fn rsa_only_auth(dir: &TempDir, algorithms: Vec<Algorithm>) -> Authenticator {
    let files = vec![(
        dir.write("rsa.pem", &keys().rsa.public_pem),
        Some("rsa-1".to_string()),
    )];
    Authenticator::new(&cfg(algorithms, KeySource::Pem(files))).expect("pem authenticator")
}

pub(super) fn jwk(key: &KeyMaterial, family: AlgorithmFamily, kid: &str) -> Value {
    let pem = key.public_pem.as_bytes();
    let decoding = match family {
        AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
        AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
        AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
        AlgorithmFamily::Hmac => panic!("no oct keys in these tests"),
    }
    .expect("decoding key");
    let mut jwk = Jwk::from_decoding_key(&decoding, None).expect("jwk");
    jwk.common.key_id = Some(kid.to_string());
    jwk.common.public_key_use = Some(PublicKeyUse::Signature);
    serde_json::to_value(&jwk).expect("jwk json")
}

pub(super) fn identity(team: &str) -> Identity {
    Identity {
        team: team.into(),
        subject: Some("alice".into()),
    }
}
