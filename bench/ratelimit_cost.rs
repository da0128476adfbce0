//! The cost of one rate-limit decision (`RateLimiter::check`), local and
//! through Redis, next to same-run baselines.
//!
//! `cargo run --release --example ratelimit_cost [-- ITERATIONS]`
//!
//! Starts its own `redis-server` on a free 127.0.0.1 port (killed at exit);
//! without one on PATH it measures the local backend only and says so.
//! Every sample is one call timed with `Instant`, so the timer's own cost is
//! in every row, baselines included; ratios are of means.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use toastgate::action::Action;
use toastgate::config::{Config, SecretSource};
use toastgate::ratelimit::RateLimiter;

const CONFIG: &str = r#"
listen: { public: "127.0.0.1:0", admin: "127.0.0.1:0" }
upstream:
  identity_url: https://api-identity.cloud.toast.com
  compute_url: https://kr1-api-instance.infrastructure.cloud.toast.com
auth:
  issuer: bench
  audience: toastgate
  algorithms: [HS256]
  keys: { type: hs_secret, secret_env: JWT_SECRET }
projects:
  web:
    tenant_id: 6cdebe3eb0094910bc41f1d42ebe4cb7
    credentials: { type: keystone, username: a@example.com, password_env: WEB_PW }
teams:
  web-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
    rate_limits:
      - { name: reads, actions: [read], rate: 1000000/s, burst: 1000000 }
      - { name: writes, actions: [write], rate: 10/s }
  free-team:
    projects: [web]
    allow: [{ actions: ["*"] }]
"#;

const GLOBAL: &str = "  global: { rate: 1000000/s, burst: 1000000 }\n";

fn limiter(rate_limit: &str, redis_url: &str) -> std::sync::Arc<RateLimiter> {
    let yaml = format!("{CONFIG}rate_limit:\n{rate_limit}");
    let secrets = SecretSource::default()
        .with_override("JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .with_override("WEB_PW", "pw")
        .with_override("REDIS_URL", redis_url);
    let config = Config::from_yaml(&yaml, &secrets, None).expect("bench config is valid");
    RateLimiter::new(&config).expect("limiter builds")
}

struct Row {
    name: &'static str,
    mean: Duration,
    p50: Duration,
    p99: Duration,
}

fn summarize(name: &'static str, mut samples: Vec<Duration>) -> Row {
    samples.sort_unstable();
    let n = samples.len().max(1);
    let total: Duration = samples.iter().sum();
    let at = |q: f64| {
        samples
            .get(((n as f64 * q) as usize).min(n - 1))
            .copied()
            .unwrap_or_default()
    };
    Row {
        name,
        mean: total / n as u32,
        p50: at(0.50),
        p99: at(0.99),
    }
}

/// Times `n` calls of `f` one by one, after `n / 10` warm-up calls.
async fn measure<F, Fut>(name: &'static str, n: usize, mut f: F) -> Row
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..n / 10 {
        black_box(f().await);
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let out = f().await;
        samples.push(start.elapsed());
        black_box(out);
    }
    summarize(name, samples)
}

#[inline(never)]
async fn empty_async(x: u64) -> bool {
    black_box(x) == 7
}

struct RedisServer(Child);

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Option<(RedisServer, String)> {
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let server = RedisServer(child);
    let url = format!("redis://127.0.0.1:{port}/0");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((server, url))
}

fn us(d: Duration) -> String {
    format!("{:>9.3}", d.as_secs_f64() * 1e6)
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let n_redis = (n / 10).max(1_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut rows = Vec::new();
        let mut i = 0u64;
        rows.push(
            measure("baseline: empty async call", n, || {
                i = i.wrapping_add(1);
                empty_async(i)
            })
            .await,
        );
        let map: HashMap<String, u32> = (0..64).map(|t| (format!("team-{t}"), t)).collect();
        rows.push(
            measure("baseline: HashMap<String, _> lookup", n, || {
                let hit = black_box(map.get(black_box("team-42"))).copied() == Some(42);
                async move { hit }
            })
            .await,
        );

        let local = limiter("  backend: local\n", "");
        let l = &local;
        rows.push(
            measure("local: no rule applies (fast path)", n, || async move {
                l.check("free-team", Action::InstanceList).await.allowed()
            })
            .await,
        );
        rows.push(
            measure("local: 1 team rule", n, || async move {
                l.check("web-team", Action::InstanceList).await.allowed()
            })
            .await,
        );
        let local_global = limiter(&format!("  backend: local\n{GLOBAL}"), "");
        let lg = &local_global;
        rows.push(
            measure("local: 1 team rule + global", n, || async move {
                lg.check("web-team", Action::InstanceList).await.allowed()
            })
            .await,
        );

        let redis = start_redis();
        match &redis {
            None => println!("redis-server not found on PATH: Redis rows skipped\n"),
            Some((_server, url)) => {
                let client = redis::Client::open(url.as_str()).expect("redis url");
                let mut con = redis::aio::ConnectionManager::new(client)
                    .await
                    .expect("redis connection");
                rows.push(
                    measure("baseline: Redis PING round trip", n_redis, || {
                        let mut con = con.clone();
                        async move {
                            redis::cmd("PING")
                                .query_async::<String>(&mut con)
                                .await
                                .is_ok()
                        }
                    })
                    .await,
                );
                let _ = redis::cmd("FLUSHALL").query_async::<()>(&mut con).await;
                let backend = "  backend: redis\n  redis: { url_env: REDIS_URL, timeout: 500ms }\n";
                let shared = limiter(&format!("{backend}{GLOBAL}"), url);
                let sh = &shared;
                rows.push(
                    measure("redis: 1 team rule + global (1 script)", n_redis, || async move {
                        sh.check("web-team", Action::InstanceList).await.allowed()
                    })
                    .await,
                );
                let stats = shared.stats();
                assert_eq!(
                    (stats.degraded, stats.redis_errors),
                    (0, 0),
                    "every Redis decision went through Redis"
                );
            }
        }

        let base = rows[0].mean.as_secs_f64();
        let lookup = rows[1].mean.as_secs_f64();
        println!(
            "{:<42} {:>9} {:>9} {:>9} {:>10} {:>10}",
            "case (n samples each)", "mean us", "p50 us", "p99 us", "x empty", "x lookup"
        );
        for r in &rows {
            let m = r.mean.as_secs_f64();
            println!(
                "{:<42} {} {} {} {:>10.1} {:>10.1}",
                r.name,
                us(r.mean),
                us(r.p50),
                us(r.p99),
                m / base,
                m / lookup
            );
        }
        println!(
            "\nlocal rows: {n} samples; Redis rows: {n_redis} samples (sequential, one connection)"
        );
    });
}
