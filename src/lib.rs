//! toastgate: an authenticating API gateway for the NHN Cloud (TOAST) Compute API.
//!
//! # Layout
//! - [`config`]: the typed YAML config, validated at load with key paths.
//! - [`server`]: listeners and the layer stack; [`server::run`] is what
//!   `main`, `demo` and every integration test start.
//! - [`gateway`]: the request path, phase by phase (classify, authenticate,
//!   authorize, forward).
//! - [`router`]: method + path -> surface, project, [`action::Action`].
//! - [`auth`]: caller JWT verification.
//! - [`policy`]: the Action catalog and team/project authorization.
//! - [`ratelimit`]: per-team GCRA rate limits, in process or shared through Redis.
//! - [`upstream`]: the pooled HTTPS client and the token broker.
//! - [`proxy`]: header filtering, link rewriting, version documents.
//! - [`metrics`]: the Prometheus registry, bounded labels.
//! - [`exchange`]: one request as learned: feeds audit, metrics and the log line.
//! - [`error`]: one error type, one mapping to each surface.
//! - [`translate`]: the v1.0 surface onto the v2 upstream.
//! - [`tls`]: TLS on the public listener, certificate reload.
//! - `simulator`: a stateful fake of the TOAST identity and compute APIs, and
//!   `demo`: the simulator and the gateway in one process. Both behind the
//!   default-on `simulator` feature: a production build
//!   (`--no-default-features`, as the Dockerfile builds) carries neither.
//! - [`audit`]: the hash-chained audit log of instance actions and `toastgate audit`.
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
pub mod listener;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod router;
pub mod secret;
pub mod server;
pub mod shutdown;
#[cfg(feature = "simulator")]
pub mod simulator;
pub mod surface;
pub mod tls;
pub mod translate;
pub mod upstream;
