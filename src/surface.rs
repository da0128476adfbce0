//! What differs between the two surfaces, and nothing else: how a request
//! is classified and judged (v2 by [`crate::router`], v1.0 by
//! [`crate::translate::exec::plan`]), and how the answer is rendered (the
//! upstream's own answer, or the v1.0 envelope; errors by
//! [`GatewayError`]'s two renderings). The pipeline (the gateway module)
//! runs the same phases over these for both.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};
use http::request::Parts;
use serde_json::{Map, Value};

use crate::action::Action;
use crate::config::{Config, Project};
use crate::error::GatewayError;
use crate::exchange::Surface;
use crate::router::{self, V1Request, V2Kind, V2Route};
use crate::translate::exec::{self, Plan};

/// An error in the caller's surface.
pub fn render_error(surface: Surface, e: &GatewayError) -> Response {
    match surface {
        Surface::V2 => e.v2_response(),
        Surface::V1 => e.v1_response(),
    }
}

/// A classified request of either surface.
pub enum Route<'a> {
    V2(V2Route<'a>),
    V1(V1Request),
}

impl<'a> Route<'a> {
    pub fn classify(surface: Surface, parts: &'a Parts) -> Result<Route<'a>, GatewayError> {
        let (path, query) = (parts.uri.path(), parts.uri.query());
        Ok(match surface {
            Surface::V2 => Route::V2(router::classify_v2(
                &parts.method,
                path.strip_prefix("/v2/").unwrap_or(""),
                query,
            )?),
            Surface::V1 => Route::V1(router::classify_v1(
                &parts.method,
                path.strip_prefix("/v1.0/appkeys/").unwrap_or(""),
                query,
            )?),
        })
    }

    /// The Action when the route alone decides it.
    pub fn action(&self) -> Option<Action> {
        match self {
            Route::V2(r) => match r.kind {
                V2Kind::Action(a) => Some(a),
                V2Kind::ServerAction => None,
            },
            Route::V1(r) => r.route.action(),
        }
    }

    pub fn target(&self) -> Option<String> {
        match self {
            Route::V2(r) => r.target.map(str::to_string),
            Route::V1(r) => r.route.target().map(str::to_string),
        }
    }

    pub fn project(&self, config: &Config) -> Result<Arc<Project>, GatewayError> {
        match self {
            Route::V2(r) => config
                .project(r.project)
                .ok_or_else(|| GatewayError::UnknownProject(r.project.to_string())),
            Route::V1(r) => config
                .project_by_appkey(&r.appkey)
                .ok_or_else(|| GatewayError::UnknownProject(format!("appkey {}", r.appkey))),
        }
        .cloned()
    }

    /// Parses the body strictly and resolves the Action.
    pub fn judge(self, bytes: &[u8]) -> Result<JudgedRequest<'a>, GatewayError> {
        Ok(match self {
            Route::V2(route) => {
                let (action, body) = router::judge_v2_body(route.kind, bytes)?;
                JudgedRequest::V2 {
                    route,
                    action,
                    body,
                }
            }
            Route::V1(r) => JudgedRequest::V1(exec::plan(&r.route, bytes)?),
        })
    }
}

pub enum JudgedRequest<'a> {
    V2 {
        route: V2Route<'a>,
        action: Action,
        body: Option<Value>,
    },
    V1(Plan),
}

impl JudgedRequest<'_> {
    pub fn action(&self) -> Action {
        match self {
            JudgedRequest::V2 { action, .. } => *action,
            JudgedRequest::V1(plan) => plan.action,
        }
    }

    /// The v2 body that goes upstream, as policy and audit see it.
    pub fn v2_body(&self) -> Option<&Value> {
        match self {
            JudgedRequest::V2 { body, .. } => body.as_ref(),
            JudgedRequest::V1(plan) => plan.v2_body(),
        }
    }
}

/// A successful answer, before rendering.
pub enum Answer {
    /// The upstream's answer, passed back.
    V2(Response),
    /// The v1.0 payload next to `header`.
    V1(Map<String, Value>),
    /// The answer kept for an `Idempotency-Key`, given again.
    Replayed(crate::idempotency::Stored),
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::V2(resp) => resp,
            Answer::V1(payload) => crate::translate::envelope_ok(payload),
            Answer::Replayed(stored) => replayed(&stored),
        }
    }
}

fn replayed(stored: &crate::idempotency::Stored) -> Response {
    let mut resp = Response::new(axum::body::Body::from(stored.body_bytes()));
    *resp.status_mut() = http::StatusCode::from_u16(stored.status).unwrap_or(http::StatusCode::OK);
    let headers = resp.headers_mut();
    for (name, value) in &stored.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.insert(name, value);
        }
    }
    headers.insert(
        crate::idempotency::REPLAYED,
        http::HeaderValue::from_static("true"),
    );
    resp
}
