//! Verification of one token, step by step (see the module doc of `auth`):
//! shape and header, algorithm allow-list, key selection, signature and
//! registered claims through jsonwebtoken, then the identity claims.

use std::borrow::Cow;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use serde::de::IgnoredAny;

use super::claims::{ScannedClaims, Slot};
use super::keys::{KeySet, Select};
use super::{AuthError, Authenticator, Identity, Keys};

/// Longest compact JWT we look at; anything longer is refused before decoding.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

impl Authenticator {
    /// The identity and the `exp` claim of a token that verifies.
    pub(super) async fn verify(&self, token: &str) -> Result<(Identity, Option<i64>), AuthError> {
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
    ) -> Result<(Identity, Option<i64>), AuthError> {
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
            let checked = jsonwebtoken::decode::<IgnoredAny>(token, &key.key, validation);
            let missing = match &checked {
                Ok(_) => None,
                Err(e) => match e.kind() {
                    // This key did not verify it; another candidate may.
                    ErrorKind::InvalidSignature
                    | ErrorKind::InvalidEcdsaKey
                    | ErrorKind::InvalidEddsaKey
                    | ErrorKind::InvalidRsaKey(_)
                    | ErrorKind::InvalidKeyFormat => continue,
                    ErrorKind::MissingRequiredClaim(claim) => Some(claim),
                    kind => return Err(map_jwt_error(kind, alg)),
                },
            };
            // This key verified the signature, so the payload is trusted. It is
            // decoded once, for the identity or, as jsonwebtoken reports a
            // present-but-mistyped required claim (e.g. `"exp": "9999999999"`)
            // as missing, to tell the two apart.
            let claims = ScannedClaims::decode(payload_b64, &self.team_claim)?;
            return match missing {
                None => {
                    let exp = claims.exp_value;
                    self.identity(claims).map(|identity| (identity, exp))
                }
                Some(claim) if claims.claim_present(claim) => {
                    Err(AuthError::InvalidClaim(claim.clone()))
                }
                Some(claim) => Err(AuthError::MissingClaim(claim.clone())),
            };
        }
        Err(if tried {
            AuthError::BadSignature
        } else {
            AuthError::UnknownKey
        })
    }

    /// Reads the team and subject from a payload whose signature and
    /// registered claims were verified.
    fn identity(&self, found: ScannedClaims) -> Result<Identity, AuthError> {
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
        Ok(Identity {
            team: team.into(),
            subject: subject.map(Into::into),
        })
    }
}

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

/// `MissingRequiredClaim` is not mapped here: telling a missing claim from a
/// mistyped one needs the payload, which `verify_with` has decoded.
fn map_jwt_error(kind: &ErrorKind, alg: Algorithm) -> AuthError {
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
        _ => AuthError::BadSignature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use jsonwebtoken::EncodingKey;
    use serde_json::json;

    use crate::auth::AuthSetupError;
    use crate::auth::test_support::*;
    use crate::config::KeySource;
    use crate::secret::Secret;

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
                team: "t".into(),
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
}
