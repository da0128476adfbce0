//! The audit log: hash chain, tampering, rotation, recovery, write errors,
//! concurrency, redaction and the `toastgate audit` commands.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::logs::Capture;
use common::tempdir::TempDir;
use serde_json::{Value, json};
use toastgate::action::Action;
use toastgate::audit::{
    self, AuditCommand, AuditError, AuditLog, AuditRecord, Decision, GENESIS, Owed, Stage,
};
use toastgate::config::{Audit, AuditFileConfig, AuditLevel, FsyncPolicy};

fn cfg(path: &Path, max_bytes: u64, keep: u32, fsync: FsyncPolicy) -> Audit {
    Audit {
        file: Some(AuditFileConfig {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            fsync,
        }),
        stdout: false,
        webhook: None,
        fail_closed: true,
        rules: Vec::new(),
        refusal_records: Default::default(),
    }
}

fn file_cfg(path: &Path) -> Audit {
    cfg(path, 100 * 1024 * 1024, 10, FsyncPolicy::Always)
}

fn rec(i: usize) -> AuditRecord {
    let mut r = AuditRecord::new(
        &format!("req-{i}"),
        Stage::Completed,
        AuditLevel::Metadata,
        "v2",
        Decision::Allowed,
    );
    r.team = Some("web".into());
    r.subject = Some("alice".into());
    r.client = Some("10.0.0.7:5123".into());
    r.action = Some("instance.reboot");
    r.project = Some("web-prod".into());
    r.target = Some(format!("inst-{i}"));
    r.upstream_status = Some(202);
    r.latency_ms = Some(12.5);
    r
}

async fn write_n(log: &AuditLog, range: std::ops::Range<usize>) {
    for i in range {
        log.write(rec(i), Owed::No).await.unwrap();
    }
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// Runs an audit command; returns (exit code, stdout, stderr).
fn cli(cmd: AuditCommand) -> (ExitCode, String, String) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let code = audit::run_cli_with(cmd, &mut out, &mut err, &|| false).unwrap();
    (
        code,
        String::from_utf8(out).unwrap(),
        String::from_utf8(err).unwrap(),
    )
}

fn verify_cmd(file: &Path, with_rotated: bool) -> (ExitCode, String, String) {
    cli(AuditCommand::Verify {
        file: file.to_path_buf(),
        with_rotated,
    })
}

#[test]
fn record_serializes_as_documented() {
    let mut r = AuditRecord::new(
        "req-1",
        Stage::Received,
        AuditLevel::Request,
        "v1.0",
        Decision::Refused,
    );
    r.reason = Some("auth:expired".into());
    let v: Value = serde_json::to_value(&r).unwrap();
    let time = v["time"].as_str().unwrap();
    assert_eq!(time.len(), "2026-11-23T17:00:00.123456Z".len(), "{time}");
    assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.');
    assert!(chrono::DateTime::parse_from_rfc3339(time).is_ok());
    assert_eq!(
        uuid::Uuid::parse_str(v["event_id"].as_str().unwrap())
            .unwrap()
            .get_version_num(),
        4
    );
    assert_eq!(v["stage"], "received");
    assert_eq!(v["level"], "request");
    assert_eq!(v["surface"], "v1.0");
    assert_eq!(v["decision"], "refused");
    assert_eq!(v["reason"], "auth:expired");
    assert_eq!(v["team"], Value::Null);
    assert_eq!(v["action"], Value::Null);
    for absent in ["request", "upstream_status", "result", "latency_ms"] {
        assert!(v.get(absent).is_none(), "{absent}");
    }
}

#[tokio::test]
async fn chain_verifies_and_each_record_is_one_line() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    assert!(log.is_enabled());
    write_n(&log, 0..10).await;
    log.flush().await.unwrap();
    assert_eq!(log.stats().written, 10);
    assert_eq!(log.stats().failed, 0);

    let ls = lines(&path);
    assert_eq!(ls.len(), 10);
    let mut prev = GENESIS.to_string();
    for (i, l) in ls.iter().enumerate() {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["request_id"], format!("req-{i}"));
        assert_eq!(v["prev_hash"], prev.as_str());
        assert!(l.ends_with(&format!(",\"hash\":{}}}", v["hash"])));
        prev = v["hash"].as_str().unwrap().to_string();
    }
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact());
    assert_eq!(report.records, 10);
    assert_eq!(report.first_prev.as_deref(), Some(GENESIS));
    assert_eq!(report.head.as_deref(), Some(prev.as_str()));

    let (code, out, _) = verify_cmd(&path, false);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.starts_with("ok: 10 records, chain intact"), "{out}");

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o007, 0, "world-accessible: {mode:o}");
    }
}

async fn five_line_file(dir: &TempDir) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    write_n(&log, 0..5).await;
    log.flush().await.unwrap();
    path
}

/// A five-record audit file after `edit` changed its lines: its folder and path.
async fn edited_five_line_file(edit: impl FnOnce(&mut Vec<String>)) -> (TempDir, PathBuf) {
    let dir = TempDir::new("audit");
    let path = five_line_file(&dir).await;
    let mut ls = lines(&path);
    edit(&mut ls);
    write_lines(&path, &ls);
    (dir, path)
}

fn assert_broken_at(path: &Path, line: u64, why: &str) {
    let report = audit::verify(path, false).unwrap();
    let broken = report.broken.expect("broken");
    assert_eq!(broken.line, line, "{broken}");
    assert_eq!(broken.file, path);
    assert!(broken.why.contains(why), "{broken}");
    assert_eq!(report.records, line - 1);
    let (code, out, _) = verify_cmd(path, false);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(
        out.contains(&format!("{} line {line}:", path.display())),
        "{out}"
    );
}

#[tokio::test]
async fn tampering_with_a_field_is_reported_at_that_line() {
    let (_dir, path) = edited_five_line_file(|ls| {
        ls[2] = ls[2].replace("\"team\":\"web\"", "\"team\":\"ops\"");
    })
    .await;
    assert_broken_at(&path, 3, "hash mismatch");
}

#[tokio::test]
async fn a_deleted_line_is_reported_where_the_chain_breaks() {
    let (_dir, path) = edited_five_line_file(|ls| {
        ls.remove(2);
    })
    .await;
    assert_broken_at(&path, 3, "prev_hash");
}

#[tokio::test]
async fn a_missing_head_is_detected_without_any_rotation() {
    let dir = TempDir::new("audit");
    let path = five_line_file(&dir).await;
    let ls = lines(&path);
    assert!(ls[0].contains("\"file_start\":true"), "{}", ls[0]);
    assert!(ls[1..].iter().all(|l| !l.contains("file_start")));
    // The first two records of a log that was never rotated are deleted.
    write_lines(&path, &ls[2..]);
    assert_broken_at(&path, 1, "records before it were removed");
    let (code, _, _) = verify_cmd(&path, true);
    assert_eq!(
        code,
        ExitCode::FAILURE,
        "no rotated file explains it either"
    );
    // Two files joined: a second file start in the middle.
    let mut joined = ls.clone();
    joined.extend(ls.iter().cloned());
    write_lines(&path, &joined);
    assert_broken_at(&path, 6, "files were joined");
}

#[tokio::test]
async fn reordered_lines_are_reported() {
    let (_dir, path) = edited_five_line_file(|ls| ls.swap(1, 2)).await;
    assert_broken_at(&path, 2, "prev_hash");
}

#[tokio::test]
async fn an_inserted_or_garbage_line_is_reported() {
    let (_dir, path) = edited_five_line_file(|ls| ls.insert(3, "{\"team\":\"evil\"}".into())).await;
    assert_broken_at(&path, 4, "");
    let mut ls = lines(&path);
    ls[3] = "\u{0}\u{1}not json at all".into();
    write_lines(&path, &ls);
    assert_broken_at(&path, 4, "");
}

#[test]
fn verify_exit_codes() {
    let dir = TempDir::new("audit");
    // Missing file: 2, with the path in the message.
    let missing = dir.join("missing.jsonl");
    let (code, _, err) = verify_cmd(&missing, false);
    assert_eq!(code, ExitCode::from(2));
    assert!(err.contains("missing.jsonl"), "{err}");
    // Empty file: intact.
    let empty = dir.join("empty.jsonl");
    fs::write(&empty, "").unwrap();
    let (code, out, _) = verify_cmd(&empty, true);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.starts_with("ok: 0 records, chain intact"));
    // Not an audit file at all: 1.
    let junk = dir.join("junk.jsonl");
    fs::write(&junk, "hello\nworld\n").unwrap();
    let (code, out, _) = verify_cmd(&junk, false);
    assert_eq!(code, ExitCode::FAILURE);
    assert!(out.contains("line 1"), "{out}");
}

/// Every request id 0..n exactly once across FILE and its rotated files.
fn assert_each_once(path: &Path, n: usize) {
    let mut files = vec![path.to_path_buf()];
    for i in 1.. {
        let p = PathBuf::from(format!("{}.{i}", path.display()));
        if !p.exists() {
            break;
        }
        files.push(p);
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for f in &files {
        for l in lines(f) {
            let v: Value = serde_json::from_str(&l).unwrap();
            *seen
                .entry(v["request_id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert_eq!(seen.len(), n, "distinct records");
    for i in 0..n {
        assert_eq!(seen.get(&format!("req-{i}")), Some(&1), "req-{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_loses_and_duplicates_nothing_and_the_chain_spans_files() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let max = 2_000;
    let log = AuditLog::open(&cfg(&path, max, 1_000, FsyncPolicy::Always)).unwrap();
    // Sequential and concurrent writes (batches straddle rotations).
    write_n(&log, 0..50).await;
    let mut tasks = Vec::new();
    for i in 50..150 {
        let log = log.clone();
        tasks.push(tokio::spawn(
            async move { log.write(rec(i), Owed::No).await },
        ));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    log.flush().await.unwrap();
    assert_eq!(log.stats().written, 150);

    let rotated = fs::read_dir(dir.path()).unwrap().count() - 1;
    assert!(rotated >= 20, "only {rotated} rotations");
    for e in fs::read_dir(dir.path()).unwrap() {
        let len = e.unwrap().metadata().unwrap().len();
        assert!(len <= max, "a file of {len} bytes");
    }
    assert_each_once(&path, 150);

    let report = audit::verify(&path, true).unwrap();
    assert!(report.is_intact(), "{:?}", report.broken);
    assert_eq!(report.records, 150);
    assert_eq!(report.files.len(), rotated + 1);
    assert_eq!(report.first_prev.as_deref(), Some(GENESIS));
    let (code, out, _) = verify_cmd(&path, true);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.starts_with("ok: 150 records, chain intact"), "{out}");
    // The current file alone verifies too: it starts with a file-start
    // record, which a rotation explains.
    let alone = audit::verify(&path, false).unwrap();
    assert!(alone.is_intact());
    assert_ne!(alone.first_prev.as_deref(), Some(GENESIS));
    // A rotated file with its head removed does not, checked alone.
    let f1 = PathBuf::from(format!("{}.1", path.display()));
    let whole = lines(&f1);
    assert!(whole.len() >= 2, "records are under half of max_bytes");
    write_lines(&f1, &whole[1..]);
    let broken = audit::verify(&f1, false)
        .unwrap()
        .broken
        .expect("a missing head is found");
    assert_eq!(
        (broken.file.clone(), broken.line),
        (f1.clone(), 1),
        "{broken}"
    );
    assert!(
        broken.why.contains("records before it were removed"),
        "{broken}"
    );
    write_lines(&f1, &whole);

    // Tampering in a rotated file is found with --with-rotated.
    let f3 = PathBuf::from(format!("{}.3", path.display()));
    let mut ls = lines(&f3);
    ls[0] = ls[0].replace("inst-", "inst-X");
    write_lines(&f3, &ls);
    let report = audit::verify(&path, true).unwrap();
    let broken = report.broken.unwrap();
    assert_eq!((broken.file, broken.line), (f3, 1));
}

#[tokio::test]
async fn rotation_honours_keep() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    // A leftover from a larger keep goes too.
    fs::write(format!("{}.7", path.display()), "old\n").unwrap();
    let log = AuditLog::open(&cfg(&path, 1_500, 2, FsyncPolicy::Never)).unwrap();
    write_n(&log, 0..60).await;
    log.flush().await.unwrap();
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]);
    let report = audit::verify(&path, true).unwrap();
    assert!(report.is_intact());
    assert!(report.records < 60);
    // Older records were rotated away: the chain starts mid-way.
    assert_ne!(report.first_prev.as_deref(), Some(GENESIS));
    let (code, out, _) = verify_cmd(&path, true);
    assert_eq!(code, ExitCode::SUCCESS);
    assert!(out.contains("rotated away"), "{out}");
}

#[tokio::test]
async fn keep_zero_keeps_only_the_current_file() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&cfg(&path, 1_500, 0, FsyncPolicy::Interval)).unwrap();
    write_n(&log, 0..20).await;
    log.flush().await.unwrap();
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    assert!(audit::verify(&path, true).unwrap().is_intact());
}

#[tokio::test]
async fn reopening_continues_the_chain() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    {
        let log = AuditLog::open(&file_cfg(&path)).unwrap();
        write_n(&log, 0..3).await;
        log.flush().await.unwrap();
    }
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    write_n(&log, 3..6).await;
    log.flush().await.unwrap();
    drop(log);
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact(), "{:?}", report.broken);
    assert_eq!(report.records, 6);
    assert_eq!(report.first_prev.as_deref(), Some(GENESIS));

    // Rotated away by hand (FILE missing): the head comes from FILE.1.
    fs::rename(&path, format!("{}.1", path.display())).unwrap();
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    write_n(&log, 6..8).await;
    log.flush().await.unwrap();
    let report = audit::verify(&path, true).unwrap();
    assert!(report.is_intact(), "{:?}", report.broken);
    assert_eq!(report.records, 8);
    assert_each_once(&path, 8);
}

#[tokio::test]
async fn a_torn_last_line_is_repaired_on_open() {
    let dir = TempDir::new("audit");
    let path = five_line_file(&dir).await;
    let full = fs::read_to_string(&path).unwrap();
    // A crash mid-write: half a line at the end.
    let torn = format!("{full}{{\"time\":\"2026-11-23T17:");
    fs::write(&path, &torn).unwrap();
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact() && report.incomplete_tail);
    assert_eq!(report.records, 5);
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    write_n(&log, 5..6).await;
    log.flush().await.unwrap();
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact(), "{:?}", report.broken);
    assert!(!report.incomplete_tail);
    assert_eq!(report.records, 6);
}

#[test]
fn a_corrupt_last_line_refuses_to_open() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    fs::write(&path, "{\"not\":\"an audit record\"}\n").unwrap();
    let err = AuditLog::open(&file_cfg(&path)).unwrap_err();
    assert!(matches!(err, AuditError::Corrupt(_)), "{err}");
    assert!(err.to_string().contains("audit.jsonl"), "{err}");
}

#[test]
fn open_fails_when_the_parent_is_a_file() {
    let dir = TempDir::new("audit");
    let file = dir.join("plain");
    fs::write(&file, "x").unwrap();
    let path = file.join("audit.jsonl");
    let err = AuditLog::open(&file_cfg(&path)).unwrap_err();
    assert!(matches!(err, AuditError::Io(_)), "{err}");
    assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
}

#[tokio::test]
async fn write_errors_are_counted_and_the_sink_recovers() {
    let dir = TempDir::new("audit");
    let sub = dir.join("logs");
    fs::create_dir(&sub).unwrap();
    let path = sub.join("audit.jsonl");
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    write_n(&log, 0..2).await;

    // The folder disappears: writes fail (not silently into the unlinked file).
    fs::remove_dir_all(&sub).unwrap();
    for i in 2..4 {
        let err = log.write(rec(i), Owed::No).await.unwrap_err();
        assert!(matches!(err, AuditError::Io(_)), "{err}");
        assert!(err.to_string().contains("audit.jsonl"), "{err}");
    }
    assert_eq!(log.stats().failed, 2);
    assert_eq!(log.stats().written, 2);

    // It comes back: the next record is written, the chain goes on.
    fs::create_dir(&sub).unwrap();
    write_n(&log, 4..6).await;
    log.flush().await.unwrap();
    assert_eq!(log.stats().written, 4);
    assert_eq!(log.stats().failed, 2);
    let ls = lines(&path);
    assert_eq!(ls.len(), 2);
    assert!(ls[0].contains("\"req-4\""));
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact());
    assert_ne!(report.first_prev.as_deref(), Some(GENESIS));

    // The path turned into something unwritable (a folder): Err again.
    fs::remove_file(&path).unwrap();
    fs::create_dir(&path).unwrap();
    assert!(log.write(rec(6), Owed::No).await.is_err());
    assert_eq!(log.stats().failed, 3);
    fs::remove_dir(&path).unwrap();
    log.write(rec(7), Owed::No).await.unwrap();
    assert!(audit::verify(&path, false).unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_keep_the_chain() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.write(rec(i), Owed::No).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Ok means written: no flush needed to see the lines.
    assert_eq!(lines(&path).len(), 200);
    assert_each_once(&path, 200);
    let report = audit::verify(&path, false).unwrap();
    assert!(report.is_intact());
    assert_eq!(report.records, 200);
    assert_eq!(log.stats().written, 200);
}

#[tokio::test]
async fn disabled_log_accepts_and_drops() {
    let log = AuditLog::disabled();
    assert!(!log.is_enabled());
    log.write(rec(0), Owed::No).await.unwrap();
    log.flush().await.unwrap();
    assert_eq!(log.stats().written, 0);
    let none = Audit {
        file: None,
        stdout: false,
        webhook: None,
        fail_closed: true,
        rules: Vec::new(),
        refusal_records: Default::default(),
    };
    assert!(!AuditLog::open(&none).unwrap().is_enabled());
}

const SECRETS: &[&str] = &[
    "USERDATA-S3CRET",
    "ADMINPASS-S3CRET",
    "PUBKEY-S3CRET",
    "PRIVKEY-S3CRET",
    "METAVALUE-S3CRET",
    "PERSONALITY-S3CRET",
    "TOKEN-S3CRET",
];

fn create_body() -> Value {
    json!({"server": {
        "name": "web-03",
        "imageRef": "img-ubuntu-2404",
        "flavorRef": "flv-m2-c4m8",
        "key_name": "ops-key",
        "availability_zone": "kr-pub-a",
        "min_count": 1,
        "max_count": 2,
        "networks": [{"uuid": "net-1", "secret": "TOKEN-S3CRET"}],
        "block_device_mapping_v2": [{
            "boot_index": 0, "source_type": "image", "destination_type": "volume",
            "volume_size": 50, "uuid": "img-ubuntu-2404", "password": "TOKEN-S3CRET"
        }],
        "security_groups": [{"name": "web-sg"}],
        "metadata": {"role": "METAVALUE-S3CRET", "owner": "METAVALUE-S3CRET"},
        "user_data": "IyEvYmluL3NoCmVjaG8gVVNFUkRBVEEtUzNDUkVU USERDATA-S3CRET",
        "personality": [{"path": "/etc/motd", "contents": "PERSONALITY-S3CRET"}],
        "adminPass": "ADMINPASS-S3CRET",
        "private_key": "PRIVKEY-S3CRET",
        "auth_token": "TOKEN-S3CRET",
    }})
}

#[test]
fn summarize_instance_create_keeps_safe_fields_only() {
    let s = audit::summarize(Action::InstanceCreate, &create_body());
    let text = s.to_string();
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    assert_eq!(s["name"], "web-03");
    assert_eq!(s["imageRef"], "img-ubuntu-2404");
    assert_eq!(s["flavorRef"], "flv-m2-c4m8");
    assert_eq!(s["key_name"], "ops-key");
    assert_eq!(s["availability_zone"], "kr-pub-a");
    assert_eq!(s["max_count"], 2);
    assert_eq!(s["networks"], json!([{"uuid": "net-1"}]));
    assert_eq!(
        s["block_device_mapping_v2"],
        json!([{"boot_index": 0, "source_type": "image", "destination_type": "volume",
                "volume_size": 50, "uuid": "img-ubuntu-2404"}])
    );
    assert_eq!(s["security_groups"], json!(["web-sg"]));
    assert_eq!(s["metadata_keys"], json!(["owner", "role"]));
    let ud = s["user_data"].as_str().unwrap();
    assert!(
        ud.starts_with("[redacted: ") && ud.ends_with(" bytes]"),
        "{ud}"
    );
    assert_eq!(s["adminPass"], "[redacted]");
    assert_eq!(
        s["personality"],
        json!([{"path": "/etc/motd", "contents": "[redacted: 18 bytes]"}])
    );
    assert!(s.get("private_key").is_none() && s.get("auth_token").is_none());
}

#[test]
fn summarize_keypair_create_hides_the_key() {
    let s = audit::summarize(
        Action::KeypairCreate,
        &json!({"keypair": {"name": "ops-key", "public_key": "ssh-ed25519 AAAA PUBKEY-S3CRET",
                            "private_key": "PRIVKEY-S3CRET"}}),
    );
    assert_eq!(s, json!({"name": "ops-key", "public_key_provided": true}));
    let s = audit::summarize(Action::KeypairCreate, &json!({"keypair": {"name": "gen"}}));
    assert_eq!(s, json!({"name": "gen", "public_key_provided": false}));
}

#[test]
fn summarize_update_and_server_actions() {
    let s = audit::summarize(
        Action::InstanceUpdate,
        &json!({"server": {"name": "web-04", "adminPass": "ADMINPASS-S3CRET"}}),
    );
    assert_eq!(s, json!({"name": "web-04"}));
    let s = audit::summarize(
        Action::InstanceReboot,
        &json!({"reboot": {"type": "SOFT", "token": "TOKEN-S3CRET"}}),
    );
    assert_eq!(s, json!({"type": "SOFT"}));
    let s = audit::summarize(
        Action::InstanceCreateImage,
        &json!({"createImage": {"name": "nightly", "metadata": {"k": "METAVALUE-S3CRET"}}}),
    );
    assert_eq!(s, json!({"name": "nightly", "metadata_keys": ["k"]}));
}

#[tokio::test]
async fn no_secret_reaches_the_file() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&file_cfg(&path)).unwrap();
    let mut r = rec(0);
    r.level = AuditLevel::Request;
    r.action = Some("instance.create");
    r.request = Some(audit::summarize(Action::InstanceCreate, &create_body()));
    r.result = Some(json!({"instance_id": "i-new"}));
    log.write(r, Owed::No).await.unwrap();
    let text = fs::read_to_string(&path).unwrap();
    for secret in SECRETS {
        assert!(!text.contains(secret), "{secret} leaked");
    }
    assert!(text.contains("web-03") && text.contains("i-new"));
}

/// A small file for query / tail: records at known times.
fn query_fixture(dir: &TempDir) -> PathBuf {
    let path = dir.join("audit.jsonl");
    let now = chrono::Utc::now();
    let at = |hours_ago: i64| {
        (now - chrono::Duration::hours(hours_ago))
            .format("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string()
    };
    let mut records = Vec::new();
    let mut add = |i: usize,
                   hours_ago: i64,
                   team: &str,
                   action: &'static str,
                   target: &str,
                   decision: Decision| {
        let mut r = rec(i);
        r.time = at(hours_ago);
        r.team = Some(team.into());
        r.action = Some(action);
        r.target = Some(target.into());
        r.decision = decision;
        if decision == Decision::Refused {
            r.reason = Some("policy:action".into());
            r.upstream_status = None;
        }
        records.push(r);
    };
    add(
        0,
        72,
        "web",
        "instance.reboot",
        "web-03-id",
        Decision::Allowed,
    );
    add(
        1,
        20,
        "web",
        "instance.reboot",
        "web-03-id",
        Decision::Allowed,
    );
    add(
        2,
        10,
        "batch",
        "instance.reboot",
        "web-03-id",
        Decision::Refused,
    );
    add(3, 5, "web", "keypair.create", "ops-key", Decision::Allowed);
    add(4, 2, "web", "instance.stop", "web-04-id", Decision::Allowed);
    add(
        5,
        1,
        "batch",
        "volume.attach",
        "web-03-id",
        Decision::Allowed,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = AuditLog::open(&file_cfg(&path)).unwrap();
        for r in records {
            log.write(r, Owed::No).await.unwrap();
        }
        log.flush().await.unwrap();
    });
    path
}

fn query(path: &Path, f: impl FnOnce(&mut QueryArgs)) -> Vec<String> {
    let mut a = QueryArgs::default();
    f(&mut a);
    let (code, out, _) = cli(AuditCommand::Query {
        file: path.to_path_buf(),
        team: a.team,
        action: a.action,
        project: None,
        target: a.target,
        since: a.since,
        decision: a.decision,
        json: a.json,
    });
    assert_eq!(code, ExitCode::SUCCESS);
    out.lines().map(str::to_string).collect()
}

#[derive(Default)]
struct QueryArgs {
    team: Option<String>,
    action: Option<String>,
    target: Option<String>,
    since: Option<String>,
    decision: Option<String>,
    json: bool,
}

fn req_ids(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("req="))
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn query_filters() {
    let dir = TempDir::new("audit");
    let path = query_fixture(&dir);
    assert_eq!(query(&path, |_| {}).len(), 6);
    // "Who rebooted web-03 in the last day?"
    let who = query(&path, |a| {
        a.action = Some("instance.reboot".into());
        a.target = Some("web-03-id".into());
        a.since = Some("24h".into());
    });
    assert_eq!(req_ids(&who), ["req-1", "req-2"]);
    assert!(
        who[0].contains("web/alice") && who[0].contains("allowed"),
        "{}",
        who[0]
    );
    assert!(who[1].contains("batch/alice") && who[1].contains("refused(policy:action)"));
    assert_eq!(
        req_ids(&query(&path, |a| a.team = Some("batch".into()))),
        ["req-2", "req-5"]
    );
    assert_eq!(
        req_ids(&query(&path, |a| a.action = Some("instance.*".into()))),
        ["req-0", "req-1", "req-2", "req-4"]
    );
    assert_eq!(
        req_ids(&query(&path, |a| a.action = Some("write".into()))).len(),
        6
    );
    assert_eq!(
        req_ids(&query(&path, |a| a.since = Some("3h".into()))),
        ["req-4", "req-5"]
    );
    assert_eq!(
        req_ids(&query(&path, |a| a.decision = Some("refused".into()))),
        ["req-2"]
    );
    assert_eq!(
        req_ids(&query(&path, |a| a.target = Some("web-0".into()))).len(),
        5
    );
    let json_lines = query(&path, |a| {
        a.team = Some("web".into());
        a.json = true;
    });
    assert_eq!(json_lines.len(), 4);
    for l in &json_lines {
        let v: Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["team"], "web");
        assert!(v["hash"].is_string());
    }
    // Nothing matches: empty stdout, a note on stderr.
    let (_, out, err) = cli(AuditCommand::Query {
        file: path.clone(),
        team: Some("nobody".into()),
        action: None,
        project: None,
        target: None,
        since: None,
        decision: None,
        json: false,
    });
    assert!(out.is_empty() && err.contains("no matching"));
    // Bad filters are clear errors.
    for (action, since, decision) in [
        (Some("instance.rebot"), None, None),
        (None, Some("last tuesday"), None),
        (None, None, Some("maybe")),
    ] {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let r = audit::run_cli_with(
            AuditCommand::Query {
                file: path.clone(),
                team: None,
                action: action.map(String::from),
                project: None,
                target: None,
                since: since.map(String::from),
                decision: decision.map(String::from),
                json: false,
            },
            &mut out,
            &mut err,
            &|| false,
        );
        assert!(r.is_err());
    }
}

#[test]
fn query_skips_garbage_lines_without_failing() {
    let dir = TempDir::new("audit");
    let path = query_fixture(&dir);
    let mut text = fs::read_to_string(&path).unwrap();
    text.push_str("garbage\n\n[1,2]\n");
    fs::write(&path, text).unwrap();
    let (code, out, err) = cli(AuditCommand::Query {
        file: path.clone(),
        team: None,
        action: None,
        project: None,
        target: None,
        since: None,
        decision: None,
        json: false,
    });
    assert_eq!(code, ExitCode::SUCCESS);
    assert_eq!(out.lines().count(), 6);
    assert!(err.contains("2 lines skipped"), "{err}");
}

#[test]
fn tail_prints_the_last_records() {
    let dir = TempDir::new("audit");
    let path = query_fixture(&dir);
    let (code, out, _) = cli(AuditCommand::Tail {
        file: path.clone(),
        lines: 2,
        follow: false,
    });
    assert_eq!(code, ExitCode::SUCCESS);
    let ls: Vec<String> = out.lines().map(str::to_string).collect();
    assert_eq!(req_ids(&ls), ["req-4", "req-5"]);
    assert!(ls[1].contains("volume.attach") && ls[1].contains("web-03-id"));
    let (_, out, _) = cli(AuditCommand::Tail {
        file: path,
        lines: 100,
        follow: false,
    });
    assert_eq!(out.lines().count(), 6);
}

#[tokio::test]
async fn tail_reaches_into_rotated_files() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&cfg(&path, 1_500, 100, FsyncPolicy::Always)).unwrap();
    write_n(&log, 0..30).await;
    log.flush().await.unwrap();
    let in_current = lines(&path).len();
    assert!(in_current < 12);
    let (_, out, _) = cli(AuditCommand::Tail {
        file: path.clone(),
        lines: 12,
        follow: false,
    });
    let ls: Vec<String> = out.lines().map(str::to_string).collect();
    let expected: Vec<String> = (18..30).map(|i| format!("req-{i}")).collect();
    assert_eq!(req_ids(&ls), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_sees_every_record_across_rotations() {
    let dir = TempDir::new("audit");
    let path = dir.join("audit.jsonl");
    let log = AuditLog::open(&cfg(&path, 1_500, 1_000, FsyncPolicy::Never)).unwrap();
    write_n(&log, 0..3).await;
    log.flush().await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let printed = Capture::default();
    let follower = {
        let (path, stop, mut out) = (path.clone(), stop.clone(), printed.clone());
        std::thread::spawn(move || {
            let mut err = Vec::new();
            audit::run_cli_with(
                AuditCommand::Tail {
                    file: path,
                    lines: 2,
                    follow: true,
                },
                &mut out,
                &mut err,
                &|| stop.load(Ordering::SeqCst),
            )
            .unwrap()
        })
    };
    // The initial tail is out before anything new is written.
    for _ in 0..500 {
        if printed.text().contains("req=req-2") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(req_ids(&printed.lines()), ["req-1", "req-2"]);
    // Many rotations between two polls, then a few slower ones.
    write_n(&log, 3..40).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    for i in 40..46 {
        log.write(rec(i), Owed::No).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    log.flush().await.unwrap();
    stop.store(true, Ordering::SeqCst);
    let code = follower.join().unwrap();
    assert_eq!(code, ExitCode::SUCCESS);
    let ls = printed.lines();
    let expected: Vec<String> = (1..46).map(|i| format!("req-{i}")).collect();
    assert_eq!(req_ids(&ls), expected);
}
