//! The audit log of instance actions.
//!
//! The gateway fills in an [`AuditRecord`] per stage of a request
//! (`received`, `completed`) and hands it to [`AuditLog::write`]. One writer
//! thread seals each record into a hash chain and appends it as one JSON line
//! to the file sink (rotated by size) and, when configured, to stdout.
//!
//! # Durability
//! `write` returns once the writer acknowledged the record: it is in the file
//! and, under `fsync: always`, on disk. The writer commits in groups: it
//! drains every record queued, writes them with one `write`, syncs once
//! (`sync_data`) and acknowledges them all, so concurrent requests share one
//! fsync. `interval` syncs at most once a second (and within a second of the
//! last write), `never` leaves it to the OS. [`AuditLog::flush`] syncs
//! whatever the policy (graceful shutdown).
//!
//! # Failures
//! A record that cannot be written (disk full, folder removed, the file's
//! parent not a folder, ...) gets `Err`, counts in [`AuditStats::failed`],
//! and is not part of the chain. The writer keeps going: before each batch it
//! checks that the path still names the open file (deleted, moved away ->
//! reopened), and after an error it reopens the path for the next record, so
//! the sink recovers by itself once the problem is gone. The chain then
//! continues from the file's last record, or from the last record written
//! when the file is new.
//!
//! # The file
//! JSON Lines, one record per line, sealed as described in [`chain`] (the
//! hash definition). When the next line would take the file past `max_bytes`,
//! `FILE` becomes `FILE.1` (`FILE.1` -> `FILE.2` ... up to `keep`, older ones
//! deleted) and a new `FILE` starts; the chain carries across. On open, the
//! chain head is recovered from the last line of `FILE` (or of `FILE.1` when
//! `FILE` is empty); a partial last line left by a crash is completed with a
//! newline when it is a whole record, else cut off; a last line that is not an
//! audit record makes [`AuditLog::open`] fail rather than start a new chain.
//! One process writes one file.
//!
//! # Commands
//! [`AuditCommand`] / [`run_cli`]: `toastgate audit verify|query|tail`.

pub mod chain;
mod cli;
pub mod refusals;
mod sink;
mod summary;
mod webhook;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{Audit, AuditLevel};

pub use chain::{BrokenLink, GENESIS, VerifyReport, verify};
pub use cli::{AuditCommand, run_cli, run_cli_with};
pub use summary::{result_ids, summarize};

/// Whether a record is the `completed` record owed to an action admitted
/// with its `received` record: written even past a full webhook backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owed {
    Yes,
    No,
}

/// Which point of a request a record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Authenticated and authorized (or refused), before anything upstream.
    Received,
    /// Upstream answered (or the request failed).
    Completed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allowed,
    Refused,
}

/// One audit event, as the gateway fills it in. Serialized as one JSON line,
/// plus `prev_hash` and `hash` added by the sink.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC with microseconds and `Z`, e.g. `2026-11-23T17:00:00.123456Z`.
    pub time: String,
    /// uuid v4, one per record.
    pub event_id: String,
    pub request_id: String,
    /// Which gateway process wrote it: [`replica_name`].
    pub replica: &'static str,
    pub stage: Stage,
    pub level: AuditLevel,
    /// `"v2"` | `"v1.0"`.
    pub surface: &'static str,
    pub team: Option<String>,
    /// The JWT `sub`.
    pub subject: Option<String>,
    /// Client address `ip:port`.
    pub client: Option<String>,
    /// Action name; None when refused before the Action was known.
    pub action: Option<&'static str>,
    pub project: Option<String>,
    /// Instance / volume / keypair id.
    pub target: Option<String>,
    /// What the request's constraints look at (flavor, count, name), for
    /// any create / resize / rename: what `toastgate replay` judges again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facts: Option<serde_json::Value>,
    /// Redacted summary ([`summarize`]), level `request` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    pub decision: Decision,
    /// Refusal / failure reason: `auth:expired`, `policy:action`,
    /// `rate_limit:reads`, `upstream:409`, ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Result ids: `{"instance_id": ..}`, `{"image_id": ..}`, `{"keypair": name}`,
    /// `{"attachment_id": ..}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// On a refusal record: how many refusal records of the same caller
    /// were held back (`audit.refusal_records`) and are counted here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suppressed: Option<u64>,
}

impl AuditRecord {
    /// A record stamped now with a new event id; every other field None.
    pub fn new(
        request_id: &str,
        stage: Stage,
        level: AuditLevel,
        surface: &'static str,
        decision: Decision,
    ) -> Self {
        AuditRecord {
            time: chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.6fZ")
                .to_string(),
            event_id: uuid::Uuid::new_v4().to_string(),
            request_id: request_id.to_string(),
            replica: replica_name(),
            stage,
            level,
            surface,
            team: None,
            subject: None,
            client: None,
            action: None,
            project: None,
            target: None,
            facts: None,
            request: None,
            decision,
            reason: None,
            upstream_status: None,
            result: None,
            latency_ms: None,
            suppressed: None,
        }
    }
}

/// This process's name in audit records and webhook batches: `$HOSTNAME`
/// (a pod's name in Kubernetes) when it is a plain name, else `unknown`.
/// Records of several replicas merged by a log collector or a webhook
/// receiver still say where each came from.
pub fn replica_name() -> &'static str {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| {
                !h.is_empty()
                    && h.len() <= 253
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
            })
            .unwrap_or_else(|| "unknown".to_string())
    })
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The file or stdout could not be opened, written, synced or rotated
    /// (the message names the path and the OS error).
    #[error("audit log: {0}")]
    Io(String),
    /// The file's last line is not an audit record, so the chain cannot
    /// continue from it.
    #[error("audit log: {0}")]
    Corrupt(String),
    /// The record could not be serialized.
    #[error("audit log: cannot encode the record: {0}")]
    Encode(String),
    /// The writer thread is gone.
    #[error("audit log: the writer has stopped")]
    Closed,
    /// The writer did not confirm the record in time (a hung disk): it may
    /// still be written, but nobody may count on it.
    #[error("audit log: the record was not confirmed written within {0:?}")]
    NotConfirmed(std::time::Duration),
    /// The webhook receiver is so far behind that the spool is full.
    #[error(
        "audit log: the audit webhook's unsent backlog is over its bound (audit.webhook.max_backlog_bytes)"
    )]
    Backlog,
}

impl AuditError {
    pub(crate) fn io(verb: &str, path: &std::path::Path, e: &std::io::Error) -> Self {
        AuditError::Io(format!("{verb} {}: {e}", path.display()))
    }
}

/// Records written / failed since the log was opened.
#[derive(Debug, Clone, Default)]
pub struct AuditStats {
    pub written: u64,
    pub failed: u64,
}

/// The audit log: cheap to clone and share. See the module docs.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: Sender<sink::Msg>,
    counters: Arc<sink::Counters>,
    /// The audit webhook's unsent backlog (unbounded without a webhook).
    backlog: Arc<webhook::Backlog>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("enabled", &self.is_enabled())
            .field("stats", &self.stats())
            .finish()
    }
}

impl AuditLog {
    /// Opens (creates, appends to) the file sink, recovers the chain head and
    /// starts the writer thread. [`AuditLog::disabled`] when `cfg` has no sink.
    pub fn open(cfg: &Audit) -> Result<AuditLog, AuditError> {
        if cfg.file.is_none() && !cfg.stdout {
            return Ok(AuditLog::disabled());
        }
        let counters = Arc::new(sink::Counters::default());
        let tx = sink::start(cfg, counters.clone())?;
        Ok(AuditLog {
            inner: Some(Arc::new(Inner {
                tx,
                counters,
                backlog: Arc::default(),
            })),
        })
    }

    /// Starts shipping the file's records to `cfg.webhook`, if configured,
    /// until `stop` (a task in the current runtime).
    pub fn start_webhook(
        &self,
        cfg: &Audit,
        client: crate::upstream::UpstreamClient,
        metrics: Arc<crate::metrics::Metrics>,
        stop: crate::shutdown::Stop,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let (Some(inner), Some(webhook), Some(file)) = (&self.inner, &cfg.webhook, &cfg.file)
        else {
            return None;
        };
        let shipper = webhook::Shipper::new(
            webhook.clone(),
            file.clone(),
            client,
            metrics,
            inner.backlog.clone(),
            inner.counters.clone(),
            cfg.fail_closed,
        );
        Some(tokio::spawn(shipper.run(stop)))
    }

    /// No sinks: `write` is Ok and does nothing.
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Appends `record`; Ok once it is written (and synced under
    /// `fsync: always`). Awaits the writer without blocking the runtime.
    pub async fn write(&self, record: AuditRecord, owed: Owed) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        // A full webhook backlog stops new actions and every record but the
        // `completed` one of an action admitted with its `received` record
        // (that would turn a performed action into an unrecorded one): the
        // records of audited reads, replays and refusals would otherwise
        // grow the unsent spool past its bound, until rotation deleted
        // records never sent.
        if owed == Owed::No
            && inner
                .backlog
                .is_full(inner.counters.bytes.load(Ordering::Acquire))
        {
            inner.counters.failed.fetch_add(1, Ordering::Relaxed);
            return Err(AuditError::Backlog);
        }
        let body = match serde_json::to_string(&record) {
            Ok(b) => b,
            Err(e) => {
                inner.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(AuditError::Encode(e.to_string()));
            }
        };
        let (ack, done) = oneshot::channel();
        inner.ask(sink::Msg::Write { body, ack }, done).await
    }

    /// Waits until everything queued before it is written and synced.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        let (ack, done) = oneshot::channel();
        inner.ask(sink::Msg::Flush { ack }, done).await
    }

    pub fn stats(&self) -> AuditStats {
        match &self.inner {
            None => AuditStats::default(),
            Some(i) => AuditStats {
                written: i.counters.written.load(Ordering::Relaxed),
                failed: i.counters.failed.load(Ordering::Relaxed),
            },
        }
    }
}

impl Inner {
    async fn ask(
        &self,
        msg: sink::Msg,
        done: oneshot::Receiver<Result<(), AuditError>>,
    ) -> Result<(), AuditError> {
        let counted = matches!(msg, sink::Msg::Write { .. });
        let closed = || {
            if counted {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
            }
            AuditError::Closed
        };
        if self.tx.send(msg).is_err() {
            return Err(closed());
        }
        match done.await {
            Ok(r) => r,
            Err(_) => Err(closed()),
        }
    }
}
