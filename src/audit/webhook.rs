//! Shipping audit records to an HTTP receiver, after the manner of the
//! Kubernetes audit webhook backend: batched POSTs, retried with backoff.
//!
//! The audit file is the durable spool: a request's records are acknowledged
//! once they are in the file (as without a webhook), and the shipper sends
//! the file on from where it left off, so nothing acknowledged is lost while
//! the receiver is slow, down or restarting, nor across a gateway restart.
//! Delivery is at least once (a batch whose answer was lost is sent again):
//! receivers de-duplicate by `hash` (or `event_id`) and can verify the chain.
//!
//! Where it left off is a cursor file next to the audit file
//! (`FILE.webhook-cursor`): the hash of the first line of the file being read
//! and a byte offset in it, so it survives rotation (`FILE` -> `FILE.1`).
//! The unsent backlog is bounded: beyond `max_backlog_bytes` every new record
//! is refused (mutating requests are then refused, fail closed) until the
//! receiver catches up, so rotation never deletes a record not yet sent
//! (the config requires `max_backlog_bytes <= max_bytes x keep`).
//!
//! Each POST body is `{"replica": NAME, "records": [RECORD, ...]}` with the
//! records exactly as in the file, oldest first; `NAME` (also in the
//! `X-Toastgate-Replica` header, and in every record) is
//! [`super::replica_name`].

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request};
use http_body_util::Full;

use super::sink;
use crate::config::{AuditFileConfig, AuditWebhook};
use crate::metrics::Metrics;
use crate::shutdown::Stop;
use crate::upstream::UpstreamClient;

/// How often an idle shipper looks for new records.
const POLL: Duration = Duration::from_millis(200);
/// Retry backoff after a failed POST: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// Where the shipper is: `offset` bytes into the file whose first line has
/// hash `first_hash`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Cursor {
    first_hash: String,
    offset: u64,
}

/// The files of the log, oldest first: FILE.keep .. FILE.1, FILE.
fn files_oldest_first(path: &Path, keep: u32) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = (1..=keep)
        .rev()
        .map(|n| PathBuf::from(format!("{}.{n}", path.display())))
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    files
}

/// The `hash` of a file's first line (None: empty or unreadable).
fn first_hash(path: &Path) -> Option<String> {
    let mut line = String::new();
    BufReader::new(File::open(path).ok()?)
        .read_line(&mut line)
        .ok()?;
    let value: serde_json::Value = serde_json::from_str(line.trim_end()).ok()?;
    value["hash"].as_str().map(str::to_string)
}

/// Up to `max` complete lines from `offset` of `path`, and the offset after them.
fn read_lines(path: &Path, offset: u64, max: usize) -> std::io::Result<(Vec<String>, u64)> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file.take(u64::MAX));
    let (mut lines, mut at) = (Vec::new(), offset);
    while lines.len() < max {
        let mut line = String::new();
        let n = reader.read_line(&mut line)?;
        // A line not yet ended is being written: leave it for next time.
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        at += n as u64;
        lines.push(line.trim_end_matches('\n').to_string());
    }
    Ok((lines, at))
}

/// The unsent backlog, kept exact between the shipper's measurements: the
/// shipper records what was unsent when it measured and how many bytes the
/// writer had appended by then; the writer's appends since are unsent too.
/// Checked before every record is queued, so the bound holds to within the
/// records being written at that moment.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// 0: no webhook, no bound.
    limit: AtomicU64,
    unsent_at_measure: AtomicU64,
    appended_at_measure: AtomicU64,
}

impl Backlog {
    /// Would the backlog be over its bound, given `appended` bytes so far?
    pub(crate) fn is_full(&self, appended: u64) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        if limit == 0 {
            return false;
        }
        let since = appended.saturating_sub(self.appended_at_measure.load(Ordering::Acquire));
        self.unsent_at_measure.load(Ordering::Acquire) + since > limit
    }
}

pub(crate) struct Shipper {
    webhook: AuditWebhook,
    file: AuditFileConfig,
    cursor_path: PathBuf,
    client: UpstreamClient,
    metrics: Arc<Metrics>,
    backlog: Arc<Backlog>,
    /// The writer's appended-bytes counter.
    appended: Arc<sink::Counters>,
    /// Whether the last measurement was over the bound (for the log).
    over: AtomicBool,
    /// The "file being sent is gone" error was logged.
    warned_gone: AtomicBool,
    replica: String,
}

impl Shipper {
    pub(crate) fn new(
        webhook: AuditWebhook,
        file: AuditFileConfig,
        client: UpstreamClient,
        metrics: Arc<Metrics>,
        backlog: Arc<Backlog>,
        appended: Arc<sink::Counters>,
        fail_closed: bool,
    ) -> Shipper {
        // Only a fail-closed log refuses records over the bound; otherwise
        // availability wins and unsent records may be rotated away (said
        // loudly when it happens).
        if fail_closed {
            backlog
                .limit
                .store(webhook.max_backlog_bytes.max(1), Ordering::Release);
        }
        let cursor_path = PathBuf::from(format!("{}.webhook-cursor", file.path.display()));
        let replica = super::replica_name().to_string();
        Shipper {
            webhook,
            file,
            cursor_path,
            client,
            metrics,
            backlog,
            appended,
            over: AtomicBool::new(false),
            warned_gone: AtomicBool::new(false),
            replica,
        }
    }

    /// Ships until `stop`, then once more (what the last requests wrote).
    pub(crate) async fn run(self, stop: Stop) {
        let mut backoff = BACKOFF.0;
        loop {
            let stopping = stop.is_stopped();
            match self.ship_one_batch().await {
                Ok(true) => {
                    backoff = BACKOFF.0;
                    continue;
                }
                Ok(false) => {
                    backoff = BACKOFF.0;
                    if stopping || stop.sleep(POLL).await {
                        return;
                    }
                }
                Err(why) => {
                    self.metrics
                        .audit_webhook_batches
                        .with_label_values(&["failed"])
                        .inc();
                    tracing::warn!(error = %why, retry_in = ?backoff, "audit webhook: batch not delivered; retrying");
                    if stopping || self.wait_measuring(backoff, &stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    /// Waits `d` (true: stopped meanwhile), re-measuring the backlog every
    /// [`POLL`] so that it can be seen to fall back under its bound... or
    /// to grow, while the receiver stays down.
    async fn wait_measuring(&self, d: Duration, stop: &Stop) -> bool {
        let until = tokio::time::Instant::now() + d;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            if stop.sleep(left.min(POLL)).await {
                return true;
            }
            let files = files_oldest_first(&self.file.path, self.file.keep);
            let (index, cursor) = self.locate(&files);
            self.measure_backlog(&files, index, &cursor);
        }
    }

    /// Sends the next batch. Ok(true): sent (more may follow); Ok(false):
    /// nothing to send.
    async fn ship_one_batch(&self) -> Result<bool, String> {
        let files = files_oldest_first(&self.file.path, self.file.keep);
        let (index, cursor) = self.locate(&files);
        self.measure_backlog(&files, index, &cursor);
        let Some(current) = files.get(index) else {
            return Ok(false);
        };
        let (lines, next) = read_lines(current, cursor.offset, self.webhook.batch_max)
            .map_err(|e| format!("reading {}: {e}", current.display()))?;
        if lines.is_empty() {
            // This file is done once a newer one exists: move on to it.
            if let Some(newer) = files.get(index + 1)
                && let Some(first_hash) = first_hash(newer)
            {
                self.save(&Cursor {
                    first_hash,
                    offset: 0,
                })?;
                return Ok(true);
            }
            return Ok(false);
        }
        self.post(&lines).await?;
        self.metrics
            .audit_webhook_batches
            .with_label_values(&["sent"])
            .inc();
        self.metrics
            .audit_webhook_records
            .inc_by(lines.len() as u64);
        self.save(&Cursor {
            first_hash: cursor.first_hash,
            offset: next,
        })?;
        Ok(true)
    }

    /// The file the cursor is in and the cursor; the oldest file from its
    /// start when there is no cursor yet, or when its file is gone (rotated
    /// away unsent: said loudly).
    fn locate(&self, files: &[PathBuf]) -> (usize, Cursor) {
        let saved: Option<Cursor> = std::fs::read(&self.cursor_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(cursor) = &saved {
            for (i, f) in files.iter().enumerate() {
                if first_hash(f).as_deref() == Some(cursor.first_hash.as_str()) {
                    return (i, cursor.clone());
                }
            }
            if files.iter().any(|f| first_hash(f).is_some())
                && !self.warned_gone.swap(true, Ordering::Relaxed)
            {
                tracing::error!(
                    "audit webhook: the file being sent is gone (deleted or rotated away); \
                     starting again from the oldest file"
                );
            }
        }
        let first = files
            .first()
            .and_then(|f| first_hash(f))
            .unwrap_or_default();
        (
            0,
            Cursor {
                first_hash: first,
                offset: 0,
            },
        )
    }

    /// Unsent bytes: the rest of the current file and every newer one. Over
    /// the bound, new records are refused until the receiver catches up.
    fn measure_backlog(&self, files: &[PathBuf], index: usize, cursor: &Cursor) {
        // Read before the file lengths: a record appended in between is
        // then counted twice (safe side), never not at all.
        let appended = self.appended.bytes.load(Ordering::Acquire);
        let len = |p: &PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let backlog: u64 = files
            .iter()
            .enumerate()
            .skip(index)
            .map(|(i, f)| {
                if i == index {
                    len(f).saturating_sub(cursor.offset)
                } else {
                    len(f)
                }
            })
            .sum();
        self.metrics
            .audit_webhook_backlog
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
        self.backlog
            .unsent_at_measure
            .store(backlog, Ordering::Release);
        self.backlog
            .appended_at_measure
            .store(appended, Ordering::Release);
        let over = backlog > self.webhook.max_backlog_bytes;
        if self.over.swap(over, Ordering::AcqRel) != over {
            if over {
                tracing::error!(
                    backlog,
                    "audit webhook: unsent backlog over max_backlog_bytes; refusing new audit records (mutating requests) until the receiver catches up"
                );
            } else {
                tracing::info!(backlog, "audit webhook: backlog back under its bound");
            }
        }
    }

    async fn post(&self, lines: &[String]) -> Result<(), String> {
        // Only whole records go out: a line that is not JSON stops here.
        for line in lines {
            serde_json::from_str::<serde::de::IgnoredAny>(line)
                .map_err(|e| format!("a line of the audit file is not a record: {e}"))?;
        }
        let mut body = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum::<usize>() + 64);
        body.push_str("{\"replica\":");
        body.push_str(&serde_json::Value::from(self.replica.as_str()).to_string());
        body.push_str(",\"records\":[");
        body.push_str(&lines.join(","));
        body.push_str("]}");
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self
            .webhook
            .url
            .parse()
            .map_err(|e| format!("webhook url: {e}"))?;
        let headers = req.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&self.replica) {
            headers.insert("x-toastgate-replica", v);
        }
        if let Some(token) = &self.webhook.bearer_token
            && let Ok(mut v) = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
        {
            v.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, v);
        }
        let answer = self
            .client
            .send_buffered(req, 64 * 1024, self.webhook.timeout)
            .await
            .map_err(|e| e.to_string())?;
        if answer.status().is_success() {
            Ok(())
        } else {
            Err(format!("the receiver answered {}", answer.status()))
        }
    }

    /// Writes the cursor (a temp file renamed over the old one, so a crash
    /// leaves the old or the new cursor, never half of one).
    fn save(&self, cursor: &Cursor) -> Result<(), String> {
        let tmp = PathBuf::from(format!("{}.tmp", self.cursor_path.display()));
        let bytes = serde_json::to_vec(cursor).map_err(|e| e.to_string())?;
        std::fs::write(&tmp, bytes)
            .and_then(|()| std::fs::rename(&tmp, &self.cursor_path))
            .map_err(|e| format!("saving {}: {e}", self.cursor_path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("toastgate-webhook-{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reads_only_complete_lines_and_finds_files_oldest_first() {
        let dir = scratch("lines");
        let path = dir.join("audit.jsonl");
        std::fs::write(&path, "{\"hash\":\"a\"}\n{\"hash\":\"b\"}\n{\"hash\":\"c").unwrap();
        let (lines, next) = read_lines(&path, 0, 10).unwrap();
        assert_eq!(lines, ["{\"hash\":\"a\"}", "{\"hash\":\"b\"}"]);
        assert_eq!(next, 26);
        let (lines, _) = read_lines(&path, 13, 10).unwrap();
        assert_eq!(lines, ["{\"hash\":\"b\"}"]);
        let (lines, at) = read_lines(&path, 0, 1).unwrap();
        assert_eq!((lines.len(), at), (1, 13));

        std::fs::write(dir.join("audit.jsonl.2"), "{\"hash\":\"old\"}\n").unwrap();
        std::fs::write(dir.join("audit.jsonl.1"), "{\"hash\":\"mid\"}\n").unwrap();
        let files = files_oldest_first(&path, 3);
        let hashes: Vec<Option<String>> = files.iter().map(|f| first_hash(f)).collect();
        assert_eq!(
            hashes,
            [Some("old".into()), Some("mid".into()), Some("a".into())]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
