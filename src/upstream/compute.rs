//! Calls to the compute API with the project's cloud token, and the token
//! retry rule: an answer of 401 drops that token (only if it is still the
//! cached one) and the request is sent once more with a fresh token; a second
//! 401 is an error, never a loop. Request bodies are buffered, so every
//! request can be replayed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;

use super::token::{IdentityError, TokenBroker, UpstreamToken};
use super::{UpstreamClient, UpstreamError};
use crate::action::Action;
use crate::config::Project;
use crate::metrics::{Metrics, UpstreamWait};

/// Largest upstream body toastgate reads (JSON answers it rewrites or translates).
pub const MAX_BODY: usize = 32 * 1024 * 1024;

/// A request ready to go upstream, replayable (its body is buffered). The
/// token is added per attempt.
#[derive(Debug, Clone)]
pub struct Forward {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Why a compute call produced no answer to pass on.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no cloud token for project `{project}`: {source}")]
    Token {
        project: String,
        source: IdentityError,
    },
    #[error("the upstream refused a freshly obtained token for project `{project}`")]
    Unauthorized { project: String },
    #[error("{0}")]
    Transport(#[from] UpstreamError),
}

/// The compute API of every project, through one pooled client.
pub struct Compute {
    client: UpstreamClient,
    broker: Arc<TokenBroker>,
    metrics: Arc<Metrics>,
    /// Per attempt: the answer's head and whole body.
    request_timeout: Duration,
}

impl Compute {
    pub fn new(
        client: UpstreamClient,
        broker: Arc<TokenBroker>,
        metrics: Arc<Metrics>,
        request_timeout: Duration,
    ) -> Self {
        Compute {
            client,
            broker,
            metrics,
            request_timeout,
        }
    }

    /// Sends `forward` for `project` and returns the whole answer. The time
    /// it takes (a token wait included) counts in the request's `waited`.
    pub async fn call(
        &self,
        project: &Arc<Project>,
        forward: &Forward,
        action: Action,
        waited: &UpstreamWait,
    ) -> Result<Response<Bytes>, CallError> {
        let _waiting = waited.start();
        self.call_with_retry(project, forward, action).await
    }

    async fn call_with_retry(
        &self,
        project: &Arc<Project>,
        forward: &Forward,
        action: Action,
    ) -> Result<Response<Bytes>, CallError> {
        let token = self.token(project).await?;
        let resp = self.attempt(forward, &token, action).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        self.broker.invalidate_if_current(project, &token);
        let token = self.token(project).await?;
        let resp = self.attempt(forward, &token, action).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.broker.invalidate_if_current(project, &token);
            return Err(CallError::Unauthorized {
                project: project.alias.clone(),
            });
        }
        Ok(resp)
    }

    async fn token(&self, project: &Arc<Project>) -> Result<Arc<UpstreamToken>, CallError> {
        self.broker
            .current_token(project)
            .await
            .map_err(|source| CallError::Token {
                project: project.alias.clone(),
                source,
            })
    }

    async fn attempt(
        &self,
        forward: &Forward,
        token: &UpstreamToken,
        action: Action,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let mut req = Request::new(Full::new(forward.body.clone()));
        *req.method_mut() = forward.method.clone();
        *req.uri_mut() = forward.uri.clone();
        // Not a clone: a cloned map has no room left, and adding the token
        // then reallocates every entry.
        let headers = req.headers_mut();
        headers.reserve(forward.headers.len() + 3);
        for (name, value) in &forward.headers {
            headers.append(name.clone(), value.clone());
        }
        let mut value = HeaderValue::from_str(token.id.expose()).map_err(|_| {
            UpstreamError::Body("the cloud token is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        req.headers_mut().insert(super::X_AUTH_TOKEN, value);
        let span = crate::traces::CallSpan::start(|| {
            (
                format!("compute {}", action.name()).into(),
                vec![opentelemetry::KeyValue::new(
                    "toastgate.action",
                    action.name(),
                )],
            )
        });
        span.inject(req.headers_mut());
        let started = Instant::now();
        // Boxed: the client's future held in place doubles at every caller
        // up the chain (rust-lang/rust#62958): 1 KiB here was 10 KiB in the
        // request's future.
        let result = Box::pin(
            self.client
                .send_buffered(req, MAX_BODY, self.request_timeout),
        )
        .await;
        let answer = match &result {
            Ok(resp) => Ok(resp.status()),
            Err(e) => Err(e.kind()),
        };
        span.end(answer.map(|s| s.as_u16()));
        self.metrics
            .observe_upstream(action.name(), answer, started.elapsed());
        result
    }
}
