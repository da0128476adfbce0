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
//!
//! Layout: `verify` runs the steps above, `claims` reads the payload claims
//! in one pass, `keys` turns key files and JWKS documents into typed keys,
//! `jwks` fetches and caches a JWKS URL, `mint` signs dev/test tokens.

mod caller;
mod claims;
mod jwks;
mod keys;
mod mint;
mod verify;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};

use crate::config::{Auth, KeySource};

use jwks::RemoteJwks;
use keys::{KeyKind, KeySet, VerifyKey, load_pem, parse_jwks};

pub use caller::{CacheOutcome, VerifiedTokens, caller_token};
pub use mint::mint_token;

/// Same floor as the config validation (defence in depth).
const MIN_HS_SECRET_BYTES: usize = 32;
/// Same ceiling as the config validation (jsonwebtoken computes `now - leeway`).
const MAX_LEEWAY: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// Public types

/// Who is calling, as proven by a verified JWT. Shared strings: the
/// verified-token cache hands out a clone on every request it answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub team: Arc<str>,
    pub subject: Option<Arc<str>>,
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
    #[error(
        "more than one credential was presented (repeated Authorization or X-Auth-Token headers, or both with different tokens); send exactly one"
    )]
    Ambiguous,
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
            AuthError::Ambiguous => "ambiguous",
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
    /// a JWKS URL this does not block: keys are fetched on first use, trusting
    /// the standard roots only; see [`Authenticator::with_ca`].
    pub fn new(cfg: &Auth) -> Result<Self, AuthSetupError> {
        Self::with_ca(cfg, None)
    }

    /// [`Authenticator::new`], with a JWKS URL fetched by the one HTTPS
    /// client builder that also trusts `ca_file` (`upstream.ca_file`).
    pub fn with_ca(cfg: &Auth, ca_file: Option<&std::path::Path>) -> Result<Self, AuthSetupError> {
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
                ca_file,
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
        self.authenticate_until(token)
            .await
            .map(|(identity, _)| identity)
    }

    /// [`Authenticator::authenticate`], plus the token's `exp` (from the
    /// same single decoding of the payload), for caching the answer.
    pub async fn authenticate_until(
        &self,
        token: &str,
    ) -> Result<(Identity, Option<i64>), AuthError> {
        let result = self.verify(token).await;
        if let Err(e) = &result {
            tracing::debug!(reason = e.reason(), "caller token rejected");
        }
        result
    }
}

/// Where the verification keys come from. Lives beside [`Authenticator`]
/// rather than in `keys`, which `jwks` builds on: no keys <-> jwks cycle.
enum Keys {
    Static(Arc<KeySet>),
    Remote(Arc<RemoteJwks>),
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keys::Static(set) => f.debug_tuple("Static").field(set).finish(),
            Keys::Remote(remote) => fmt::Debug::fmt(remote, f),
        }
    }
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

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use super::*;

    use crate::auth::test_support::*;
    use crate::secret::Secret;

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
}
