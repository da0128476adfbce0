//! The request path of the public listener, phase by phase.
//!
//! ```text
//! classify (surface, project, Action)  -> router
//! authenticate (JWT -> team, subject)  -> auth
//! authorize (team may use project)     -> policy
//! read body, resolve server action     -> (here)
//! forward with the project's token     -> upstream + proxy
//! ```
//! Each phase returns a `GatewayError` on refusal; `error.rs` alone decides
//! what the caller sees.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};

use crate::auth::{AuthError, Authenticator, Identity};
use crate::config::{Config, Project};
use crate::error::GatewayError;
use crate::policy::{self, Action};
use crate::proxy;
use crate::router::{self, V2Kind};
use crate::translate::exec::{self, V2Answer, V2Caller};
use crate::translate::response::FlavorInfo;
use crate::translate::{self, V1Error, V1Route};
use crate::upstream::token::{TokenBroker, UpstreamToken};
use crate::upstream::{MAX_BUFFERED_BODY, UpstreamClient, read_body};

/// Flavors change rarely; instance details must not cost a flavor call each.
const FLAVOR_CACHE_TTL: Duration = Duration::from_secs(600);

/// What a reload swaps as one unit: the config and everything derived from it.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub auth: Authenticator,
}

/// Shared state of the public and admin listeners.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    pub broker: Arc<TokenBroker>,
    client: UpstreamClient,
    /// Flavor details per tenant, for the v1.0 instance details (cpu, ram).
    flavors: moka::future::Cache<String, Arc<HashMap<String, FlavorInfo>>>,
    /// Scheme the public listener speaks, for links when no public_url is set.
    scheme: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Auth(#[from] crate::auth::AuthSetupError),
    #[error("{0}")]
    Client(#[from] crate::upstream::ClientSetupError),
}

impl Gateway {
    pub fn new(config: Config) -> Result<Arc<Gateway>, StartError> {
        let auth = Authenticator::new(&config.auth)?;
        let client = UpstreamClient::new(&config.upstream)?;
        let broker = Arc::new(TokenBroker::new(
            client.clone(),
            config.upstream.clone(),
            config.token.clone(),
        ));
        Ok(Arc::new(Gateway {
            snapshot: ArcSwap::from_pointee(Snapshot {
                config: Arc::new(config),
                auth,
            }),
            broker,
            client,
            flavors: moka::future::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(FLAVOR_CACHE_TTL)
                .build(),
            scheme: "http",
        }))
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The base URL callers reach the gateway at.
    fn public_base(&self, config: &Config, headers: &HeaderMap) -> String {
        if let Some(url) = &config.server.public_url {
            return url.clone();
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .filter(|h| is_plausible_host(h))
            .unwrap_or("localhost");
        format!("{}://{host}", self.scheme)
    }

    /// `GET /` and `GET /v2/`: version discovery, no credential needed.
    pub fn versions(&self, headers: &HeaderMap, single: bool) -> Response {
        let snap = self.snapshot();
        let base = self.public_base(&snap.config, headers);
        let doc = if single {
            proxy::version_document(&base)
        } else {
            proxy::versions_document(&base)
        };
        axum::Json(doc).into_response()
    }

    /// Everything under `/v2/{project}/...`, bounded by the request timeout.
    pub async fn handle_v2(self: Arc<Self>, req: Request<Body>) -> Response {
        let snap = self.snapshot();
        let limit = snap.config.server.request_timeout;
        match tokio::time::timeout(limit, self.v2(snap, req)).await {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => log_refusal(e).v2_response(),
            Err(_) => log_refusal(GatewayError::Timeout(limit)).v2_response(),
        }
    }

    async fn v2(&self, snap: Arc<Snapshot>, req: Request<Body>) -> Result<Response, GatewayError> {
        let config = &snap.config;
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().strip_prefix("/v2/").unwrap_or("");
        let route = router::classify_v2(&parts.method, path)?;

        let identity = authenticate(&snap.auth, &parts.headers).await?;
        let project = config
            .project(route.project)
            .ok_or_else(|| GatewayError::UnknownProject(route.project.to_string()))?
            .clone();

        let body = read_request_body(body, config.server.body_limit_bytes).await?;
        let action = match route.kind {
            V2Kind::Action(a) => a,
            V2Kind::ServerAction => server_action(&body)?,
        };
        let facts = request_facts(action, &body);
        policy::authorize(config, &identity.team, &project.alias, action, &facts)?;
        tracing::debug!(team = %identity.team, action = %action, project = %project.alias, "authorized");

        let base = self.public_base(config, &parts.headers);
        let gateway_project_base = format!("{base}/v2/{}", route.project);
        let upstream_url = format!(
            "{}/v2/{}/{}{}",
            config.upstream.compute_url,
            project.tenant_id,
            route.rest,
            parts
                .uri
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default()
        );
        let forward = Forward {
            method: parts.method.clone(),
            url: upstream_url,
            headers: proxy::upstream_request_headers(&parts.headers),
            body,
        };
        let resp = self.forward_with_token(&project, &forward).await?;
        self.respond(resp, &project, &gateway_project_base).await
    }

    /// Everything under `/v1.0/appkeys/{appkey}/...`: always HTTP 200 with
    /// the `header` envelope, bounded by the request timeout.
    pub async fn handle_v1(self: Arc<Self>, req: Request<Body>) -> Response {
        let snap = self.snapshot();
        let limit = snap.config.server.request_timeout;
        match tokio::time::timeout(limit, self.v1(snap, req)).await {
            Ok(Ok(payload)) => translate::envelope_ok(payload),
            Ok(Err(e)) => translate::envelope_error(&log_v1_refusal(e)),
            Err(_) => {
                translate::envelope_error(&log_v1_refusal(GatewayError::Timeout(limit).into()))
            }
        }
    }

    async fn v1(
        &self,
        snap: Arc<Snapshot>,
        req: Request<Body>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, V1Error> {
        let config = &snap.config;
        let (parts, body) = req.into_parts();
        let path = parts
            .uri
            .path()
            .strip_prefix("/v1.0/appkeys/")
            .unwrap_or("");
        let request = translate::classify_v1(&parts.method, path, parts.uri.query())?;
        // The token API is refused outright: caller-supplied cloud keys are
        // never read, let alone forwarded.
        if request.route == V1Route::Token {
            return Err(V1Error::TokenApi);
        }
        let identity = authenticate(&snap.auth, &parts.headers).await?;
        let project = config
            .project_by_appkey(&request.appkey)
            .ok_or_else(|| GatewayError::UnknownProject(format!("appkey {}", request.appkey)))?
            .clone();
        let body = read_request_body(body, config.server.body_limit_bytes).await?;
        let plan = exec::plan(&request.route, &body)?;
        let facts = plan
            .v2_body()
            .map(|b| policy::RequestFacts::from_v2_body(plan.action, b))
            .unwrap_or_default();
        policy::authorize(config, &identity.team, &project.alias, plan.action, &facts)
            .map_err(GatewayError::from)?;
        tracing::debug!(team = %identity.team, action = %plan.action, project = %project.alias, "authorized");
        let caller = ProjectCaller {
            gateway: self,
            project: &project,
            compute_url: &config.upstream.compute_url,
        };
        exec::execute(&plan, &caller).await
    }

    /// Sends `forward` with the project's token; on a 401, drops that token
    /// (if still current) and retries exactly once with a fresh one.
    async fn forward_with_token(
        &self,
        project: &Project,
        forward: &Forward,
    ) -> Result<Response<hyper::body::Incoming>, GatewayError> {
        let token = self.token(project).await?;
        let resp = self.client.send(forward.request(&token)?).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        drop(resp);
        self.broker.invalidate_if_current(project, &token).await;
        let token = self.token(project).await?;
        let resp = self.client.send(forward.request(&token)?).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            self.broker.invalidate_if_current(project, &token).await;
            return Err(GatewayError::UpstreamUnauthorized(project.alias.clone()));
        }
        Ok(resp)
    }

    async fn token(&self, project: &Project) -> Result<Arc<UpstreamToken>, GatewayError> {
        self.broker
            .current_token(project)
            .await
            .map_err(|source| GatewayError::TokenUnavailable {
                project: project.alias.clone(),
                source,
            })
    }

    /// Turns the upstream answer into the caller's: hop-by-hop headers out,
    /// links pointed back at the gateway, other bodies streamed through.
    async fn respond(
        &self,
        resp: Response<hyper::body::Incoming>,
        project: &Project,
        gateway_project_base: &str,
    ) -> Result<Response, GatewayError> {
        let (mut parts, body) = resp.into_parts();
        proxy::strip_hop_by_hop(&mut parts.headers);
        if let Some(loc) = parts
            .headers
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            && let Some(new) =
                proxy::rewrite_location(loc, &project.tenant_id, gateway_project_base)
            && let Ok(v) = HeaderValue::from_str(&new)
        {
            parts.headers.insert(header::LOCATION, v);
        }
        if !is_json(&parts.headers) {
            return Ok(Response::from_parts(parts, Body::new(body)));
        }
        let bytes = read_body(body, MAX_BUFFERED_BODY, self.client.request_timeout()).await?;
        let bytes = match proxy::rewrite_links(&bytes, &project.tenant_id, gateway_project_base) {
            Some(rewritten) => Bytes::from(rewritten),
            None => bytes,
        };
        parts.headers.remove(header::CONTENT_LENGTH);
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

/// A request ready to go upstream, replayable (its body is buffered).
struct Forward {
    method: Method,
    url: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Forward {
    fn request(&self, token: &UpstreamToken) -> Result<Request<Full<Bytes>>, GatewayError> {
        let uri: Uri = self
            .url
            .parse()
            .map_err(|_| GatewayError::BadRequest("the request path is not a valid URI".into()))?;
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .body(Full::new(self.body.clone()))
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        *req.headers_mut() = self.headers.clone();
        let mut value = HeaderValue::from_str(token.id.expose()).map_err(|_| {
            GatewayError::Internal("upstream token is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        req.headers_mut().insert("x-auth-token", value);
        Ok(req)
    }
}

/// The caller's JWT: `Authorization: Bearer <jwt>`, or the bare JWT in
/// `X-Auth-Token` as unmodified OpenStack/TOAST clients send it.
pub fn caller_token(headers: &HeaderMap) -> Result<&str, AuthError> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| AuthError::Malformed)?;
        let (scheme, token) = v.split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed);
        }
        return Ok(token.trim());
    }
    if let Some(v) = headers.get("x-auth-token") {
        return v.to_str().map(str::trim).map_err(|_| AuthError::Malformed);
    }
    Err(AuthError::Missing)
}

pub async fn authenticate(
    auth: &Authenticator,
    headers: &HeaderMap,
) -> Result<Identity, GatewayError> {
    let token = caller_token(headers)?;
    Ok(auth.authenticate(token).await?)
}

async fn read_request_body(body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(GatewayError::BodyTooLarge(limit))
        }
        Err(e) => Err(GatewayError::BadRequest(format!(
            "could not read the request body: {e}"
        ))),
    }
}

/// `POST servers/{id}/action`: the body's single key names the Action.
fn server_action(body: &[u8]) -> Result<Action, GatewayError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| GatewayError::BadRequest(format!("the action body is not valid JSON: {e}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| GatewayError::BadRequest("the action body must be a JSON object".into()))?;
    let mut keys = obj.keys();
    match (keys.next(), keys.next()) {
        (Some(key), None) => Action::from_v2_server_action(key).ok_or_else(|| {
            GatewayError::BadRequest(format!(
                "toastgate does not support the server action `{key}`"
            ))
        }),
        _ => Err(GatewayError::BadRequest(
            "the action body must have exactly one key, the action name".into(),
        )),
    }
}

/// Constraint facts of a v2 request; only the Actions constraints concern
/// need their body parsed.
fn request_facts(action: Action, body: &[u8]) -> policy::RequestFacts {
    match action {
        Action::InstanceCreate | Action::InstanceResize | Action::InstanceUpdate => {
            serde_json::from_slice(body)
                .map(|v| policy::RequestFacts::from_v2_body(action, &v))
                .unwrap_or_default()
        }
        _ => policy::RequestFacts::default(),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Host header values are echoed into links: accept only host[:port].
fn is_plausible_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}

fn log_v1_refusal(e: V1Error) -> V1Error {
    match &e {
        V1Error::Gateway(g) if g.origin() != crate::error::Origin::Caller => {
            tracing::warn!(error = %e, "v1.0 request failed")
        }
        V1Error::Upstream { status, .. } if *status >= 500 => {
            tracing::warn!(error = %e, "v1.0 request failed")
        }
        _ => tracing::info!(error = %e, "v1.0 request refused"),
    }
    e
}

/// The v2 API of one project, as the v1.0 translation calls it.
struct ProjectCaller<'a> {
    gateway: &'a Gateway,
    project: &'a Project,
    compute_url: &'a str,
}

impl V2Caller for ProjectCaller<'_> {
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<V2Answer, V1Error> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let body = match body {
            Some(v) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(
                    serde_json::to_vec(&v).map_err(|e| GatewayError::Internal(e.to_string()))?,
                )
            }
            None => Bytes::new(),
        };
        let forward = Forward {
            method,
            url: format!("{}/v2/{}/{path}", self.compute_url, self.project.tenant_id),
            headers,
            body,
        };
        let resp = self
            .gateway
            .forward_with_token(self.project, &forward)
            .await?;
        let status = resp.status().as_u16();
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_body(
            resp.into_body(),
            MAX_BUFFERED_BODY,
            self.gateway.client.request_timeout(),
        )
        .await?;
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| V1Error::Upstream {
                status: 502,
                message: format!("the upstream answered {status} with a body that is not JSON"),
            })?
        };
        Ok(V2Answer {
            status,
            body,
            location,
        })
    }

    async fn flavors(&self) -> Result<Arc<HashMap<String, FlavorInfo>>, V1Error> {
        let load = async {
            let a = self.call(Method::GET, "flavors/detail", None).await?;
            if a.status != 200 {
                return Err(V1Error::Upstream {
                    status: a.status,
                    message: "could not list flavors".into(),
                });
            }
            let map: HashMap<String, FlavorInfo> = a.body["flavors"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(translate::response::flavor_info)
                .collect();
            Ok(Arc::new(map))
        };
        self.gateway
            .flavors
            .try_get_with(self.project.tenant_id.clone(), load)
            .await
            .map_err(|e: Arc<V1Error>| V1Error::Upstream {
                status: 502,
                message: format!("flavor details unavailable: {e}"),
            })
    }
}

fn log_refusal(e: GatewayError) -> GatewayError {
    match e.origin() {
        crate::error::Origin::Caller => tracing::info!(error = %e, "request refused"),
        _ => tracing::warn!(error = %e, "request failed"),
    }
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_token_from_either_header() {
        let mut h = HeaderMap::new();
        assert!(matches!(caller_token(&h), Err(AuthError::Missing)));
        h.insert("x-auth-token", HeaderValue::from_static("abc"));
        assert_eq!(caller_token(&h).unwrap(), "abc");
        h.insert("authorization", HeaderValue::from_static("Bearer xyz"));
        assert_eq!(caller_token(&h).unwrap(), "xyz", "Authorization wins");
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic dXNlcjpwYXNz"),
        );
        assert!(matches!(caller_token(&h), Err(AuthError::Malformed)));
    }

    #[test]
    fn server_action_body_selects_the_action() {
        assert_eq!(
            server_action(br#"{"os-stop": null}"#).unwrap(),
            Action::InstanceStop
        );
        assert_eq!(
            server_action(br#"{"reboot": {"type": "HARD"}}"#).unwrap(),
            Action::InstanceReboot
        );
        for bad in [
            &b"{}"[..],
            b"[]",
            b"not json",
            br#"{"os-stop":null,"os-start":null}"#,
            br#"{"lock":null}"#,
        ] {
            assert!(matches!(
                server_action(bad),
                Err(GatewayError::BadRequest(_))
            ));
        }
    }

    #[test]
    fn host_header_is_checked_before_it_goes_into_links() {
        assert!(is_plausible_host("gw.example.com:8080"));
        assert!(is_plausible_host("[::1]:8080"));
        assert!(!is_plausible_host("evil.com/\"><script>"));
        assert!(!is_plausible_host(""));
    }
}
