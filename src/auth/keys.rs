//! Key material: PEM files and JWKS documents turned into typed verifying
//! keys, and the rules for which key may verify which algorithm.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::time::Instant;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use serde::Deserialize;

use super::AuthSetupError;

const MIN_RSA_BITS: usize = 2048;

/// A key's type, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
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

pub(super) struct VerifyKey {
    pub(super) kid: Option<String>,
    pub(super) kind: KeyKind,
    /// A JWK's `alg`, when it pins one.
    pub(super) alg: Option<Algorithm>,
    pub(super) key: DecodingKey,
}

impl VerifyKey {
    fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|pinned| pinned == alg)
    }
}

#[derive(Clone, Copy)]
pub(super) enum Select<'a> {
    /// Keys with exactly this kid.
    Kid(&'a str),
    /// Keys bound to no kid (PEM without kid, JWK without kid, the HS secret).
    Unbound,
    /// Every key.
    Any,
}

pub(super) struct KeySet {
    pub(super) keys: Vec<VerifyKey>,
    pub(super) fetched_at: Instant,
}

impl KeySet {
    pub(super) fn new(keys: Vec<VerifyKey>) -> Self {
        KeySet {
            keys,
            fetched_at: Instant::now(),
        }
    }

    pub(super) fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    pub(super) fn candidates<'s>(
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

pub(super) fn load_pem(
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
pub(super) fn parse_jwks(bytes: &[u8], algorithms: &[Algorithm]) -> Result<Vec<VerifyKey>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    use crate::auth::test_support::*;
    use crate::auth::{AuthError, Authenticator};
    use crate::config::KeySource;

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
}
