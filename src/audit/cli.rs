//! `toastgate audit verify|query|tail`.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

use super::chain::rotated_files;
use super::chain::{self, GENESIS, MAX_LINE};
use super::sink::read_tail;
use crate::action;

/// How often `tail --follow` looks for new records.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Checks the hash chain of FILE (and, with --with-rotated, FILE.N ...
    /// FILE.1 before it); reports the first broken link (file, line, why).
    /// Exit 0: intact; 1: broken; 2: a file cannot be read.
    Verify {
        /// The audit file (audit.file.path).
        #[arg(long)]
        file: PathBuf,
        /// Also check the rotated files FILE.1, FILE.2, ... and the links
        /// between them.
        #[arg(long)]
        with_rotated: bool,
    },
    /// Records matching every given filter, one readable line each (time,
    /// stage, team/subject, action, project, target, decision, status,
    /// request id). Reads FILE's rotated files too, oldest first.
    Query {
        /// The audit file (audit.file.path).
        #[arg(long)]
        file: PathBuf,
        /// Only this team's records (the `team` claim of the caller's JWT).
        #[arg(long)]
        team: Option<String>,
        /// An Action name (instance.reboot), a prefix (instance.*), a group
        /// (instance.power, read, write) or `*`.
        #[arg(long)]
        action: Option<String>,
        /// Only records for this project (its alias in the config, or its
        /// tenant id).
        #[arg(long)]
        project: Option<String>,
        /// An instance / volume / keypair id, or the start of one.
        #[arg(long)]
        target: Option<String>,
        /// A duration back from now ("1h", "30m", "2days"), an RFC 3339
        /// time, or a date (2026-11-23, midnight UTC).
        #[arg(long)]
        since: Option<String>,
        /// allowed | refused
        #[arg(long)]
        decision: Option<String>,
        /// Print the raw JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// The last N records (default 20) in the same readable form; --follow
    /// keeps printing new ones (across rotations).
    Tail {
        /// The audit file (audit.file.path).
        #[arg(long)]
        file: PathBuf,
        /// How many of the last records to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Keep printing new records as they are written (across
        /// rotations) until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

/// Runs an audit command on stdout / stderr. Blocking (`tail --follow` runs
/// until the process is stopped).
pub fn run_cli(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let stdout = io::stdout();
    let stderr = io::stderr();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    match run_cli_with(cmd, &mut out, &mut err, &|| false) {
        Err(e) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// [`run_cli`] on any writers; `tail --follow` returns once `stop()` is true
/// (after printing what was written before).
pub fn run_cli_with(
    cmd: AuditCommand,
    out: &mut dyn Write,
    err: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { file, with_rotated } => verify_cmd(&file, with_rotated, out, err),
        AuditCommand::Query {
            file,
            team,
            action,
            project,
            target,
            since,
            decision,
            json,
        } => {
            let filter = Filter {
                team,
                action: action.as_deref().map(ActionMatch::parse).transpose()?,
                project,
                target,
                since: since
                    .as_deref()
                    .map(|s| parse_since(s, Utc::now()))
                    .transpose()?,
                decision: decision.as_deref().map(parse_decision).transpose()?,
            };
            query(&file, &filter, json, out, err)?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Tail {
            file,
            lines,
            follow,
        } => {
            let cursor = tail(&file, lines, out, err)?;
            if follow {
                follow_from(&file, cursor, out, err, POLL, stop)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn verify_cmd(
    file: &Path,
    with_rotated: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<ExitCode> {
    let report = match chain::verify(file, with_rotated) {
        Ok(r) => r,
        Err(e) => {
            writeln!(err, "error: {e}")?;
            return Ok(ExitCode::from(2));
        }
    };
    if let Some(b) = &report.broken {
        writeln!(out, "broken: {b}")?;
        writeln!(out, "{} records before it are intact", report.records)?;
        return Ok(ExitCode::FAILURE);
    }
    writeln!(out, "ok: {} records, chain intact", report.records)?;
    if report.files.len() > 1 {
        writeln!(out, "files: {}", report.files.len())?;
    }
    if let Some(p) = report.first_prev.as_deref().filter(|p| *p != GENESIS) {
        writeln!(
            out,
            "note: the first record follows one no longer present (prev_hash {}...): \
             older files were rotated away{}",
            chain::short(p),
            if with_rotated {
                ""
            } else {
                " (see --with-rotated)"
            }
        )?;
    }
    if let Some(h) = &report.head {
        writeln!(out, "head: {h}")?;
    }
    if report.incomplete_tail {
        writeln!(
            out,
            "note: the last line is incomplete (being written, or torn by a crash); not counted"
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug)]
enum ActionMatch {
    Any,
    Prefix(String),
    Names(Vec<&'static str>),
}

impl ActionMatch {
    fn parse(p: &str) -> anyhow::Result<ActionMatch> {
        if p == "*" {
            return Ok(ActionMatch::Any);
        }
        if let Some(prefix) = p.strip_suffix('*') {
            return Ok(ActionMatch::Prefix(prefix.to_string()));
        }
        match action::resolve_pattern(p) {
            Some(actions) => Ok(ActionMatch::Names(
                actions.into_iter().map(action::Action::name).collect(),
            )),
            None => bail!(
                "--action: unknown Action or group `{p}` (`toastgate explain --list` lists them; \
                 a prefix is written like instance.*)"
            ),
        }
    }

    fn matches(&self, action: Option<&str>) -> bool {
        let Some(a) = action else { return false };
        match self {
            ActionMatch::Any => true,
            ActionMatch::Prefix(p) => a.starts_with(p.as_str()),
            ActionMatch::Names(names) => names.contains(&a),
        }
    }
}

#[derive(Debug, Default)]
struct Filter {
    team: Option<String>,
    action: Option<ActionMatch>,
    project: Option<String>,
    target: Option<String>,
    since: Option<DateTime<Utc>>,
    decision: Option<&'static str>,
}

impl Filter {
    fn matches(&self, v: &Value) -> bool {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let eq = |want: &Option<String>, k: &str| want.as_deref().is_none_or(|w| s(k) == Some(w));
        eq(&self.team, "team")
            && eq(&self.project, "project")
            && self.action.as_ref().is_none_or(|a| a.matches(s("action")))
            && self
                .target
                .as_deref()
                .is_none_or(|t| s("target").is_some_and(|x| x.starts_with(t)))
            && self.decision.is_none_or(|d| s("decision") == Some(d))
            && self
                .since
                .is_none_or(|since| s("time").and_then(parse_time).is_some_and(|t| t >= since))
    }
}

fn parse_time(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

fn parse_since(s: &str, now: DateTime<Utc>) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(d) = humantime::parse_duration(s) {
        let d = chrono::Duration::from_std(d).context("--since: duration too long")?;
        return now
            .checked_sub_signed(d)
            .context("--since: duration too long");
    }
    if let Some(t) = parse_time(s) {
        return Ok(t);
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    bail!(
        "--since: `{s}` is neither a duration (1h, 30m, 2days), an RFC 3339 time \
         (2026-11-23T17:00:00Z) nor a date (2026-11-23)"
    )
}

fn parse_decision(d: &str) -> anyhow::Result<&'static str> {
    match d {
        "allowed" => Ok("allowed"),
        "refused" => Ok("refused"),
        other => bail!("--decision: `{other}` is not `allowed` or `refused`"),
    }
}

/// FILE's rotated files, oldest first, then FILE.
fn chain_order(file: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = rotated_files(file).into_iter().rev().collect();
    files.push(file.to_path_buf());
    files
}

/// Reads one line (without its newline) into `buf`; false at the end. A line
/// longer than [`MAX_LINE`] comes back cut (and then fails to parse).
fn next_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<bool> {
    buf.clear();
    let n = reader.take(MAX_LINE as u64 + 1).read_until(b'\n', buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if buf.len() > MAX_LINE {
        // Skip the rest of an overlong line without holding it.
        loop {
            let avail = reader.fill_buf()?;
            if avail.is_empty() {
                break;
            }
            match avail.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    reader.consume(i + 1);
                    break;
                }
                None => {
                    let n = avail.len();
                    reader.consume(n);
                }
            }
        }
    }
    Ok(n > 0)
}

fn parse_record(line: &[u8]) -> Option<Value> {
    if line.len() > MAX_LINE {
        return None;
    }
    serde_json::from_slice::<Value>(line)
        .ok()
        .filter(Value::is_object)
}

fn query(
    file: &Path,
    filter: &Filter,
    json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<()> {
    if !file.is_file() {
        bail!("cannot open {}: no such file", file.display());
    }
    let (mut matched, mut skipped) = (0u64, 0u64);
    let mut buf = Vec::new();
    for path in chain_order(file) {
        let f = match File::open(&path) {
            Ok(f) => f,
            // A rotated file removed meanwhile.
            Err(e) if e.kind() == io::ErrorKind::NotFound && path != file => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut reader = BufReader::new(f);
        while next_line(&mut reader, &mut buf)
            .with_context(|| format!("reading {}", path.display()))?
        {
            if buf.is_empty() {
                continue;
            }
            let Some(v) = parse_record(&buf) else {
                skipped += 1;
                continue;
            };
            if !filter.matches(&v) {
                continue;
            }
            matched += 1;
            if json {
                out.write_all(&buf)?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", readable(&v))?;
            }
        }
    }
    if skipped > 0 {
        writeln!(err, "note: {skipped} lines skipped (not audit records)")?;
    }
    if matched == 0 {
        writeln!(err, "no matching records")?;
    }
    Ok(())
}

/// Where `--follow` goes on from.
struct Cursor {
    file: File,
    offset: u64,
    partial: Vec<u8>,
}

/// Prints the last `n` records (from FILE, then its rotated files when FILE
/// has fewer) and returns the position right after them in FILE.
fn tail(file: &Path, n: usize, out: &mut dyn Write, err: &mut dyn Write) -> anyhow::Result<Cursor> {
    let mut current =
        File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let len = current
        .metadata()
        .with_context(|| format!("reading {}", file.display()))?
        .len();
    let t =
        read_tail(&mut current, len, n).with_context(|| format!("reading {}", file.display()))?;
    let cursor_offset = t.complete_len;
    // Newest file first; each file's lines oldest first.
    let mut groups: Vec<Vec<Vec<u8>>> = vec![t.lines];
    let mut have = groups[0].len();
    for path in rotated_files(file) {
        if have >= n {
            break;
        }
        let Ok(mut f) = File::open(&path) else { break };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let t = read_tail(&mut f, len, n - have)
            .with_context(|| format!("reading {}", path.display()))?;
        have += t.lines.len();
        groups.push(t.lines);
    }
    let mut skipped = 0u64;
    for line in groups.iter().rev().flatten() {
        match parse_record(line) {
            Some(v) => writeln!(out, "{}", readable(&v))?,
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        writeln!(err, "note: {skipped} lines skipped (not audit records)")?;
    }
    out.flush()?;
    Ok(Cursor {
        file: current,
        offset: cursor_offset,
        partial: Vec::new(),
    })
}

/// Prints records appended to `file` after `cursor` until `stop()`. A
/// rotation (FILE renamed, a new FILE) is followed: the rest of the old file,
/// any file rotated in between, then the new file from its start. A file
/// truncated in place is read again from its start.
fn follow_from(
    file: &Path,
    mut cursor: Cursor,
    out: &mut dyn Write,
    err: &mut dyn Write,
    poll: Duration,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<()> {
    loop {
        let stopping = stop();
        drain(&mut cursor, out, err).with_context(|| format!("reading {}", file.display()))?;
        if let Ok(now) = fs::metadata(file) {
            let ours = cursor.file.metadata().ok();
            let replaced = !ours.as_ref().is_some_and(|m| same_file(m, &now));
            if replaced {
                // What was appended to ours just before it was renamed.
                drain(&mut cursor, out, err)
                    .with_context(|| format!("reading {}", file.display()))?;
                // Switch only once the new FILE is there (else next poll).
                if let (newer, Some(current)) = switch_files(file, ours.as_ref()) {
                    for f in newer {
                        let mut c = Cursor {
                            file: f,
                            offset: 0,
                            partial: Vec::new(),
                        };
                        drain(&mut c, out, err)
                            .with_context(|| format!("reading {}", file.display()))?;
                    }
                    cursor = Cursor {
                        file: current,
                        offset: 0,
                        partial: Vec::new(),
                    };
                    drain(&mut cursor, out, err)
                        .with_context(|| format!("reading {}", file.display()))?;
                }
            } else if now.len() < cursor.offset {
                writeln!(
                    err,
                    "note: {} was truncated; reading it from the start",
                    file.display()
                )?;
                cursor.offset = 0;
                cursor.partial.clear();
                drain(&mut cursor, out, err)
                    .with_context(|| format!("reading {}", file.display()))?;
            }
        }
        out.flush()?;
        if stopping {
            return Ok(());
        }
        let until = Instant::now() + poll;
        while Instant::now() < until {
            if stop() {
                break;
            }
            std::thread::sleep(poll.min(Duration::from_millis(50)));
        }
    }
}

/// After FILE was replaced: the rotated files newer than ours (which became
/// FILE.k: FILE.k-1 .. FILE.1, oldest first) and the new FILE, all opened
/// (pinned) and then checked against a rotation in between (ours must still
/// be FILE.k). No newer files when ours is not among the rotated ones
/// (deleted beyond keep, or FILE replaced without a rotation).
fn switch_files(file: &Path, ours: Option<&fs::Metadata>) -> (Vec<File>, Option<File>) {
    let mut attempt = (Vec::new(), None);
    for _ in 0..5 {
        let rotated = rotated_files(file);
        let k = ours.and_then(|m| {
            rotated
                .iter()
                .position(|p| fs::metadata(p).is_ok_and(|x| same_file(&x, m)))
        });
        let newer: Vec<File> = match k {
            Some(k) => rotated[..k]
                .iter()
                .rev()
                .filter_map(|p| File::open(p).ok())
                .collect(),
            None => Vec::new(),
        };
        let current = File::open(file).ok();
        let stable = match (ours, k) {
            (Some(m), Some(k)) => fs::metadata(&rotated[k]).is_ok_and(|x| same_file(&x, m)),
            _ => true,
        };
        attempt = (newer, current);
        if stable {
            break;
        }
    }
    attempt
}

/// Prints the complete lines from the cursor to the end of its file.
fn drain(c: &mut Cursor, out: &mut dyn Write, err: &mut dyn Write) -> io::Result<()> {
    c.file.seek(SeekFrom::Start(c.offset))?;
    let mut fresh = Vec::new();
    let n = c.file.read_to_end(&mut fresh)?;
    c.offset += n as u64;
    c.partial.extend_from_slice(&fresh);
    let Some(end) = c.partial.iter().rposition(|&b| b == b'\n') else {
        if c.partial.len() > MAX_LINE {
            writeln!(err, "note: skipped a line longer than {MAX_LINE} bytes")?;
            c.partial.clear();
        }
        return Ok(());
    };
    let rest = c.partial.split_off(end + 1);
    for line in c.partial.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue;
        }
        match parse_record(line) {
            Some(v) => writeln!(out, "{}", readable(&v))?,
            None => writeln!(err, "note: skipped a line that is not an audit record")?,
        }
    }
    c.partial = rest;
    Ok(())
}

#[cfg(unix)]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    a.len() <= b.len()
}

/// Control characters (a terminal escape in a team name, a target id, ...)
/// printed escaped.
fn clean(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars()
            .flat_map(|c| {
                let e: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                e
            })
            .collect()
    } else {
        s.to_string()
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => clean(s),
        other => clean(&other.to_string()),
    }
}

/// One record as a readable line:
/// `time  stage  team/subject  action  project  target  decision[(reason)]  status  req=..  [result]  [from client]`.
pub(crate) fn readable(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(clean);
    let dash = || "-".to_string();
    let time = s("time")
        .map(|t| match parse_time(&t) {
            Some(p) => p.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            None => t,
        })
        .unwrap_or_else(dash);
    let who = match (s("team"), s("subject")) {
        (Some(t), Some(u)) => format!("{t}/{u}"),
        (Some(t), None) => t,
        (None, Some(u)) => format!("?/{u}"),
        (None, None) => dash(),
    };
    let outcome = match (s("decision"), s("reason")) {
        (Some(d), Some(r)) => format!("{d}({r})"),
        (Some(d), None) => d,
        (None, Some(r)) => format!("?({r})"),
        (None, None) => dash(),
    };
    let status = v
        .get("upstream_status")
        .and_then(Value::as_u64)
        .map_or_else(dash, |n| n.to_string());
    let mut line = format!(
        "{time}  {stage:<9}  {who:<24}  {action:<30}  {project:<12}  {target:<36}  {outcome:<22}  {status:>3}  req={req}",
        stage = s("stage").unwrap_or_else(dash),
        action = s("action").unwrap_or_else(dash),
        project = s("project").unwrap_or_else(dash),
        target = s("target").unwrap_or_else(dash),
        req = s("request_id").unwrap_or_else(dash),
    );
    match v.get("result") {
        Some(Value::Object(r)) => {
            for (k, val) in r {
                line.push_str(&format!("  {}={}", clean(k), text(val)));
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => line.push_str(&format!("  result={}", text(other))),
    }
    if let Some(c) = s("client") {
        line.push_str(&format!("  from {c}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn since_accepts_durations_times_and_dates() {
        let now = parse_time("2026-11-23T17:00:00Z").unwrap();
        assert_eq!(
            parse_since("1h", now).unwrap(),
            parse_time("2026-11-23T16:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("30m", now).unwrap(),
            parse_time("2026-11-23T16:30:00Z").unwrap()
        );
        assert_eq!(
            parse_since("2026-11-20T10:00:00+09:00", now).unwrap(),
            parse_time("2026-11-20T01:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("2026-11-22", now).unwrap(),
            parse_time("2026-11-22T00:00:00Z").unwrap()
        );
        assert!(parse_since("yesterday-ish", now).is_err());
        assert!(parse_since("99999999999years", now).is_err());
    }

    #[test]
    fn action_patterns() {
        let p = ActionMatch::parse("instance.*").unwrap();
        assert!(p.matches(Some("instance.reboot")));
        assert!(!p.matches(Some("keypair.create")));
        assert!(!p.matches(None));
        let g = ActionMatch::parse("instance.power").unwrap();
        assert!(g.matches(Some("instance.stop")));
        assert!(!g.matches(Some("instance.delete")));
        assert!(ActionMatch::parse("instance.rebot").is_err());
        assert!(ActionMatch::parse("*").unwrap().matches(Some("zone.list")));
    }

    #[test]
    fn readable_line_answers_who_did_what() {
        let v = json!({
            "time": "2026-11-23T17:00:00.123456Z", "stage": "completed", "team": "web",
            "subject": "alice", "action": "instance.reboot", "project": "web-prod",
            "target": "3f2a9c1e", "decision": "allowed", "upstream_status": 202,
            "request_id": "req-1", "client": "10.0.0.7:5123",
            "result": {"instance_id": "i-9"},
        });
        let l = readable(&v);
        for part in [
            "2026-11-23T17:00:00Z",
            "completed",
            "web/alice",
            "instance.reboot",
            "web-prod",
            "3f2a9c1e",
            "allowed",
            "202",
            "req=req-1",
            "instance_id=i-9",
            "from 10.0.0.7:5123",
        ] {
            assert!(l.contains(part), "{part} in {l}");
        }
        let refused = readable(
            &json!({"decision": "refused", "reason": "auth:expired", "team": "x\u{1b}[31m"}),
        );
        assert!(refused.contains("refused(auth:expired)"));
        assert!(!refused.contains('\u{1b}'));
        // Nothing at all still prints a line.
        assert!(readable(&json!({})).starts_with('-'));
    }
}
