//! The project's v2 API as the v1.0 plans call it: each call goes through
//! [`Compute`] (the cloud token and its retry rule), answers are parsed, and
//! flavor details are cached per project.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, header};
use serde_json::Value;

use super::exec::{RawAnswer, V2Caller};
use super::response::{self, FlavorInfo};
use crate::action::Action;
use crate::audit;
use crate::body;
use crate::config::Project;
use crate::error::GatewayError;
use crate::metrics::UpstreamWait;
use crate::upstream::compute::{Compute, Forward};

/// Flavors change rarely; instance details must not cost a flavor call each.
const FLAVOR_CACHE_TTL: Duration = Duration::from_secs(600);

/// Flavor details per tenant, for the v1.0 instance details (cpu, ram).
pub struct FlavorCache(moka::future::Cache<String, Arc<HashMap<String, FlavorInfo>>>);

impl Default for FlavorCache {
    fn default() -> Self {
        FlavorCache(
            moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(FLAVOR_CACHE_TTL)
                .build(),
        )
    }
}

/// What a v1.0 request learned from the upstream, for audit and metrics.
#[derive(Debug, Default, Clone)]
pub struct Learned {
    /// The status of the last upstream answer.
    pub status: Option<u16>,
    /// Ids of what the mutating call produced (from its v2 answer).
    pub result: Option<Value>,
    /// A call other than a GET went out (any not refused unsent): the
    /// request may have changed something upstream.
    pub mutation_sent: bool,
}

/// One v1.0 request's view of its project's v2 API.
pub struct ProjectApi<'a> {
    pub compute: &'a Compute,
    pub flavors: &'a FlavorCache,
    pub project: &'a Arc<Project>,
    pub action: Action,
    pub learned: Mutex<Learned>,
    /// The request's time waiting for the upstream, added to by each call.
    pub waited: &'a UpstreamWait,
}

impl ProjectApi<'_> {
    pub fn learned(&self) -> Learned {
        self.learned.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl V2Caller for ProjectApi<'_> {
    async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<RawAnswer, GatewayError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let sent = match &body {
            Some(v) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                body::to_upstream_bytes(v)
            }
            None => Bytes::new(),
        };
        let uri = self
            .compute
            .base()
            .uri(&self.project.tenant_id, &[path])
            .map_err(|_| GatewayError::Internal("an upstream path is not a valid URI".into()))?;
        let forward = Forward {
            method: method.clone(),
            uri,
            headers,
            body: sent,
        };
        let resp = self
            .compute
            .call(self.project, &forward, self.action, self.waited)
            .await;
        if method != Method::GET
            && !matches!(resp, Err(ref e) if crate::upstream::compute::never_sent(e))
            && let Ok(mut learned) = self.learned.lock()
        {
            learned.mutation_sent = true;
        }
        let resp = resp?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.into_body();
        if let Ok(mut learned) = self.learned.lock() {
            learned.status = outcome_status(learned.status, &method, status);
            // What a mutating call produced (small answers: parsed here).
            if method != Method::GET && (200..300).contains(&status) {
                let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                learned.result = audit::result_ids(self.action, &body, location.as_deref())
                    .or(learned.result.take());
            }
        }
        Ok(RawAnswer {
            status,
            bytes,
            location,
        })
    }

    async fn flavors(&self) -> Result<Arc<HashMap<String, FlavorInfo>>, GatewayError> {
        let load = async {
            let a = self.call(Method::GET, "flavors/detail", None).await?;
            if a.status != 200 {
                return Err(GatewayError::UpstreamAnswer {
                    status: a.status,
                    message: "could not list flavors".into(),
                });
            }
            let map: HashMap<String, FlavorInfo> = a.body["flavors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(response::flavor_info)
                .collect();
            Ok(Arc::new(map))
        };
        // Waiting for a list another request is loading is upstream time
        // too (the load's own call, when it is this request's, nests).
        let _waiting = self.waited.start();
        self.flavors
            .0
            .try_get_with(self.project.tenant_id.clone(), load)
            .await
            .map_err(unshared)
    }
}

/// The status a v1.0 request's outcome is judged by, after one more upstream
/// answer: the first call's (a list, a lookup) or the mutation's. A read
/// after them (a created instance's name read back, a listed server's
/// volumes, one of them tolerated as gone) does not replace it.
fn outcome_status(recorded: Option<u16>, method: &Method, status: u16) -> Option<u16> {
    if *method != Method::GET || recorded.is_none() {
        Some(status)
    } else {
        recorded
    }
}

/// The error of a flavor load shared by every request that waited for it,
/// keeping its classification (a token outage stays a 503, a timeout a 504).
fn unshared(error: Arc<GatewayError>) -> GatewayError {
    let shared = match Arc::try_unwrap(error) {
        Ok(only_waiter) => return only_waiter,
        Err(shared) => shared,
    };
    match &*shared {
        GatewayError::TokenUnavailable { project, source } => GatewayError::TokenUnavailable {
            project: project.clone(),
            source: source.clone(),
        },
        GatewayError::UpstreamUnauthorized(project) => {
            GatewayError::UpstreamUnauthorized(project.clone())
        }
        GatewayError::Upstream(e) => GatewayError::Upstream(e.clone()),
        GatewayError::UpstreamAnswer { status, message } => GatewayError::UpstreamAnswer {
            status: *status,
            message: message.clone(),
        },
        GatewayError::Timeout(d) => GatewayError::Timeout(*d),
        other => GatewayError::Internal(format!("flavor details unavailable: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamError;

    /// Every waiter of a failed flavor load gets the failure as it was
    /// classified, not a generic 502.
    #[test]
    fn a_shared_flavor_load_error_keeps_its_status_for_every_waiter() {
        let cases = [
            GatewayError::Upstream(UpstreamError::Timeout(Duration::from_secs(3))),
            GatewayError::UpstreamAnswer {
                status: 503,
                message: "busy".into(),
            },
            GatewayError::UpstreamUnauthorized("web".into()),
        ];
        for error in cases {
            let (status, code) = (error.status(), error.result_code());
            let shared = Arc::new(error);
            let waiters = [unshared(shared.clone()), unshared(shared)];
            for e in waiters {
                assert_eq!((e.status(), e.result_code()), (status, code), "{e}");
            }
        }
    }

    #[test]
    fn the_outcome_is_the_first_call_or_the_mutation_never_a_later_read() {
        // A list, then its servers' volumes (one gone: 404).
        let mut status = None;
        for (method, answer) in [(Method::GET, 200), (Method::GET, 200), (Method::GET, 404)] {
            status = outcome_status(status, &method, answer);
        }
        assert_eq!(status, Some(200));
        // A create, then the name read back (failing).
        let mut status = None;
        for (method, answer) in [(Method::POST, 202), (Method::GET, 500)] {
            status = outcome_status(status, &method, answer);
        }
        assert_eq!(status, Some(202));
        // A lookup before a mutation: the mutation's answer is the outcome.
        let mut status = None;
        for (method, answer) in [(Method::GET, 200), (Method::DELETE, 409)] {
            status = outcome_status(status, &method, answer);
        }
        assert_eq!(status, Some(409));
    }
}
