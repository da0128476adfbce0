//! The payload claims verification reads itself (the team claim, `sub`,
//! `iss`, and which registered claims are present), decoded once per
//! verification in one streaming pass that skips every other claim.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use super::AuthError;

/// One claim of interest, read in a single pass over the payload.
#[derive(Default)]
pub(super) enum Slot {
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
pub(super) struct ScannedClaims {
    pub(super) team: Slot,
    pub(super) sub: Slot,
    pub(super) iss: Slot,
    // Presence only: jsonwebtoken has judged their values already, and may
    // report a mistyped one as missing.
    exp: bool,
    nbf: bool,
    aud: bool,
    /// `exp` as an integer (the verified-token cache keeps an answer until then).
    pub(super) exp_value: Option<i64>,
}

impl ScannedClaims {
    /// Decodes the payload segment: base64url, then one pass over the JSON.
    /// Any failure is [`AuthError::Malformed`].
    pub(super) fn decode(payload_b64: &str, team_claim: &str) -> Result<Self, AuthError> {
        let json = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| AuthError::Malformed)?;
        let mut de = serde_json::Deserializer::from_slice(&json);
        let found = ScanClaims { team_claim }
            .deserialize(&mut de)
            .map_err(|_| AuthError::Malformed)?;
        de.end().map_err(|_| AuthError::Malformed)?;
        Ok(found)
    }

    /// Whether `claim` is in the payload, with any value (`null` included).
    /// Knows the registered claims jsonwebtoken can report as missing (`exp`,
    /// `nbf`, `iss`, `sub`, `aud`); any other name counts as absent.
    pub(super) fn claim_present(&self, claim: &str) -> bool {
        match claim {
            "exp" => self.exp,
            "nbf" => self.nbf,
            "aud" => self.aud,
            "iss" => !matches!(self.iss, Slot::Absent),
            "sub" => !matches!(self.sub, Slot::Absent),
            _ => false,
        }
    }
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
            out.exp |= field.exp;
            out.nbf |= field.nbf;
            out.aud |= field.aud;
            if field.team || field.sub || field.iss || field.exp {
                let value: serde_json::Value = map.next_value()?;
                if field.exp {
                    out.exp_value = value.as_i64();
                }
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
    exp: bool,
    nbf: bool,
    aud: bool,
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
            exp: name == "exp",
            nbf: name == "nbf",
            aud: name == "aud",
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::auth::test_support::*;
    use crate::auth::{AuthError, Authenticator};

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

    #[tokio::test]
    async fn required_claims_given_as_null_are_invalid_not_missing() {
        // jsonwebtoken reads a `null` registered claim as absent and reports
        // it missing; the payload does carry it.
        let auth = hs_auth();
        let secret = HS_SECRET.as_bytes();
        for claim in ["exp", "iss", "aud"] {
            let token = sign_hs(&with(claims("t"), claim, json!(null)), secret);
            assert_eq!(
                auth.authenticate(&token).await,
                Err(AuthError::InvalidClaim(claim.to_string())),
                "{claim}"
            );
        }
    }
}
