//! The caller's credential: where it is read from (exactly one), and the
//! cache of tokens verified recently.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, header};

use super::{AuthError, Authenticator, Identity};
use crate::upstream::X_AUTH_TOKEN;

/// The caller's JWT: `Authorization: Bearer <jwt>`, or the bare JWT in
/// `X-Auth-Token` as unmodified OpenStack/TOAST clients send it.
///
/// Exactly one credential: a repeated header, or both headers carrying
/// different tokens, is refused as ambiguous. Otherwise one part of a chain
/// (a proxy, a log, the cache) could read one token while another read the
/// other. Both headers with the same token are one credential.
pub fn caller_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    let bearer = match only_one(headers, &header::AUTHORIZATION)? {
        Some(v) => {
            let v = ascii_text(v)?;
            let (scheme, token) = v.split_at(v.find(' ').ok_or(AuthError::Malformed)?);
            if !scheme.eq_ignore_ascii_case("bearer") {
                return Err(AuthError::Malformed);
            }
            Some(token.trim_ascii())
        }
        None => None,
    };
    let x_auth = match only_one(headers, &X_AUTH_TOKEN)? {
        Some(v) => Some(ascii_text(v)?.trim_ascii()),
        None => None,
    };
    match (bearer, x_auth) {
        (Some(a), Some(b)) if a != b => Err(AuthError::Ambiguous),
        (Some(token), _) | (None, Some(token)) => Ok(token),
        (None, None) => Err(AuthError::Missing),
    }
}

/// The value as text: visible ASCII and tab only, as `to_str` checks (the
/// cheapest check measured: `is_ascii` plus `from_utf8` costs more).
fn ascii_text(v: &HeaderValue) -> Result<&str, AuthError> {
    v.to_str().map_err(|_| AuthError::Malformed)
}

fn only_one<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h HeaderValue>, AuthError> {
    let mut values = headers.get_all(name).iter();
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        (Some(_), Some(_)) | (None, Some(_)) => Err(AuthError::Ambiguous),
    }
}

/// Successfully verified JWTs, for at most a minute and never past their
/// own `exp` (plus the configured leeway, as the verifier allows). Only
/// successes are kept, keyed by the whole token, so a cached answer is
/// exactly what verifying again would say, minus a key removed from a JWKS
/// in the last minute.
pub struct VerifiedTokens {
    /// foldhash rather than SipHash: the key is the whole token (hundreds of
    /// bytes), hashed on every request; an attacker gains nothing by
    /// colliding keys of a bounded cache that only holds verified tokens.
    /// `None` when configured with capacity 0: every request is verified.
    cache: Option<moka::sync::Cache<String, (Identity, i64), foldhash::fast::RandomState>>,
    leeway_secs: i64,
}

/// Whether [`VerifiedTokens::authenticate`] answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    Hit,
    /// The token was verified (successfully or not).
    Miss,
}

impl VerifiedTokens {
    pub fn new(leeway: Duration, capacity: u64) -> VerifiedTokens {
        let cache = (capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(Duration::from_secs(60))
                .build_with_hasher(foldhash::fast::RandomState::default())
        });
        VerifiedTokens {
            cache,
            leeway_secs: leeway.as_secs() as i64,
        }
    }

    /// The caller of a request: its one credential, verified (or found in
    /// the cache). The outcome says which, also when verifying refused it;
    /// it is `None` when there was no one token to look up.
    pub async fn authenticate(
        &self,
        auth: &Authenticator,
        headers: &HeaderMap,
    ) -> (Result<Identity, AuthError>, Option<CacheOutcome>) {
        let token = match caller_token(headers) {
            Ok(token) => token,
            Err(e) => return (Err(e), None),
        };
        let now = super::mint::unix_now() as i64;
        if let Some(cache) = &self.cache
            && let Some((identity, valid_until)) = cache.get(token)
            && now < valid_until
        {
            return (Ok(identity), Some(CacheOutcome::Hit));
        }
        let verified = auth.authenticate_until(token).await;
        let result = verified.map(|(identity, exp)| {
            if let (Some(cache), Some(exp)) = (&self.cache, exp) {
                cache.insert(
                    token.to_string(),
                    (identity.clone(), exp.saturating_add(self.leeway_secs)),
                );
            }
            identity
        });
        (result, Some(CacheOutcome::Miss))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(list: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in list {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn one_credential_from_either_header() {
        assert!(matches!(
            caller_token(&headers(&[])),
            Err(AuthError::Missing)
        ));
        assert_eq!(
            caller_token(&headers(&[("x-auth-token", "abc")])).unwrap(),
            "abc"
        );
        assert_eq!(
            caller_token(&headers(&[("authorization", "Bearer xyz")])).unwrap(),
            "xyz"
        );
        assert_eq!(
            caller_token(&headers(&[
                ("authorization", "bearer xyz"),
                ("x-auth-token", "xyz")
            ]))
            .unwrap(),
            "xyz",
            "the same token twice is one credential"
        );
        assert!(matches!(
            caller_token(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])),
            Err(AuthError::Malformed)
        ));
        assert_eq!(
            caller_token(&headers(&[("authorization", "Bearer \t xyz \t")])).unwrap(),
            "xyz"
        );
        for list in [
            &[("authorization", "Bearer")][..],
            &[("authorization", "Bearerxyz")],
            &[("authorization", "Bear xyz")],
        ] {
            assert!(
                matches!(caller_token(&headers(list)), Err(AuthError::Malformed)),
                "{list:?}"
            );
        }
    }

    #[test]
    fn a_credential_that_is_not_ascii_is_malformed() {
        for value in [&b"Bearer x\xc3\xa9y"[..], b"Bearer \xff", b"x\x80"] {
            let v = HeaderValue::from_bytes(value).unwrap();
            for name in [header::AUTHORIZATION, X_AUTH_TOKEN] {
                let mut h = HeaderMap::new();
                h.insert(name.clone(), v.clone());
                assert!(
                    matches!(caller_token(&h), Err(AuthError::Malformed)),
                    "{name}: {value:?}"
                );
            }
        }
    }

    #[test]
    fn more_than_one_credential_is_ambiguous() {
        for list in [
            &[("authorization", "Bearer a"), ("authorization", "Bearer b")][..],
            &[("authorization", "Bearer a"), ("authorization", "Bearer a")],
            &[("x-auth-token", "a"), ("x-auth-token", "b")],
            &[("authorization", "Bearer a"), ("x-auth-token", "b")],
        ] {
            assert!(
                matches!(caller_token(&headers(list)), Err(AuthError::Ambiguous)),
                "{list:?}"
            );
        }
    }

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).expect("token is ASCII");
        h.insert(http::header::AUTHORIZATION, value);
        h
    }

    #[tokio::test]
    async fn the_cache_answers_the_second_time_and_capacity_zero_turns_it_off() {
        use crate::auth::test_support::{HS_SECRET, claims, hs_auth, identity, sign_hs};
        let auth = hs_auth();
        let token = bearer(&sign_hs(&claims("t"), HS_SECRET.as_bytes()));
        let forged = bearer(&sign_hs(
            &claims("t"),
            b"another-secret-0123456789abcdef-0123",
        ));

        let cached = VerifiedTokens::new(Duration::from_secs(30), 100);
        let (first, outcome) = cached.authenticate(&auth, &token).await;
        assert_eq!(
            (first, outcome),
            (Ok(identity("t")), Some(CacheOutcome::Miss))
        );
        let (second, outcome) = cached.authenticate(&auth, &token).await;
        assert_eq!(
            (second, outcome),
            (Ok(identity("t")), Some(CacheOutcome::Hit))
        );
        // Refusals are not remembered: a forged token is verified every time.
        for _ in 0..2 {
            let (refused, outcome) = cached.authenticate(&auth, &forged).await;
            assert!(refused.is_err(), "{refused:?}");
            assert_eq!(outcome, Some(CacheOutcome::Miss));
        }
        let (none, outcome) = cached.authenticate(&auth, &HeaderMap::new()).await;
        assert_eq!((none, outcome), (Err(AuthError::Missing), None));

        let uncached = VerifiedTokens::new(Duration::from_secs(30), 0);
        for _ in 0..2 {
            let (again, outcome) = uncached.authenticate(&auth, &token).await;
            assert_eq!(
                (again, outcome),
                (Ok(identity("t")), Some(CacheOutcome::Miss))
            );
        }
    }
}
