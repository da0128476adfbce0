//! The writer thread and the file sink: append, group commit, fsync policy,
//! size rotation, recovery of the chain head and of write errors.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::AuditError;
use super::chain::{self, GENESIS, MAX_LINE, SEAL_OVERHEAD, rotated_files, rotated_path};
use crate::config::{Audit, AuditFileConfig, FsyncPolicy};

/// Records one batch may hold (bounds the latency of a group commit).
const MAX_BATCH: usize = 4096;
/// FsyncPolicy::Interval.
const SYNC_INTERVAL: Duration = Duration::from_secs(1);

pub(crate) type Ack = oneshot::Sender<Result<(), AuditError>>;

pub(crate) enum Msg {
    /// One serialized record (a JSON object, not yet sealed).
    Write { body: String, ack: Ack },
    /// Answered once everything queued before it is written and synced.
    Flush { ack: Ack },
}

#[derive(Default)]
pub(crate) struct Counters {
    pub written: AtomicU64,
    pub failed: AtomicU64,
    /// Bytes appended to the file since the log was opened.
    pub bytes: AtomicU64,
}

/// The numbers `n` of every `FILE.n` in FILE's folder, gaps included.
fn rotated_numbers(path: &Path) -> Vec<u32> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let prefix = format!("{}.", name.to_string_lossy());
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e
                .file_name()
                .to_str()?
                .strip_prefix(&prefix)?
                .parse::<u32>()
                .ok()?;
            (n > 0).then_some(n)
        })
        .collect()
}

/// Starts the writer thread over the sinks of `cfg`.
pub(crate) fn start(cfg: &Audit, counters: Arc<Counters>) -> Result<Sender<Msg>, AuditError> {
    let (file, head) = match &cfg.file {
        Some(fc) => {
            let (sink, head) = FileSink::open(fc)?;
            (Some(sink), head)
        }
        None => (None, GENESIS.to_string()),
    };
    let writer = Writer {
        pending_head: head.clone(),
        head,
        file,
        stdout: cfg.stdout,
        pending: Vec::new(),
        pending_acks: Vec::new(),
        counters,
        failing: false,
        stdout_failing: false,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("toastgate-audit".into())
        .spawn(move || writer.run(rx))
        .map_err(|e| AuditError::Io(format!("cannot start the audit writer thread: {e}")))?;
    Ok(tx)
}

struct Writer {
    file: Option<FileSink>,
    stdout: bool,
    /// Hash of the last record sealed (pending included).
    head: String,
    /// Hash of the last record committed: what `head` falls back to when the
    /// pending records fail.
    pending_head: String,
    pending: Vec<u8>,
    pending_acks: Vec<Ack>,
    counters: Arc<Counters>,
    /// In a failure streak (warn once, note the recovery).
    failing: bool,
    stdout_failing: bool,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = match self.sync_deadline() {
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
                Some(deadline) => {
                    match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => {
                            self.interval_sync();
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            self.process(batch);
        }
        // Every AuditLog handle is gone: leave nothing unsynced behind.
        if let Some(fs) = &mut self.file
            && fs.dirty
            && let Err(e) = fs.sync()
        {
            tracing::warn!(error = %e, "audit: final sync failed");
        }
    }

    /// When an Interval sync is due (None: nothing to wait for).
    fn sync_deadline(&self) -> Option<Instant> {
        let fs = self.file.as_ref()?;
        (fs.cfg.fsync == FsyncPolicy::Interval && fs.dirty && fs.handle.is_some())
            .then(|| fs.last_sync + SYNC_INTERVAL)
    }

    fn interval_sync(&mut self) {
        if let Some(fs) = &mut self.file
            && fs.cfg.fsync == FsyncPolicy::Interval
            && fs.dirty
            && fs.last_sync.elapsed() >= SYNC_INTERVAL
            && let Err(e) = fs.sync()
        {
            tracing::warn!(error = %e, "audit: periodic sync failed");
        }
    }

    fn process(&mut self, batch: Vec<Msg>) {
        let mut flushes = Vec::new();
        let mut open_error: Option<AuditError> = None;
        if let Some(fs) = &mut self.file {
            fs.check_still_there();
        }
        for msg in batch {
            match msg {
                Msg::Write { body, ack } => self.stage(body, ack, &mut open_error),
                Msg::Flush { ack } => flushes.push(ack),
            }
        }
        self.commit();
        if !flushes.is_empty() {
            let result = self.sync_all();
            for ack in flushes {
                let _ = ack.send(result.clone());
            }
        }
        self.interval_sync();
    }

    /// Seals one record into the pending batch, committing and rotating
    /// first when it would overflow the file.
    fn stage(&mut self, body: String, ack: Ack, open_error: &mut Option<AuditError>) {
        let line_len = (body.len() + SEAL_OVERHEAD) as u64;
        if self.file.is_some() {
            if let Err(e) = self.ensure_open(open_error) {
                return self.fail_one(ack, e);
            }
            if self.needs_rotation(line_len) {
                self.commit();
                if let Err(e) = self.ensure_open(open_error) {
                    return self.fail_one(ack, e);
                }
                if let Some(fs) = &mut self.file
                    && fs.len > 0
                    && fs.len + line_len > fs.cfg.max_bytes
                    && let Err(e) = fs.rotate()
                {
                    return self.fail_one(ack, e);
                }
            }
        }
        let starts_file = self
            .file
            .as_ref()
            .is_some_and(|fs| fs.len == 0 && self.pending.is_empty());
        let body = if starts_file {
            chain::mark_file_start(&body)
        } else {
            body
        };
        let sealed = chain::seal(&body, &self.head);
        self.pending.extend_from_slice(sealed.line.as_bytes());
        self.head = sealed.hash;
        self.pending_acks.push(ack);
    }

    fn needs_rotation(&self, line_len: u64) -> bool {
        self.file.as_ref().is_some_and(|fs| {
            let used = fs.len + self.pending.len() as u64;
            used > 0 && used + line_len > fs.cfg.max_bytes
        })
    }

    /// Reopens the file after an error (once per batch); on success the
    /// chain continues from the file's last record, or from memory when the
    /// file is new or empty.
    fn ensure_open(&mut self, open_error: &mut Option<AuditError>) -> Result<(), AuditError> {
        let Some(fs) = &mut self.file else {
            return Ok(());
        };
        if fs.handle.is_some() {
            return Ok(());
        }
        if let Some(e) = open_error {
            return Err(e.clone());
        }
        match fs.reopen() {
            Ok(last) => {
                if let Some(h) = last {
                    self.head.clone_from(&h);
                    self.pending_head = h;
                }
                Ok(())
            }
            Err(e) => {
                *open_error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn fail_one(&mut self, ack: Ack, e: AuditError) {
        self.note_failure(&e, 1);
        let _ = ack.send(Err(e));
    }

    fn note_failure(&mut self, e: &AuditError, n: u64) {
        self.counters.failed.fetch_add(n, Ordering::Relaxed);
        if !self.failing {
            self.failing = true;
            tracing::warn!(error = %e, "audit: records cannot be written");
        }
    }

    /// Writes the pending batch to every sink and answers it.
    fn commit(&mut self) {
        if self.pending_acks.is_empty() {
            return;
        }
        let n = self.pending_acks.len() as u64;
        let mut result = match &mut self.file {
            Some(fs) => fs.append(&self.pending),
            None => Ok(()),
        };
        if result.is_ok() && self.stdout {
            match write_stdout(&self.pending) {
                Ok(()) => self.stdout_failing = false,
                // The only sink: the records are not written.
                Err(e) if self.file.is_none() => {
                    result = Err(AuditError::Io(format!("writing to standard output: {e}")));
                }
                // A copy of the file: warn, the records are in the file.
                Err(e) => {
                    if !self.stdout_failing {
                        self.stdout_failing = true;
                        tracing::warn!(error = %e, "audit: the stdout copy cannot be written");
                    }
                }
            }
        }
        let acks = std::mem::take(&mut self.pending_acks);
        let appended = self.pending.len() as u64;
        self.pending.clear();
        match result {
            Ok(()) => {
                self.counters.written.fetch_add(n, Ordering::Relaxed);
                if self.file.is_some() {
                    self.counters.bytes.fetch_add(appended, Ordering::Release);
                }
                if self.failing {
                    self.failing = false;
                    tracing::info!("audit: records are written again");
                }
                self.pending_head.clone_from(&self.head);
                for ack in acks {
                    let _ = ack.send(Ok(()));
                }
            }
            Err(e) => {
                self.note_failure(&e, n);
                self.head.clone_from(&self.pending_head);
                for ack in acks {
                    let _ = ack.send(Err(e.clone()));
                }
            }
        }
    }

    /// For `flush`: syncs whatever was written, whatever the policy.
    fn sync_all(&mut self) -> Result<(), AuditError> {
        if self.stdout {
            let _ = io::stdout().lock().flush();
        }
        match &mut self.file {
            Some(fs) if fs.handle.is_some() => fs.sync(),
            _ => Ok(()),
        }
    }
}

fn write_stdout(buf: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(buf)?;
    out.flush()
}

struct FileSink {
    cfg: AuditFileConfig,
    /// None after an error: reopened for the next record.
    handle: Option<File>,
    /// Bytes in the file (as far as this writer knows).
    len: u64,
    /// Written since the last sync.
    dirty: bool,
    last_sync: Instant,
}

impl FileSink {
    /// Opens (creates) the file and recovers the chain head: the hash of its
    /// last record, else of the newest rotated file's, else [`GENESIS`].
    fn open(cfg: &AuditFileConfig) -> Result<(FileSink, String), AuditError> {
        let (file, len, last) = open_current(&cfg.path)?;
        let head = match last {
            Some(h) => h,
            None => match rotated_files(&cfg.path).first() {
                Some(newest) => last_hash_of(newest)?.unwrap_or_else(|| GENESIS.to_string()),
                None => GENESIS.to_string(),
            },
        };
        let sink = FileSink {
            cfg: cfg.clone(),
            handle: Some(file),
            len,
            dirty: false,
            last_sync: Instant::now(),
        };
        Ok((sink, head))
    }

    /// Reopens after an error; returns the hash of the file's last record.
    fn reopen(&mut self) -> Result<Option<String>, AuditError> {
        let (file, len, last) = open_current(&self.cfg.path)?;
        self.handle = Some(file);
        self.len = len;
        self.dirty = false;
        Ok(last)
    }

    /// Drops the handle when the path no longer names the open file (deleted,
    /// its folder removed, moved away): the next record then reopens the path
    /// instead of vanishing into an unlinked file.
    fn check_still_there(&mut self) {
        let Some(f) = &self.handle else { return };
        let same = match (fs::metadata(&self.cfg.path), f.metadata()) {
            (Ok(p), Ok(h)) => same_file(&p, &h),
            _ => false,
        };
        if !same {
            tracing::warn!(path = %self.cfg.path.display(), "audit: the file was moved or deleted; reopening it");
            if self.dirty {
                let _ = f.sync_data();
            }
            self.handle = None;
        }
    }

    /// Appends whole lines; on an error, cuts any partial write back and
    /// drops the handle.
    fn append(&mut self, buf: &[u8]) -> Result<(), AuditError> {
        let Some(f) = &mut self.handle else {
            return Err(AuditError::Io(format!(
                "{} is not open",
                self.cfg.path.display()
            )));
        };
        let always = self.cfg.fsync == FsyncPolicy::Always;
        let written = f
            .write_all(buf)
            .and_then(|()| if always { f.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                if always {
                    self.last_sync = Instant::now();
                } else {
                    self.dirty = true;
                }
                Ok(())
            }
            Err(e) => {
                let _ = f.set_len(self.len);
                self.handle = None;
                Err(AuditError::io("writing", &self.cfg.path, &e))
            }
        }
    }

    fn sync(&mut self) -> Result<(), AuditError> {
        let Some(f) = &self.handle else { return Ok(()) };
        match f.sync_data() {
            Ok(()) => {
                self.dirty = false;
                self.last_sync = Instant::now();
                Ok(())
            }
            Err(e) => {
                self.handle = None;
                Err(AuditError::io("syncing", &self.cfg.path, &e))
            }
        }
    }

    /// FILE -> FILE.1 -> ... -> FILE.keep (the oldest beyond keep deleted),
    /// then a new FILE. On an error the handle is dropped (reopened later).
    fn rotate(&mut self) -> Result<(), AuditError> {
        if self.cfg.fsync != FsyncPolicy::Never {
            self.sync()?;
        }
        self.handle = None;
        let path = self.cfg.path.clone();
        let keep = self.cfg.keep;
        let remove = |p: &Path| match fs::remove_file(p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(AuditError::io("removing", p, &e)),
            _ => Ok(()),
        };
        // FILE.keep is about to fall beyond keep; so are leftovers of a larger
        // keep set before. The rest shift up by one, the oldest first.
        let mut existing = rotated_numbers(&path);
        existing.sort_unstable_by(|a, b| b.cmp(a));
        for n in existing {
            let from = rotated_path(&path, n);
            if n >= keep.max(1) {
                remove(&from)?;
            } else {
                let to = rotated_path(&path, n + 1);
                fs::rename(&from, &to).map_err(|e| AuditError::io("renaming", &from, &e))?;
            }
        }
        if keep > 0 {
            let to = rotated_path(&path, 1);
            fs::rename(&path, &to).map_err(|e| AuditError::io("renaming", &path, &e))?;
        } else {
            remove(&path)?;
        }
        let file = create_append(&path)?;
        if self.cfg.fsync == FsyncPolicy::Always
            && let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        tracing::debug!(path = %path.display(), keep, "audit: rotated");
        self.handle = Some(file);
        self.len = 0;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &fs::Metadata, _: &fs::Metadata) -> bool {
    true
}

/// Opens for appending; a new file is created `rw-r-----`.
fn create_append(path: &Path) -> Result<File, AuditError> {
    let mut opts = OpenOptions::new();
    opts.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o640);
    }
    opts.open(path)
        .map_err(|e| AuditError::io("opening", path, &e))
}

/// Opens (creates) `path` for appending and returns it with its length and
/// the hash of its last record. A partial last line (a torn write) is
/// completed with a newline when it is a whole record, else cut off.
fn open_current(path: &Path) -> Result<(File, u64, Option<String>), AuditError> {
    let mut file = create_append(path)?;
    let mut len = file
        .metadata()
        .map_err(|e| AuditError::io("reading", path, &e))?
        .len();
    let tail = read_tail(&mut file, len, 1).map_err(|e| AuditError::io("reading", path, &e))?;
    let mut last = tail.lines.last().cloned();
    if let Some(fragment) = tail.fragment {
        if checked(&fragment).is_ok() {
            file.write_all(b"\n")
                .map_err(|e| AuditError::io("writing", path, &e))?;
            len += 1;
            last = Some(fragment);
        } else {
            tracing::warn!(
                path = %path.display(),
                bytes = fragment.len(),
                "audit: dropping a partial last line (torn write)"
            );
            len = tail.complete_len;
            file.set_len(len)
                .map_err(|e| AuditError::io("truncating", path, &e))?;
        }
    }
    let head = match last {
        None => None,
        Some(line) => Some(checked(&line).map_err(|why| {
            AuditError::Corrupt(format!(
                "{}: the last line is not a valid audit record ({why}); \
                 move the file aside to start a new one",
                path.display()
            ))
        })?),
    };
    Ok((file, len, head))
}

/// The hash of the last record of a (rotated) file, read only.
fn last_hash_of(path: &Path) -> Result<Option<String>, AuditError> {
    let mut f = File::open(path).map_err(|e| AuditError::io("opening", path, &e))?;
    let len = f
        .metadata()
        .map_err(|e| AuditError::io("reading", path, &e))?
        .len();
    let tail = read_tail(&mut f, len, 1).map_err(|e| AuditError::io("reading", path, &e))?;
    match tail.lines.last() {
        None => Ok(None),
        Some(line) => checked(line).map(Some).map_err(|why| {
            AuditError::Corrupt(format!(
                "{}: the last line is not a valid audit record ({why})",
                path.display()
            ))
        }),
    }
}

fn checked(line: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(line).map_err(|_| "not UTF-8".to_string())?;
    chain::check_line(s).map(|l| l.hash)
}

/// The end of a file, read backwards.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Up to `n` last complete lines (without newlines), oldest first.
    pub lines: Vec<Vec<u8>>,
    /// Bytes after the last newline, if any.
    pub fragment: Option<Vec<u8>>,
    /// Length of the file up to and including its last newline.
    pub complete_len: u64,
}

/// Reads the last `n` complete lines of `file` (of length `len`) without
/// reading the whole file. Lines longer than [`MAX_LINE`] are an error.
pub(crate) fn read_tail(file: &mut File, len: u64, n: usize) -> io::Result<Tail> {
    const CHUNK: u64 = 64 * 1024;
    // Newest chunk first.
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut newlines = 0usize;
    // Bytes before the first newline read so far (a line still going on).
    let mut lead = 0usize;
    let mut pos = len;
    while pos > 0 && newlines <= n {
        if lead > MAX_LINE + 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a line is longer than {MAX_LINE} bytes"),
            ));
        }
        let step = CHUNK.min(pos);
        pos -= step;
        let mut chunk = vec![0u8; usize::try_from(step).unwrap_or(0)];
        file.seek(SeekFrom::Start(pos))?;
        file.read_exact(&mut chunk)?;
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        lead = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => i,
            None => lead + chunk.len(),
        };
        chunks.push(chunk);
    }
    let buf: Vec<u8> = chunks.into_iter().rev().flatten().collect();
    let mut tail = Tail::default();
    let complete_end = match buf.iter().rposition(|&b| b == b'\n') {
        Some(i) => i + 1,
        None => 0,
    };
    if complete_end < buf.len() {
        tail.fragment = Some(buf[complete_end..].to_vec());
    }
    tail.complete_len = pos + complete_end as u64;
    let complete = &buf[..complete_end];
    let mut lines: Vec<Vec<u8>> = complete
        .split(|&b| b == b'\n')
        .map(<[u8]>::to_vec)
        .collect();
    lines.pop(); // after the final newline
    // The first piece may be the end of a longer line when pos > 0.
    if pos > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    tail.lines = lines.split_off(skip);
    Ok(tail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("toastgate-sink-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn read_tail_finds_last_lines() {
        let path = scratch("t.txt");
        let mut content = String::new();
        for i in 0..10_000 {
            content.push_str(&format!("line {i} {}\n", "x".repeat(i % 50)));
        }
        fs::write(&path, format!("{content}partial")).unwrap();
        let mut f = File::open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let t = read_tail(&mut f, len, 3).unwrap();
        let got: Vec<String> = t
            .lines
            .iter()
            .map(|l| String::from_utf8(l.clone()).unwrap())
            .collect();
        assert_eq!(got.len(), 3);
        assert!(got[0].starts_with("line 9997 "));
        assert!(got[2].starts_with("line 9999 "));
        assert_eq!(t.fragment.as_deref(), Some(&b"partial"[..]));
        assert_eq!(t.complete_len, content.len() as u64);

        fs::write(&path, "only\n").unwrap();
        let mut f = File::open(&path).unwrap();
        let t = read_tail(&mut f, 5, 5).unwrap();
        assert_eq!(t.lines, vec![b"only".to_vec()]);
        assert!(t.fragment.is_none());

        fs::write(&path, "").unwrap();
        let mut f = File::open(&path).unwrap();
        let t = read_tail(&mut f, 0, 1).unwrap();
        assert!(t.lines.is_empty() && t.fragment.is_none());
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn open_current_repairs_a_torn_tail() {
        let path = scratch("a.jsonl");
        let a = chain::seal(r#"{"n":1}"#, GENESIS);
        let b = chain::seal(r#"{"n":2}"#, &a.hash);
        // A whole record missing only its newline is kept.
        fs::write(&path, format!("{}{}", a.line, b.line.trim_end())).unwrap();
        let (_, len, head) = open_current(&path).unwrap();
        assert_eq!(head.as_deref(), Some(b.hash.as_str()));
        assert_eq!(len, (a.line.len() + b.line.len()) as u64);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("{}{}", a.line, b.line)
        );
        // A torn record is cut off.
        fs::write(&path, format!("{}{}", a.line, &b.line[..20])).unwrap();
        let (_, len, head) = open_current(&path).unwrap();
        assert_eq!(head.as_deref(), Some(a.hash.as_str()));
        assert_eq!(len, a.line.len() as u64);
        // A corrupt last line is a clear error.
        fs::write(&path, "{\"not\":\"audit\"}\n").unwrap();
        let err = open_current(&path).unwrap_err().to_string();
        assert!(err.contains("not a valid audit record"), "{err}");
        let _ = fs::remove_dir_all(path.parent().unwrap());
    }
}
