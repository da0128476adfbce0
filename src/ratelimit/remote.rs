//! Limits shared across replicas: one atomic GCRA Lua script per decision on
//! Redis, on the server's clock, behind a per-decision timeout and a small
//! circuit breaker so that a dead Redis costs a request at most one timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::RateLimitSetupError;
use super::local::{Gcra, MIN_RETRY};
use crate::config::RedisTls;
use crate::secret::Secret;

/// After a failure, requests skip Redis for this long (deciding by the
/// failure mode at once); then one background probe checks it again.
pub(super) const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// A background probe (never on a request's path) may wait this long.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// GCRA over every applied rule of one decision, atomically, on the server's clock.
///
/// KEYS[i]: one rule's state, its theoretical arrival time (TAT) in server
/// microseconds. ARGV[3i-2], ARGV[3i-1]: that rule's emission interval T and
/// tolerance tau = T * (burst - 1), in microseconds; ARGV[3i]: the request's
/// cost n in that rule (1 unless weighted). n units fit when the TAT after
/// taking them, tat + n*T, is within tau + T of now.
/// Returns 4 integers per rule evaluated, in order, stopping after the first
/// refusal: allowed (1/0), remaining, retry_after_us, reset_us.
const GCRA_LUA: &str = r#"
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[3 * i - 2])
  local tau = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  local wait = new_tat - tau - interval - now
  if wait > 0 then
    out[#out + 1] = 0
    out[#out + 1] = 0
    out[#out + 1] = wait
    out[#out + 1] = tat - now
    return out
  end
  local reset = new_tat - now
  redis.call('SET', KEYS[i], string.format('%d', new_tat),
    'PX', string.format('%d', math.ceil(reset / 1000)))
  out[#out + 1] = 1
  out[#out + 1] = math.floor((tau + interval - reset) / interval)
  out[#out + 1] = 0
  out[#out + 1] = reset
end
return out
"#;

/// One (team, rule) limit on Redis.
pub(super) struct RemoteSlot {
    key: String,
    interval_us: u64,
    tau_us: u64,
    burst: u32,
}

impl RemoteSlot {
    pub fn new(key: String, gcra: Gcra) -> RemoteSlot {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        RemoteSlot {
            key,
            // Redis works in microseconds: round a sub-microsecond interval up.
            interval_us: us(gcra.interval).max(1),
            tau_us: us(gcra.tolerance()),
            burst: gcra.burst,
        }
    }
}

/// Redis's answer for one rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Verdict {
    pub allowed: bool,
    pub remaining: u32,
    pub retry_after: Duration,
    pub reset: Duration,
}

/// Why Redis did not decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    /// This call failed or timed out (and opened the circuit).
    Error,
    /// A recent failure: Redis is skipped until the next probe succeeds.
    CircuitOpen,
}

pub(crate) struct RedisBackend {
    client: Client,
    connection: tokio::sync::OnceCell<Connection>,
    script: redis::Script,
    timeout: Duration,
    epoch: Instant,
    /// Milliseconds since `epoch` until which Redis is skipped; 0 = healthy.
    down_until_ms: AtomicU64,
    errors: AtomicU64,
    /// Script invocations sent (what a decision with the circuit open skips).
    calls: AtomicU64,
}

/// One Redis server (`redis://`, `rediss://`) or a Redis Cluster reached
/// through one of its nodes.
enum Client {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

/// Both reconnect by themselves after I/O errors and are cheap to clone
/// (one multiplexed connection per server, shared by every request).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the client: its connection info holds the URL's credentials.
        f.debug_struct("RedisBackend")
            .field("timeout", &self.timeout)
            .field("healthy", &self.is_healthy())
            .field("errors", &self.errors.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// Where and how to reach Redis (from `rate_limit.redis`).
pub(super) struct Target<'a> {
    pub url: &'a Secret,
    pub cluster: bool,
    pub tls: Option<&'a RedisTls>,
}

impl RedisBackend {
    /// Parses the URL and certificates; connects nothing (the connection is
    /// made lazily, in the runtime, by the first decision or by
    /// [`RedisBackend::warm_up`]).
    pub(super) fn new(
        target: &Target<'_>,
        timeout: Duration,
    ) -> Result<RedisBackend, RateLimitSetupError> {
        // The redis crate's URL errors are static text, never the input (a
        // test below holds it to that).
        let client =
            open_client(target).map_err(|e| RateLimitSetupError::RedisUrl(e.to_string()))?;
        Ok(RedisBackend {
            client,
            connection: tokio::sync::OnceCell::new(),
            script: redis::Script::new(GCRA_LUA),
            timeout,
            epoch: Instant::now(),
            down_until_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    /// One command of another toastgate feature on the same Redis (the
    /// idempotency store), within `timeout`. Not subject to the limiter's
    /// circuit: its callers decide what a failure means for them.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
        timeout: Duration,
    ) -> Result<T, String> {
        let call = async {
            let mut con = self.connection().await?;
            cmd.query_async::<T>(&mut con).await
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer from Redis within {timeout:?}")),
        }
    }

    /// The configured per-decision timeout.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    pub fn is_healthy(&self) -> bool {
        self.down_until_ms.load(Ordering::Acquire) == 0
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The connection, created on first use. A single server's manager is
    /// created without I/O and connects on the first command; a cluster
    /// connection reads the slot map first (within the caller's timeout).
    /// Both then reconnect by themselves after I/O errors.
    async fn connection(&self) -> redis::RedisResult<Connection> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                match &self.client {
                    Client::Single(client) => {
                        let config = ConnectionManagerConfig::new()
                            .set_number_of_retries(2)
                            .set_min_delay(Duration::from_millis(50))
                            .set_max_delay(Duration::from_millis(500))
                            .set_connection_timeout(Some(PROBE_TIMEOUT))
                            .set_response_timeout(Some(PROBE_TIMEOUT));
                        ConnectionManager::new_lazy_with_config((**client).clone(), config)
                            .map(Connection::Single)
                    }
                    Client::Cluster(client) => {
                        client.get_async_connection().await.map(Connection::Cluster)
                    }
                }
            })
            .await?;
        Ok(connection.clone())
    }

    /// Runs the script for `slots` (in order), within the timeout.
    pub(super) async fn decide<'a>(
        self: &Arc<Self>,
        slots: impl Iterator<Item = (&'a RemoteSlot, u32)>,
    ) -> Result<Vec<Verdict>, Failure> {
        let until = self.down_until_ms.load(Ordering::Acquire);
        if until != 0 {
            let now = self.now_ms();
            if now >= until
                && self
                    .down_until_ms
                    .compare_exchange(
                        until,
                        now + RETRY_INTERVAL.as_millis() as u64,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                self.spawn_probe();
            }
            return Err(Failure::CircuitOpen);
        }
        let mut invocation = self.script.prepare_invoke();
        let mut slots_seen: Vec<&RemoteSlot> = Vec::with_capacity(4);
        for (slot, cost) in slots {
            invocation
                .key(slot.key.as_str())
                .arg(slot.interval_us)
                .arg(slot.tau_us)
                .arg(cost.max(1));
            slots_seen.push(slot);
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
        let call = async {
            let mut con = self.connection().await?;
            invocation.invoke_async::<Vec<i64>>(&mut con).await
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(reply)) => match parse_reply(&reply, &slots_seen) {
                Some(verdicts) => Ok(verdicts),
                None => {
                    self.trip("the rate-limit script returned an unexpected reply");
                    Err(Failure::Error)
                }
            },
            Ok(Err(e)) => {
                self.trip(&e.to_string());
                Err(Failure::Error)
            }
            Err(_) => {
                self.trip("no answer within the rate-limit timeout");
                Err(Failure::Error)
            }
        }
    }

    /// Counts an error and opens the circuit for [`RETRY_INTERVAL`].
    fn trip(&self, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let until = self.now_ms() + RETRY_INTERVAL.as_millis() as u64;
        if self.down_until_ms.swap(until, Ordering::AcqRel) == 0 {
            tracing::warn!(
                error = why,
                "Redis rate limiting unavailable; deciding by each Action's failure mode"
            );
        }
    }

    /// Connects and loads the script, in the background (startup and probes).
    pub async fn warm_up(&self) -> bool {
        let load = async {
            let mut con = self.connection().await?;
            self.script.prepare_invoke().load_async(&mut con).await
        };
        match tokio::time::timeout(PROBE_TIMEOUT, load).await {
            Ok(Ok(_)) => true,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "Redis rate-limit probe failed");
                false
            }
            Err(_) => {
                tracing::debug!("Redis rate-limit probe timed out");
                false
            }
        }
    }

    /// At startup: connect and load the script; if Redis cannot be reached,
    /// open the circuit now rather than on the first requests.
    pub async fn startup(self: &Arc<Self>) {
        if !self.warm_up().await && self.is_healthy() {
            self.trip("Redis not reachable at startup");
        }
    }

    fn spawn_probe(self: &Arc<Self>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if this.warm_up().await {
                this.down_until_ms.store(0, Ordering::Release);
                tracing::info!("Redis rate limiting available again");
            } else {
                this.errors.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

fn open_client(target: &Target<'_>) -> redis::RedisResult<Client> {
    crate::tls::install_default_provider();
    let url = target.url.expose();
    let certificates = || {
        target.tls.map(|tls| redis::TlsCertificates {
            client_tls: tls
                .client
                .as_ref()
                .map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.expose().as_bytes().to_vec(),
                }),
            root_cert: tls.root_cert.clone(),
        })
    };
    if target.cluster {
        let mut builder = redis::cluster::ClusterClientBuilder::new([url])
            .connection_timeout(PROBE_TIMEOUT)
            .response_timeout(PROBE_TIMEOUT)
            .retries(2);
        if let Some(certs) = certificates() {
            builder = builder.certs(certs);
        }
        builder.build().map(|c| Client::Cluster(Box::new(c)))
    } else {
        match certificates() {
            Some(certs) => redis::Client::build_with_tls(url, certs),
            None => redis::Client::open(url),
        }
        .map(|c| Client::Single(Box::new(c)))
    }
}

/// 4 integers per evaluated rule; every rule but the last allowed; at least one.
fn parse_reply(reply: &[i64], slots: &[&RemoteSlot]) -> Option<Vec<Verdict>> {
    if reply.is_empty() || !reply.len().is_multiple_of(4) || reply.len() / 4 > slots.len() {
        return None;
    }
    let n = reply.len() / 4;
    let mut out = Vec::with_capacity(n);
    for (i, (chunk, slot)) in reply.chunks_exact(4).zip(slots).enumerate() {
        let allowed = chunk[0] == 1;
        if !allowed && i + 1 != n {
            return None;
        }
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        out.push(Verdict {
            allowed,
            remaining: u32::try_from(chunk[1].max(0))
                .unwrap_or(u32::MAX)
                .min(slot.burst),
            retry_after: if allowed {
                Duration::ZERO
            } else {
                us(chunk[2]).max(MIN_RETRY)
            },
            reset: us(chunk[3]),
        });
    }
    // A reply that stops early must stop on a refusal.
    if n < slots.len() && out.last().is_some_and(|v| v.allowed) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(burst: u32) -> RemoteSlot {
        RemoteSlot::new(
            "k".into(),
            Gcra::new(5, Duration::from_secs(1), burst).unwrap(),
        )
    }

    #[test]
    fn slot_parameters_in_microseconds() {
        let s = slot(5);
        assert_eq!((s.interval_us, s.tau_us), (200_000, 800_000));
    }

    #[test]
    fn replies_are_validated() {
        let (a, b) = (slot(5), slot(5));
        let slots = [&a, &b];
        let ok = parse_reply(&[1, 4, 0, 200_000, 1, 3, 0, 400_000], &slots).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].remaining, 3);
        assert_eq!(ok[1].reset, Duration::from_millis(400));
        let refused = parse_reply(&[0, 0, 150_000, 950_000], &slots).unwrap();
        assert!(!refused[0].allowed);
        assert_eq!(refused[0].retry_after, Duration::from_millis(150));
        assert!(parse_reply(&[], &slots).is_none());
        assert!(parse_reply(&[1, 4, 0], &slots).is_none());
        assert!(
            parse_reply(&[1, 4, 0, 1], &slots).is_none(),
            "stopped early on an allow"
        );
        assert!(
            parse_reply(&[0, 0, 1, 1, 1, 3, 0, 1], &slots).is_none(),
            "went on after a refusal"
        );
        assert!(
            parse_reply(&[1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1], &slots).is_none(),
            "too many"
        );
    }

    #[test]
    fn url_errors_never_echo_the_url() {
        for cluster in [false, true] {
            let url = Secret::new("redis://:hunter2@[bad");
            let target = Target {
                url: &url,
                cluster,
                tls: None,
            };
            let e = RedisBackend::new(&target, Duration::from_millis(50)).unwrap_err();
            assert!(!format!("{e} {e:?}").contains("hunter2"), "{e}");
        }
    }

    #[test]
    fn tls_and_cluster_urls_are_accepted() {
        for (url, cluster) in [
            ("rediss://:pw@redis.example:6380/0", false),
            ("rediss://:pw@redis.example:6380", true),
            ("redis://127.0.0.1:7000", true),
        ] {
            let url = Secret::new(url);
            let target = Target {
                url: &url,
                cluster,
                tls: None,
            };
            let backend = RedisBackend::new(&target, Duration::from_millis(50)).unwrap();
            assert_eq!(matches!(backend.client, Client::Cluster(_)), cluster);
        }
    }
}
