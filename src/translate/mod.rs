//! The v1.0 surface, translated onto the v2 upstream.
//!
//! - [`classify_v1`]: `/v1.0/appkeys/{appkey}/...` -> appkey + [`V1Route`] (+ Action);
//! - [`request`]: v1.0 bodies validated and turned into v2 bodies, before
//!   anything is sent (a request that would be refused is never half-executed);
//! - [`response`]: v2 answers turned into the v1.0 shapes, the status table;
//! - [`exec`]: the v2 call(s) behind each v1.0 endpoint;
//! - [`V1Error`] and [`result_code`]: the one table from every failure to a
//!   v1.0 `resultCode`. The v1.0 surface always answers HTTP 200 with the
//!   `header` envelope.

pub mod exec;
pub mod request;
pub mod response;

use axum::response::{IntoResponse, Response};
use http::Method;
use serde_json::{Map, Value, json};

use crate::action::Action;
use crate::error::GatewayError;
use crate::upstream::UpstreamError;

/// A classified v1.0 request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Request {
    pub appkey: String,
    pub route: V1Route,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum V1Route {
    Zones,
    /// `GET instances[?id=]`: brief.
    Instances {
        id: Option<String>,
    },
    /// `GET instances-detail[?id=]`.
    InstancesDetail {
        id: Option<String>,
    },
    CreateInstance,
    DeleteInstance {
        id: String,
    },
    Attach {
        instance: String,
    },
    Detach {
        instance: String,
        volume: String,
    },
    /// `POST instances/{id}/action`: the Action comes from the body.
    InstanceAction {
        instance: String,
    },
    Flavors,
    Keypairs {
        name: Option<String>,
    },
    CreateKeypair,
    DeleteKeypair {
        name: String,
    },
    /// The v1.0 token API: refused, toastgate manages tokens.
    Token,
}

impl V1Route {
    /// The Action of this route; `None` for the action endpoint (decided by
    /// its body) and for the token API (refused before policy).
    pub fn action(&self) -> Option<Action> {
        Some(match self {
            V1Route::Zones => Action::ZoneList,
            V1Route::Instances { id: Some(_) } | V1Route::InstancesDetail { id: Some(_) } => {
                Action::InstanceGet
            }
            V1Route::Instances { id: None } => Action::InstanceList,
            V1Route::InstancesDetail { id: None } => Action::InstanceListDetail,
            V1Route::CreateInstance => Action::InstanceCreate,
            V1Route::DeleteInstance { .. } => Action::InstanceDelete,
            V1Route::Attach { .. } => Action::VolumeAttach,
            V1Route::Detach { .. } => Action::VolumeDetach,
            V1Route::Flavors => Action::FlavorListDetail,
            V1Route::Keypairs { name: None } => Action::KeypairList,
            V1Route::Keypairs { name: Some(_) } => Action::KeypairGet,
            V1Route::CreateKeypair => Action::KeypairCreate,
            V1Route::DeleteKeypair { .. } => Action::KeypairDelete,
            V1Route::InstanceAction { .. } | V1Route::Token => return None,
        })
    }

    /// The instance / keypair / volume concerned, for audit.
    pub fn target(&self) -> Option<&str> {
        match self {
            V1Route::Instances { id } | V1Route::InstancesDetail { id } => id.as_deref(),
            V1Route::DeleteInstance { id } => Some(id),
            V1Route::Attach { instance } | V1Route::InstanceAction { instance } => Some(instance),
            V1Route::Detach { instance, .. } => Some(instance),
            V1Route::Keypairs { name } => name.as_deref(),
            V1Route::DeleteKeypair { name } => Some(name),
            _ => None,
        }
    }
}

/// Everything that can go wrong on the v1.0 surface.
#[derive(Debug, thiserror::Error)]
pub enum V1Error {
    #[error("the request body is not valid JSON: {0}")]
    Json(String),
    #[error("invalid parameter: {0}")]
    Invalid(String),
    #[error("no such v1.0 API: {0}")]
    NoRoute(String),
    #[error("{0}")]
    NotSupported(String),
    #[error(
        "tokens are managed by toastgate: call the API with your team JWT in X-Auth-Token (or Authorization: Bearer); cloud keys are never accepted from callers"
    )]
    TokenApi,
    #[error("upstream answered {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("{0}")]
    Gateway(#[from] GatewayError),
}

impl From<UpstreamError> for V1Error {
    fn from(e: UpstreamError) -> Self {
        V1Error::Gateway(GatewayError::Upstream(e))
    }
}

/// The one table from failures to v1.0 result codes (documented in the README).
///
/// Families are the provider's: 0 success; -2 unknown exception; -3 permission
/// denied (user, appkey or token); -4 invalid parameters; -5 nonexistent;
/// -7 not supported; -8 JSON parsing error; 10400-10599 instance API errors,
/// `10000 + HTTP status` (upstream statuses, and the gateway's own 413, 429,
/// 502, 503, 504); 50400-50499 token API errors.
pub fn result_code(e: &V1Error) -> i64 {
    match e {
        V1Error::Json(_) => -8,
        V1Error::Invalid(_) => -4,
        V1Error::NoRoute(_) => -5,
        V1Error::NotSupported(_) => -7,
        V1Error::TokenApi => 50403,
        V1Error::Upstream { status, .. } => 10000 + i64::from(*status),
        V1Error::Gateway(g) => gateway_code(g),
    }
}

fn gateway_code(e: &GatewayError) -> i64 {
    match e {
        GatewayError::Unauthenticated(crate::auth::AuthError::KeysUnavailable) => 10503,
        GatewayError::Unauthenticated(_)
        | GatewayError::Forbidden(_)
        | GatewayError::UnknownProject(_) => -3,
        GatewayError::NoRoute(_) => -5,
        GatewayError::BadRequest(_) => -4,
        GatewayError::Internal(_) => -2,
        // The gateway's own HTTP-like failures, in the instance API family.
        other => 10000 + i64::from(other.status().as_u16()),
    }
}

/// `{"header": {...}}` plus the payload fields, always HTTP 200.
pub fn envelope_ok(payload: Map<String, Value>) -> Response {
    let mut body = Map::new();
    body.insert(
        "header".into(),
        json!({"isSuccessful": true, "resultCode": 0, "resultMessage": "SUCCESS"}),
    );
    body.extend(payload);
    axum::Json(Value::Object(body)).into_response()
}

pub fn envelope_error(e: &V1Error) -> Response {
    let body = json!({"header": {
        "isSuccessful": false,
        "resultCode": result_code(e),
        "resultMessage": e.to_string(),
    }});
    axum::Json(body).into_response()
}

/// Classifies `path` (the part after `/v1.0/appkeys/`) with its query.
pub fn classify_v1(method: &Method, path: &str, query: Option<&str>) -> Result<V1Request, V1Error> {
    let path = path.strip_suffix('/').unwrap_or(path);
    let no_route = || V1Error::NoRoute(format!("{method} /v1.0/appkeys/{path}"));
    let mut segments = path.split('/');
    let appkey = segments
        .next()
        .filter(|a| is_plain(a))
        .ok_or_else(no_route)?;
    let rest: Vec<&str> = segments.collect();
    if rest.iter().any(|s| !is_plain(s)) {
        return Err(no_route());
    }
    let q = |name: &str| query_param(query, name);
    let required = |name: &str| {
        q(name).ok_or_else(|| V1Error::Invalid(format!("the `{name}` query parameter is required")))
    };
    let m = method.clone();
    let route = match (m, rest.as_slice()) {
        (Method::GET, ["availability-zones"]) => V1Route::Zones,
        (Method::GET, ["instances"]) => V1Route::Instances { id: q("id") },
        (Method::GET, ["instances-detail"]) => V1Route::InstancesDetail { id: q("id") },
        (Method::POST, ["instances"]) => V1Route::CreateInstance,
        (Method::DELETE, ["instances"]) => V1Route::DeleteInstance {
            id: required("id")?,
        },
        (Method::POST, ["instances", id, "attachments"]) => V1Route::Attach {
            instance: id.to_string(),
        },
        (Method::DELETE, ["instances", id, "attachments"]) => V1Route::Detach {
            instance: id.to_string(),
            volume: required("volumeId")?,
        },
        (Method::POST, ["instances", id, "action"]) => V1Route::InstanceAction {
            instance: id.to_string(),
        },
        (Method::GET, ["flavors"]) => V1Route::Flavors,
        (Method::GET, ["keypairs"]) => V1Route::Keypairs { name: q("name") },
        (Method::POST, ["keypairs"]) => V1Route::CreateKeypair,
        (Method::DELETE, ["keypairs"]) => V1Route::DeleteKeypair {
            name: required("name")?,
        },
        (_, ["tokens"]) => V1Route::Token,
        (m, segs) if is_known_path(segs) => {
            return Err(V1Error::NotSupported(format!(
                "{m} is not supported on /v1.0/appkeys/{{appkey}}/{}",
                segs.join("/")
            )));
        }
        _ => return Err(no_route()),
    };
    Ok(V1Request {
        appkey: appkey.to_string(),
        route,
    })
}

fn is_known_path(segs: &[&str]) -> bool {
    matches!(
        segs,
        ["availability-zones"]
            | ["instances"]
            | ["instances-detail"]
            | ["instances", _, "attachments"]
            | ["instances", _, "action"]
            | ["flavors"]
            | ["keypairs"]
    )
}

/// A path segment or id that can be placed into an upstream path as is.
fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A decoded query parameter; empty values count as absent.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;
    use crate::policy::Refusal;
    use crate::upstream::token::IdentityError;
    use std::time::Duration;

    fn route(m: Method, p: &str, q: Option<&str>) -> V1Route {
        classify_v1(&m, p, q).unwrap().route
    }

    #[test]
    fn every_v1_endpoint_classifies_with_its_action() {
        let k = "AppKey1";
        let cases = [
            (
                Method::GET,
                "availability-zones",
                None,
                V1Route::Zones,
                Some(Action::ZoneList),
            ),
            (
                Method::GET,
                "instances",
                None,
                V1Route::Instances { id: None },
                Some(Action::InstanceList),
            ),
            (
                Method::GET,
                "instances",
                Some("id=abc"),
                V1Route::Instances {
                    id: Some("abc".into()),
                },
                Some(Action::InstanceGet),
            ),
            (
                Method::GET,
                "instances-detail",
                None,
                V1Route::InstancesDetail { id: None },
                Some(Action::InstanceListDetail),
            ),
            (
                Method::POST,
                "instances",
                None,
                V1Route::CreateInstance,
                Some(Action::InstanceCreate),
            ),
            (
                Method::DELETE,
                "instances",
                Some("id=abc"),
                V1Route::DeleteInstance { id: "abc".into() },
                Some(Action::InstanceDelete),
            ),
            (
                Method::POST,
                "instances/abc/attachments",
                None,
                V1Route::Attach {
                    instance: "abc".into(),
                },
                Some(Action::VolumeAttach),
            ),
            (
                Method::DELETE,
                "instances/abc/attachments",
                Some("volumeId=v1"),
                V1Route::Detach {
                    instance: "abc".into(),
                    volume: "v1".into(),
                },
                Some(Action::VolumeDetach),
            ),
            (
                Method::POST,
                "instances/abc/action",
                None,
                V1Route::InstanceAction {
                    instance: "abc".into(),
                },
                None,
            ),
            (
                Method::GET,
                "flavors",
                None,
                V1Route::Flavors,
                Some(Action::FlavorListDetail),
            ),
            (
                Method::GET,
                "keypairs",
                None,
                V1Route::Keypairs { name: None },
                Some(Action::KeypairList),
            ),
            (
                Method::GET,
                "keypairs",
                Some("name=k1"),
                V1Route::Keypairs {
                    name: Some("k1".into()),
                },
                Some(Action::KeypairGet),
            ),
            (
                Method::POST,
                "keypairs",
                None,
                V1Route::CreateKeypair,
                Some(Action::KeypairCreate),
            ),
            (
                Method::DELETE,
                "keypairs",
                Some("name=k%201"),
                V1Route::DeleteKeypair { name: "k 1".into() },
                Some(Action::KeypairDelete),
            ),
            (Method::POST, "tokens", None, V1Route::Token, None),
            (Method::GET, "tokens", Some("id=x"), V1Route::Token, None),
        ];
        for (m, p, q, want, action) in cases {
            let got = route(m.clone(), &format!("{k}/{p}"), q);
            assert_eq!(got, want, "{m} {p}");
            assert_eq!(got.action(), action, "{m} {p}");
        }
    }

    #[test]
    fn missing_required_query_and_unknown_paths() {
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/instances", None),
            Err(V1Error::Invalid(m)) if m.contains("`id`")
        ));
        assert!(matches!(
            classify_v1(&Method::DELETE, "k/keypairs", Some("name=")),
            Err(V1Error::Invalid(_))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/volumes", None),
            Err(V1Error::NoRoute(_))
        ));
        assert!(matches!(
            classify_v1(&Method::PUT, "k/instances", None),
            Err(V1Error::NotSupported(_))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "k/instances/../x/action", None),
            Err(V1Error::NoRoute(_))
        ));
        assert!(matches!(
            classify_v1(&Method::GET, "", None),
            Err(V1Error::NoRoute(_))
        ));
    }

    #[test]
    fn result_code_table() {
        let cases: Vec<(V1Error, i64)> = vec![
            (V1Error::Json("x".into()), -8),
            (V1Error::Invalid("x".into()), -4),
            (V1Error::NoRoute("x".into()), -5),
            (V1Error::NotSupported("x".into()), -7),
            (V1Error::TokenApi, 50403),
            (
                V1Error::Upstream {
                    status: 404,
                    message: "m".into(),
                },
                10404,
            ),
            (
                V1Error::Upstream {
                    status: 409,
                    message: "m".into(),
                },
                10409,
            ),
            (
                V1Error::Upstream {
                    status: 400,
                    message: "m".into(),
                },
                10400,
            ),
            (
                V1Error::Gateway(GatewayError::Unauthenticated(AuthError::Expired)),
                -3,
            ),
            (
                V1Error::Gateway(GatewayError::Forbidden(Refusal::UnknownTeam {
                    team: "t".into(),
                })),
                -3,
            ),
            (
                V1Error::Gateway(GatewayError::UnknownProject("k".into())),
                -3,
            ),
            (V1Error::Gateway(GatewayError::BodyTooLarge(1)), 10413),
            (
                V1Error::Gateway(GatewayError::TokenUnavailable {
                    project: "p".into(),
                    source: IdentityError::Unavailable("x".into()),
                }),
                10503,
            ),
            (
                V1Error::Gateway(GatewayError::Upstream(UpstreamError::Unreachable(
                    "x".into(),
                ))),
                10502,
            ),
            (
                V1Error::Gateway(GatewayError::Upstream(UpstreamError::Timeout(
                    Duration::from_secs(1),
                ))),
                10504,
            ),
            (
                V1Error::Gateway(GatewayError::Timeout(Duration::from_secs(1))),
                10504,
            ),
            (V1Error::Gateway(GatewayError::Internal("x".into())), -2),
        ];
        for (e, code) in cases {
            assert_eq!(result_code(&e), code, "{e}");
        }
    }
}
