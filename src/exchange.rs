//! One request as the gateway learns about it, phase by phase: the context
//! every phase of the pipeline takes whole. Who (the verified caller), what
//! (the Action and the judged request), on which project, and how it ended.
//! The audit records, the metrics and the log line are all built from this
//! one value, so they always agree.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::HeaderName;
use http::request::Parts;
use serde_json::Value;

use crate::action::Action;
use crate::audit::{AuditRecord, Decision as AuditDecision, Stage};
use crate::auth::Identity;
use crate::config::{AuditLevel, Config, Project};
use crate::error::Ending;
use crate::metrics::Outcome;
use crate::policy::RequestFacts;

/// The request's id: the caller's, or one the gateway made, on the request
/// and on its answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which API the caller speaks; it decides only how answers are rendered.
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

    /// The surface a path belongs to (for answers made before routing,
    /// such as a panic's).
    pub fn of_path(path: &str) -> Surface {
        if path == "/v1.0" || path.starts_with("/v1.0/") {
            Surface::V1
        } else {
            Surface::V2
        }
    }
}

#[derive(Debug)]
pub struct Exchange {
    pub surface: Surface,
    /// The server layer's `X-Request-Id`, kept as the header value (no
    /// copy per request); text only when a log line or record needs it.
    request_id: http::HeaderValue,
    pub started: Instant,
    pub client: Option<SocketAddr>,
    pub caller: Option<Identity>,
    pub project: Option<Arc<Project>>,
    pub action: Option<Action>,
    pub target: Option<String>,
    /// The request as judged: set once its body (if any) has been parsed
    /// strictly and its Action resolved. Everything after is decided on it.
    pub judged: Option<Judged>,
    pub upstream_status: Option<u16>,
    pub result: Option<Value>,
    /// A call other than a GET went upstream (or may have: any that was
    /// not refused unsent), so the request may have changed something.
    pub mutation_sent: bool,
    pub rate: Option<crate::ratelimit::Decision>,
    /// The request's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// Held while this request is the first with its key.
    pub idempotency_ticket: Option<crate::idempotency::Ticket>,
    /// Answered from the idempotency store, not by the upstream.
    pub replayed: bool,
    /// Its `received` audit record was written: its `completed` record is
    /// owed, full webhook backlog or not.
    pub received_recorded: bool,
    /// Time spent waiting for the upstream so far.
    pub upstream_wait: crate::metrics::UpstreamWait,
}

/// What policy, audit and the upstream all see of a request.
#[derive(Debug, Default)]
pub struct Judged {
    /// The v2 body that goes (or would go) upstream; `None` for a request
    /// without one.
    pub v2_body: Option<Value>,
    /// The facts constraints look at, read from that same body.
    pub facts: RequestFacts,
}

impl Judged {
    pub fn new(action: Action, v2_body: Option<Value>) -> Judged {
        let facts = v2_body
            .as_ref()
            .map(|b| RequestFacts::from_v2_body(action, b))
            .unwrap_or_default();
        Judged { v2_body, facts }
    }
}

impl Exchange {
    pub fn start(surface: Surface, parts: &Parts, client: Option<SocketAddr>) -> Exchange {
        let request_id = parts
            .headers
            .get(REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| http::HeaderValue::from_static(""));
        Exchange {
            surface,
            request_id,
            started: Instant::now(),
            client,
            caller: None,
            project: None,
            action: None,
            target: None,
            judged: None,
            upstream_status: None,
            result: None,
            mutation_sent: false,
            rate: None,
            idempotency_key: None,
            idempotency_ticket: None,
            replayed: false,
            received_recorded: false,
            upstream_wait: Default::default(),
        }
    }

    /// The request's id ("" when the server layer set none, as in tests
    /// that build an exchange by hand).
    pub fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or_default()
    }

    pub fn team(&self) -> Option<&str> {
        self.caller.as_ref().map(|c| &*c.team)
    }

    /// The team as a metrics label: bounded to the configured teams.
    pub fn team_label<'a>(&'a self, config: &Config) -> &'a str {
        match self.team() {
            Some(t) if config.teams.contains_key(t) => t,
            Some(_) => "unknown",
            None => "none",
        }
    }

    pub fn action_label(&self) -> &'static str {
        crate::action::label(self.action)
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
            self.request_id(),
            stage,
            level,
            self.surface.label(),
            decision,
        );
        r.team = self.caller.as_ref().map(|c| c.team.to_string());
        r.subject = self
            .caller
            .as_ref()
            .and_then(|c| c.subject.as_deref().map(str::to_string));
        r.client = self.client.map(|c| c.to_string());
        r.action = self.action.map(Action::name);
        r.project = self.project.as_ref().map(|p| p.alias.clone());
        r.target = self.target.clone();
        r.facts = self.judged.as_ref().and_then(|j| j.facts.to_record());
        // Every judged request carries its summary at level `request`, also
        // one without a body (`{}`), so a forwarded mutation is never
        // recorded without it.
        if level == AuditLevel::Request
            && let (Some(action), Some(judged)) = (self.action, &self.judged)
        {
            let body = judged.v2_body.as_ref().unwrap_or(&Value::Null);
            r.request = Some(crate::audit::summarize(action, body));
        }
        if let Some(e) = ending {
            r.reason = match (&e.reason, self.replayed) {
                (Some(reason), _) => Some(reason.to_string()),
                // Answered from the idempotency store: nothing went upstream.
                (None, true) => Some("idempotent_replay".to_string()),
                (None, false) => None,
            };
            r.upstream_status = self.upstream_status;
            r.result = self.result.clone();
            r.latency_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
        }
        r
    }

    /// One line per request; a warning when the gateway, identity or the
    /// upstream failed, so failures stand out at the default level.
    pub fn log_line(&self, ending: &Ending, status: u16, took: std::time::Duration) {
        let x = self;
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    request_id = %x.request_id(),
                    surface = x.surface.label(),
                    team = x.team().unwrap_or("-"),
                    action = x.action_label(),
                    project = x.project.as_ref().map(|p| p.alias.as_str()).unwrap_or("-"),
                    status,
                    upstream_status = x.upstream_status.unwrap_or(0),
                    outcome = ending.outcome.label(),
                    reason = ending.reason.as_deref().unwrap_or("-"),
                    error = ending.message.as_deref().unwrap_or("-"),
                    latency_ms = took.as_secs_f64() * 1000.0,
                    "request"
                )
            };
        }
        match ending.outcome {
            Outcome::GatewayError | Outcome::UpstreamError => line!(warn),
            _ => line!(info),
        }
    }
}
