//! Dev/test tokens signed with the configured HS secret (`toastgate
//! mint-token`, the demo and the integration tests).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{AlgorithmFamily, EncodingKey, Header};

use super::{AuthSetupError, MIN_HS_SECRET_BYTES, install_crypto_provider};
use crate::config::{Auth, KeySource};

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

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::Algorithm;
    use serde_json::{Value, json};

    use crate::auth::test_support::*;
    use crate::auth::{Authenticator, Identity};

    #[tokio::test]
    async fn minted_tokens_round_trip() {
        let c = hs_cfg();
        let token = mint_token(&c, "web-team", "ci-bot", Duration::from_secs(60)).unwrap();
        let auth = Authenticator::new(&c).unwrap();
        assert_eq!(
            auth.authenticate(&token).await,
            Ok(Identity {
                team: "web-team".into(),
                subject: Some("ci-bot".into())
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
}
