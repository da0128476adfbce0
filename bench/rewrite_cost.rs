//! The cost of pointing a body's links back at the gateway
//! (`proxy::rewrite_links`), next to same-run baselines.
//!
//! `cargo run --release --example rewrite_cost [-- ITERATIONS]`
//!
//! The body is bench/run.sh's upstream answer: the spec's servers document
//! as compact JSON (as an API server sends it), 16 links. The baselines are
//! what any rewrite must at least do: copy the body into a new buffer, and
//! read it once (a one-byte search for a byte it does not hold). Each row is
//! the mean of ITERATIONS calls timed together (a call is well under a
//! microsecond, too short to time one by one); the best of 5 rounds, since
//! on a shared machine noise only ever adds time.

use std::hint::black_box;
use std::time::{Duration, Instant};

use toastgate::proxy::rewrite_links;

const TENANT: &str = "6cdebe3eb0094910bc41f1d42ebe4cb7";
const GATEWAY_BASE: &str = "http://127.0.0.1:47004/v2/bench";

fn compact_body() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/servers-detail.json");
    let text = std::fs::read(path).expect("bench/servers-detail.json is readable");
    let value: serde_json::Value = serde_json::from_slice(&text).expect("it is JSON");
    serde_json::to_vec(&value).expect("it serializes")
}

/// Mean time of one call of `f`, best of 5 rounds of `n` calls.
fn mean_of_best_round(n: u32, mut f: impl FnMut() -> usize) -> Duration {
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(f());
            }
            start.elapsed() / n
        })
        .min()
        .expect("5 rounds")
}

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let body = compact_body();
    let links = body.windows(7).filter(|w| w == b"\"href\":").count();
    let rewritten = rewrite_links(&body, TENANT, GATEWAY_BASE).expect("the links name the tenant");
    assert_eq!(
        rewritten
            .windows(GATEWAY_BASE.len())
            .filter(|w| *w == GATEWAY_BASE.as_bytes())
            .count(),
        links,
        "every link rewritten"
    );

    let copy = mean_of_best_round(n, || black_box(black_box(&body).to_vec()).len());
    let scan = mean_of_best_round(n, || memchr::memchr(b'\x01', black_box(&body)).unwrap_or(0));
    let rewrite = mean_of_best_round(n, || {
        // All three through black_box: the gateway's tenant and base come
        // from the request and the config, never constants LTO could fold.
        rewrite_links(black_box(&body), black_box(TENANT), black_box(GATEWAY_BASE))
            .map_or(0, |out| out.len())
    });

    let ns = |d: Duration| d.as_secs_f64() * 1e9;
    println!(
        "rewrite_links on {} bytes of JSON, {links} links; mean of {n} calls, best of 5 rounds\n",
        body.len()
    );
    println!("| what | ns per call | / copy |");
    println!("|---|---:|---:|");
    for (name, d) in [
        ("baseline: copy the body into a new Vec", copy),
        ("baseline: read the body once (memchr, no match)", scan),
        ("rewrite_links", rewrite),
    ] {
        println!("| {name} | {:.0} | {:.2} |", ns(d), ns(d) / ns(copy));
    }
}
