//! `Idempotency-Key` (draft-ietf-httpapi-idempotency-key-header) on the
//! Actions that create something: `instance.create`, `keypair.create`,
//! `instance.create_image`, on both surfaces.
//!
//! The first request with a key (per team) runs; its answer is kept for
//! `idempotency.window`. A repeat with the same key and the same request
//! (surface, Action, project and judged body) gets that answer again, with
//! `Idempotent-Replayed: true`, and nothing goes upstream. The same key with
//! another request is refused (422). A repeat while the first is still
//! running is refused at once (409, `Retry-After: 1`) rather than held: a
//! waiting connection per retry is what a client that times out would pile
//! up, and the answer is there to fetch a moment later.
//!
//! Kept in the shared Redis when the rate limits use one (so a retry that
//! lands on another replica finds it), in process otherwise (bounded).
//! A generated key pair's `private_key` is never kept: a replay of such a
//! `keypair.create` answers without it (it is shown once, as by the cloud).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::action::Action;
use crate::ratelimit::RedisBackend;

pub const HEADER: &str = "idempotency-key";
/// Set on a replayed answer.
pub const REPLAYED: &str = "idempotent-replayed";
/// Longest key accepted.
const MAX_KEY_LEN: usize = 255;
/// Largest answer kept (create answers are a few KiB).
pub const MAX_STORED_BODY: usize = 1024 * 1024;
/// The answer headers kept and replayed.
const KEPT_HEADERS: [&str; 4] = [
    "content-type",
    "location",
    "openstack-api-version",
    "x-openstack-nova-api-version",
];

/// Does `action` honour `Idempotency-Key`?
pub fn creates(action: Action) -> bool {
    matches!(
        action,
        Action::InstanceCreate | Action::KeypairCreate | Action::InstanceCreateImage
    )
}

/// The key of a request, if it sends one: an RFC 8941 sf-string (`"..."`,
/// as the draft defines the field) or the same characters unquoted; 1 to 255
/// visible ASCII characters. Sent twice, or ill-formed: `Err` (a 400).
pub fn parse_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    static NAME: http::HeaderName = http::HeaderName::from_static(HEADER);
    let mut values = headers.get_all(&NAME).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("give the Idempotency-Key header once".into());
    }
    let text = value
        .to_str()
        .map_err(|_| "the Idempotency-Key must be visible ASCII".to_string())?
        .trim();
    let key = match text.strip_prefix('"') {
        Some(rest) => rest
            .strip_suffix('"')
            .filter(|inner| !inner.contains(['"', '\\']))
            .ok_or("the Idempotency-Key is a quoted string without inner quotes or backslashes")?,
        None => text,
    };
    let visible = key
        .chars()
        .all(|c| c.is_ascii_graphic() && c != '"' && c != '\\');
    if key.is_empty() || key.len() > MAX_KEY_LEN || !visible {
        return Err(format!(
            "the Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters (e.g. a UUID)"
        ));
    }
    Ok(Some(key.to_string()))
}

/// What makes two requests "the same": surface, Action, project and the
/// judged body (as it goes upstream), its objects' members sorted by name:
/// the same members in another order are the same request.
pub fn fingerprint(surface: &str, action: Action, project: &str, body: Option<&Value>) -> String {
    let mut h = Sha256::new();
    for part in [surface, action.name(), project] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    if let Some(body) = body {
        let mut canonical = String::new();
        write_sorted(body, &mut canonical);
        h.update(canonical.as_bytes());
    }
    hex(&h.finalize())
}

/// `value` as compact JSON with every object's members sorted by name
/// (bytewise): what serde_json wrote for any value before objects kept
/// their order, so fingerprints stored by earlier versions (on Redis)
/// still match.
fn write_sorted(value: &Value, out: &mut String) {
    match value {
        Value::Object(members) => {
            let mut sorted: Vec<(&String, &Value)> = members.iter().collect();
            sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (name, member)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::from(name.as_str()).to_string());
                out.push(':');
                write_sorted(member, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An answer kept for replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Base64 of the body.
    pub body: String,
    /// The ids the first request produced (for the replay's audit record).
    pub result: Option<Value>,
}

impl Stored {
    /// Keeps `status`, the headers worth replaying and the body, minus any
    /// private key.
    pub fn new(
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
        result: Option<Value>,
    ) -> Option<Stored> {
        if body.len() > MAX_STORED_BODY {
            return None;
        }
        let body = match serde_json::from_slice::<Value>(body) {
            Ok(mut value) => {
                if strip_private_keys(&mut value) {
                    value.to_string().into_bytes()
                } else {
                    body.to_vec()
                }
            }
            Err(_) => body.to_vec(),
        };
        let headers = KEPT_HEADERS
            .iter()
            .filter_map(|name| {
                let v = headers.get(*name)?.to_str().ok()?;
                Some((name.to_string(), v.to_string()))
            })
            .collect();
        Some(Stored {
            status,
            headers,
            body: B64.encode(body),
            result,
        })
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        B64.decode(&self.body).unwrap_or_default()
    }
}

/// Removes every `private_key` / `privateKey` member; true if any was there.
fn strip_private_keys(value: &mut Value) -> bool {
    match value {
        Value::Object(map) => {
            // Shifted out, not swapped: the replay keeps the first
            // answer's member order.
            let mut removed = map.shift_remove("private_key").is_some();
            removed |= map.shift_remove("privateKey").is_some();
            for v in map.values_mut() {
                removed |= strip_private_keys(v);
            }
            removed
        }
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |acc, v| strip_private_keys(v) | acc),
        _ => false,
    }
}

/// One key's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Entry {
    InFlight {
        fingerprint: String,
        /// How long the marker holds ([`running_hold`] at the claim).
        #[serde(default)]
        hold_ms: u64,
    },
    Done {
        fingerprint: String,
        answer: Stored,
    },
}

/// What a request with a key may do.
#[derive(Debug)]
pub enum Claim {
    /// The first with this key: run, then [`IdempotencyStore::complete`]
    /// (or [`IdempotencyStore::release`] if nothing was sent upstream).
    First(Ticket),
    /// Answered before: this is the answer.
    Replay(Stored),
}

/// Why a key cannot be used now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    InFlight,
    Mismatch,
    Unavailable,
}

/// The right to complete one key.
#[derive(Debug, Clone)]
pub struct Ticket {
    store_key: String,
    fingerprint: String,
    redis: Option<Arc<RedisBackend>>,
}

/// How long a running request holds its key at most: its phases (bounded
/// by `server.request_timeout`), then its `completed` audit record (bounded
/// by the same again, a hung volume) and the keeping of its answer, with a
/// margin. A marker that expired sooner would let a retry run the create a
/// second time while the first is still finishing; a replica that died
/// mid-request frees its keys after this.
pub fn running_hold(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(30)
}

/// Keys and answers: in process, or on the shared Redis.
pub struct IdempotencyStore {
    local: moka::sync::Cache<String, Entry>,
    window: Duration,
}

impl std::fmt::Debug for IdempotencyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyStore")
            .field("window", &self.window)
            .field("entries", &self.local.entry_count())
            .finish()
    }
}

/// In-process entries live `window` once done, their hold while running.
struct Lifetimes {
    window: Duration,
}

impl moka::Expiry<String, Entry> for Lifetimes {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Entry,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(self.lifetime(value))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Entry,
        _updated_at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(value))
    }
}

impl Lifetimes {
    fn lifetime(&self, entry: &Entry) -> Duration {
        match entry {
            Entry::InFlight { hold_ms, .. } => Duration::from_millis((*hold_ms).max(1)),
            Entry::Done { .. } => self.window,
        }
    }
}

impl IdempotencyStore {
    /// `window`: how long answers are kept; `max_entries`: the in-process
    /// bound.
    pub fn new(window: Duration, max_entries: u64) -> IdempotencyStore {
        let local = moka::sync::Cache::builder()
            .max_capacity(max_entries)
            .expire_after(Lifetimes { window })
            .build();
        IdempotencyStore { local, window }
    }

    /// Claims `key` of `team` for a request with `fingerprint`, on `redis`
    /// when given (shared by every replica), else in process; a first claim
    /// holds the key for `hold` at most ([`running_hold`]).
    pub(crate) async fn claim(
        &self,
        redis: Option<(&Arc<RedisBackend>, &str)>,
        team: &str,
        key: &str,
        fingerprint: &str,
        hold: Duration,
    ) -> Result<Claim, Refused> {
        let digest = hex(&Sha256::digest(key.as_bytes()));
        let running = Entry::InFlight {
            fingerprint: fingerprint.to_string(),
            hold_ms: millis(hold),
        };
        let (store_key, existing) = match redis {
            None => {
                let store_key = format!("{team}\0{digest}");
                let entry = self.local.entry(store_key.clone()).or_insert(running);
                let existing = (!entry.is_fresh()).then(|| entry.into_value());
                (store_key, existing)
            }
            Some((backend, prefix)) => {
                let store_key = format!("{prefix}:idem:{team}:{digest}");
                let existing = self
                    .claim_on_redis(backend, &store_key, &running, millis(hold))
                    .await?;
                (store_key, existing)
            }
        };
        match existing {
            None => Ok(Claim::First(Ticket {
                store_key,
                fingerprint: fingerprint.to_string(),
                redis: redis.map(|(b, _)| b.clone()),
            })),
            Some(Entry::InFlight { fingerprint: f, .. }) if f == fingerprint => {
                Err(Refused::InFlight)
            }
            Some(Entry::Done {
                fingerprint: f,
                answer,
            }) if f == fingerprint => Ok(Claim::Replay(answer)),
            Some(_) => Err(Refused::Mismatch),
        }
    }

    /// `SET NX` the running marker for `hold_ms`; if the key was there, its
    /// entry.
    async fn claim_on_redis(
        &self,
        backend: &Arc<RedisBackend>,
        store_key: &str,
        running: &Entry,
        hold_ms: u64,
    ) -> Result<Option<Entry>, Refused> {
        let value = serde_json::to_string(running).map_err(|_| Refused::Unavailable)?;
        let timeout = backend.timeout().max(Duration::from_millis(250));
        // Twice: the key may expire between a refused SET and the GET.
        for _ in 0..2 {
            let set: Option<String> = backend
                .query(
                    redis::cmd("SET")
                        .arg(store_key)
                        .arg(&value)
                        .arg("NX")
                        .arg("PX")
                        .arg(hold_ms),
                    timeout,
                )
                .await
                .map_err(|e| unavailable(&e))?;
            if set.is_some() {
                return Ok(None);
            }
            let got: Option<String> = backend
                .query(redis::cmd("GET").arg(store_key), timeout)
                .await
                .map_err(|e| unavailable(&e))?;
            if let Some(text) = got {
                return serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|_| unavailable("an idempotency entry that is not ours"));
            }
        }
        Err(Refused::Unavailable)
    }

    /// Keeps `answer` for the window: repeats get it from now on.
    pub async fn complete(&self, ticket: Ticket, answer: Stored) {
        let done = Entry::Done {
            fingerprint: ticket.fingerprint.clone(),
            answer,
        };
        match &ticket.redis {
            None => self.local.insert(ticket.store_key, done),
            Some(backend) => {
                let Ok(value) = serde_json::to_string(&done) else {
                    return;
                };
                let result: Result<(), String> = backend
                    .query(
                        redis::cmd("SET")
                            .arg(&ticket.store_key)
                            .arg(value)
                            .arg("PX")
                            .arg(millis(self.window)),
                        backend.timeout().max(Duration::from_secs(1)),
                    )
                    .await;
                if let Err(e) = result {
                    // The running marker stays until it expires: repeats get
                    // 409 meanwhile, never a second run.
                    tracing::warn!(error = %e, "idempotency: the answer could not be kept in Redis");
                }
            }
        }
    }

    /// Frees the key: nothing was sent upstream, so a retry may run.
    pub async fn release(&self, ticket: Ticket) {
        match &ticket.redis {
            None => self.local.invalidate(&ticket.store_key),
            Some(backend) => {
                let result: Result<(), String> = backend
                    .query(
                        redis::cmd("DEL").arg(&ticket.store_key),
                        backend.timeout().max(Duration::from_secs(1)),
                    )
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "idempotency: a key could not be freed in Redis (it expires by itself)");
                }
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn unavailable(why: &str) -> Refused {
    tracing::warn!(error = why, "idempotency store unavailable");
    Refused::Unavailable
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn keys_are_sf_strings_or_plain_tokens() {
        assert_eq!(parse_key(&headers(&[])), Ok(None));
        assert_eq!(
            parse_key(&headers(&["\"8e03978e-40d5-43e8-bc93-6894a57f9324\""])),
            Ok(Some("8e03978e-40d5-43e8-bc93-6894a57f9324".into()))
        );
        assert_eq!(
            parse_key(&headers(&["abc-123"])),
            Ok(Some("abc-123".into()))
        );
        for bad in ["\"\"", "\"a\"b\"", "\"abc", "a b", &"x".repeat(256)] {
            assert!(parse_key(&headers(&[bad])).is_err(), "{bad}");
        }
        assert!(parse_key(&headers(&["a", "b"])).is_err(), "twice");
    }

    /// The same members in another order are the same request, and the
    /// fingerprint is the one earlier versions stored (sorted compact JSON).
    #[test]
    fn fingerprints_ignore_member_order() {
        let a: Value = serde_json::from_str(
            r#"{"server": {"name": "a", "networks": [{"uuid": "n", "fixed_ip": "1"}], "flavorRef": "f"}}"#,
        )
        .unwrap();
        let b: Value = serde_json::from_str(
            r#"{"server": {"flavorRef": "f", "networks": [{"fixed_ip": "1", "uuid": "n"}], "name": "a"}}"#,
        )
        .unwrap();
        assert_ne!(a.to_string(), b.to_string(), "objects keep their order");
        let fp = |v: &Value| fingerprint("v2", Action::InstanceCreate, "web", Some(v));
        assert_eq!(fp(&a), fp(&b));
        let mut sorted = String::new();
        write_sorted(&a, &mut sorted);
        assert_eq!(
            sorted,
            r#"{"server":{"flavorRef":"f","name":"a","networks":[{"fixed_ip":"1","uuid":"n"}]}}"#
        );
        // Arrays keep their order: another order is another request.
        let c: Value = serde_json::from_str(
            r#"{"server": {"name": "a", "networks": [{"uuid": "m"}, {"uuid": "n"}], "flavorRef": "f"}}"#,
        )
        .unwrap();
        let d: Value = serde_json::from_str(
            r#"{"server": {"name": "a", "networks": [{"uuid": "n"}, {"uuid": "m"}], "flavorRef": "f"}}"#,
        )
        .unwrap();
        assert_ne!(fp(&c), fp(&d));
        // Escapes and numbers are written as serde_json writes them.
        let e: Value =
            serde_json::from_str(r#"{"z": "a\"b\u00e9", "a": -0.5e3, "m": null}"#).unwrap();
        let mut out = String::new();
        write_sorted(&e, &mut out);
        assert_eq!(out, r#"{"a":-500.0,"m":null,"z":"a\"bé"}"#);
    }

    #[test]
    fn fingerprints_tell_requests_apart() {
        let body = serde_json::json!({"keypair": {"name": "a"}});
        let other = serde_json::json!({"keypair": {"name": "b"}});
        let a = fingerprint("v2", Action::KeypairCreate, "web", Some(&body));
        assert_eq!(
            a,
            fingerprint("v2", Action::KeypairCreate, "web", Some(&body))
        );
        assert_ne!(
            a,
            fingerprint("v2", Action::KeypairCreate, "web", Some(&other))
        );
        assert_ne!(
            a,
            fingerprint("v1.0", Action::KeypairCreate, "web", Some(&body))
        );
        assert_ne!(
            a,
            fingerprint("v2", Action::KeypairCreate, "batch", Some(&body))
        );
    }

    #[test]
    fn a_generated_private_key_is_never_kept() {
        let body = br#"{"keypair":{"name":"k","public_key":"ssh-rsa AAA","private_key":"-----BEGIN RSA PRIVATE KEY-----"}}"#;
        let stored = Stored::new(200, &HeaderMap::new(), body, None).unwrap();
        let kept = String::from_utf8(stored.body_bytes()).unwrap();
        assert!(
            !kept.contains("PRIVATE KEY") && !kept.contains("private_key"),
            "{kept}"
        );
        assert!(kept.contains("ssh-rsa AAA"));
        let v1 = br#"{"header":{"isSuccessful":true},"keypair":{"privateKey":"secret"}}"#;
        let stored = Stored::new(200, &HeaderMap::new(), v1, None).unwrap();
        assert!(
            !String::from_utf8(stored.body_bytes())
                .unwrap()
                .contains("secret")
        );
    }

    #[tokio::test]
    async fn first_replay_conflict_and_mismatch_in_process() {
        const HOLD: Duration = Duration::from_secs(5);
        let store = IdempotencyStore::new(Duration::from_secs(60), 100);
        let Ok(Claim::First(ticket)) = store.claim(None, "web-team", "k1", "fp-a", HOLD).await
        else {
            panic!("the first claim runs");
        };
        assert_eq!(
            store
                .claim(None, "web-team", "k1", "fp-a", HOLD)
                .await
                .unwrap_err(),
            Refused::InFlight
        );
        assert_eq!(
            store
                .claim(None, "web-team", "k1", "fp-b", HOLD)
                .await
                .unwrap_err(),
            Refused::Mismatch
        );
        // Another team's key of the same name is another key.
        assert!(matches!(
            store.claim(None, "batch-team", "k1", "fp-b", HOLD).await,
            Ok(Claim::First(_))
        ));
        let answer = Stored::new(202, &HeaderMap::new(), b"{\"server\":{}}", None).unwrap();
        store.complete(ticket, answer.clone()).await;
        match store.claim(None, "web-team", "k1", "fp-a", HOLD).await {
            Ok(Claim::Replay(got)) => assert_eq!(got, answer),
            other => panic!("{other:?}"),
        }
        // Released: the next claim runs again.
        let Ok(Claim::First(t)) = store.claim(None, "web-team", "k2", "fp", HOLD).await else {
            panic!()
        };
        store.release(t).await;
        assert!(matches!(
            store.claim(None, "web-team", "k2", "fp", HOLD).await,
            Ok(Claim::First(_))
        ));
    }

    /// A running marker holds for the hold of its claim (not the window of
    /// answers), and then frees the key.
    #[tokio::test]
    async fn a_running_marker_holds_for_its_claims_hold() {
        let store = IdempotencyStore::new(Duration::from_secs(600), 100);
        let hold = Duration::from_secs(2);
        let Ok(Claim::First(_running)) = store.claim(None, "web-team", "k", "fp", hold).await
        else {
            panic!("the first claim runs");
        };
        assert_eq!(
            store
                .claim(None, "web-team", "k", "fp", hold)
                .await
                .unwrap_err(),
            Refused::InFlight
        );
        tokio::time::sleep(hold + Duration::from_millis(500)).await;
        assert!(matches!(
            store.claim(None, "web-team", "k", "fp", hold).await,
            Ok(Claim::First(_))
        ));
    }

    #[test]
    fn a_running_request_holds_its_key_past_both_of_its_deadlines() {
        let request_timeout = Duration::from_secs(60);
        assert!(running_hold(request_timeout) > request_timeout * 2);
    }
}
