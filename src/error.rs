//! One error type for everything that can go wrong on the request path, and
//! the one place that turns it into what the caller sees.
//!
//! Each variant says where the failure came from (the caller, the gateway,
//! or the upstream); that decides the status code here, and the metrics and
//! audit outcome in `exchange`. Handlers never build error responses by hand.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::auth::AuthError;
use crate::policy::Refusal;
use crate::router::RouteError;
use crate::upstream::UpstreamError;
use crate::upstream::token::IdentityError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("authentication required: {0}")]
    Unauthenticated(#[from] AuthError),
    #[error("{0}")]
    Forbidden(#[from] Refusal),
    #[error("project `{0}` is not configured in toastgate")]
    UnknownProject(String),
    #[error("{0}")]
    NoRoute(#[from] RouteError),
    #[error("{0}")]
    BadRequest(String),
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("no cloud token for project `{project}`: {source}")]
    TokenUnavailable {
        project: String,
        source: IdentityError,
    },
    #[error("the upstream refused a freshly obtained token for project `{0}`")]
    UpstreamUnauthorized(String),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("rate limit `{rule}` exceeded; retry in {} s", retry_after.as_secs_f64().ceil().max(1.0))]
    RateLimited {
        rule: String,
        retry_after: std::time::Duration,
    },
    #[error(
        "rate limit `{rule}` cannot be checked right now (shared limit store unavailable); retry shortly"
    )]
    RateLimitUnavailable { rule: String },
    #[error("the audit log cannot record this action right now, so it was not performed: {0}")]
    AuditUnavailable(String),
    #[error("request did not complete within {0:?}")]
    Timeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            // The caller's token may be fine: we cannot check it right now.
            GatewayError::Unauthenticated(AuthError::KeysUnavailable) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::UnknownProject(_) => StatusCode::NOT_FOUND,
            GatewayError::NoRoute(RouteError::NotFound { .. }) => StatusCode::NOT_FOUND,
            GatewayError::NoRoute(RouteError::MethodNotAllowed { .. }) => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::RateLimitUnavailable { .. } | GatewayError::AuditUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::UpstreamUnauthorized(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Upstream(UpstreamError::Timeout(_)) | GatewayError::Timeout(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::Upstream(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds for `Retry-After`, on the answers that invite a retry.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            GatewayError::RateLimited { retry_after, .. } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            GatewayError::TokenUnavailable { .. }
            | GatewayError::Unauthenticated(AuthError::KeysUnavailable)
            | GatewayError::RateLimitUnavailable { .. }
            | GatewayError::AuditUnavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The Nova fault name for the v2 error body (`{"<name>": {code, message}}`).
    fn nova_fault(status: StatusCode) -> &'static str {
        match status.as_u16() {
            400 => "badRequest",
            401 => "unauthorized",
            403 => "forbidden",
            404 => "itemNotFound",
            405 => "badMethod",
            409 => "conflictingRequest",
            413 => "requestEntityTooLarge",
            429 => "overLimit",
            503 => "serviceUnavailable",
            _ => "computeFault",
        }
    }

    /// The v2 answer: real status, Nova-style body. The message is safe to
    /// show: no error variant carries a secret.
    pub fn v2_response(&self) -> Response {
        let status = self.status();
        let body = json!({
            Self::nova_fault(status): {"code": status.as_u16(), "message": self.to_string()}
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"toastgate\", error=\"invalid_token\""),
            );
        }
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_per_failure() {
        let cases: Vec<(GatewayError, u16)> = vec![
            (GatewayError::Unauthenticated(AuthError::Expired), 401),
            (
                GatewayError::Forbidden(Refusal::UnknownTeam { team: "x".into() }),
                403,
            ),
            (GatewayError::UnknownProject("p".into()), 404),
            (GatewayError::BadRequest("b".into()), 400),
            (GatewayError::BodyTooLarge(10), 413),
            (
                GatewayError::TokenUnavailable {
                    project: "p".into(),
                    source: IdentityError::Unavailable("down".into()),
                },
                503,
            ),
            (
                GatewayError::Upstream(UpstreamError::Timeout(std::time::Duration::from_secs(1))),
                504,
            ),
            (
                GatewayError::Upstream(UpstreamError::Unreachable("refused".into())),
                502,
            ),
            (GatewayError::UpstreamUnauthorized("p".into()), 502),
            (GatewayError::Internal("x".into()), 500),
            (
                GatewayError::Unauthenticated(AuthError::KeysUnavailable),
                503,
            ),
            (
                GatewayError::RateLimited {
                    rule: "r".into(),
                    retry_after: std::time::Duration::from_millis(1500),
                },
                429,
            ),
            (GatewayError::RateLimitUnavailable { rule: "r".into() }, 503),
            (GatewayError::AuditUnavailable("x".into()), 503),
        ];
        for (e, status) in cases {
            assert_eq!(e.status().as_u16(), status, "{e}");
        }
    }

    #[test]
    fn fault_names_follow_nova() {
        assert_eq!(
            GatewayError::nova_fault(StatusCode::NOT_FOUND),
            "itemNotFound"
        );
        assert_eq!(
            GatewayError::nova_fault(StatusCode::TOO_MANY_REQUESTS),
            "overLimit"
        );
        assert_eq!(
            GatewayError::nova_fault(StatusCode::BAD_GATEWAY),
            "computeFault"
        );
    }
}
