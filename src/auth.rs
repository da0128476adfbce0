//! Caller authentication: every request carries a team JWT, verified here.
//!
//! Verification order (each step maps to one [`AuthError`] variant):
//! 1. shape: three base64url segments, a JSON-object header with a string `alg`
//!    (no `crit` extensions: we understand none);
//! 2. the header `alg` must be in the configured allow-list (`none` never is);
//! 3. key selection: a token `kid` picks the key with that id, else every key
//!    whose type fits `alg` is tried; the key type must always fit `alg`, so an
//!    RSA/EC/Ed key can never be used as an HMAC secret (algorithm confusion);
//! 4. signature, then the registered claims (`exp` required, `nbf` when
//!    present, `iss`, `aud`, with the configured leeway) through jsonwebtoken;
//! 5. the team claim (a non-empty string) and the optional `sub`.
//!
//! Key sources: a shared HS secret, PEM public keys, a JWKS file, or a JWKS URL
//! (fetched lazily, cached for `cache_ttl`, refetched on an unknown `kid` at
//! most once per `min_refetch_interval`, single-flight, and the last good set
//! keeps serving when the identity provider is unreachable).
//!
//! Nothing here logs or displays a token or key material.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind, EncodingKey, Header, Validation,
};
use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::config::{Auth, KeySource};

/// Longest compact JWT we look at; anything longer is refused before decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Whole-fetch deadline for the JWKS URL (connect, TLS, headers and body).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JWKS document we accept.
const JWKS_MAX_BYTES: usize = 1024 * 1024;
/// Same floor as the config validation (defence in depth).
const MIN_HS_SECRET_BYTES: usize = 32;
const MIN_RSA_BITS: usize = 2048;
/// Same ceiling as the config validation (jsonwebtoken computes `now - leeway`).
const MAX_LEEWAY: Duration = Duration::from_secs(300);
/// Sentinel for "never attempted" in [`RemoteJwks::last_attempt_ms`].
const NEVER: u64 = u64::MAX;

// ---------------------------------------------------------------------------
// Public types

/// Who is calling, as proven by a verified JWT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub team: String,
    pub subject: Option<String>,
}

/// Why a caller's token was refused. The messages are safe to show the
/// caller: they never include the token or key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token was presented")]
    Missing,
    #[error("the bearer token is not a well-formed JWT")]
    Malformed,
    #[error("tokens signed with `{0}` are not accepted")]
    AlgorithmNotAllowed(String),
    #[error("the token names no known signing key")]
    UnknownKey,
    #[error("the token signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token lacks the required `{0}` claim")]
    MissingClaim(String),
    #[error("the token's `{0}` claim is invalid")]
    InvalidClaim(String),
    #[error("the token was not issued by the trusted issuer")]
    WrongIssuer,
    #[error("the token is not intended for this service")]
    WrongAudience,
    #[error("token signing keys are temporarily unavailable")]
    KeysUnavailable,
}

impl AuthError {
    /// A bounded label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::AlgorithmNotAllowed(_) => "algorithm",
            AuthError::UnknownKey => "unknown_key",
            AuthError::BadSignature => "signature",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::InvalidClaim(_) => "invalid_claim",
            AuthError::WrongIssuer => "issuer",
            AuthError::WrongAudience => "audience",
            AuthError::KeysUnavailable => "keys_unavailable",
        }
    }
}

/// A problem setting up authentication. File errors name the file; no
/// message ever contains key material.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("auth config: {0}")]
    Config(&'static str),
    #[error("cannot read key file {}: {source}", path.display())]
    ReadKeyFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {}: {reason}", path.display())]
    BadKeyFile { path: PathBuf, reason: String },
    #[error("auth.keys.url: {0}")]
    JwksUrl(&'static str),
    #[error("cannot set up the HTTPS client for the JWKS URL: {0}")]
    HttpClient(String),
    #[error("tokens can only be minted with `hs_secret` keys")]
    NotHsSecret,
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// Verifies caller JWTs. `Send + Sync`; share it in an `Arc`.
pub struct Authenticator {
    algorithms: Vec<Algorithm>,
    /// One prepared `Validation` per allowed algorithm (jsonwebtoken wants the
    /// validation's algorithms to share the key's family).
    validations: Vec<(Algorithm, Validation)>,
    team_claim: String,
    keys: Keys,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.algorithms)
            .field("team_claim", &self.team_claim)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Loads PEM / JWKS files / HS secret eagerly (errors name the file). For
    /// a JWKS URL this does not block: keys are fetched on first use.
    pub fn new(cfg: &Auth) -> Result<Self, AuthSetupError> {
        install_crypto_provider();
        if cfg.algorithms.is_empty() {
            return Err(AuthSetupError::Config("list at least one algorithm"));
        }
        if cfg.issuer.trim().is_empty() {
            return Err(AuthSetupError::Config("the issuer must not be empty"));
        }
        if cfg.audience.is_empty() || cfg.audience.iter().any(|a| a.trim().is_empty()) {
            return Err(AuthSetupError::Config(
                "name at least one non-empty audience",
            ));
        }
        if cfg.team_claim.trim().is_empty() {
            return Err(AuthSetupError::Config(
                "the team claim name must not be empty",
            ));
        }
        if cfg.leeway > MAX_LEEWAY {
            return Err(AuthSetupError::Config("the leeway must be at most 5m"));
        }
        let hmac = cfg
            .algorithms
            .iter()
            .filter(|a| a.family() == AlgorithmFamily::Hmac)
            .count();
        let keys = match &cfg.keys {
            KeySource::HsSecret(secret) => {
                if hmac != cfg.algorithms.len() {
                    return Err(AuthSetupError::Config(
                        "hs_secret keys verify HS256/HS384/HS512 only; do not list public-key algorithms (algorithm confusion)",
                    ));
                }
                if secret.expose().len() < MIN_HS_SECRET_BYTES {
                    return Err(AuthSetupError::Config(
                        "the HS secret must be at least 32 bytes long",
                    ));
                }
                Keys::Static(Arc::new(KeySet::new(vec![VerifyKey {
                    kid: None,
                    kind: KeyKind::Hmac,
                    alg: None,
                    key: DecodingKey::from_secret(secret.expose().as_bytes()),
                }])))
            }
            _ if hmac > 0 => {
                return Err(AuthSetupError::Config(
                    "HS* algorithms need hs_secret keys; public keys are never used as HMAC secrets (algorithm confusion)",
                ));
            }
            KeySource::Pem(files) => {
                if files.is_empty() {
                    return Err(AuthSetupError::Config("list at least one PEM file"));
                }
                let keys = files
                    .iter()
                    .map(|(path, kid)| load_pem(path, kid.as_deref(), &cfg.algorithms))
                    .collect::<Result<Vec<_>, _>>()?;
                Keys::Static(Arc::new(KeySet::new(keys)))
            }
            KeySource::JwksFile(path) => {
                let bytes = std::fs::read(path).map_err(|source| AuthSetupError::ReadKeyFile {
                    path: path.clone(),
                    source,
                })?;
                let keys = parse_jwks(&bytes, &cfg.algorithms).map_err(|reason| {
                    AuthSetupError::BadKeyFile {
                        path: path.clone(),
                        reason,
                    }
                })?;
                if keys.is_empty() {
                    return Err(AuthSetupError::BadKeyFile {
                        path: path.clone(),
                        reason: "holds no signature key usable with the configured algorithms"
                            .to_string(),
                    });
                }
                Keys::Static(Arc::new(KeySet::new(keys)))
            }
            KeySource::JwksUrl {
                url,
                cache_ttl,
                min_refetch_interval,
            } => Keys::Remote(Arc::new(RemoteJwks::new(
                url,
                *cache_ttl,
                *min_refetch_interval,
                &cfg.algorithms,
            )?)),
        };
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                v.leeway = cfg.leeway.as_secs();
                v.validate_exp = true;
                v.validate_nbf = true;
                v.validate_aud = true;
                v.set_issuer(&[cfg.issuer.as_str()]);
                v.set_audience(&cfg.audience);
                (alg, v)
            })
            .collect();
        Ok(Authenticator {
            algorithms: cfg.algorithms.clone(),
            validations,
            team_claim: cfg.team_claim.clone(),
            keys,
        })
    }

    /// Verifies `token` (the raw compact JWT, without "Bearer ") and returns
    /// the identity.
    pub async fn authenticate(&self, token: &str) -> Result<Identity, AuthError> {
        let result = self.verify(token).await;
        if let Err(e) = &result {
            tracing::debug!(reason = e.reason(), "caller token rejected");
        }
        result
    }

    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let mut segments = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(_signature), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(AuthError::Malformed);
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|_| AuthError::Malformed)?;
        let header: RawHeader<'_> =
            serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed)?;
        if header.crit.is_some() {
            return Err(AuthError::Malformed);
        }
        let alg = self.allowed_algorithm(&header.alg)?;
        let kid = header.kid.as_deref();
        match &self.keys {
            Keys::Static(set) => self.verify_with(set, alg, kid, token, payload_b64),
            Keys::Remote(remote) => {
                let set = remote.key_set_for(kid).await?;
                self.verify_with(&set, alg, kid, token, payload_b64)
            }
        }
    }

    fn allowed_algorithm(&self, name: &str) -> Result<Algorithm, AuthError> {
        name.parse::<Algorithm>()
            .ok()
            .filter(|alg| self.algorithms.contains(alg))
            .ok_or_else(|| AuthError::AlgorithmNotAllowed(shown_alg(name)))
    }

    fn verify_with(
        &self,
        set: &KeySet,
        alg: Algorithm,
        kid: Option<&str>,
        token: &str,
        payload_b64: &str,
    ) -> Result<Identity, AuthError> {
        let select = match kid {
            Some(id) if set.has_kid(id) => {
                if set.candidates(alg, Select::Kid(id)).next().is_none() {
                    // The named key exists but is of another type (or pinned to
                    // another `alg`): never verify across families.
                    return Err(AuthError::AlgorithmNotAllowed(alg_name(alg)));
                }
                Select::Kid(id)
            }
            // Unknown kid: only keys not bound to any kid may stand in.
            Some(_) => Select::Unbound,
            None => Select::Any,
        };
        let validation = self
            .validations
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, v)| v)
            .ok_or_else(|| AuthError::AlgorithmNotAllowed(alg_name(alg)))?;
        let mut tried = false;
        for key in set.candidates(alg, select) {
            tried = true;
            match jsonwebtoken::decode::<IgnoredAny>(token, &key.key, validation) {
                Ok(_) => return self.identity(payload_b64),
                Err(e) => match e.kind() {
                    // This key did not verify it; another candidate may.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidKeyFormat => continue,
                    _ => return Err(map_jwt_error(e.kind(), alg, payload_b64)),
                },
            }
        }
        Err(if tried {
            AuthError::BadSignature
        } else {
            AuthError::UnknownKey
        })
    }

    /// Reads the team and subject from a payload whose signature and
    /// registered claims were verified.
    fn identity(&self, payload_b64: &str) -> Result<Identity, AuthError> {
        let json = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Malformed)?;
        let mut de = serde_json::Deserializer::from_slice(&json);
        let found = ScanClaims {
            team_claim: &self.team_claim,
        }
        .deserialize(&mut de)
        .map_err(|_| AuthError::Malformed)?;
        de.end().map_err(|_| AuthError::Malformed)?;
        // jsonwebtoken accepts an array `iss` when one element matches; the
        // issuer is a single string here.
        if !matches!(found.iss, Slot::Str(_)) {
            return Err(AuthError::InvalidClaim("iss".to_string()));
        }
        let team = match found.team {
            Slot::Str(team) if !team.is_empty() => team,
            Slot::Absent => return Err(AuthError::MissingClaim(self.team_claim.clone())),
            _ => return Err(AuthError::InvalidClaim(self.team_claim.clone())),
        };
        let subject = match found.sub {
            Slot::Str(sub) => Some(sub),
            _ => None,
        };
        Ok(Identity { team, subject })
    }
}

/// Signs a dev/test token with the configured HS secret (error unless keys
/// are [`KeySource::HsSecret`]). Claims: `iss`, `aud` (the first configured
/// audience), `sub`, the team claim, `iat`, `nbf` = `iat`, `exp` = `iat` +
/// `ttl`, `jti`.
pub fn mint_token(
    cfg: &Auth,
    team: &str,
    subject: &str,
    ttl: Duration,
) -> Result<String, AuthSetupError> {
    install_crypto_provider();
    let KeySource::HsSecret(secret) = &cfg.keys else {
        return Err(AuthSetupError::NotHsSecret);
    };
    let alg = cfg
        .algorithms
        .iter()
        .copied()
        .find(|a| a.family() == AlgorithmFamily::Hmac)
        .ok_or(AuthSetupError::Config(
            "minting needs HS256, HS384 or HS512 in auth.algorithms",
        ))?;
    if secret.expose().len() < MIN_HS_SECRET_BYTES {
        return Err(AuthSetupError::Config(
            "the HS secret must be at least 32 bytes long",
        ));
    }
    let audience = cfg
        .audience
        .first()
        .ok_or(AuthSetupError::Config("name at least one audience"))?;
    let iat = unix_now();
    let lifetime = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    let mut claims = serde_json::Map::new();
    claims.insert("iss".into(), cfg.issuer.clone().into());
    claims.insert("aud".into(), audience.clone().into());
    claims.insert("sub".into(), subject.into());
    claims.insert("iat".into(), iat.into());
    claims.insert("nbf".into(), iat.into());
    claims.insert("exp".into(), iat.saturating_add(lifetime).into());
    claims.insert("jti".into(), uuid::Uuid::new_v4().to_string().into());
    // Last, so the team always round-trips even if its claim name is unusual.
    claims.insert(cfg.team_claim.clone(), team.into());
    jsonwebtoken::encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(secret.expose().as_bytes()),
    )
    .map_err(|e| AuthSetupError::Sign(e.to_string()))
}

/// jsonwebtoken 11 needs a process-wide crypto provider. With only the
/// `aws_lc_rs` feature it would pick that one on first use anyway; installing
/// it explicitly keeps working should another provider feature get unified in.
fn install_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let ours = &jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER;
        if let Err(existing) = ours.install_default()
            && !std::ptr::eq(existing, ours)
        {
            tracing::debug!("another jsonwebtoken crypto provider is installed; keeping it");
        }
    });
}

// ---------------------------------------------------------------------------
// Token parsing helpers

/// The header fields we need before choosing a key. jsonwebtoken parses the
/// full header again; parsing `alg` as a string here is what lets `none` and
/// unknown algorithms be reported as such rather than as bad JSON.
#[derive(Deserialize)]
struct RawHeader<'a> {
    #[serde(borrow)]
    alg: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    #[serde(default)]
    crit: Option<IgnoredAny>,
}

/// The header `alg` as shown in an error: short, no odd characters.
fn shown_alg(name: &str) -> String {
    let shown: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(16)
        .collect();
    if shown.is_empty() {
        "(empty)".to_string()
    } else {
        shown
    }
}

fn alg_name(alg: Algorithm) -> String {
    format!("{alg:?}")
}

fn map_jwt_error(kind: &ErrorKind, alg: Algorithm, payload_b64: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::MissingAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName => AuthError::AlgorithmNotAllowed(alg_name(alg)),
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSubject => AuthError::InvalidClaim("sub".to_string()),
        ErrorKind::InvalidClaimFormat(claim) => AuthError::InvalidClaim(claim.clone()),
        // jsonwebtoken reports a present-but-mistyped required claim (e.g.
        // `"exp": "9999999999"`) as missing; tell the two apart. The signature
        // was verified before claims validation, so the payload is trusted.
        ErrorKind::MissingRequiredClaim(claim) => match claim_present(payload_b64, claim) {
            Some(true) => AuthError::InvalidClaim(claim.clone()),
            Some(false) => AuthError::MissingClaim(claim.clone()),
            None => AuthError::Malformed,
        },
        _ => AuthError::BadSignature,
    }
}

fn claim_present(payload_b64: &str, claim: &str) -> Option<bool> {
    let json = URL_SAFE_NO_PAD.decode(payload_b64).ok()?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json).ok()?;
    Some(claims.contains_key(claim))
}

/// One claim of interest, read in a single pass over the payload.
#[derive(Default)]
enum Slot {
    #[default]
    Absent,
    Str(String),
    /// Not a string, or given twice.
    Invalid,
}

impl Slot {
    fn set(&mut self, value: &serde_json::Value) {
        *self = match (&*self, value) {
            (Slot::Absent, serde_json::Value::String(s)) => Slot::Str(s.clone()),
            _ => Slot::Invalid,
        };
    }
}

#[derive(Default)]
struct ScannedClaims {
    team: Slot,
    sub: Slot,
    iss: Slot,
}

/// Scans the claims object for the team claim (whose name is configured),
/// `sub` and `iss`, skipping everything else without building it.
struct ScanClaims<'a> {
    team_claim: &'a str,
}

impl<'de> DeserializeSeed<'de> for ScanClaims<'_> {
    type Value = ScannedClaims;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ScanClaims<'_> {
    type Value = ScannedClaims;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = ScannedClaims::default();
        let seed = FieldSeed {
            team_claim: self.team_claim,
        };
        while let Some(field) = map.next_key_seed(seed)? {
            if field.team || field.sub || field.iss {
                let value: serde_json::Value = map.next_value()?;
                if field.team {
                    out.team.set(&value);
                }
                if field.sub {
                    out.sub.set(&value);
                }
                if field.iss {
                    out.iss.set(&value);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(out)
    }
}

#[derive(Clone, Copy)]
struct Field {
    team: bool,
    sub: bool,
    iss: bool,
}

#[derive(Clone, Copy)]
struct FieldSeed<'a> {
    team_claim: &'a str,
}

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl Visitor<'_> for FieldSeed<'_> {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a claim name")
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Field, E> {
        Ok(Field {
            team: name == self.team_claim,
            sub: name == "sub",
            iss: name == "iss",
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Keys

/// A key's type, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm as A;
        matches!(
            (self, alg),
            (KeyKind::Hmac, A::HS256 | A::HS384 | A::HS512)
                | (
                    KeyKind::Rsa,
                    A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
                )
                | (KeyKind::EcP256, A::ES256)
                | (KeyKind::EcP384, A::ES384)
                | (KeyKind::Ed25519, A::EdDSA)
        )
    }
}

struct VerifyKey {
    kid: Option<String>,
    kind: KeyKind,
    /// A JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl VerifyKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

#[derive(Clone, Copy)]
enum Select<'a> {
    /// Keys with exactly this kid.
    Kid(&'a str),
    /// Keys bound to no kid (PEM without kid, JWK without kid, the HS secret).
    Unbound,
    /// Every key.
    Any,
}

struct KeySet {
    keys: Vec<VerifyKey>,
    fetched_at: Instant,
}

impl KeySet {
    fn new(keys: Vec<VerifyKey>) -> Self {
        KeySet {
            keys,
            fetched_at: Instant::now(),
        }
    }

    fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    fn candidates<'s>(
        &'s self,
        alg: Algorithm,
        select: Select<'s>,
    ) -> impl Iterator<Item = &'s VerifyKey> + 's {
        self.keys.iter().filter(move |k| {
            k.fits(alg)
                && match select {
                    Select::Kid(id) => k.kid.as_deref() == Some(id),
                    Select::Unbound => k.kid.is_none(),
                    Select::Any => true,
                }
        })
    }
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.keys.iter().map(|k| (k.kind, k.kid.as_deref())))
            .finish()
    }
}

enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keys::Static(set) => f.debug_tuple("Static").field(set).finish(),
            Keys::Remote(remote) => f
                .debug_struct("JwksUrl")
                .field("url", &remote.shown_url)
                .field("cache_ttl", &remote.cache_ttl)
                .field("cached", &remote.state().1)
                .finish(),
        }
    }
}

/// Which key types the configured algorithms can use.
fn wanted_kinds(algorithms: &[Algorithm]) -> impl Iterator<Item = KeyKind> + '_ {
    [
        KeyKind::Rsa,
        KeyKind::EcP256,
        KeyKind::EcP384,
        KeyKind::Ed25519,
    ]
    .into_iter()
    .filter(|kind| algorithms.iter().any(|a| kind.fits(*a)))
}

/// Determines (and sanity-checks) the type of a parsed public key.
fn classify(key: &DecodingKey) -> Result<KeyKind, String> {
    match key.family() {
        AlgorithmFamily::Hmac => Ok(KeyKind::Hmac),
        AlgorithmFamily::Rsa => {
            let bits = rsa_modulus_bits(key)?;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
                ));
            }
            Ok(KeyKind::Rsa)
        }
        AlgorithmFamily::Ec => match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(65) => Ok(KeyKind::EcP256),
            Ok(97) => Ok(KeyKind::EcP384),
            _ => Err("unsupported EC key (P-256 and P-384 are supported)".to_string()),
        },
        AlgorithmFamily::Ed => match key.try_get_as_bytes().map(<[u8]>::len) {
            Ok(32) => Ok(KeyKind::Ed25519),
            _ => Err("unsupported EdDSA key (only Ed25519 is supported)".to_string()),
        },
    }
}

fn rsa_modulus_bits(key: &DecodingKey) -> Result<usize, String> {
    let invalid = || "not a valid RSA public key".to_string();
    let modulus: Cow<'_, [u8]> = match key.kind() {
        DecodingKeyKind::RsaModulusExponent { n, e } => {
            if e.is_empty() {
                return Err(invalid());
            }
            Cow::Borrowed(n.as_slice())
        }
        DecodingKeyKind::SecretOrDer(der) => {
            let components = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER
                .key_utils
                .rsa_pub_components_from_public_key;
            let (n, _) = components(der).map_err(|_| invalid())?;
            Cow::Owned(n)
        }
    };
    let significant = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    let rest = &modulus[significant..];
    match rest.first() {
        Some(first) => Ok(rest.len() * 8 - first.leading_zeros() as usize),
        None => Err(invalid()),
    }
}

/// The label of the first PEM block, e.g. `PUBLIC KEY`.
fn pem_label(text: &[u8]) -> Option<String> {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let start = text.windows(BEGIN.len()).position(|w| w == BEGIN)? + BEGIN.len();
    let rest = &text[start..];
    let end = rest.windows(5).position(|w| w == b"-----")?;
    let label: String = rest[..end]
        .iter()
        .take(40)
        .map(|b| char::from(*b))
        .filter(|c| c.is_ascii_uppercase() || *c == ' ' || c.is_ascii_digit())
        .collect();
    Some(label)
}

fn load_pem(
    path: &Path,
    kid: Option<&str>,
    algorithms: &[Algorithm],
) -> Result<VerifyKey, AuthSetupError> {
    let bad = |reason: String| AuthSetupError::BadKeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|source| AuthSetupError::ReadKeyFile {
        path: path.to_path_buf(),
        source,
    })?;
    let label = pem_label(&bytes)
        .ok_or_else(|| bad("is not a PEM file (no -----BEGIN line)".to_string()))?;
    match label.as_str() {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {}
        l if l.contains("PRIVATE KEY") => {
            return Err(bad(
                "holds a private key; configure the matching public key".to_string(),
            ));
        }
        "CERTIFICATE" => {
            return Err(bad(
                "holds a certificate; configure its public key (openssl x509 -pubkey -noout)"
                    .to_string(),
            ));
        }
        other => return Err(bad(format!("holds a `{other}` block, not a public key"))),
    }
    let mut families: Vec<AlgorithmFamily> = Vec::new();
    for kind in wanted_kinds(algorithms) {
        let family = match kind {
            KeyKind::Rsa => AlgorithmFamily::Rsa,
            KeyKind::EcP256 | KeyKind::EcP384 => AlgorithmFamily::Ec,
            KeyKind::Ed25519 => AlgorithmFamily::Ed,
            KeyKind::Hmac => continue,
        };
        if !families.contains(&family) {
            families.push(family);
        }
    }
    for family in families {
        let parsed = match family {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(&bytes),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(&bytes),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(&bytes),
            AlgorithmFamily::Hmac => continue,
        };
        let Ok(key) = parsed else { continue };
        let kind = classify(&key).map_err(bad)?;
        if !algorithms.iter().any(|a| kind.fits(*a)) {
            return Err(bad(format!(
                "holds a {kind:?} key, which none of the configured algorithms uses"
            )));
        }
        return Ok(VerifyKey {
            kid: kid.map(str::to_string),
            kind,
            alg: None,
            key,
        });
    }
    Err(bad(
        "is not an RSA, EC (P-256/P-384) or Ed25519 public key usable with the configured algorithms"
            .to_string(),
    ))
}

#[derive(Deserialize)]
struct RawJwks {
    keys: Vec<serde_json::Value>,
}

/// Parses a JWKS document, keeping the signature keys usable with
/// `algorithms`. Unusable entries (encryption keys, other key types, bad
/// parameters) are skipped, not fatal.
fn parse_jwks(bytes: &[u8], algorithms: &[Algorithm]) -> Result<Vec<VerifyKey>, String> {
    let raw: RawJwks = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "is not a JWKS document ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    let mut keys = Vec::with_capacity(raw.keys.len());
    for (index, value) in raw.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(_) => {
                tracing::debug!(index, "ignoring a JWK that cannot be parsed");
                continue;
            }
        };
        match jwk_to_key(&jwk, algorithms) {
            Ok(key) => keys.push(key),
            Err(why) => tracing::debug!(
                index,
                kid = jwk.common.key_id.as_deref().unwrap_or("-"),
                why = %why,
                "ignoring JWK"
            ),
        }
    }
    Ok(keys)
}

fn jwk_to_key(jwk: &Jwk, algorithms: &[Algorithm]) -> Result<VerifyKey, Cow<'static, str>> {
    if let Some(usage) = &jwk.common.public_key_use
        && *usage != PublicKeyUse::Signature
    {
        return Err("`use` is not `sig`".into());
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("`key_ops` does not allow `verify`".into());
    }
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(
            Algorithm::try_from(ka).map_err(|_| "`alg` is not a supported signature algorithm")?,
        ),
    };
    let kind = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyKind::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyKind::EcP256,
            EllipticCurve::P384 => KeyKind::EcP384,
            _ => return Err("unsupported EC curve".into()),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyKind::Ed25519,
            _ => return Err("unsupported OKP curve".into()),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err("symmetric (`oct`) keys are never taken from a JWKS".into());
        }
        _ => return Err("unsupported `kty`".into()),
    };
    if let Some(alg) = alg
        && !kind.fits(alg)
    {
        return Err("`alg` does not match the key type".into());
    }
    if !algorithms
        .iter()
        .any(|a| kind.fits(*a) && alg.is_none_or(|pinned| pinned == *a))
    {
        return Err("no configured algorithm uses this key".into());
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|_| "invalid key parameters")?;
    if classify(&key)? != kind {
        return Err("key parameters do not match the curve".into());
    }
    Ok(VerifyKey {
        kid: jwk.common.key_id.clone(),
        kind,
        alg,
        key,
    })
}

// ---------------------------------------------------------------------------
// JWKS URL

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

struct RemoteJwks {
    uri: http::Uri,
    /// The URL without credentials, for logs.
    shown_url: String,
    cache_ttl: Duration,
    min_refetch_ms: u64,
    algorithms: Vec<Algorithm>,
    client: HttpClient,
    epoch: Instant,
    /// The last good key set, swapped atomically: no lock on the request path.
    current: ArcSwapOption<KeySet>,
    /// Completed fetch attempts (good or failed): lets waiters see that the
    /// fetch they queued behind already happened.
    generation: AtomicU64,
    /// Start of the last fetch attempt, in ms since `epoch` ([`NEVER`] if none).
    last_attempt_ms: AtomicU64,
    /// Single-flight: held by the one task fetching.
    flight: tokio::sync::Mutex<()>,
}

impl RemoteJwks {
    fn new(
        url: &str,
        cache_ttl: Duration,
        min_refetch_interval: Duration,
        algorithms: &[Algorithm],
    ) -> Result<Self, AuthSetupError> {
        let uri: http::Uri = url
            .parse()
            .map_err(|_| AuthSetupError::JwksUrl("is not a valid URL"))?;
        let scheme = match uri.scheme_str() {
            Some(s @ ("http" | "https")) => s,
            _ => return Err(AuthSetupError::JwksUrl("must be an http or https URL")),
        };
        let Some(authority) = uri.authority() else {
            return Err(AuthSetupError::JwksUrl("must name a host"));
        };
        if authority.as_str().contains('@') {
            return Err(AuthSetupError::JwksUrl("must not embed credentials"));
        }
        let shown_url = format!("{scheme}://{authority}{}", uri.path());
        if scheme == "http" && !is_loopback(authority.host()) {
            tracing::warn!(
                url = %shown_url,
                "the JWKS URL is plain http: anyone on the path can substitute signing keys"
            );
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(JWKS_FETCH_TIMEOUT));
        http.set_nodelay(true);
        // An explicit rustls provider: the process default may be ambiguous
        // when several rustls crypto features are unified into the build.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .map_err(|e| AuthSetupError::HttpClient(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        // Fetches are minutes apart: no connection pooling, so a restarted IdP
        // never meets a stale pooled connection.
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(https);
        Ok(RemoteJwks {
            uri,
            shown_url,
            cache_ttl,
            min_refetch_ms: u64::try_from(min_refetch_interval.as_millis()).unwrap_or(u64::MAX),
            algorithms: algorithms.to_vec(),
            client,
            epoch: Instant::now(),
            current: ArcSwapOption::empty(),
            generation: AtomicU64::new(0),
            last_attempt_ms: AtomicU64::new(NEVER),
            flight: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> (u64, Option<Arc<KeySet>>) {
        let generation = self.generation.load(Ordering::Acquire);
        // Generation first: a reader that sees generation N also sees the
        // set stored before N was published.
        (generation, self.current.load_full())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    /// Whether the rate limit allows a fetch now.
    fn may_fetch(&self) -> bool {
        let last = self.last_attempt_ms.load(Ordering::Acquire);
        last == NEVER || self.now_ms().saturating_sub(last) >= self.min_refetch_ms
    }

    /// The key set to verify a token naming `kid` with.
    async fn key_set_for(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<KeySet>, AuthError> {
        let (generation, current) = self.state();
        let Some(set) = current else {
            return self
                .refresh(generation)
                .await
                .ok_or(AuthError::KeysUnavailable);
        };
        if let Some(kid) = kid
            && !set.has_kid(kid)
        {
            // Maybe the IdP rotated keys: refetch (rate-limited, single-flight).
            return Ok(self.refresh(generation).await.unwrap_or(set));
        }
        if set.fetched_at.elapsed() >= self.cache_ttl {
            // Serve the cached set now; refresh it off the request path.
            self.refresh_in_background(generation);
        }
        Ok(set)
    }

    /// Fetches unless another fetch completed since `seen` or the rate limit
    /// forbids it, then returns the current set. The fetch runs in its own
    /// task so that a cancelled request cannot abandon it half-way.
    async fn refresh(self: &Arc<Self>, seen: u64) -> Option<Arc<KeySet>> {
        if self.generation.load(Ordering::Acquire) == seen && self.may_fetch() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    // A failed join (runtime shutting down) leaves the cache as is.
                    let _ = runtime.spawn(Arc::clone(self).refresh_task(seen)).await;
                }
                // The HTTP client and its timeouts need Tokio: no fetch without it.
                Err(_) => tracing::warn!("no Tokio runtime: the JWKS cannot be fetched"),
            }
        }
        self.state().1
    }

    fn refresh_in_background(self: &Arc<Self>, seen: u64) {
        if self.generation.load(Ordering::Acquire) == seen
            && self.may_fetch()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            drop(runtime.spawn(Arc::clone(self).refresh_task(seen)));
        }
    }

    async fn refresh_task(self: Arc<Self>, seen: u64) {
        let _flight = self.flight.lock().await;
        if self.generation.load(Ordering::Acquire) != seen || !self.may_fetch() {
            return;
        }
        self.last_attempt_ms.store(self.now_ms(), Ordering::Release);
        match self.fetch().await {
            Ok(set) => {
                tracing::info!(url = %self.shown_url, keys = set.keys.len(), "fetched JWKS");
                self.current.store(Some(Arc::new(set)));
            }
            Err(reason) => tracing::warn!(
                url = %self.shown_url,
                error = %reason,
                "JWKS fetch failed; the last good key set (if any) stays in use"
            ),
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let request = http::Request::get(self.uri.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .header(
                http::header::USER_AGENT,
                concat!("toastgate/", env!("CARGO_PKG_VERSION")),
            )
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let body = tokio::time::timeout(JWKS_FETCH_TIMEOUT, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("request failed: {}", crate::upstream::error_chain(&e)))?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("HTTP status {status}"));
            }
            Limited::new(response.into_body(), JWKS_MAX_BYTES)
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .map_err(|e| {
                    format!(
                        "cannot read the body: {}",
                        crate::upstream::error_chain(e.as_ref())
                    )
                })
        })
        .await
        .map_err(|_| format!("timed out after {}s", JWKS_FETCH_TIMEOUT.as_secs()))??;
        let keys = parse_jwks(&body, &self.algorithms)?;
        if keys.is_empty() {
            return Err(
                "the document holds no signature key usable with the configured algorithms"
                    .to_string(),
            );
        }
        Ok(KeySet::new(keys))
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::{Mutex, OnceLock};

    use jsonwebtoken::jwk::Jwk;
    use serde_json::{Value, json};

    use crate::secret::Secret;

    const ISSUER: &str = "https://idp.example.com";
    const AUDIENCE: &str = "toastgate";
    const HS_SECRET: &str = "test-only-0123456789abcdef-0123456789abcdef";

    struct KeyMaterial {
        private_pem: String,
        public_pem: String,
    }

    struct TestKeys {
        rsa: KeyMaterial,
        rsa_other: KeyMaterial,
        ec: KeyMaterial,
        ed: KeyMaterial,
    }

    fn generate(alg: &'static rcgen::SignatureAlgorithm) -> KeyMaterial {
        let pair = rcgen::KeyPair::generate_for(alg).expect("key generation");
        KeyMaterial {
            private_pem: pair.serialize_pem(),
            public_pem: pair.public_key_pem(),
        }
    }

    /// Generated once per test run; nothing is committed.
    fn keys() -> &'static TestKeys {
        static KEYS: OnceLock<TestKeys> = OnceLock::new();
        KEYS.get_or_init(|| TestKeys {
            rsa: generate(&rcgen::PKCS_RSA_SHA256),
            rsa_other: generate(&rcgen::PKCS_RSA_SHA256),
            ec: generate(&rcgen::PKCS_ECDSA_P256_SHA256),
            ed: generate(&rcgen::PKCS_ED25519),
        })
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("toastgate-auth-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
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

    fn now() -> u64 {
        unix_now()
    }

    fn claims(team: &str) -> Value {
        json!({
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice",
            "team": team,
            "iat": now(),
            "exp": now() + 300,
        })
    }

    fn with(mut claims: Value, key: &str, value: Value) -> Value {
        claims[key] = value;
        claims
    }

    fn without(mut claims: Value, key: &str) -> Value {
        if let Some(map) = claims.as_object_mut() {
            map.remove(key);
        }
        claims
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &KeyMaterial) -> String {
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

    fn sign_hs(claims: &Value, secret: &[u8]) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("sign")
    }

    fn b64(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    fn cfg(algorithms: Vec<Algorithm>, keys: KeySource) -> Auth {
        Auth {
            issuer: ISSUER.to_string(),
            audience: vec![AUDIENCE.to_string(), "second-audience".to_string()],
            algorithms,
            team_claim: "team".to_string(),
            leeway: Duration::from_secs(30),
            keys,
        }
    }

    fn hs_cfg() -> Auth {
        cfg(
            vec![Algorithm::HS256],
            KeySource::HsSecret(Secret::new(HS_SECRET)),
        )
    }

    fn hs_auth() -> Authenticator {
        Authenticator::new(&hs_cfg()).expect("hs authenticator")
    }

    /// RSA (kid rsa-1), EC (kid ec-1) and Ed25519 (no kid) public keys as PEM.
    fn pem_auth(dir: &TempDir, algorithms: Vec<Algorithm>) -> Authenticator {
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

    fn rsa_only_auth(dir: &TempDir, algorithms: Vec<Algorithm>) -> Authenticator {
        let files = vec![(
            dir.write("rsa.pem", &keys().rsa.public_pem),
            Some("rsa-1".to_string()),
        )];
        Authenticator::new(&cfg(algorithms, KeySource::Pem(files))).expect("pem authenticator")
    }

    fn jwk(key: &KeyMaterial, family: AlgorithmFamily, kid: &str) -> Value {
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

    fn identity(team: &str) -> Identity {
        Identity {
            team: team.to_string(),
            subject: Some("alice".to_string()),
        }
    }

    // --- accepted tokens -------------------------------------------------

    #[tokio::test]
    async fn valid_hs256_token_yields_team_and_subject() {
        let auth = hs_auth();
        let token = sign_hs(&claims("web-team"), HS_SECRET.as_bytes());
        assert_eq!(auth.authenticate(&token).await, Ok(identity("web-team")));
        // Surrounding whitespace is tolerated.
        assert_eq!(
            auth.authenticate(&format!(" {token}\n")).await,
            Ok(identity("web-team"))
        );
        // A non-string `sub` is simply no subject.
        let token = sign_hs(&with(claims("t"), "sub", json!(7)), HS_SECRET.as_bytes());
        assert_eq!(
            auth.authenticate(&token).await,
            Ok(Identity {
                team: "t".to_string(),
                subject: None
            })
        );
    }

    #[tokio::test]
    async fn valid_rs256_es256_eddsa_tokens_are_accepted() {
        let dir = TempDir::new();
        let k = keys();
        let auth = pem_auth(
            &dir,
            vec![Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA],
        );
        let cases = [
            (Algorithm::RS256, Some("rsa-1"), &k.rsa),
            (Algorithm::RS256, None, &k.rsa),
            (Algorithm::ES256, Some("ec-1"), &k.ec),
            (Algorithm::ES256, None, &k.ec),
            (Algorithm::EdDSA, None, &k.ed),
            // A kid no PEM is bound to falls back to the unbound (Ed25519) key.
            (Algorithm::EdDSA, Some("whatever"), &k.ed),
        ];
        for (alg, kid, key) in cases {
            let token = sign(alg, kid, &claims("ops"), key);
            assert_eq!(
                auth.authenticate(&token).await,
                Ok(identity("ops")),
                "{alg:?} kid={kid:?}"
            );
        }
        // An unknown kid never falls back to keys bound to other kids.
        let token = sign(Algorithm::RS256, Some("rsa-9"), &claims("ops"), &k.rsa);
        assert_eq!(auth.authenticate(&token).await, Err(AuthError::UnknownKey));
    }

    #[tokio::test]
    async fn custom_team_claim_name() {
        let mut c = hs_cfg();
        c.team_claim = "https://example.com/team".to_string();
        let auth = Authenticator::new(&c).unwrap();
        let token = sign_hs(
            &with(
                without(claims("x"), "team"),
                "https://example.com/team",
                json!("data"),
            ),
            HS_SECRET.as_bytes(),
        );
        assert_eq!(auth.authenticate(&token).await, Ok(identity("data")));
        let token = sign_hs(&claims("x"), HS_SECRET.as_bytes());
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::MissingClaim(
                "https://example.com/team".to_string()
            ))
        );
    }

    // --- algorithms ----------------------------------------------------------

    #[tokio::test]
    async fn alg_none_is_rejected() {
        let header = b64(r#"{"alg":"none","typ":"JWT"}"#);
        let body = b64(&claims("web").to_string());
        let token = format!("{header}.{body}.");
        assert_eq!(
            hs_auth().authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("none".to_string()))
        );
        let dir = TempDir::new();
        let auth = rsa_only_auth(&dir, vec![Algorithm::RS256]);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("none".to_string()))
        );
        // Case variants and junk are refused the same way, and sanitised.
        let token = format!("{}.{body}.", b64(r#"{"alg":"NoNe"}"#));
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("NoNe".to_string()))
        );
        let token = format!("{}.{body}.", b64(r#"{"alg":"<script>"}"#));
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("script".to_string()))
        );
    }

    #[tokio::test]
    async fn algorithm_confusion_is_rejected() {
        let dir = TempDir::new();
        let public_pem = keys().rsa.public_pem.as_bytes();
        let auth = rsa_only_auth(&dir, vec![Algorithm::RS256]);
        // The classic attack: HS256 with the RSA public key as HMAC secret.
        let forged = sign_hs(&claims("web"), public_pem);
        assert_eq!(
            auth.authenticate(&forged).await,
            Err(AuthError::AlgorithmNotAllowed("HS256".to_string()))
        );
        // Even a config listing both families is refused up front.
        let files = vec![(dir.0.join("rsa.pem"), None)];
        let mixed = cfg(
            vec![Algorithm::RS256, Algorithm::HS256],
            KeySource::Pem(files),
        );
        assert!(matches!(
            Authenticator::new(&mixed),
            Err(AuthSetupError::Config(_))
        ));
        let hs_with_rs = cfg(
            vec![Algorithm::HS256, Algorithm::RS256],
            KeySource::HsSecret(Secret::new(HS_SECRET)),
        );
        assert!(matches!(
            Authenticator::new(&hs_with_rs),
            Err(AuthSetupError::Config(_))
        ));
    }

    #[tokio::test]
    async fn allowed_alg_that_does_not_fit_the_key_is_rejected() {
        let dir = TempDir::new();
        let k = keys();
        // ES256 is allowed, but the only key is RSA.
        let auth = rsa_only_auth(&dir, vec![Algorithm::RS256, Algorithm::ES256]);
        let token = sign(Algorithm::ES256, Some("rsa-1"), &claims("web"), &k.ec);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("ES256".to_string()))
        );
        let token = sign(Algorithm::ES256, None, &claims("web"), &k.ec);
        assert_eq!(auth.authenticate(&token).await, Err(AuthError::UnknownKey));
        // RS384 names the right key but is not in the list.
        let token = sign(Algorithm::RS384, Some("rsa-1"), &claims("web"), &k.rsa);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::AlgorithmNotAllowed("RS384".to_string()))
        );
    }

    // --- time and registered claims ---------------------------------------------

    #[tokio::test]
    async fn expiry_respects_leeway() {
        let auth = hs_auth();
        let within = sign_hs(
            &with(claims("t"), "exp", json!(now() - 10)),
            HS_SECRET.as_bytes(),
        );
        assert_eq!(auth.authenticate(&within).await, Ok(identity("t")));
        let beyond = sign_hs(
            &with(claims("t"), "exp", json!(now() - 100)),
            HS_SECRET.as_bytes(),
        );
        assert_eq!(auth.authenticate(&beyond).await, Err(AuthError::Expired));
    }

    #[tokio::test]
    async fn nbf_in_the_future_is_not_yet_valid() {
        let auth = hs_auth();
        let future = sign_hs(
            &with(claims("t"), "nbf", json!(now() + 600)),
            HS_SECRET.as_bytes(),
        );
        assert_eq!(
            auth.authenticate(&future).await,
            Err(AuthError::NotYetValid)
        );
        let skewed = sign_hs(
            &with(claims("t"), "nbf", json!(now() + 10)),
            HS_SECRET.as_bytes(),
        );
        assert_eq!(auth.authenticate(&skewed).await, Ok(identity("t")));
    }

    #[tokio::test]
    async fn issuer_and_audience_are_checked() {
        let auth = hs_auth();
        let secret = HS_SECRET.as_bytes();
        let token = sign_hs(&with(claims("t"), "iss", json!("https://evil")), secret);
        assert_eq!(auth.authenticate(&token).await, Err(AuthError::WrongIssuer));
        let token = sign_hs(&with(claims("t"), "aud", json!("someone-else")), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::WrongAudience)
        );
        let token = sign_hs(
            &with(claims("t"), "aud", json!(["x", "second-audience"])),
            secret,
        );
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
        // An issuer list is not an issuer, even when it contains ours.
        let token = sign_hs(&with(claims("t"), "iss", json!([ISSUER])), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::InvalidClaim("iss".to_string()))
        );
        let token = sign_hs(&without(claims("t"), "iss"), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::MissingClaim("iss".to_string()))
        );
        let token = sign_hs(&without(claims("t"), "aud"), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::MissingClaim("aud".to_string()))
        );
    }

    #[tokio::test]
    async fn wrongly_typed_exp_and_nbf_are_invalid_not_accepted() {
        let auth = hs_auth();
        let secret = HS_SECRET.as_bytes();
        let token = sign_hs(&with(claims("t"), "exp", json!("9999999999")), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::InvalidClaim("exp".to_string()))
        );
        let token = sign_hs(&with(claims("t"), "nbf", json!("0")), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::InvalidClaim("nbf".to_string()))
        );
        let token = sign_hs(&with(claims("t"), "exp", json!(-5)), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::InvalidClaim("exp".to_string()))
        );
    }

    #[tokio::test]
    async fn missing_exp_is_missing_claim() {
        let token = sign_hs(&without(claims("t"), "exp"), HS_SECRET.as_bytes());
        assert_eq!(
            hs_auth().authenticate(&token).await,
            Err(AuthError::MissingClaim("exp".to_string()))
        );
    }

    #[tokio::test]
    async fn team_claim_must_be_a_non_empty_string() {
        let auth = hs_auth();
        let secret = HS_SECRET.as_bytes();
        let token = sign_hs(&without(claims("t"), "team"), secret);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::MissingClaim("team".to_string()))
        );
        for bad in [json!(42), json!(["a"]), json!(null), json!("")] {
            let token = sign_hs(&with(claims("t"), "team", bad.clone()), secret);
            assert_eq!(
                auth.authenticate(&token).await,
                Err(AuthError::InvalidClaim("team".to_string())),
                "{bad}"
            );
        }
    }

    // --- signatures and shape ----------------------------------------------------

    #[tokio::test]
    async fn bad_signatures_are_rejected() {
        let dir = TempDir::new();
        let k = keys();
        let auth = rsa_only_auth(&dir, vec![Algorithm::RS256]);
        let token = sign(Algorithm::RS256, Some("rsa-1"), &claims("t"), &k.rsa_other);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::BadSignature)
        );
        let token = sign(Algorithm::RS256, None, &claims("t"), &k.rsa_other);
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::BadSignature)
        );
        let token = sign_hs(&claims("t"), b"another-secret-another-secret-0123456789");
        assert_eq!(
            hs_auth().authenticate(&token).await,
            Err(AuthError::BadSignature)
        );
        // Claims swapped under a valid signature.
        let good = sign_hs(&claims("t"), HS_SECRET.as_bytes());
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&claims("admins").to_string()),
            parts[2]
        );
        assert_eq!(
            hs_auth().authenticate(&tampered).await,
            Err(AuthError::BadSignature)
        );
    }

    #[tokio::test]
    async fn malformed_tokens_are_rejected() {
        let auth = hs_auth();
        assert_eq!(auth.authenticate("").await, Err(AuthError::Missing));
        assert_eq!(auth.authenticate("   ").await, Err(AuthError::Missing));
        let body = b64(&claims("t").to_string());
        let hs_header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
        let cases = [
            "garbage".to_string(),
            format!("{hs_header}.{body}"),
            format!("{hs_header}.{body}.sig.extra"),
            format!("!!!.{body}.sig"),
            format!("{}.{body}.sig", b64("[1,2]")),
            format!("{}.{body}.sig", b64("not json")),
            format!("{}.{body}.sig", b64(r#"{"typ":"JWT"}"#)),
            format!("{}.{body}.sig", b64(r#"{"alg":256}"#)),
            format!("{}.{body}.sig", b64(r#"{"alg":"HS256","kid":5}"#)),
            format!(
                "{}.{body}.sig",
                b64(r#"{"alg":"HS256","crit":["exp"],"exp":1}"#)
            ),
            format!("{hs_header}.{body}.%%%"),
            "a".repeat(MAX_TOKEN_BYTES + 1),
        ];
        for token in cases {
            assert_eq!(
                auth.authenticate(&token).await,
                Err(AuthError::Malformed),
                "{token:.80}"
            );
        }
        // Claims that are not an object, under a valid signature.
        let message = format!("{hs_header}.{}", b64(r#"["x"]"#));
        let key = EncodingKey::from_secret(HS_SECRET.as_bytes());
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        let token = format!("{message}.{signature}");
        assert_eq!(auth.authenticate(&token).await, Err(AuthError::Malformed));
        // The positional trick: a claims array that jsonwebtoken's own
        // validation would read as exp/nbf/sub/iss/aud.
        let message = format!(
            "{hs_header}.{}",
            b64(&json!([now() + 300, 0, "alice", ISSUER, AUDIENCE]).to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).unwrap();
        let token = format!("{message}.{signature}");
        assert_eq!(auth.authenticate(&token).await, Err(AuthError::Malformed));
    }

    // --- JWKS file ---------------------------------------------------------------

    #[tokio::test]
    async fn jwks_file_keys_are_selected_by_kid() {
        let dir = TempDir::new();
        let k = keys();
        let mut pinned = jwk(&k.rsa_other, AlgorithmFamily::Rsa, "pinned-rs384");
        pinned["alg"] = json!("RS384");
        let mut encryption = jwk(&k.rsa_other, AlgorithmFamily::Rsa, "enc-1");
        encryption["use"] = json!("enc");
        let document = json!({"keys": [
            jwk(&k.rsa, AlgorithmFamily::Rsa, "a"),
            jwk(&k.ec, AlgorithmFamily::Ec, "b"),
            pinned,
            encryption,
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "weird", "kid": "w"},
        ]});
        let path = dir.write("jwks.json", &document.to_string());
        let auth = Authenticator::new(&cfg(
            vec![Algorithm::RS256, Algorithm::ES256],
            KeySource::JwksFile(path),
        ))
        .expect("jwks file");
        let rs = sign(Algorithm::RS256, Some("a"), &claims("t"), &k.rsa);
        assert_eq!(auth.authenticate(&rs).await, Ok(identity("t")));
        let es = sign(Algorithm::ES256, Some("b"), &claims("t"), &k.ec);
        assert_eq!(auth.authenticate(&es).await, Ok(identity("t")));
        // Right key, wrong kid: the named key does not verify it.
        let swapped = sign(Algorithm::RS256, Some("a"), &claims("t"), &k.rsa_other);
        assert_eq!(
            auth.authenticate(&swapped).await,
            Err(AuthError::BadSignature)
        );
        // kid "b" is an EC key: an RS256 token naming it is refused.
        let cross = sign(Algorithm::RS256, Some("b"), &claims("t"), &k.rsa);
        assert_eq!(
            auth.authenticate(&cross).await,
            Err(AuthError::AlgorithmNotAllowed("RS256".to_string()))
        );
        // Pinned to RS384 (not configured): ignored, so unknown.
        let pinned = sign(
            Algorithm::RS256,
            Some("pinned-rs384"),
            &claims("t"),
            &k.rsa_other,
        );
        assert_eq!(auth.authenticate(&pinned).await, Err(AuthError::UnknownKey));
        // `use: enc` keys are ignored.
        let enc = sign(Algorithm::RS256, Some("enc-1"), &claims("t"), &k.rsa_other);
        assert_eq!(auth.authenticate(&enc).await, Err(AuthError::UnknownKey));
        // No kid: every key that fits the alg is tried.
        let no_kid = sign(Algorithm::ES256, None, &claims("t"), &k.ec);
        assert_eq!(auth.authenticate(&no_kid).await, Ok(identity("t")));
    }

    #[test]
    fn setup_errors_name_the_file_and_hide_key_material() {
        let dir = TempDir::new();
        let k = keys();
        let rs = vec![Algorithm::RS256];
        let missing = dir.0.join("missing.pem");
        let err = Authenticator::new(&cfg(
            rs.clone(),
            KeySource::Pem(vec![(missing.clone(), None)]),
        ))
        .unwrap_err();
        assert!(matches!(err, AuthSetupError::ReadKeyFile { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let private = dir.write("private.pem", &k.rsa.private_pem);
        let err = Authenticator::new(&cfg(rs.clone(), KeySource::Pem(vec![(private, None)])))
            .unwrap_err();
        assert!(matches!(err, AuthSetupError::BadKeyFile { .. }), "{err}");
        let shown = err.to_string();
        assert!(
            shown.contains("private.pem") && shown.contains("private key"),
            "{shown}"
        );
        assert!(!shown.contains("MII"), "{shown}");

        let garbage = dir.write("garbage.pem", "hello");
        let err = Authenticator::new(&cfg(rs.clone(), KeySource::Pem(vec![(garbage, None)])))
            .unwrap_err();
        assert!(matches!(err, AuthSetupError::BadKeyFile { .. }), "{err}");

        // An EC key where only RS256 is configured.
        let ec = dir.write("ec.pem", &k.ec.public_pem);
        let err =
            Authenticator::new(&cfg(rs.clone(), KeySource::Pem(vec![(ec, None)]))).unwrap_err();
        assert!(matches!(err, AuthSetupError::BadKeyFile { .. }), "{err}");

        let jwks = dir.write("jwks.json", r#"{"keys": "nope"}"#);
        let err = Authenticator::new(&cfg(rs.clone(), KeySource::JwksFile(jwks))).unwrap_err();
        assert!(err.to_string().contains("jwks.json"), "{err}");
        let empty = dir.write("empty.json", r#"{"keys": []}"#);
        let err = Authenticator::new(&cfg(rs.clone(), KeySource::JwksFile(empty))).unwrap_err();
        assert!(matches!(err, AuthSetupError::BadKeyFile { .. }), "{err}");

        let short = cfg(
            vec![Algorithm::HS256],
            KeySource::HsSecret(Secret::new("short")),
        );
        assert!(matches!(
            Authenticator::new(&short),
            Err(AuthSetupError::Config(_))
        ));
        let url = cfg(
            rs,
            KeySource::JwksUrl {
                url: "ftp://idp.example.com/jwks".to_string(),
                cache_ttl: Duration::from_secs(60),
                min_refetch_interval: Duration::from_secs(1),
            },
        );
        assert!(matches!(
            Authenticator::new(&url),
            Err(AuthSetupError::JwksUrl(_))
        ));
    }

    #[test]
    fn debug_shows_no_key_material_and_types_are_shareable() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Authenticator>();
        let shown = format!("{:?}", hs_auth());
        assert!(!shown.contains(HS_SECRET), "{shown}");
        assert!(shown.contains("Hmac"), "{shown}");
        let dir = TempDir::new();
        let shown = format!("{:?}", rsa_only_auth(&dir, vec![Algorithm::RS256]));
        assert!(shown.contains("rsa-1") && !shown.contains("MII"), "{shown}");
        // The request future can move across threads.
        fn assert_send<T: Send>(_: T) {}
        let auth = hs_auth();
        assert_send(auth.authenticate("x"));
    }

    #[test]
    fn reasons_are_bounded_labels() {
        let all = [
            (AuthError::Missing, "missing"),
            (AuthError::Malformed, "malformed"),
            (AuthError::AlgorithmNotAllowed("x".into()), "algorithm"),
            (AuthError::UnknownKey, "unknown_key"),
            (AuthError::BadSignature, "signature"),
            (AuthError::Expired, "expired"),
            (AuthError::NotYetValid, "not_yet_valid"),
            (AuthError::MissingClaim("x".into()), "missing_claim"),
            (AuthError::InvalidClaim("x".into()), "invalid_claim"),
            (AuthError::WrongIssuer, "issuer"),
            (AuthError::WrongAudience, "audience"),
            (AuthError::KeysUnavailable, "keys_unavailable"),
        ];
        for (error, reason) in all {
            assert_eq!(error.reason(), reason);
        }
    }

    // --- mint_token ----------------------------------------------------------

    #[tokio::test]
    async fn minted_tokens_round_trip() {
        let c = hs_cfg();
        let token = mint_token(&c, "web-team", "ci-bot", Duration::from_secs(60)).unwrap();
        let auth = Authenticator::new(&c).unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Ok(Identity {
                team: "web-team".to_string(),
                subject: Some("ci-bot".to_string())
            })
        );
        let claims: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], json!(AUDIENCE));
        assert_eq!(claims["nbf"], claims["iat"]);
        assert!(claims["jti"].is_string());
    }

    #[test]
    fn minting_needs_an_hs_secret() {
        let dir = TempDir::new();
        let path = dir.write("rsa.pem", &keys().rsa.public_pem);
        let c = cfg(vec![Algorithm::RS256], KeySource::Pem(vec![(path, None)]));
        assert!(matches!(
            mint_token(&c, "t", "s", Duration::from_secs(60)),
            Err(AuthSetupError::NotHsSecret)
        ));
    }

    // --- JWKS URL ------------------------------------------------------------

    /// A tiny identity provider serving a JWKS document and counting hits.
    struct TestIdp {
        url: String,
        hits: Arc<AtomicUsize>,
        document: Arc<Mutex<String>>,
        down: Arc<AtomicBool>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for TestIdp {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestIdp {
        async fn start(document: Value, delay: Duration) -> TestIdp {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let document = Arc::new(Mutex::new(document.to_string()));
            let down = Arc::new(AtomicBool::new(false));
            let (h, d, is_down) = (Arc::clone(&hits), Arc::clone(&document), Arc::clone(&down));
            let task = tokio::spawn(async move {
                // Dropping the set (when this task is aborted) closes every
                // connection.
                let mut connections = tokio::task::JoinSet::new();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    if is_down.load(Ordering::SeqCst) {
                        // Down: hang up at once. The listener stays bound, so
                        // no other test's server can take over the port.
                        drop(stream);
                        continue;
                    }
                    let (h, d) = (Arc::clone(&h), Arc::clone(&d));
                    let service = hyper::service::service_fn(move |_request| {
                        let (h, d) = (Arc::clone(&h), Arc::clone(&d));
                        async move {
                            h.fetch_add(1, Ordering::SeqCst);
                            if !delay.is_zero() {
                                tokio::time::sleep(delay).await;
                            }
                            let body = d.lock().unwrap().clone();
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    connections.spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
            TestIdp {
                url: format!("http://{addr}/jwks"),
                hits,
                document,
                down,
                task,
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn serve(&self, document: Value) {
            *self.document.lock().unwrap() = document.to_string();
        }

        fn go_down(&self) {
            self.down.store(true, Ordering::SeqCst);
        }
    }

    fn url_cfg(url: &str, cache_ttl: Duration, min_refetch_interval: Duration) -> Auth {
        cfg(
            vec![Algorithm::RS256, Algorithm::ES256],
            KeySource::JwksUrl {
                url: url.to_string(),
                cache_ttl,
                min_refetch_interval,
            },
        )
    }

    #[tokio::test]
    async fn jwks_url_caches_refetches_rate_limits_rotates_and_survives_outages() {
        let k = keys();
        let interval = Duration::from_millis(1000);
        let pause = interval + Duration::from_millis(150);
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::ZERO,
        )
        .await;
        let auth =
            Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), interval)).unwrap();
        // Tokens are signed up front so the timed phases stay short.
        let t1 = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        let t2 = sign(Algorithm::ES256, Some("k2"), &claims("t"), &k.ec);
        let flood: Vec<String> = (0..40)
            .map(|i| {
                sign(
                    Algorithm::ES256,
                    Some(&format!("junk-{i}")),
                    &claims("t"),
                    &k.ec,
                )
            })
            .collect();
        assert_eq!(idp.hits(), 0, "construction must not fetch");

        // First use fetches once; afterwards the cache serves.
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 1);
        for _ in 0..5 {
            assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        }
        assert_eq!(idp.hits(), 1);

        // Unknown kid right after a fetch: rate-limited, no fetch.
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 1);

        // Once the interval has passed, an unknown kid triggers one refetch...
        tokio::time::sleep(pause).await;
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 2);
        // ...and a flood of garbage kids within the interval triggers none.
        for token in &flood {
            assert_eq!(auth.authenticate(token).await, Err(AuthError::UnknownKey));
        }
        assert_eq!(idp.hits(), 2);

        // Key rotation: the new kid is picked up by the next allowed refetch.
        idp.serve(json!({"keys": [
            jwk(&k.rsa, AlgorithmFamily::Rsa, "k1"),
            jwk(&k.ec, AlgorithmFamily::Ec, "k2"),
        ]}));
        assert_eq!(auth.authenticate(&t2).await, Err(AuthError::UnknownKey));
        assert_eq!(idp.hits(), 2);
        tokio::time::sleep(pause).await;
        assert_eq!(auth.authenticate(&t2).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3);
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3);

        // The IdP goes away: the last good set keeps serving.
        idp.go_down();
        tokio::time::sleep(pause).await;
        assert_eq!(
            auth.authenticate(&flood[0]).await,
            Err(AuthError::UnknownKey)
        );
        assert_eq!(auth.authenticate(&t1).await, Ok(identity("t")));
        assert_eq!(auth.authenticate(&t2).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 3, "a down server serves nothing");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jwks_url_concurrent_misses_share_one_fetch() {
        let k = keys();
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::from_millis(200),
        )
        .await;
        let auth = Arc::new(
            Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), Duration::ZERO))
                .unwrap(),
        );
        let token = Arc::new(sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (auth, token) = (Arc::clone(&auth), Arc::clone(&token));
                tokio::spawn(async move { auth.authenticate(&token).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(identity("t")));
        }
        assert_eq!(idp.hits(), 1);
    }

    #[tokio::test]
    async fn jwks_url_refreshes_after_ttl_and_serves_stale_keys_on_failure() {
        let k = keys();
        let ttl = Duration::from_millis(300);
        let idp = TestIdp::start(
            json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}),
            Duration::ZERO,
        )
        .await;
        let auth = Authenticator::new(&url_cfg(&idp.url, ttl, Duration::ZERO)).unwrap();
        let token = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
        assert_eq!(idp.hits(), 1);
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        // Stale: served at once, refreshed in the background.
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
        let deadline = Instant::now() + Duration::from_secs(5);
        while idp.hits() < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(idp.hits(), 2);
        idp.go_down();
        tokio::time::sleep(ttl + Duration::from_millis(100)).await;
        for _ in 0..3 {
            assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn jwks_url_without_keys_is_keys_unavailable() {
        let k = keys();
        let token = sign(Algorithm::RS256, Some("k1"), &claims("t"), &k.rsa);
        // Nothing listens on port 1 (and no test binds it).
        let auth = Authenticator::new(&url_cfg(
            "http://127.0.0.1:1/jwks",
            Duration::from_secs(600),
            Duration::from_secs(30),
        ))
        .unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );

        // Not JSON, and too large: both fail the fetch.
        let idp = TestIdp::start(json!("not a jwks"), Duration::ZERO).await;
        let auth = Authenticator::new(&url_cfg(&idp.url, Duration::from_secs(600), Duration::ZERO))
            .unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        idp.serve(json!({
            "keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")],
            "padding": "x".repeat(JWKS_MAX_BYTES),
        }));
        assert_eq!(
            auth.authenticate(&token).await,
            Err(AuthError::KeysUnavailable)
        );
        assert_eq!(idp.hits(), 2);
        // Fixed document: served.
        idp.serve(json!({"keys": [jwk(&k.rsa, AlgorithmFamily::Rsa, "k1")]}));
        assert_eq!(auth.authenticate(&token).await, Ok(identity("t")));
    }
}
