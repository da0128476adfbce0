//! Distributed traces: W3C Trace Context in and out, spans over OTLP.
//!
//! - A caller's `traceparent` / `tracestate` are parsed (W3C Trace Context;
//!   an ill-formed one is ignored, as the spec asks, never forwarded) and
//!   continued: every upstream call (compute and identity) carries a
//!   `traceparent` re-serialized from the parsed context, with the span of
//!   that call as the parent when toastgate exports spans, else the
//!   caller's own (toastgate then passes the trace through unchanged).
//! - With `traces.otlp_endpoint` set, spans are exported over OTLP/HTTP
//!   (JSON) in batches from a background thread: one server span per request
//!   (`toastgate.request`) and one client span per compute call and per
//!   identity call, with the team, project, Action and outcome as
//!   attributes. Never secrets: no header, token, body or query.
//!
//! The tracer travels in the request's OpenTelemetry [`Context`], so the
//! compute client and the token broker start their spans from
//! `Context::current()` without a global provider (several gateways in one
//! process, as the tests run them, each export their own).

use std::borrow::Cow;
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Tracer};

use crate::config::TraceExport as ExportSettings;

/// The exporting side, when configured: the provider (flushed at shutdown)
/// and its tracer.
#[derive(Clone)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    tracer: Option<Tracer>,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces")
            .field("exporting", &self.tracer.is_some())
            .finish()
    }
}

static TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
static TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The tracer a request's context carries (absent: nothing exported).
#[derive(Clone)]
struct RequestTracer(Tracer);

impl Traces {
    /// No export: trace context is still continued and passed upstream.
    pub fn off() -> Traces {
        Traces {
            provider: None,
            tracer: None,
        }
    }

    /// Exports over OTLP/HTTP JSON through `http` (the gateway's own
    /// client, see `upstream::OtlpHttp`); `instance` names this process.
    pub fn export(
        settings: &ExportSettings,
        http: impl HttpClient + 'static,
        instance: &str,
    ) -> Result<Traces, String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(Duration::from_secs(10))
            .with_http_client(http)
            .build()
            .map_err(|e| format!("the OTLP exporter: {e}"))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(settings.batch_delay)
                    .build(),
            )
            .build();
        let sampler = opentelemetry_sdk::trace::Sampler::ParentBased(Box::new(
            opentelemetry_sdk::trace::Sampler::TraceIdRatioBased(settings.sample_ratio),
        ));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .with_attribute(KeyValue::new("service.instance.id", instance.to_string()))
                    .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
                    .build(),
            )
            .build();
        let tracer = provider.tracer("toastgate");
        Ok(Traces {
            provider: Some(provider),
            tracer: Some(tracer),
        })
    }

    /// The request's context: the caller's trace continued (a valid
    /// `traceparent`), with the request's server span when exporting.
    /// `None` when there is neither: an empty context need not be attached
    /// (on every poll of the request) to be the current one.
    pub fn request_context(
        &self,
        headers: &HeaderMap,
        method: &str,
        path: &str,
    ) -> Option<Context> {
        let traced = headers.contains_key(&TRACEPARENT);
        let parent = if traced {
            TraceContextPropagator::new().extract(&HeaderExtractor(headers))
        } else {
            Context::new()
        };
        let Some(tracer) = &self.tracer else {
            return traced.then_some(parent);
        };
        let span = tracer
            .span_builder("toastgate.request")
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", path.to_string()),
            ])
            .start_with_context(tracer, &parent);
        Some(
            parent
                .with_span(span)
                .with_value(RequestTracer(tracer.clone())),
        )
    }

    /// Sends what is left and stops the exporter (graceful shutdown).
    pub fn shutdown(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "traces: the last spans could not be exported");
        }
    }
}

/// Records the request's outcome on its span; without one (export off),
/// nothing is built at all.
pub fn finish_request(attributes: impl FnOnce() -> Vec<KeyValue>, status_code: u16, failed: bool) {
    let cx = Context::current();
    if !cx.has_active_span() {
        return;
    }
    let attributes = attributes();
    let span = cx.span();
    span.set_attributes(attributes);
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status_code),
    ));
    if failed {
        span.set_status(Status::error("the gateway or the upstream failed"));
    }
}

/// A client span for one upstream call, child of the request's span, ended
/// by `end` (or, without an outcome, when dropped: a call cut off by a
/// timeout). Without export, a no-op that only carries the context.
pub struct CallSpan {
    cx: Context,
    /// A span of this call's own was started (export is on): only then is
    /// there anything to record or end.
    own: bool,
}

impl CallSpan {
    /// A client span named and attributed by `describe` (e.g. `compute
    /// instance.create`), which runs only when the request is traced: with
    /// export off a call pays for no name or attribute it would not send.
    pub fn start(describe: impl FnOnce() -> (Cow<'static, str>, Vec<KeyValue>)) -> CallSpan {
        let parent = Context::current();
        let (cx, own) = match parent.get::<RequestTracer>() {
            Some(RequestTracer(tracer)) => {
                let (name, attributes) = describe();
                let span = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Client)
                    .with_attributes(attributes)
                    .start_with_context(tracer, &parent);
                (parent.with_span(span), true)
            }
            None => (parent, false),
        };
        CallSpan { cx, own }
    }

    /// Adds `traceparent` (and `tracestate`) for this call to `headers`,
    /// re-serialized from the parsed context (nothing when there is no
    /// valid trace).
    pub fn inject(&self, headers: &mut HeaderMap) {
        // Never the caller's own: a compute call forwards an allow list that
        // leaves them out (`proxy::upstream_request_headers`), an identity
        // call builds its headers itself.
        debug_assert!(!headers.contains_key(&TRACEPARENT) && !headers.contains_key(&TRACESTATE));
        if self.cx.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&self.cx, &mut HeaderInjector(headers));
        }
    }

    /// What came of the call: an HTTP status, or a failure.
    pub fn end(self, outcome: Result<u16, &str>) {
        // Not the caller's span (a continued trace, export off): it is not
        // ours to end, and a no-op span would still read the clock.
        if !self.own {
            return;
        }
        let span = self.cx.span();
        match outcome {
            Ok(status) => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    span.set_status(Status::error(format!("upstream answered {status}")));
                }
            }
            Err(kind) => {
                span.set_attribute(KeyValue::new("error.type", kind.to_string()));
                span.set_status(Status::error(kind.to_string()));
            }
        }
        span.end();
    }
}
