//! Calls to the compute API with the project's cloud token, and the token
//! retry rule: an answer of 401 drops that token (only if it is still the
//! cached one) and the request is sent once more with a fresh token; a second
//! 401 is an error, never a loop. Request bodies are buffered, so every
//! request can be replayed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;

use super::pool::{Limits, OriginPool};
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

/// `upstream.compute_url`, parsed once: every upstream URI is built from its
/// scheme and authority, not parsed again per request.
#[derive(Debug, Clone)]
pub struct ComputeBase {
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without its trailing slash ("" for none).
    path: String,
}

/// `upstream.compute_url` is not a URL the HTTP client can call. (The URL
/// is not repeated: config validation names it, and it could hold a
/// password.)
#[derive(Debug, thiserror::Error)]
#[error(
    "not an http(s) URL with a host, without credentials, query or fragment, that the HTTP client accepts"
)]
pub struct InvalidComputeUrl;

/// A path built from a request is not a valid URI path.
#[derive(Debug, thiserror::Error)]
#[error("the upstream path is not a valid URI")]
pub struct InvalidUpstreamPath;

impl ComputeBase {
    pub fn parse(url: &str) -> Result<Self, InvalidComputeUrl> {
        let uri: Uri = url.parse().map_err(|_| InvalidComputeUrl)?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(InvalidComputeUrl);
        };
        if !matches!(scheme.as_str(), "http" | "https") || authority.as_str().contains('@') {
            return Err(InvalidComputeUrl);
        }
        let path = parts
            .path_and_query
            .filter(|p| p.query().is_none())
            .map(|p| p.path().trim_end_matches('/').to_string())
            .ok_or(InvalidComputeUrl)?;
        Ok(ComputeBase {
            scheme,
            authority,
            path,
        })
    }

    /// `{compute_url}/v2/{tenant_id}/` followed by `tail`'s parts, which
    /// are the rest of the path and any query.
    pub fn uri(&self, tenant_id: &str, tail: &[&str]) -> Result<Uri, InvalidUpstreamPath> {
        let tail_len: usize = tail.iter().map(|t| t.len()).sum();
        let mut path = String::with_capacity(self.path.len() + tenant_id.len() + tail_len + 5);
        for part in [self.path.as_str(), "/v2/", tenant_id, "/"]
            .into_iter()
            .chain(tail.iter().copied())
        {
            path.push_str(part);
        }
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            PathAndQuery::from_maybe_shared(Bytes::from(path)).map_err(|_| InvalidUpstreamPath)?,
        );
        Uri::from_parts(parts).map_err(|_| InvalidUpstreamPath)
    }

    /// `scheme://authority/`: where the connections go.
    pub fn origin(&self) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
        Uri::from_parts(parts).unwrap_or_default()
    }
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

/// Whether the failed call certainly never reached the upstream: no token
/// to send it with, or no connection free for it.
pub fn never_sent(e: &CallError) -> bool {
    matches!(
        e,
        CallError::Token { .. } | CallError::Transport(UpstreamError::Busy { .. })
    )
}

/// The compute API of every project, through one pool of connections.
pub struct Compute {
    connections: OriginPool,
    base: ComputeBase,
    broker: Arc<TokenBroker>,
    metrics: Arc<Metrics>,
    /// Per attempt: the answer's head and whole body.
    request_timeout: Duration,
}

impl Compute {
    pub fn new(
        client: UpstreamClient,
        base: ComputeBase,
        broker: Arc<TokenBroker>,
        metrics: Arc<Metrics>,
        settings: &crate::config::Upstream,
    ) -> Self {
        let limits = Limits {
            max_connections: settings.max_connections,
            queue_timeout: settings.queue_timeout,
            open: metrics.upstream_connections.clone(),
            waits: metrics.upstream_connection_waits.clone(),
        };
        Compute {
            connections: client.origin_pool(base.origin(), limits),
            base,
            broker,
            metrics,
            request_timeout: settings.request_timeout,
        }
    }

    /// Where every upstream URI starts.
    pub fn base(&self) -> &ComputeBase {
        &self.base
    }

    /// Sends `forward` for `project` and returns the whole answer. The time
    /// it takes (a token wait included) counts in the request's `waited`.
    ///
    /// The clock is read once as the call begins and once as each attempt
    /// ends (and after a token wait): every step in between (the token's
    /// validity, the pool's idle connections, the attempt's duration, the
    /// wait) takes the last reading. Each read is tens of nanoseconds on a
    /// virtual machine; this path made seven.
    pub async fn call(
        &self,
        project: &Arc<Project>,
        forward: &Forward,
        action: Action,
        waited: &UpstreamWait,
    ) -> Result<Response<Bytes>, CallError> {
        let mut clock = Instant::now();
        let waiting = waited.start_at(clock);
        let result = self
            .call_with_retry(project, forward, action, &mut clock)
            .await;
        waiting.end_at(clock);
        result
    }

    /// `clock`: the last reading of the clock, moved on by every step that
    /// waited.
    async fn call_with_retry(
        &self,
        project: &Arc<Project>,
        forward: &Forward,
        action: Action,
        clock: &mut Instant,
    ) -> Result<Response<Bytes>, CallError> {
        let token = self.token(project, clock).await?;
        let resp = self.attempt(forward, &token, action, clock).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        self.broker.invalidate_if_current(project, &token);
        let token = self.token(project, clock).await?;
        let resp = self.attempt(forward, &token, action, clock).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.broker.invalidate_if_current(project, &token);
            return Err(CallError::Unauthorized {
                project: project.alias.clone(),
            });
        }
        Ok(resp)
    }

    /// The token valid at `clock`, or the one the broker gives after a
    /// wait (then `clock` is read anew).
    async fn token(
        &self,
        project: &Arc<Project>,
        clock: &mut Instant,
    ) -> Result<Arc<UpstreamToken>, CallError> {
        if let Some(token) = self.broker.valid_token_at(project, *clock) {
            return Ok(token);
        }
        let token = self.broker.current_token(project).await;
        *clock = Instant::now();
        token.map_err(|source| CallError::Token {
            project: project.alias.clone(),
            source,
        })
    }

    async fn attempt(
        &self,
        forward: &Forward,
        token: &UpstreamToken,
        action: Action,
        clock: &mut Instant,
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
        headers.insert(super::X_AUTH_TOKEN, token.header.clone());
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
        let started = *clock;
        // Boxed: the client's future held in place doubles at every caller
        // up the chain (rust-lang/rust#62958): 1 KiB here was 10 KiB in the
        // request's future. Boxed inside the timer, not around it: the
        // kilobyte is copied once, into the box, and the timer moves only
        // the pointer.
        let exchange = Box::pin(self.connections.send_buffered(req, MAX_BODY, started));
        let result = super::within_from(started, self.request_timeout, exchange).await;
        let (result, ended) = match result {
            Ok((resp, ended)) => (Ok(resp), ended),
            Err(e) => (Err(e), Instant::now()),
        };
        *clock = ended;
        let answer = match &result {
            Ok(resp) => Ok(resp.status()),
            Err(e) => Err(e.kind()),
        };
        span.end(answer.map(|s| s.as_u16()));
        self.metrics
            .observe_upstream(action, answer, ended.saturating_duration_since(started));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_builds_uris_from_its_parts() {
        let rows = [
            // url, the URI of servers/detail?limit=1 for tenant t
            (
                "https://compute.example",
                "https://compute.example/v2/t/servers/detail?limit=1",
            ),
            (
                "https://compute.example:443/nova/",
                "https://compute.example:443/nova/v2/t/servers/detail?limit=1",
            ),
            (
                "http://127.0.0.1:8774",
                "http://127.0.0.1:8774/v2/t/servers/detail?limit=1",
            ),
            (
                "http://[::1]:80",
                "http://[::1]:80/v2/t/servers/detail?limit=1",
            ),
            (
                "https://[::1]:8443",
                "https://[::1]:8443/v2/t/servers/detail?limit=1",
            ),
        ];
        for (url, uri) in rows {
            let base = ComputeBase::parse(url).unwrap();
            let built = base.uri("t", &["servers/detail", "?", "limit=1"]).unwrap();
            assert_eq!(built.to_string(), uri, "{url}");
            // The same URI as parsing the whole string gives.
            assert_eq!(built, uri.parse::<Uri>().unwrap(), "{url}");
        }
    }

    #[test]
    fn base_refuses_what_is_no_http_base_and_paths_that_are_no_uri() {
        for url in [
            "compute.example",
            "/v2",
            "ftp://compute.example",
            "https://user:pw@compute.example",
            "https://compute.example/?q=1",
            "https://bücher.example",
        ] {
            ComputeBase::parse(url).expect_err(url);
        }
        let base = ComputeBase::parse("https://compute.example").unwrap();
        for tail in ["servers detail", "a\u{7f}", "a\nb"] {
            assert!(base.uri("t", &[tail]).is_err(), "{tail}");
        }
        assert!(base.uri("t", &["servers/detail"]).is_ok());
    }
}
