//! One error type for everything that can go wrong on the request path, one
//! classification of it, and the one place that turns it into what the caller
//! sees on either surface.
//!
//! Every failure is classified once ([`GatewayError::origin`]): the caller
//! (a request the gateway refuses), the gateway itself, the identity service
//! (no cloud token), or the upstream compute API. From that one answer come
//! the v2 status and Nova body ([`GatewayError::v2_response`]), the v1.0
//! result code and envelope ([`GatewayError::v1_response`]), the metrics
//! outcome and the audit reason ([`Ending`]). Handlers never build error
//! responses by hand.

use std::borrow::Cow;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::{Value, json};

use crate::auth::AuthError;
use crate::metrics::Outcome;
use crate::policy::Refusal;
use crate::upstream::UpstreamError;
use crate::upstream::compute::CallError;
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
    /// A v2 request the gateway cannot judge (body shape, query, headers).
    #[error("{0}")]
    BadRequest(String),
    /// A v1.0 request parameter that is missing, of the wrong type or out of range.
    #[error("invalid parameter: {0}")]
    Invalid(String),
    #[error("the request body is not valid JSON: {0}")]
    Json(String),
    /// A v1.0 action (or other feature) toastgate does not expose.
    #[error("{0}")]
    NotSupported(String),
    #[error(
        "tokens are managed by toastgate: call the API with your team JWT in X-Auth-Token (or Authorization: Bearer); cloud keys are never accepted from callers"
    )]
    TokenApi,
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
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
    /// An `Idempotency-Key` that cannot be used (ill-formed, or on an Action
    /// that does not create anything).
    #[error("Idempotency-Key: {0}")]
    IdempotencyKey(String),
    /// The first request with this key is still running.
    #[error(
        "a request with this Idempotency-Key is still in progress; retry once it has finished to get its answer"
    )]
    IdempotencyInFlight,
    /// The key was first used for another request.
    #[error(
        "this Idempotency-Key was used for a different request (another Action, project, surface or body); use a new key"
    )]
    IdempotencyMismatch,
    /// The shared idempotency store cannot be reached.
    #[error(
        "the Idempotency-Key cannot be checked right now (shared store unavailable), so the request was not performed; retry shortly"
    )]
    IdempotencyUnavailable,
    /// The action ran upstream but its `completed` audit record could not be
    /// written; with `audit.fail_closed` the success is not passed on.
    #[error(
        "the action was performed (upstream answered {upstream_status}{}) but its audit record could not be written, so the success is not passed on; do not retry blindly: check the resource first",
        result.as_ref().map(|r| format!("; {r}")).unwrap_or_default()
    )]
    AuditIncomplete {
        upstream_status: u16,
        result: Option<Value>,
    },
    #[error("request did not complete within {0:?}")]
    Timeout(std::time::Duration),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("no cloud token for project `{project}`: {source}")]
    TokenUnavailable {
        project: String,
        source: IdentityError,
    },
    #[error("the upstream refused a freshly obtained token for project `{0}`")]
    UpstreamUnauthorized(String),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    /// An upstream error answer met by the v1.0 translation (the v2 surface
    /// passes such answers through as they are).
    #[error("upstream answered {status}: {message}")]
    UpstreamAnswer { status: u16, message: String },
}

/// A request that names no route of the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such route: {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path} (allowed: {allowed})")]
    MethodNotAllowed {
        method: String,
        path: String,
        /// The methods the path takes, for the message and v2's `Allow`.
        allowed: String,
    },
}

/// Where a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The request itself: refused by the gateway's rules or unreadable.
    Caller,
    /// The gateway could not do its part (audit sink, limit store, timeout, bug).
    Gateway,
    /// No cloud token could be had.
    Identity,
    /// The upstream compute API failed or refused.
    Upstream,
}

impl From<CallError> for GatewayError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Token { project, source } => {
                GatewayError::TokenUnavailable { project, source }
            }
            CallError::Unauthorized { project } => GatewayError::UpstreamUnauthorized(project),
            CallError::Transport(e) => GatewayError::Upstream(e),
        }
    }
}

impl GatewayError {
    pub fn origin(&self) -> Origin {
        use GatewayError::*;
        match self {
            Unauthenticated(AuthError::KeysUnavailable) => Origin::Gateway,
            Unauthenticated(_)
            | Forbidden(_)
            | UnknownProject(_)
            | NoRoute(_)
            | BadRequest(_)
            | Invalid(_)
            | Json(_)
            | NotSupported(_)
            | TokenApi
            | BodyTooLarge(_)
            | BodyTimeout(_)
            | IdempotencyKey(_)
            | IdempotencyInFlight
            | IdempotencyMismatch
            | RateLimited { .. } => Origin::Caller,
            IdempotencyUnavailable
            | RateLimitUnavailable { .. }
            | AuditUnavailable(_)
            | AuditIncomplete { .. }
            | Timeout(_)
            | Upstream(UpstreamError::Busy { .. })
            | Internal(_) => Origin::Gateway,
            TokenUnavailable { .. } => Origin::Identity,
            UpstreamUnauthorized(_) | Upstream(_) | UpstreamAnswer { .. } => Origin::Upstream,
        }
    }

    /// A failure of a compute call that certainly never reached the
    /// upstream (no cloud token, no connection free). Only the request's
    /// last call: an earlier one may have.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            GatewayError::TokenUnavailable { .. }
                | GatewayError::Upstream(UpstreamError::Busy { .. })
        )
    }

    /// A decision of the gateway's own rules (authentication, policy, rate
    /// limits, the audit promise): always audited, as `decision: refused`.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            GatewayError::Unauthenticated(_)
                | GatewayError::Forbidden(_)
                | GatewayError::RateLimited { .. }
                | GatewayError::RateLimitUnavailable { .. }
                | GatewayError::AuditUnavailable(_)
                | GatewayError::IdempotencyInFlight
                | GatewayError::IdempotencyMismatch
                | GatewayError::IdempotencyUnavailable
        )
    }

    /// The metrics outcome.
    pub fn outcome(&self) -> Outcome {
        match (self.origin(), self) {
            (_, GatewayError::Unauthenticated(AuthError::KeysUnavailable)) => Outcome::GatewayError,
            (_, GatewayError::Unauthenticated(_)) => Outcome::AuthRefused,
            (_, GatewayError::Forbidden(_)) => Outcome::PolicyRefused,
            (_, GatewayError::RateLimited { .. }) => Outcome::RateLimited,
            (_, GatewayError::UpstreamAnswer { status, .. }) if *status < 500 => {
                Outcome::UpstreamRejected
            }
            (Origin::Caller, _) => Outcome::BadRequest,
            (Origin::Gateway, _) => Outcome::GatewayError,
            (Origin::Identity | Origin::Upstream, _) => Outcome::UpstreamError,
        }
    }

    /// Bounded reason for the audit record and the log line.
    pub fn reason(&self) -> Cow<'static, str> {
        use GatewayError::*;
        match self {
            Unauthenticated(a) => format!("auth:{}", a.reason()).into(),
            Forbidden(r) => format!("policy:{}", r.reason()).into(),
            RateLimited { rule, .. } => format!("rate_limit:{rule}").into(),
            RateLimitUnavailable { rule } => format!("rate_limit_unavailable:{rule}").into(),
            AuditUnavailable(_) => "audit_unavailable".into(),
            AuditIncomplete { .. } => "audit_incomplete".into(),
            IdempotencyKey(_) => "bad_request".into(),
            IdempotencyInFlight => "idempotency:in_flight".into(),
            IdempotencyMismatch => "idempotency:mismatch".into(),
            IdempotencyUnavailable => "idempotency:unavailable".into(),
            UnknownProject(_) | NoRoute(_) | BadRequest(_) | Invalid(_) | Json(_)
            | NotSupported(_) | TokenApi | BodyTooLarge(_) | BodyTimeout(_) => "bad_request".into(),
            TokenUnavailable { .. } => "token_unavailable".into(),
            UpstreamUnauthorized(_) => "upstream:401".into(),
            Upstream(UpstreamError::Timeout(_)) => "upstream_timeout".into(),
            Upstream(UpstreamError::Busy { .. }) => "upstream_busy".into(),
            Upstream(_) => "upstream_unreachable".into(),
            UpstreamAnswer { status, .. } => format!("upstream:{status}").into(),
            Timeout(_) => "timeout".into(),
            Internal(_) => "internal".into(),
        }
    }

    /// The v2 status.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            // The caller's token may be fine: we cannot check it right now.
            Unauthenticated(AuthError::KeysUnavailable) => StatusCode::SERVICE_UNAVAILABLE,
            Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Forbidden(_) | TokenApi => StatusCode::FORBIDDEN,
            UnknownProject(_) | NoRoute(RouteError::NotFound { .. }) => StatusCode::NOT_FOUND,
            NoRoute(RouteError::MethodNotAllowed { .. }) => StatusCode::METHOD_NOT_ALLOWED,
            BadRequest(_) | Invalid(_) | Json(_) | NotSupported(_) | IdempotencyKey(_) => {
                StatusCode::BAD_REQUEST
            }
            IdempotencyInFlight => StatusCode::CONFLICT,
            IdempotencyMismatch => StatusCode::UNPROCESSABLE_ENTITY,
            IdempotencyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            RateLimitUnavailable { .. } | AuditUnavailable(_) | TokenUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AuditIncomplete { .. } | Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            UpstreamUnauthorized(_) => StatusCode::BAD_GATEWAY,
            Upstream(UpstreamError::Timeout(_)) | Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Upstream(UpstreamError::Busy { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            Upstream(_) => StatusCode::BAD_GATEWAY,
            UpstreamAnswer { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
        }
    }

    /// The v1.0 `resultCode`, in the provider's families (the README's table):
    /// -2 unexpected; -3 permission denied (user, appkey or token); -4 invalid
    /// parameters; -5 nonexistent API; -7 not supported; -8 JSON parsing;
    /// `10000 + HTTP status` for the instance API's own failures (the
    /// upstream's statuses and the gateway's 413, 429, 5xx); 50403 the token API.
    pub fn result_code(&self) -> i64 {
        use GatewayError::*;
        match self {
            Json(_) => -8,
            Invalid(_) | BadRequest(_) | IdempotencyKey(_) => -4,
            NoRoute(RouteError::NotFound { .. }) => -5,
            NoRoute(RouteError::MethodNotAllowed { .. }) | NotSupported(_) => -7,
            TokenApi => 50403,
            Unauthenticated(AuthError::KeysUnavailable) => 10503,
            Unauthenticated(_) | Forbidden(_) | UnknownProject(_) => -3,
            Internal(_) => -2,
            // Everything else already has the HTTP status of its family.
            other => 10000 + i64::from(other.status().as_u16()),
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
            | GatewayError::IdempotencyUnavailable
            | GatewayError::AuditUnavailable(_) => Some(5),
            GatewayError::IdempotencyInFlight
            | GatewayError::Upstream(UpstreamError::Busy { .. }) => Some(1),
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
            408 => "requestTimeout",
            409 => "conflictingRequest",
            422 => "unprocessableEntity",
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
        // RFC 9110 (15.5.6): a 405 says which methods the target takes.
        if let GatewayError::NoRoute(RouteError::MethodNotAllowed { allowed, .. }) = self
            && let Ok(allowed) = HeaderValue::from_str(allowed)
        {
            resp.headers_mut().insert(header::ALLOW, allowed);
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"toastgate\", error=\"invalid_token\""),
            );
        }
        self.add_retry_after(&mut resp);
        resp
    }

    /// The v1.0 answer: HTTP 200, the `header` envelope with
    /// `isSuccessful: false`.
    pub fn v1_response(&self) -> Response {
        let body = json!({"header": {
            "isSuccessful": false,
            "resultCode": self.result_code(),
            "resultMessage": self.to_string(),
        }});
        let mut resp = axum::Json(body).into_response();
        self.add_retry_after(&mut resp);
        resp
    }

    fn add_retry_after(&self, resp: &mut Response) {
        if let Some(secs) = self.retry_after_secs() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
    }
}

/// How a request ended, in the terms audit, metrics and the log line need.
#[derive(Debug, Clone)]
pub struct Ending {
    pub outcome: Outcome,
    /// Refused by the gateway's rules: always audited.
    pub refused: bool,
    pub reason: Option<Cow<'static, str>>,
    /// What the caller was told, for the log line (never holds a secret:
    /// error texts name keys, paths and statuses, not values).
    pub message: Option<String>,
}

impl Ending {
    /// A request the upstream answered with `status`.
    pub fn upstream(status: u16) -> Ending {
        let outcome = match status {
            0..=399 => Outcome::Ok,
            400..=499 => Outcome::UpstreamRejected,
            _ => Outcome::UpstreamError,
        };
        Ending {
            outcome,
            refused: false,
            reason: (status >= 400).then(|| format!("upstream:{status}").into()),
            message: None,
        }
    }
}

impl From<&GatewayError> for Ending {
    fn from(e: &GatewayError) -> Ending {
        Ending {
            outcome: e.outcome(),
            refused: e.is_refusal(),
            reason: Some(e.reason()),
            message: Some(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn every_variant() -> Vec<GatewayError> {
        use GatewayError::*;
        vec![
            Unauthenticated(AuthError::Expired),
            Unauthenticated(AuthError::KeysUnavailable),
            Forbidden(Refusal::UnknownTeam { team: "x".into() }),
            UnknownProject("p".into()),
            NoRoute(RouteError::NotFound {
                method: "GET".into(),
                path: "/x".into(),
            }),
            NoRoute(RouteError::MethodNotAllowed {
                method: "PUT".into(),
                path: "/x".into(),
                allowed: "GET".into(),
            }),
            BadRequest("b".into()),
            Invalid("i".into()),
            Json("j".into()),
            NotSupported("n".into()),
            TokenApi,
            BodyTooLarge(10),
            BodyTimeout(Duration::from_secs(1)),
            RateLimited {
                rule: "r".into(),
                retry_after: Duration::from_millis(1500),
            },
            RateLimitUnavailable { rule: "r".into() },
            AuditUnavailable("x".into()),
            IdempotencyKey("k".into()),
            IdempotencyInFlight,
            IdempotencyMismatch,
            IdempotencyUnavailable,
            AuditIncomplete {
                upstream_status: 202,
                result: None,
            },
            Timeout(Duration::from_secs(1)),
            Internal("x".into()),
            TokenUnavailable {
                project: "p".into(),
                source: IdentityError::Unavailable("down".into()),
            },
            UpstreamUnauthorized("p".into()),
            Upstream(UpstreamError::Timeout(Duration::from_secs(1))),
            Upstream(UpstreamError::Unreachable("refused".into())),
            Upstream(UpstreamError::Busy {
                max_connections: 4,
                waited: Duration::from_secs(5),
            }),
            UpstreamAnswer {
                status: 409,
                message: "m".into(),
            },
        ]
    }

    /// One row per variant: origin, v2 status, v1.0 result code, metrics
    /// outcome, refusal. The README's two tables are these rows.
    #[test]
    fn one_classification_per_failure() {
        use Origin::*;
        use Outcome as O;
        let want: Vec<(Origin, u16, i64, Outcome, bool)> = vec![
            (Caller, 401, -3, O::AuthRefused, true),
            (Gateway, 503, 10503, O::GatewayError, true),
            (Caller, 403, -3, O::PolicyRefused, true),
            (Caller, 404, -3, O::BadRequest, false),
            (Caller, 404, -5, O::BadRequest, false),
            (Caller, 405, -7, O::BadRequest, false),
            (Caller, 400, -4, O::BadRequest, false),
            (Caller, 400, -4, O::BadRequest, false),
            (Caller, 400, -8, O::BadRequest, false),
            (Caller, 400, -7, O::BadRequest, false),
            (Caller, 403, 50403, O::BadRequest, false),
            (Caller, 413, 10413, O::BadRequest, false),
            (Caller, 408, 10408, O::BadRequest, false),
            (Caller, 429, 10429, O::RateLimited, true),
            (Gateway, 503, 10503, O::GatewayError, true),
            (Gateway, 503, 10503, O::GatewayError, true),
            (Caller, 400, -4, O::BadRequest, false),
            (Caller, 409, 10409, O::BadRequest, true),
            (Caller, 422, 10422, O::BadRequest, true),
            (Gateway, 503, 10503, O::GatewayError, true),
            (Gateway, 500, 10500, O::GatewayError, false),
            (Gateway, 504, 10504, O::GatewayError, false),
            (Gateway, 500, -2, O::GatewayError, false),
            (Identity, 503, 10503, O::UpstreamError, false),
            (Upstream, 502, 10502, O::UpstreamError, false),
            (Upstream, 504, 10504, O::UpstreamError, false),
            (Upstream, 502, 10502, O::UpstreamError, false),
            (Gateway, 503, 10503, O::GatewayError, false),
            (Upstream, 409, 10409, O::UpstreamRejected, false),
        ];
        let all = every_variant();
        assert_eq!(all.len(), want.len());
        for (e, (origin, status, code, outcome, refused)) in all.iter().zip(want) {
            assert_eq!(e.origin(), origin, "{e:?}");
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.result_code(), code, "{e:?}");
            assert_eq!(e.outcome(), outcome, "{e:?}");
            assert_eq!(e.is_refusal(), refused, "{e:?}");
            let ending = Ending::from(e);
            assert_eq!((ending.outcome, ending.refused), (outcome, refused));
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

    #[test]
    fn upstream_endings() {
        assert_eq!(Ending::upstream(202).outcome, Outcome::Ok);
        assert_eq!(Ending::upstream(202).reason, None);
        assert_eq!(Ending::upstream(409).outcome, Outcome::UpstreamRejected);
        assert_eq!(Ending::upstream(503).outcome, Outcome::UpstreamError);
        assert_eq!(
            Ending::upstream(404).reason.as_deref(),
            Some("upstream:404")
        );
    }

    #[test]
    fn retry_after_only_where_a_retry_helps() {
        for e in every_variant() {
            let expected = matches!(
                e,
                GatewayError::RateLimited { .. }
                    | GatewayError::TokenUnavailable { .. }
                    | GatewayError::Unauthenticated(AuthError::KeysUnavailable)
                    | GatewayError::RateLimitUnavailable { .. }
                    | GatewayError::AuditUnavailable(_)
                    | GatewayError::IdempotencyInFlight
                    | GatewayError::Upstream(UpstreamError::Busy { .. })
                    | GatewayError::IdempotencyUnavailable
            );
            assert_eq!(e.retry_after_secs().is_some(), expected, "{e:?}");
            let has = |r: Response| r.headers().contains_key(header::RETRY_AFTER);
            assert_eq!(has(e.v2_response()), expected, "{e:?}");
            assert_eq!(has(e.v1_response()), expected, "{e:?}");
        }
    }

    /// The rows of a README table (between `heading` and the next heading),
    /// as their cells.
    fn readme_rows(heading: &str) -> Vec<Vec<String>> {
        let readme = include_str!("../README.md");
        let start = readme.find(heading).expect("README section");
        let section = &readme[start + heading.len()..];
        let section = &section[..section.find("\n#").unwrap_or(section.len())];
        section
            .lines()
            .filter(|l| l.starts_with('|') && !l.starts_with("| ---"))
            .skip(1)
            .map(|l| {
                l.trim_matches('|')
                    .split(" | ")
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect()
    }

    /// Every `` `N` `` in `text` that is a whole number.
    fn backticked_numbers(text: &str) -> Vec<i64> {
        text.split('`')
            .skip(1)
            .step_by(2)
            .filter_map(|t| t.parse().ok())
            .collect()
    }

    /// The README's result-code table is this classification: every code the
    /// gateway answers is documented, and every code documented (outside the
    /// upstream's own 104xx/105xx family) is one the gateway answers.
    #[test]
    fn the_readme_result_code_table_matches() {
        let rows = readme_rows("### v1.0 result codes");
        // `10000` appears as the base of the `10000 + status` formula.
        let documented: Vec<i64> = rows
            .iter()
            .flat_map(|r| backticked_numbers(&r.join(" ")))
            .filter(|c| *c != 10000)
            .collect();
        let produced: Vec<i64> = every_variant()
            .iter()
            .map(GatewayError::result_code)
            .collect();
        for code in &produced {
            assert!(
                documented.contains(code),
                "result code {code} is not in the README"
            );
        }
        for code in &documented {
            let upstream_family = (10400..=10599).contains(code);
            assert!(
                *code == 0 || upstream_family || produced.contains(code),
                "the README documents {code}, which nothing answers"
            );
        }
    }

    /// The README's v2 error table is this classification: every status the
    /// gateway answers itself is documented with its Nova fault name, and
    /// every documented row names a status the gateway answers.
    #[test]
    fn the_readme_v2_error_table_matches() {
        let rows = readme_rows("### Errors on the v2 surface");
        let documented: Vec<(u16, String)> = rows
            .iter()
            .map(|r| {
                let status = r[1].split_whitespace().next().unwrap().parse().unwrap();
                (status, r[2].trim_matches('`').to_string())
            })
            .collect();
        for e in every_variant() {
            if matches!(e, GatewayError::UpstreamAnswer { .. }) {
                continue; // the upstream's own answers pass through as they are
            }
            let status = e.status();
            let fault = GatewayError::nova_fault(status).to_string();
            assert!(
                documented.contains(&(status.as_u16(), fault.clone())),
                "{e:?}: {} `{fault}` is not in the README's v2 table",
                status.as_u16()
            );
        }
        for (status, fault) in &documented {
            assert!(
                every_variant()
                    .iter()
                    .any(|e| e.status().as_u16() == *status
                        && GatewayError::nova_fault(e.status()) == fault),
                "the README documents {status} `{fault}`, which nothing answers"
            );
        }
    }

    /// Finds `variant` among [`every_variant`].
    fn variant(pick: impl Fn(&GatewayError) -> bool) -> GatewayError {
        every_variant()
            .into_iter()
            .find(|e| pick(e))
            .expect("a variant")
    }

    /// Each situation the README's tables name is answered with the code or
    /// status on its row (not only "somewhere in the table"): in the v1.0
    /// table, the code is the last one written before the phrase.
    #[test]
    fn each_situation_in_the_readme_tables_has_the_code_of_its_row() {
        use GatewayError as G;
        let v1: Vec<(&str, GatewayError)> = vec![
            (
                "expired JWT",
                variant(|e| matches!(e, G::Unauthenticated(AuthError::Expired))),
            ),
            (
                "JWT keys unreachable",
                variant(|e| matches!(e, G::Unauthenticated(AuthError::KeysUnavailable))),
            ),
            ("unknown team", variant(|e| matches!(e, G::Forbidden(_)))),
            (
                "unexpected gateway error",
                variant(|e| matches!(e, G::Internal(_))),
            ),
            ("not strict JSON", variant(|e| matches!(e, G::Json(_)))),
            (
                "did not arrive within",
                variant(|e| matches!(e, G::BodyTimeout(_))),
            ),
            (
                "request body too large",
                variant(|e| matches!(e, G::BodyTooLarge(_))),
            ),
            (
                "rate limited",
                variant(|e| matches!(e, G::RateLimited { .. })),
            ),
            (
                "rate-limit store down",
                variant(|e| matches!(e, G::RateLimitUnavailable { .. })),
            ),
            (
                "misplaced `Idempotency-Key`",
                variant(|e| matches!(e, G::IdempotencyKey(_))),
            ),
            (
                "idempotency key still in progress",
                variant(|e| matches!(e, G::IdempotencyInFlight)),
            ),
            (
                "idempotency key used for a different request",
                variant(|e| matches!(e, G::IdempotencyMismatch)),
            ),
            (
                "idempotency store down",
                variant(|e| matches!(e, G::IdempotencyUnavailable)),
            ),
            (
                "audit sink not writable",
                variant(|e| matches!(e, G::AuditUnavailable(_))),
            ),
            (
                "audit record could not be written",
                variant(|e| matches!(e, G::AuditIncomplete { .. })),
            ),
            (
                "no cloud token",
                variant(|e| matches!(e, G::TokenUnavailable { .. })),
            ),
            (
                "upstream unreachable",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Unreachable(_)))),
            ),
            (
                "every upstream connection busy",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Busy { .. }))),
            ),
            (
                "upstream or request timeout",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Timeout(_)))),
            ),
            (
                "upstream or request timeout",
                variant(|e| matches!(e, G::Timeout(_))),
            ),
            (
                "tokens are managed by toastgate",
                variant(|e| matches!(e, G::TokenApi)),
            ),
        ];
        let rows: Vec<String> = readme_rows("### v1.0 result codes")
            .iter()
            .map(|r| r.join(" | "))
            .collect();
        for (phrase, e) in v1 {
            let row = rows
                .iter()
                .find(|r| r.contains(phrase))
                .unwrap_or_else(|| panic!("`{phrase}` is not in the README's v1.0 table"));
            let before = &row[..row.find(phrase).unwrap()];
            let code = *backticked_numbers(before)
                .last()
                .unwrap_or_else(|| panic!("no code before `{phrase}`: {row}"));
            assert_eq!(code, e.result_code(), "`{phrase}`: {e:?}");
        }

        let v2: Vec<(&str, GatewayError)> = vec![
            (
                "expired",
                variant(|e| matches!(e, G::Unauthenticated(AuthError::Expired))),
            ),
            (
                "JWT keys cannot be fetched",
                variant(|e| matches!(e, G::Unauthenticated(AuthError::KeysUnavailable))),
            ),
            (
                "team not configured",
                variant(|e| matches!(e, G::Forbidden(_))),
            ),
            (
                "unknown project",
                variant(|e| matches!(e, G::UnknownProject(_))),
            ),
            (
                "method not allowed",
                variant(|e| matches!(e, G::NoRoute(RouteError::MethodNotAllowed { .. }))),
            ),
            (
                "did not arrive within",
                variant(|e| matches!(e, G::BodyTimeout(_))),
            ),
            (
                "over `server.body_limit_bytes`",
                variant(|e| matches!(e, G::BodyTooLarge(_))),
            ),
            (
                "rate limit is exhausted",
                variant(|e| matches!(e, G::RateLimited { .. })),
            ),
            (
                "rate-limit store (Redis) is down",
                variant(|e| matches!(e, G::RateLimitUnavailable { .. })),
            ),
            (
                "an ill-formed `Idempotency-Key`",
                variant(|e| matches!(e, G::IdempotencyKey(_))),
            ),
            (
                "whose first request is still running",
                variant(|e| matches!(e, G::IdempotencyInFlight)),
            ),
            (
                "first used for a different request",
                variant(|e| matches!(e, G::IdempotencyMismatch)),
            ),
            (
                "idempotency store (Redis) is down",
                variant(|e| matches!(e, G::IdempotencyUnavailable)),
            ),
            (
                "cannot record a mutating Action",
                variant(|e| matches!(e, G::AuditUnavailable(_))),
            ),
            (
                "audit record could not be written",
                variant(|e| matches!(e, G::AuditIncomplete { .. })),
            ),
            (
                "no cloud token can be had",
                variant(|e| matches!(e, G::TokenUnavailable { .. })),
            ),
            (
                "upstream unreachable",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Unreachable(_)))),
            ),
            (
                "refused a freshly obtained token",
                variant(|e| matches!(e, G::UpstreamUnauthorized(_))),
            ),
            (
                "compute connections stayed busy",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Busy { .. }))),
            ),
            (
                "upstream too slow",
                variant(|e| matches!(e, G::Upstream(UpstreamError::Timeout(_)))),
            ),
            (
                "request over `server.request_timeout`",
                variant(|e| matches!(e, G::Timeout(_))),
            ),
            (
                "a bug in toastgate",
                variant(|e| matches!(e, G::Internal(_))),
            ),
        ];
        let rows = readme_rows("### Errors on the v2 surface");
        for (phrase, e) in v2 {
            let row = rows
                .iter()
                .find(|r| r[0].contains(phrase))
                .unwrap_or_else(|| panic!("`{phrase}` is not in the README's v2 table"));
            let status: u16 = row[1].split_whitespace().next().unwrap().parse().unwrap();
            assert_eq!(status, e.status().as_u16(), "`{phrase}`: {e:?}");
            assert_eq!(
                row[2].trim_matches('`'),
                GatewayError::nova_fault(e.status()),
                "`{phrase}`"
            );
        }
    }
}
