//! One request as the gateway learns about it: who, what, on which project,
//! and how it ended. The audit record, the metrics and the log line are all
//! built from this one value, so they always agree.

use std::net::SocketAddr;
use std::time::Instant;

use axum::extract::ConnectInfo;
use http::request::Parts;
use serde_json::{Value, json};

use crate::action::Action;
use crate::audit::{AuditRecord, Decision as AuditDecision, Stage};
use crate::config::{AuditLevel, Config};
use crate::error::GatewayError;
use crate::metrics::Outcome;
use crate::translate::V1Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    V2,
    V1,
}

impl Surface {
    pub fn label(self) -> &'static str {
        match self {
            Surface::V2 => "v2",
            Surface::V1 => "v1.0",
        }
    }
}

#[derive(Debug)]
pub struct Exchange {
    pub surface: Surface,
    pub request_id: String,
    pub started: Instant,
    pub client: Option<String>,
    pub team: Option<String>,
    pub subject: Option<String>,
    pub action: Option<Action>,
    pub project: Option<String>,
    pub target: Option<String>,
    /// The v2 body sent (or to be sent) upstream, for the audit summary.
    pub v2_body: Option<Value>,
    pub upstream_status: Option<u16>,
    pub result: Option<Value>,
    pub rate: Option<crate::ratelimit::Decision>,
}

/// How a request ended, in the terms audit and metrics need.
#[derive(Debug, Clone)]
pub struct Ending {
    pub outcome: Outcome,
    /// Refused by the gateway (auth, policy, rate limit, audit): always audited.
    pub refused: bool,
    pub reason: Option<String>,
    pub message: Option<String>,
}

impl Exchange {
    pub fn start(surface: Surface, parts: &Parts) -> Exchange {
        let request_id = parts
            .headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let client = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.to_string());
        Exchange {
            surface,
            request_id,
            started: Instant::now(),
            client,
            team: None,
            subject: None,
            action: None,
            project: None,
            target: None,
            v2_body: None,
            upstream_status: None,
            result: None,
            rate: None,
        }
    }

    /// The team as a metrics label: bounded to the configured teams.
    pub fn team_label<'a>(&'a self, config: &Config) -> &'a str {
        match &self.team {
            Some(t) if config.teams.contains_key(t) => t,
            Some(_) => "unknown",
            None => "none",
        }
    }

    pub fn action_label(&self) -> &'static str {
        self.action.map(Action::name).unwrap_or("none")
    }

    /// The audit level of this request's Action (`None` before it is known).
    pub fn audit_level(&self, config: &Config) -> AuditLevel {
        match self.action {
            Some(a) => config.audit.level_for(a),
            None => AuditLevel::None,
        }
    }

    pub fn audit_record(
        &self,
        stage: Stage,
        level: AuditLevel,
        ending: Option<&Ending>,
    ) -> AuditRecord {
        let decision = if ending.is_some_and(|e| e.refused) {
            AuditDecision::Refused
        } else {
            AuditDecision::Allowed
        };
        let mut r = AuditRecord::new(
            &self.request_id,
            stage,
            level,
            self.surface.label(),
            decision,
        );
        r.team = self.team.clone();
        r.subject = self.subject.clone();
        r.client = self.client.clone();
        r.action = self.action.map(Action::name);
        r.project = self.project.clone();
        r.target = self.target.clone();
        if level == AuditLevel::Request
            && let (Some(action), Some(body)) = (self.action, &self.v2_body)
        {
            r.request = Some(crate::audit::summarize(action, body));
        }
        if let Some(e) = ending {
            r.reason = e.reason.clone();
            r.upstream_status = self.upstream_status;
            r.result = self.result.clone();
            r.latency_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
        }
        r
    }
}

/// Ending of a request the upstream answered with `status`.
pub fn upstream_ending(status: u16) -> Ending {
    let outcome = match status {
        0..=399 => Outcome::Ok,
        400..=499 => Outcome::UpstreamRejected,
        _ => Outcome::UpstreamError,
    };
    Ending {
        outcome,
        refused: false,
        reason: (status >= 400).then(|| format!("upstream:{status}")),
        message: None,
    }
}

pub fn gateway_ending(e: &GatewayError) -> Ending {
    let (outcome, refused, reason) = match e {
        GatewayError::Unauthenticated(a) => {
            (Outcome::AuthRefused, true, format!("auth:{}", a.reason()))
        }
        GatewayError::Forbidden(r) => (
            Outcome::PolicyRefused,
            true,
            format!("policy:{}", r.reason()),
        ),
        GatewayError::RateLimited { rule, .. } => {
            (Outcome::RateLimited, true, format!("rate_limit:{rule}"))
        }
        GatewayError::RateLimitUnavailable { rule } => (
            Outcome::GatewayError,
            true,
            format!("rate_limit_unavailable:{rule}"),
        ),
        GatewayError::AuditUnavailable(_) => {
            (Outcome::GatewayError, true, "audit_unavailable".to_string())
        }
        GatewayError::UnknownProject(_)
        | GatewayError::NoRoute(_)
        | GatewayError::BadRequest(_)
        | GatewayError::BodyTooLarge(_) => (Outcome::BadRequest, false, "bad_request".to_string()),
        GatewayError::TokenUnavailable { .. } => (
            Outcome::UpstreamError,
            false,
            "token_unavailable".to_string(),
        ),
        GatewayError::UpstreamUnauthorized(_) => {
            (Outcome::UpstreamError, false, "upstream:401".to_string())
        }
        GatewayError::Upstream(_) => (
            Outcome::UpstreamError,
            false,
            "upstream_unreachable".to_string(),
        ),
        GatewayError::Timeout(_) => (Outcome::GatewayError, false, "timeout".to_string()),
        GatewayError::Internal(_) => (Outcome::GatewayError, false, "internal".to_string()),
    };
    Ending {
        outcome,
        refused,
        reason: Some(reason),
        message: Some(e.to_string()),
    }
}

pub fn v1_ending(e: &V1Error) -> Ending {
    match e {
        V1Error::Gateway(g) => gateway_ending(g),
        V1Error::Upstream { status, message } => Ending {
            message: Some(message.clone()),
            ..upstream_ending(*status)
        },
        other => Ending {
            outcome: Outcome::BadRequest,
            refused: false,
            reason: Some("bad_request".to_string()),
            message: Some(other.to_string()),
        },
    }
}

/// Ids of what a mutating Action produced, from the upstream v2 answer.
pub fn result_ids(action: Action, v2_answer: &Value, location: Option<&str>) -> Option<Value> {
    match action {
        Action::InstanceCreate => v2_answer["server"]["id"]
            .as_str()
            .map(|id| json!({"instance_id": id})),
        Action::InstanceCreateImage => v2_answer["image_id"]
            .as_str()
            .or_else(|| location.and_then(|l| l.rsplit('/').next()))
            .map(|id| json!({"image_id": id})),
        Action::KeypairCreate => v2_answer["keypair"]["name"]
            .as_str()
            .map(|n| json!({"keypair": n})),
        Action::VolumeAttach => v2_answer["volumeAttachment"]["id"]
            .as_str()
            .map(|id| json!({"attachment_id": id})),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthError;

    #[test]
    fn endings_classify_every_failure() {
        let e = gateway_ending(&GatewayError::Unauthenticated(AuthError::Expired));
        assert_eq!(
            (e.outcome, e.refused, e.reason.as_deref()),
            (Outcome::AuthRefused, true, Some("auth:expired"))
        );
        let e = gateway_ending(&GatewayError::RateLimited {
            rule: "reads".into(),
            retry_after: std::time::Duration::from_secs(1),
        });
        assert_eq!((e.outcome, e.refused), (Outcome::RateLimited, true));
        assert_eq!(upstream_ending(409).outcome, Outcome::UpstreamRejected);
        assert_eq!(upstream_ending(503).outcome, Outcome::UpstreamError);
        assert_eq!(upstream_ending(202).reason, None);
        assert_eq!(
            v1_ending(&V1Error::Json("x".into())).outcome,
            Outcome::BadRequest
        );
    }

    #[test]
    fn result_ids_per_action() {
        assert_eq!(
            result_ids(
                Action::InstanceCreate,
                &json!({"server": {"id": "s1"}}),
                None
            ),
            Some(json!({"instance_id": "s1"}))
        );
        assert_eq!(
            result_ids(
                Action::InstanceCreateImage,
                &Value::Null,
                Some("http://x/images/i9")
            ),
            Some(json!({"image_id": "i9"}))
        );
        assert_eq!(result_ids(Action::InstanceReboot, &Value::Null, None), None);
    }
}
