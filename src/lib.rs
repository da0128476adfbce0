//! toastgate: an authenticating API gateway for the NHN Cloud (TOAST) Compute API.
//!
//! # The request path
//! A listener ([`listener`]: connection cap, timeouts, TLS, drain) hands each
//! request to the outer shell ([`server`]: request id, sensitive headers,
//! trace span, panic catch, routing), then to one pipeline of phases written
//! once for both surfaces ([`gateway`]) over one per-request context
//! ([`exchange::Exchange`]): classify ([`router`]), authenticate ([`auth`]),
//! read the body ([`body`]), judge it ([`router`] / [`translate::exec`]),
//! admit ([`policy`], [`ratelimit`], [`audit`]), execute
//! ([`upstream::compute`] + [`proxy`], or [`translate`]), finish (audit,
//! [`metrics`], one log line). The surface supplies only classification,
//! judging and rendering ([`surface`]); failures have one classification and
//! one rendering per surface ([`error`]). Phases rather than tower layers:
//! the Action they all speak can depend on the body.
//!
//! # Layout
//! - [`action`]: the Action catalog and its groups.
//! - [`config`]: the file schema, the validated model, validation with key paths.
//! - [`server`]: listeners, the outer shell, reload, drain; [`server::run`] is
//!   what `main`, `demo` and every integration test start.
//! - [`listener`]: the one accept loop, connection limits and timeouts.
//! - [`gateway`]: the pipeline, phase by phase.
//! - [`surface`]: what differs between v2 and v1.0.
//! - [`exchange`]: the per-request context: feeds audit, metrics, the log line.
//! - [`router`]: method + path + query -> project, route, Action (both surfaces).
//! - [`body`]: reading request bodies; strict JSON.
//! - [`auth`]: the caller's one credential and its JWT verification.
//! - [`policy`]: team/project authorization and constraints.
//! - [`ratelimit`]: per-team GCRA rate limits, in process or shared through Redis.
//! - [`upstream`]: the one HTTPS client builder, compute calls with the token
//!   retry rule, and the token broker.
//! - [`proxy`]: header filtering, the upstream's answer for the caller, links.
//! - [`translate`]: the v1.0 surface onto the v2 upstream.
//! - [`audit`]: the hash-chained audit log of instance actions and `toastgate audit`.
//! - [`metrics`]: the Prometheus registry, bounded labels.
//! - [`error`]: one error type, one classification, one rendering per surface.
//! - [`tls`]: TLS certificates and their reload.
//! - `simulator`: a stateful fake of the TOAST identity and compute APIs, and
//!   `demo`: the simulator and the gateway in one process. Both behind the
//!   default-on `simulator` feature: a production build
//!   (`--no-default-features`, as the Dockerfile builds) carries neither.
#![forbid(unsafe_code)]

pub mod action;
pub mod audit;
pub mod auth;
pub mod body;
pub mod config;
#[cfg(feature = "simulator")]
pub mod demo;
pub mod error;
pub mod exchange;
pub mod gateway;
pub mod idempotency;
pub mod listener;
pub mod logs;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod replay;
pub mod router;
pub mod secret;
pub mod server;
pub mod shutdown;
#[cfg(feature = "simulator")]
pub mod simulator;
pub mod surface;
pub mod tls;
pub mod traces;
pub mod translate;
pub mod upstream;
