//! The two token APIs: Keystone v2.0 (`POST /v2.0/tokens`, real HTTP statuses) and the
//! v1.0 token API (`/v1.0/appkeys/{appkey}/tokens`, always HTTP 200 with the `header`
//! envelope), plus the identity version list at `GET /`.
//!
//! A token from either API is valid on the v2 compute API for its account's tenant until
//! `expires` or until `SimHandle::revoke_all_tokens`.

use std::sync::atomic::Ordering;

use axum::response::Response;
use bytes::Bytes;
use http::StatusCode;
use serde_json::{Value, json};

use super::reply::{self, add, fmt_micro, fmt_z, json_response, keystone_error};
use super::state::{Token, lock};
use super::{Shared, SimAccount};

/// Keystone's wording for a request it cannot parse.
const MALFORMED: &str = "The server could not comply with the request since it is either \
     malformed or otherwise incorrect. The client is assumed to be in error.";

pub(crate) fn is_v1_token_path(path: &str) -> bool {
    path.strip_prefix("/v1.0/appkeys/")
        .and_then(|rest| rest.strip_suffix("/tokens"))
        .is_some_and(|appkey| !appkey.is_empty() && !appkey.contains('/'))
}

/// `GET /`: the spec's "버전 목록 보기" example, with hrefs on the simulator.
pub(crate) fn versions(shared: &Shared) -> Response {
    let base = &shared.base;
    json_response(
        StatusCode::OK,
        &json!({
            "versions": {
                "values": [
                    {
                        "status": "stable",
                        "updated": "2015-03-30T00:00:00Z",
                        "media-types": [
                            {"base": "application/json",
                             "type": "application/vnd.openstack.identity-v3+json"}
                        ],
                        "id": "v3.4",
                        "links": [{"href": format!("{base}/v3/"), "rel": "self"}]
                    },
                    {
                        "status": "stable",
                        "updated": "2014-04-17T00:00:00Z",
                        "media-types": [
                            {"base": "application/json",
                             "type": "application/vnd.openstack.identity-v2.0+json"}
                        ],
                        "id": "v2.0",
                        "links": [
                            {"href": format!("{base}/v2.0/"), "rel": "self"},
                            {"href": "http://docs.openstack.org/", "type": "text/html",
                             "rel": "describedby"}
                        ]
                    }
                ]
            }
        }),
    )
}

fn issue(shared: &Shared, account: &SimAccount) -> (String, Token) {
    let now = shared.now();
    let token = Token {
        tenant_id: account.tenant_id.clone(),
        user_id: account.user_id.clone(),
        issued: now,
        expires: add(now, shared.token_lifetime),
    };
    let id = uuid::Uuid::new_v4().simple().to_string();
    let mut world = lock(&shared.world);
    // Expired tokens are never valid again: forget them so a long run stays small.
    world.tokens.retain(|_, t| t.expires > now);
    world.tokens.insert(id.clone(), token.clone());
    (id, token)
}

// ---- Keystone v2.0 ------------------------------------------------------------------

fn keystone_bad(detail: &str) -> Response {
    keystone_error(StatusCode::BAD_REQUEST, &format!("{detail} {MALFORMED}"))
}

/// `POST /v2.0/tokens` with `passwordCredentials` and `tenantId` or `tenantName`.
pub(crate) fn keystone_tokens(shared: &Shared, body: &Bytes) -> Response {
    if shared.outage.load(Ordering::SeqCst) {
        return keystone_error(StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable");
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return keystone_bad("Expecting to find valid JSON in request body.");
    };
    let Some(auth) = v.get("auth").and_then(Value::as_object) else {
        return keystone_bad("Expecting to find auth in request body.");
    };
    let Some(creds) = auth.get("passwordCredentials").and_then(Value::as_object) else {
        return keystone_bad("Expecting to find passwordCredentials in auth.");
    };
    let (Some(username), Some(password)) = (
        creds.get("username").and_then(Value::as_str),
        creds.get("password").and_then(Value::as_str),
    ) else {
        return keystone_bad(
            "Expecting to find username and password (strings) in passwordCredentials.",
        );
    };
    let tenant_id = auth.get("tenantId");
    let tenant_name = auth.get("tenantName");
    if tenant_id.is_some_and(|t| !t.is_string()) || tenant_name.is_some_and(|t| !t.is_string()) {
        return keystone_bad("tenantId and tenantName must be strings.");
    }
    let tenant_id = tenant_id.and_then(Value::as_str);
    let tenant_name = tenant_name.and_then(Value::as_str);
    if tenant_id.is_none() && tenant_name.is_none() {
        // Keystone would issue an unscoped token, which is useless on the compute API.
        return keystone_bad(
            "Expecting to find tenantId or tenantName in auth (the simulator issues only \
             tenant-scoped tokens).",
        );
    }

    let account = shared.accounts.iter().find(|a| {
        a.username == username
            && a.api_password == password
            && tenant_id.is_none_or(|t| a.tenant_id == t)
            && tenant_name.is_none_or(|t| a.tenant_name == t)
    });
    let Some(account) = account else {
        return keystone_error(StatusCode::UNAUTHORIZED, reply::UNAUTHORIZED_MESSAGE);
    };
    let (id, token) = issue(shared, account);
    let base = &shared.base;
    json_response(
        StatusCode::OK,
        &json!({
            "access": {
                "token": {
                    "id": id,
                    "expires": fmt_z(token.expires),
                    "issued_at": fmt_micro(token.issued),
                    "tenant": {
                        "id": account.tenant_id,
                        "name": account.tenant_name,
                        "enabled": true,
                        "description": null
                    }
                },
                "serviceCatalog": [
                    {
                        "type": "compute",
                        "name": "nova",
                        "endpoints": [{
                            "publicURL": format!("{base}/v2/{}", account.tenant_id),
                            "region": "KR1"
                        }],
                        "endpoints_links": []
                    },
                    {
                        "type": "identity",
                        "name": "keystone",
                        "endpoints": [{"publicURL": format!("{base}/v2.0"), "region": "KR1"}],
                        "endpoints_links": []
                    }
                ],
                "user": {
                    "id": account.user_id,
                    "username": account.username,
                    "name": account.username,
                    "roles": [{"name": "_member_"}],
                    "roles_links": []
                },
                "metadata": {"is_admin": 0, "roles": []}
            }
        }),
    )
}

// ---- v1.0 token API -----------------------------------------------------------------

/// v1.0 result codes used by the simulator.
pub(crate) mod codes {
    pub const MALFORMED: i64 = 50400;
    pub const BAD_CREDENTIALS: i64 = 50401;
    pub const INVALID_TOKEN: i64 = 50402;
    pub const UNKNOWN_APPKEY: i64 = 50404;
    pub const OUTAGE: i64 = 50503;
}

pub(crate) fn envelope_error(code: i64, message: &str) -> Response {
    json_response(
        StatusCode::OK,
        &json!({"header": {"isSuccessful": false, "resultCode": code, "resultMessage": message}}),
    )
}

fn envelope_token(id: &str, token: &Token) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "header": {"isSuccessful": true, "resultCode": 0, "resultMessage": "SUCCESS"},
            "access": {
                "token": {
                    "expires": fmt_z(token.expires),
                    "id": id,
                    "issued_at": fmt_micro(token.issued)
                },
                "user": {"id": token.user_id, "roles": [{"name": "_member_"}]}
            }
        }),
    )
}

fn account_by_appkey<'a>(shared: &'a Shared, appkey: &str) -> Option<&'a SimAccount> {
    shared.accounts.iter().find(|a| a.appkey == appkey)
}

/// `POST /v1.0/appkeys/{appkey}/tokens` with the User Access Key ID and Secret Access
/// Key of the appkey's account.
pub(crate) fn v1_issue(shared: &Shared, appkey: &str, body: &Bytes) -> Response {
    if shared.outage.load(Ordering::SeqCst) {
        return envelope_error(
            codes::OUTAGE,
            "Identity service is temporarily unavailable. Try again later.",
        );
    }
    let creds = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        let auth = v.get("auth")?;
        Some((
            auth.get("username")?.as_str()?.to_string(),
            auth.get("password")?.as_str()?.to_string(),
        ))
    });
    let Some((username, password)) = creds else {
        return envelope_error(
            codes::MALFORMED,
            "Invalid request body: expected {\"auth\":{\"username\":\"{User Access Key ID}\",\
             \"password\":\"{Secret Access Key}\"}}.",
        );
    };
    let Some(account) = account_by_appkey(shared, appkey) else {
        return envelope_error(codes::UNKNOWN_APPKEY, &format!("Unknown appkey: {appkey}."));
    };
    if account.access_key_id != username || account.secret_access_key != password {
        return envelope_error(
            codes::BAD_CREDENTIALS,
            "Authentication failed: invalid User Access Key ID or Secret Access Key.",
        );
    }
    let (id, token) = issue(shared, account);
    envelope_token(&id, &token)
}

/// `GET /v1.0/appkeys/{appkey}/tokens?id={tokenId}`.
pub(crate) fn v1_info(shared: &Shared, appkey: &str, query: Option<&str>) -> Response {
    if shared.outage.load(Ordering::SeqCst) {
        return envelope_error(
            codes::OUTAGE,
            "Identity service is temporarily unavailable. Try again later.",
        );
    }
    let q = reply::parse_query(query);
    let Some(token_id) = reply::query_get(&q, "id").filter(|s| !s.is_empty()) else {
        return envelope_error(codes::MALFORMED, "Missing query parameter: id.");
    };
    let Some(account) = account_by_appkey(shared, appkey) else {
        return envelope_error(codes::UNKNOWN_APPKEY, &format!("Unknown appkey: {appkey}."));
    };
    let world = lock(&shared.world);
    match world.tokens.get(token_id) {
        Some(t) if t.tenant_id == account.tenant_id && t.expires > shared.now() => {
            envelope_token(token_id, t)
        }
        _ => envelope_error(
            codes::INVALID_TOKEN,
            "The token is invalid, expired or revoked.",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_token_paths() {
        assert!(is_v1_token_path("/v1.0/appkeys/abc/tokens"));
        assert!(!is_v1_token_path("/v1.0/appkeys//tokens"));
        assert!(!is_v1_token_path("/v1.0/appkeys/a/b/tokens"));
        assert!(!is_v1_token_path("/v1.0/appkeys/abc/instances"));
    }
}
