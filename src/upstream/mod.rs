//! The upstream side: one pooled HTTP(S) client for the compute and identity
//! APIs, and the token broker ([`token::TokenBroker`]) that holds one cloud
//! token per project.
//!
//! TLS is rustls with certificate verification always on: the built-in web
//! PKI roots plus the system store, plus an optional extra CA file for private
//! clouds and test setups. There is deliberately no "insecure" switch.

pub mod token;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config;

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Upstream failures, classified by what the caller should be told.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream unreachable: {0}")]
    Unreachable(String),
    #[error("upstream response body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("upstream response body could not be read: {0}")]
    Body(String),
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
    request_timeout: Duration,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// Largest upstream body toastgate buffers (JSON answers it rewrites or translates).
pub const MAX_BUFFERED_BODY: usize = 32 * 1024 * 1024;

impl UpstreamClient {
    pub fn new(cfg: &config::Upstream) -> Result<Self, ClientSetupError> {
        let tls = tls_config(cfg.ca_file.as_deref())?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.pool_idle_timeout)
            .pool_max_idle_per_host(cfg.pool_max_idle_per_host)
            .build(https);
        Ok(UpstreamClient {
            inner,
            request_timeout: cfg.request_timeout,
        })
    }

    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// Sends a request and waits for the response head (the body streams).
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout(self.request_timeout, self.inner.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout(self.request_timeout)),
            Ok(Err(e)) => Err(UpstreamError::Unreachable(error_chain(&e))),
            Ok(Ok(resp)) => Ok(resp),
        }
    }

    /// Sends a request and reads the whole body (bounded in size and time).
    pub async fn send_buffered(
        &self,
        req: Request<Full<Bytes>>,
        max_body: usize,
    ) -> Result<Response<Bytes>, UpstreamError> {
        let started = tokio::time::Instant::now();
        let resp = self.send(req).await?;
        let remaining = self.request_timeout.saturating_sub(started.elapsed());
        let (parts, body) = resp.into_parts();
        let bytes = read_body(body, max_body, remaining).await?;
        Ok(Response::from_parts(parts, bytes))
    }
}

/// Reads an upstream body completely, within a size cap and a deadline.
pub async fn read_body(
    body: Incoming,
    max: usize,
    deadline: Duration,
) -> Result<Bytes, UpstreamError> {
    match tokio::time::timeout(deadline, Limited::new(body, max).collect()).await {
        Err(_) => Err(UpstreamError::Timeout(deadline)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) => {
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
