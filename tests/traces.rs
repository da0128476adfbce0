//! Traces: a caller's W3C `traceparent` is continued to the upstream, and
//! with `traces.otlp_endpoint` set the spans go over OTLP/HTTP (JSON) to a
//! receiver started here, which decodes what was sent: the request's
//! server span, each compute call and the identity call, as its children,
//! with team, project, Action and outcome, and no secret.

mod common;

use std::sync::{Arc, Mutex};

use common::{Env, fast_sim};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traceparent() -> String {
    format!("00-{TRACE_ID}-{CALLER_SPAN}-01")
}

/// An OTLP/HTTP receiver: every POST body, decoded as JSON.
async fn receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
    let got: Arc<Mutex<Vec<Value>>> = Arc::default();
    let store = got.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let store = store.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let store = store.clone();
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        let body = BodyExt::collect(req.into_body()).await.unwrap().to_bytes();
                        let value: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                        store.lock().unwrap().push(value);
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"{}"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (url, got)
}

/// Every span the receiver got.
fn spans(exports: &[Value]) -> Vec<Value> {
    exports
        .iter()
        .flat_map(|e| e["resourceSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|rs| rs["scopeSpans"].as_array().cloned().unwrap_or_default())
        .flat_map(|ss| ss["spans"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn attribute(span: &Value, key: &str) -> Value {
    span["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|kv| kv["key"] == key))
        .map(|kv| {
            let v = &kv["value"];
            v.get("stringValue")
                .cloned()
                .or_else(|| v.get("intValue").cloned())
                .unwrap_or(Value::Null)
        })
        .unwrap_or(Value::Null)
}

/// The `traceparent` the simulator received on requests to `path_end`.
fn traceparents_seen(env: &Env, path_end: &str) -> Vec<String> {
    env.sim
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with(path_end))
        .filter_map(|r| r.header("traceparent").map(str::to_string))
        .collect()
}

async fn create_with_trace(env: &Env, name: &str, traceparent: &str) -> u16 {
    env.http
        .post(env.url("/v2/web/os-keypairs"))
        .bearer_auth(env.token("web-team"))
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=x")
        .json(&json!({"keypair": {"name": name}}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_of_a_request_its_compute_calls_and_identity_reach_the_collector() {
    let (url, exports) = receiver().await;
    let env = Env::start_with_overlays(
        fast_sim(),
        &[],
        json!({"traces": {"otlp_endpoint": url, "batch_delay": "100ms", "service_name": "tg-test"}}),
    )
    .await;
    assert_eq!(env.get("web-team", "/v2/web/flavors").await.0, 200);
    // The cloud token is revoked: the call gets 401, the request fetches a
    // new token (the identity call, in this request's trace) and retries.
    env.sim.revoke_all_tokens();
    env.sim.clear_requests();
    let jwt = env.token("web-team");
    assert_eq!(create_with_trace(&env, "traced", &traceparent()).await, 200);
    let compute = traceparents_seen(&env, "/os-keypairs");
    let identity = traceparents_seen(&env, "/tokens");
    env.stop().await; // flushes the last batch

    let spans = spans(&exports.lock().unwrap());
    let request = spans
        .iter()
        .find(|s| s["name"] == "toastgate.request" && s["traceId"] == TRACE_ID)
        .unwrap_or_else(|| panic!("no request span in the caller's trace: {spans:#?}"));
    assert_eq!(
        request["parentSpanId"], CALLER_SPAN,
        "continues the caller's span"
    );
    assert_eq!(request["kind"], 2, "server");
    for (key, want) in [
        ("toastgate.team", json!("web-team")),
        ("toastgate.project", json!("web")),
        ("toastgate.action", json!("keypair.create")),
        ("toastgate.outcome", json!("ok")),
        ("toastgate.surface", json!("v2")),
        ("http.response.status_code", json!("200")),
    ] {
        let got = attribute(request, key);
        assert!(
            got == want || got == json!(200),
            "{key}: {got} in {request:#}"
        );
    }
    let children: Vec<&Value> = spans
        .iter()
        .filter(|s| s["parentSpanId"] == request["spanId"])
        .collect();
    let compute_spans: Vec<&&Value> = children
        .iter()
        .filter(|s| s["name"] == "compute keypair.create")
        .collect();
    assert_eq!(
        compute_spans.len(),
        2,
        "the 401 and the retry: {children:#?}"
    );
    assert!(
        children.iter().any(|s| s["name"] == "identity token"),
        "{children:#?}"
    );
    for s in &children {
        assert_eq!(s["kind"], 3, "client");
        assert_eq!(s["traceId"], TRACE_ID);
    }

    // What went upstream names those spans as parents, in the same trace.
    assert_eq!(compute.len(), 2, "{compute:?}");
    for (tp, span) in compute.iter().zip(&compute_spans) {
        assert_eq!(
            tp,
            &format!("00-{TRACE_ID}-{}-01", span["spanId"].as_str().unwrap())
        );
    }
    assert_eq!(identity.len(), 1);
    assert!(identity[0].starts_with(&format!("00-{TRACE_ID}-")));

    // No secret: not the caller's JWT, not the cloud password.
    let everything = exports
        .lock()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect::<String>();
    assert!(!everything.contains(&jwt));
    assert!(!everything.contains(common::WEB_API_PASSWORD));
    assert!(everything.contains("tg-test"), "service.name");
}

#[tokio::test]
async fn without_export_a_valid_traceparent_passes_through_and_a_bad_one_does_not() {
    let env = Env::start().await;
    assert_eq!(create_with_trace(&env, "passed", &traceparent()).await, 200);
    assert_eq!(traceparents_seen(&env, "/os-keypairs"), [traceparent()]);
    // The compute call carries the caller's tracestate. So may the identity
    // call, when this request was the one that fetched the project's token
    // (a race with the token broker's start-up fetch): nothing else does.
    let requests = env.sim.requests();
    let with_state = |path_end: &str| -> Vec<String> {
        requests
            .iter()
            .filter(|r| r.path.ends_with(path_end))
            .filter_map(|r| r.header("tracestate").map(str::to_string))
            .collect()
    };
    assert_eq!(with_state("/os-keypairs"), ["vendor=x"]);
    let elsewhere: Vec<&str> = requests
        .iter()
        .filter(|r| r.header("tracestate").is_some() && !r.path.ends_with("/os-keypairs"))
        .map(|r| r.path.as_str())
        .collect();
    assert!(
        elsewhere.iter().all(|p| p.ends_with("/tokens")),
        "tracestate went to {elsewhere:?}"
    );
    // The v1.0 surface continues it the same way.
    env.sim.clear_requests();
    let answer = env
        .http
        .post(env.url("/v1.0/appkeys/WebAppKey0001/keypairs"))
        .header("X-Auth-Token", env.token("web-team"))
        .header("traceparent", traceparent())
        .json(&json!({"keypair": {"name": "passed-v1"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(traceparents_seen(&env, "/os-keypairs"), [traceparent()]);

    env.sim.clear_requests();
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra\u{0}",
    ] {
        let name = format!("bad-{}", bad.len());
        let status = env
            .http
            .post(env.url("/v2/web/os-keypairs"))
            .bearer_auth(env.token("web-team"))
            .header("traceparent", bad.replace('\u{0}', ""))
            .json(&json!({"keypair": {"name": name}}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(
            status, 200,
            "an invalid traceparent is ignored, not refused"
        );
    }
    let seen = traceparents_seen(&env, "/os-keypairs");
    assert!(
        seen.is_empty(),
        "ill-formed trace context never forwarded: {seen:?}"
    );
    env.stop().await;
}
