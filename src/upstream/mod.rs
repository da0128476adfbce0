//! The upstream side: one HTTPS client builder for everything toastgate
//! calls (the compute and identity APIs, a JWKS URL), the token broker
//! ([`token::TokenBroker`]) that holds one cloud token per project, and the
//! compute calls with the token retry rule ([`compute::Compute`]).
//!
//! TLS is rustls with certificate verification always on: the built-in web
//! PKI roots plus the system store, plus an optional extra CA file for private
//! clouds and test setups. There is deliberately no "insecure" switch.
//!
//! Every exchange is bounded: the answer's head and its whole body must
//! arrive within the deadline given, and bodies are read up to a size cap.

pub mod compute;
pub mod pool;
pub mod token;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The token header of the OpenStack and TOAST APIs: toastgate sends the
/// cloud token in it, and callers may send their JWT in it.
pub const X_AUTH_TOKEN: http::HeaderName = http::HeaderName::from_static("x-auth-token");

/// Upstream failures, classified by what the caller should be told.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream response body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("upstream response body could not be read: {0}")]
    Body(String),
    /// Not sent: every connection the gateway may open was busy.
    #[error(
        "all {max_connections} upstream connections (upstream.max_connections) stayed busy for {waited:.1?}: the call was not sent"
    )]
    Busy {
        max_connections: usize,
        waited: Duration,
    },
}

impl UpstreamError {
    /// Bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Timeout(_) => "timeout",
            UpstreamError::Unreachable(_) => "unreachable",
            UpstreamError::BodyTooLarge(_) | UpstreamError::Body(_) => "body",
            UpstreamError::Busy { .. } => "busy",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("cannot read CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// A pooled client shared by every request and by the token broker.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Client<Connector, Full<Bytes>>,
    /// For the compute API's own pool ([`pool::OriginPool`]): the same
    /// connector (roots, CA file, timeouts) and pool settings.
    connector: Connector,
    pool_max_idle_per_host: usize,
    pool_idle_timeout: Duration,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient").finish_non_exhaustive()
    }
}

/// What the one client builder needs: the extra CA, timeouts and the pool.
#[derive(Debug, Clone)]
pub struct ClientSettings<'a> {
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl<'a> ClientSettings<'a> {
    pub fn of(cfg: &'a config::Upstream) -> Self {
        ClientSettings {
            ca_file: cfg.ca_file.as_deref(),
            connect_timeout: cfg.connect_timeout,
            pool_idle_timeout: cfg.pool_idle_timeout,
            pool_max_idle_per_host: cfg.pool_max_idle_per_host,
        }
    }
}

impl UpstreamClient {
    /// The one HTTPS client builder: compute, identity and JWKS calls all
    /// trust the same roots (web PKI, the system store, `upstream.ca_file`).
    pub fn new(settings: &ClientSettings<'_>) -> Result<Self, ClientSetupError> {
        let tls = tls_config(settings.ca_file)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(settings.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.pool_max_idle_per_host)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https.clone());
        Ok(UpstreamClient {
            inner,
            connector: https,
            pool_max_idle_per_host: settings.pool_max_idle_per_host,
            pool_idle_timeout: settings.pool_idle_timeout,
        })
    }

    /// A pool of connections to `origin` alone, on this client's connector
    /// and idle settings, within `limits`.
    pub fn origin_pool(&self, origin: http::Uri, limits: pool::Limits) -> pool::OriginPool {
        pool::OriginPool::new(
            self.connector.clone(),
            origin,
            self.pool_max_idle_per_host,
            self.pool_idle_timeout,
            limits,
        )
    }

    /// Sends a request and reads the whole answer: head and body must both
    /// arrive within `deadline`, the body up to `max_body` bytes.
    pub async fn send_buffered(
        &self,
        req: Request<Full<Bytes>>,
        max_body: usize,
        deadline: Duration,
    ) -> Result<Response<Bytes>, UpstreamError> {
        within(deadline, async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unreachable(error_chain(&e)))?;
            let (parts, body) = resp.into_parts();
            let bytes = read_body(body, max_body).await?;
            Ok(Response::from_parts(parts, bytes))
        })
        .await
    }
}

/// `exchange`, or a timeout error once `deadline` has passed (the exchange
/// is dropped, closing its connection).
pub async fn within<T>(
    deadline: Duration,
    exchange: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout(deadline, exchange).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout(deadline)),
    }
}

/// [`within`], the time counted from `started`, an instant the caller has
/// already read (a clock read saved per call on the request path).
pub async fn within_from<T>(
    started: Instant,
    limit: Duration,
    exchange: impl std::future::Future<Output = Result<T, UpstreamError>>,
) -> Result<T, UpstreamError> {
    match tokio::time::timeout_at(deadline(started, limit), exchange).await {
        Ok(result) => result,
        Err(_) => Err(UpstreamError::Timeout(limit)),
    }
}

/// `limit` after `from`, as a timer deadline. Durations in the config have
/// no upper bound, and one near `Duration::MAX` would overflow the clock:
/// limits are capped at 30 years, which no request outlives.
pub fn deadline(from: Instant, limit: Duration) -> tokio::time::Instant {
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    tokio::time::Instant::from_std(from + limit.min(FAR))
}

/// Reads an upstream body completely, within a size cap (the caller bounds
/// the time).
async fn read_body(body: Incoming, max: usize) -> Result<Bytes, UpstreamError> {
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(UpstreamError::BodyTooLarge(max))
            } else {
                Err(UpstreamError::Body(e.to_string()))
            }
        }
    }
}

fn tls_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, ClientSetupError> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots_anchors());
    // The system store too, as the module doc promises: private PKIs that
    // the host trusts work without a `ca_file`. Unreadable system
    // certificates are skipped (the web PKI roots are always there).
    let system = rustls_native_certs::load_native_certs();
    let (added, _ignored) = roots.add_parsable_certificates(system.certs);
    tracing::debug!(added, "system root certificates loaded");
    if let Some(path) = ca_file {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| ClientSetupError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| ClientSetupError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(ClientSetupError::CaFile {
                path: path.display().to_string(),
                reason: "no PEM certificates found".to_string(),
            });
        }
        for cert in certs {
            roots.add(cert).map_err(|e| ClientSetupError::CaFile {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn webpki_roots_anchors() -> impl Iterator<Item = rustls::pki_types::TrustAnchor<'static>> {
    webpki_roots::TLS_SERVER_ROOTS.iter().cloned()
}

/// An error and every error under it, `outer: inner: innermost`: the useful
/// part of a client error ("connection refused", "invalid certificate")
/// is usually in the chain, not at the top.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// JSON request body helper for identity calls.
pub fn json_request(
    method: http::Method,
    url: &str,
    body: &serde_json::Value,
) -> Result<Request<Full<Bytes>>, UpstreamError> {
    let bytes = serde_json::to_vec(body).map_err(|e| UpstreamError::Body(e.to_string()))?;
    Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("toastgate/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| UpstreamError::Unreachable(format!("invalid upstream URL: {e}")))
}

/// The exporter's HTTP client: the gateway's own (its roots, its CA file),
/// driven on the gateway's runtime (the batch processor calls it from its
/// own thread).
#[derive(Clone)]
pub struct OtlpHttp {
    pub client: UpstreamClient,
    pub runtime: tokio::runtime::Handle,
}

impl std::fmt::Debug for OtlpHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpHttp")
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let client = self.client.clone();
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, http_body_util::Full::new(body));
        let call = self.runtime.spawn(async move {
            client
                .send_buffered(request, 4 * 1024 * 1024, Duration::from_secs(10))
                .await
        });
        match call.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(Box::new(e)),
            Err(e) => Err(Box::new(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_is_the_limit_after_the_instant_given() {
        let from = Instant::now();
        let at = deadline(from, Duration::from_millis(1500));
        assert_eq!(at.into_std(), from + Duration::from_millis(1500));
    }

    #[test]
    fn a_limit_past_the_clock_is_a_far_deadline_not_a_panic() {
        let from = Instant::now();
        let at = deadline(from, Duration::MAX).into_std();
        assert!(
            at >= from + Duration::from_secs(86_400 * 365 * 29),
            "{at:?}"
        );
    }

    #[tokio::test]
    async fn within_from_counts_from_the_instant_given() {
        // Started an hour ago with an hour's limit: out of time at once (a
        // timer counted from now would not end within the test's 5 s).
        let hour = Duration::from_secs(3600);
        let Some(started) = Instant::now().checked_sub(hour) else {
            panic!("this clock cannot go an hour back");
        };
        let never = std::future::pending::<Result<(), UpstreamError>>();
        let result =
            tokio::time::timeout(Duration::from_secs(5), within_from(started, hour, never))
                .await
                .expect("timed out at once, not an hour from now");
        assert!(
            matches!(result, Err(UpstreamError::Timeout(limit)) if limit == hour),
            "{result:?}"
        );
    }
}
