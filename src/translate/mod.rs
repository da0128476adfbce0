//! The v1.0 surface, translated onto the v2 upstream.
//!
//! - [`request`]: v1.0 bodies validated and turned into v2 bodies, before
//!   anything is sent (a request that would be refused is never half-executed);
//! - [`exec`]: the plan of v2 call(s) behind each v1.0 endpoint, and running it;
//! - [`response`]: v2 answers turned into the v1.0 shapes, the status table;
//! - [`api`]: the project's v2 API as the plans call it (the cloud token,
//!   the flavor cache).
//!
//! Routes are classified in [`crate::router`], next to the v2 routes;
//! failures render through [`crate::error::GatewayError::v1_response`]. The
//! v1.0 surface always answers HTTP 200 with the `header` envelope.

pub mod api;
pub mod exec;
pub mod request;
pub mod response;

use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

/// `{"header": {...}}` plus the payload fields, always HTTP 200.
pub fn envelope_ok(payload: Map<String, Value>) -> Response {
    let mut body = Map::new();
    body.insert(
        "header".into(),
        json!({"isSuccessful": true, "resultCode": 0, "resultMessage": "SUCCESS"}),
    );
    body.extend(payload);
    axum::Json(Value::Object(body)).into_response()
}
