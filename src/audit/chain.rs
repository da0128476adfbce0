//! The hash chain: how a record becomes a line, and how lines are checked.
//!
//! # Definition
//! Let `R` be the record serialized by serde_json (compact, one JSON object,
//! `{...}`), and `P` the `hash` of the record before it: 64 lowercase hex
//! digits, or [`GENESIS`] (64 zeros) for the first record ever. Then
//!
//! ```text
//! B    = R without its closing "}"  +  ,"prev_hash":"P"}
//! H    = lowercase_hex( SHA-256( P + "\n" + B ) )
//! line = B without its closing "}"  +  ,"hash":"H"}  +  "\n"
//! ```
//!
//! So every line is `{<record members>,"prev_hash":"P","hash":"H"}`, with
//! `hash` always the last member and `prev_hash` the one before it. `B` is
//! exactly the line with its final `,"hash":"H"` member cut off.
//!
//! # Checking
//! `check_line` works on the bytes as stored: it cuts the final
//! `,"hash":"<64 hex>"}`, puts the `}` back, recomputes `H` and compares. Any
//! change to any byte of a line (a field, even whitespace) breaks that line's
//! hash; removing, inserting or reordering lines breaks the `prev_hash` link
//! of the line after the change (see [`verify`]).
//!
//! The chain is tamper-evident, not tamper-proof: it is unkeyed, so whoever
//! can write the file can recompute every hash after an edit, and dropping
//! records from the very end leaves no trace in the file itself. Ship the
//! lines elsewhere (the stdout sink) or record the head hash out of band for
//! that.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::AuditError;

/// `FILE.n`.
pub(crate) fn rotated_path(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// The rotated files of `path` that exist, newest first (`FILE.1`, `FILE.2`,
/// ...), stopping at the first number missing.
pub(crate) fn rotated_files(path: &Path) -> Vec<PathBuf> {
    (1..=u32::MAX)
        .map(|n| rotated_path(path, n))
        .take_while(|p| p.is_file())
        .collect()
}

/// The member the writer adds (inside the sealed part) to the first record
/// of every file it starts: the genesis file and each file after a rotation
/// or a re-creation. A file whose first line lacks it, and does not start at
/// [`GENESIS`], has lost its head.
pub const FILE_START: &str = "file_start";

/// `record_json` (one JSON object) marked as the first record of a file.
pub(crate) fn mark_file_start(record_json: &str) -> String {
    let open = record_json.strip_suffix('}').unwrap_or(record_json);
    let sep = if open.len() > 1 { "," } else { "" };
    format!("{open}{sep}\"{FILE_START}\":true}}")
}

/// `prev_hash` of the first record ever.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_SUFFIX_HEAD: &str = ",\"hash\":\"";
/// `,"hash":"` + 64 hex + `"}`.
const HASH_SUFFIX_LEN: usize = HASH_SUFFIX_HEAD.len() + 64 + 2;
const PREV_HEAD: &str = "\"prev_hash\":\"";

/// Bytes the seal adds to a record's JSON: `,"prev_hash":"P"` and
/// `,"hash":"H"` (the closing `}` stays) and the newline.
pub(crate) const SEAL_OVERHEAD: usize =
    (1 + PREV_HEAD.len() + 64 + 1) + (HASH_SUFFIX_HEAD.len() + 64 + 1) + 1;

/// Longest line the readers accept (a record is a few KiB at most).
pub(crate) const MAX_LINE: usize = 16 * 1024 * 1024;

pub(crate) struct Sealed {
    /// The line, with its trailing newline.
    pub line: String,
    pub hash: String,
}

/// Seals one serialized record (a JSON object) after `prev`.
pub(crate) fn seal(record_json: &str, prev: &str) -> Sealed {
    let open = record_json.strip_suffix('}').unwrap_or(record_json);
    let sep = if open.len() > 1 { "," } else { "" };
    let body = format!("{open}{sep}{PREV_HEAD}{prev}\"}}");
    let hash = digest(prev, &body);
    let mut line = body;
    line.pop();
    line.push_str(HASH_SUFFIX_HEAD);
    line.push_str(&hash);
    line.push_str("\"}\n");
    Sealed { line, hash }
}

fn digest(prev: &str, body: &str) -> String {
    let mut h = Sha256::new();
    h.update(prev.as_bytes());
    h.update(b"\n");
    h.update(body.as_bytes());
    let out = h.finalize();
    let mut hex = String::with_capacity(64);
    for b in out {
        hex.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        hex.push(char::from_digit(u32::from(b & 0xf), 16).unwrap_or('0'));
    }
    hex
}

fn is_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The chain members of a line that checked out on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub prev_hash: String,
    pub hash: String,
    /// The record says it is the first line of its file (see [`FILE_START`]).
    pub file_start: bool,
}

/// Checks one line (without its newline) on its own: its form, that it is a
/// JSON object, and its own hash. The link to the line before is the caller's.
pub(crate) fn check_line(line: &str) -> Result<Link, String> {
    if line.trim().is_empty() {
        return Err("empty line".into());
    }
    let cut = line
        .len()
        .checked_sub(HASH_SUFFIX_LEN)
        .ok_or("too short for an audit record")?;
    let (open, suffix) = (line.get(..cut), line.get(cut..));
    let (Some(open), Some(suffix)) = (open, suffix) else {
        return Err("no `hash` member at the end of the line".into());
    };
    let hash = suffix
        .strip_prefix(HASH_SUFFIX_HEAD)
        .and_then(|s| s.strip_suffix("\"}"))
        .filter(|h| is_hash(h))
        .ok_or("no `hash` member at the end of the line")?;
    let prev_start = open
        .len()
        .checked_sub(PREV_HEAD.len() + 64 + 1)
        .ok_or("no `prev_hash` member before `hash`")?;
    let prev = open
        .get(prev_start..)
        .and_then(|s| s.strip_prefix(PREV_HEAD))
        .and_then(|s| s.strip_suffix('"'))
        .filter(|p| is_hash(p))
        .ok_or("no `prev_hash` member before `hash`")?;
    let parsed: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let members_agree = parsed.get("hash").and_then(|v| v.as_str()) == Some(hash)
        && parsed.get("prev_hash").and_then(|v| v.as_str()) == Some(prev);
    if !parsed.is_object() || !members_agree {
        return Err("`hash` / `prev_hash` members are ambiguous".into());
    }
    let body = format!("{open}}}");
    if digest(prev, &body) != hash {
        return Err("hash mismatch: the line was changed after it was written".into());
    }
    Ok(Link {
        prev_hash: prev.to_string(),
        hash: hash.to_string(),
        file_start: parsed.get(FILE_START) == Some(&serde_json::Value::Bool(true)),
    })
}

/// Where a chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub file: PathBuf,
    /// 1-based line number in `file`.
    pub line: u64,
    pub why: String,
}

impl std::fmt::Display for BrokenLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} line {}: {}",
            self.file.display(),
            self.line,
            self.why
        )
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// Files checked, in chain order (oldest first).
    pub files: Vec<PathBuf>,
    /// Records whose hash and link checked out (up to the break, if any).
    pub records: u64,
    /// `prev_hash` of the first record checked: [`GENESIS`] when the chain
    /// starts there, else the hash of a record in a file no longer present.
    pub first_prev: Option<String>,
    /// `hash` of the last record checked.
    pub head: Option<String>,
    /// The first broken link, if any.
    pub broken: Option<BrokenLink>,
    /// The newest file ends in a partial line (being written, or torn by a
    /// crash; the writer drops it when it next opens the file). Not counted.
    pub incomplete_tail: bool,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

/// Checks the hash chain of `file` and, with `with_rotated`, of its rotated
/// files before it (`FILE.N` ... `FILE.1`, then `FILE`). Each file must
/// begin with a record marked [`FILE_START`] (or one at [`GENESIS`]), and no
/// other record may carry the mark: records removed from the head of a file
/// are detected even when no rotation is involved. Errors only when a file
/// cannot be read.
pub fn verify(file: &Path, with_rotated: bool) -> Result<VerifyReport, AuditError> {
    let mut files: Vec<PathBuf> = if with_rotated {
        rotated_files(file).into_iter().rev().collect()
    } else {
        Vec::new()
    };
    files.push(file.to_path_buf());
    let mut report = VerifyReport {
        files: files.clone(),
        ..VerifyReport::default()
    };
    let mut prev: Option<String> = None;
    let last = files.len() - 1;
    for (i, path) in files.iter().enumerate() {
        let f = File::open(path).map_err(|e| AuditError::io("opening", path, &e))?;
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        let mut n: u64 = 0;
        loop {
            buf.clear();
            let read = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .map_err(|e| AuditError::io("reading", path, &e))?;
            if read == 0 {
                break;
            }
            n += 1;
            let terminated = buf.last() == Some(&b'\n');
            if terminated {
                buf.pop();
            }
            let broken = |why: String| BrokenLink {
                file: path.clone(),
                line: n,
                why,
            };
            if buf.len() > MAX_LINE {
                report.broken = Some(broken(format!("line longer than {MAX_LINE} bytes")));
                return Ok(report);
            }
            let checked = std::str::from_utf8(&buf)
                .map_err(|_| "not UTF-8".to_string())
                .and_then(check_line);
            let link = match checked {
                Ok(link) => link,
                Err(_) if !terminated && i == last => {
                    report.incomplete_tail = true;
                    break;
                }
                Err(why) => {
                    report.broken = Some(broken(why));
                    return Ok(report);
                }
            };
            if n == 1 && !link.file_start && link.prev_hash != GENESIS {
                report.broken = Some(broken(
                    "the first record of the file does not start it: records before it were removed \
                     (or the file was written by a toastgate older than the file_start mark)"
                        .into(),
                ));
                return Ok(report);
            }
            if n > 1 && link.file_start {
                report.broken = Some(broken(
                    "a file-start record in the middle of the file: files were joined".into(),
                ));
                return Ok(report);
            }
            match &prev {
                None => report.first_prev = Some(link.prev_hash.clone()),
                Some(p) if *p != link.prev_hash => {
                    report.broken = Some(broken(format!(
                        "prev_hash does not match the hash of the record before it \
                         (a record was removed, inserted or reordered here): expected {}, \
                         found {}",
                        short(p),
                        short(&link.prev_hash)
                    )));
                    return Ok(report);
                }
                Some(_) => {}
            }
            if !terminated && i != last {
                report.broken = Some(broken(
                    "incomplete last line (no newline) in a rotated file".into(),
                ));
                return Ok(report);
            }
            report.records += 1;
            report.head = Some(link.hash.clone());
            prev = Some(link.hash);
        }
    }
    Ok(report)
}

pub(crate) fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_check() {
        let a = seal(r#"{"x":1,"y":"z"}"#, GENESIS);
        assert!(a.line.ends_with("\"}\n"));
        assert_eq!(a.line.len(), r#"{"x":1,"y":"z"}"#.len() + SEAL_OVERHEAD);
        let link = check_line(a.line.trim_end()).unwrap();
        assert_eq!(link.prev_hash, GENESIS);
        assert_eq!(link.hash, a.hash);
        let v: serde_json::Value = serde_json::from_str(&a.line).unwrap();
        assert_eq!(v["prev_hash"], GENESIS);
        assert_eq!(v["hash"], a.hash.as_str());

        let b = seal(r#"{"x":2}"#, &a.hash);
        assert_eq!(check_line(b.line.trim_end()).unwrap().prev_hash, a.hash);
    }

    #[test]
    fn hash_is_the_documented_digest() {
        let s = seal(r#"{"a":1}"#, GENESIS);
        let body = format!("{{\"a\":1,\"prev_hash\":\"{GENESIS}\"}}");
        let mut h = Sha256::new();
        h.update(format!("{GENESIS}\n{body}").as_bytes());
        let expected: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(s.hash, expected);
        assert_eq!(
            s.line,
            format!("{{\"a\":1,\"prev_hash\":\"{GENESIS}\",\"hash\":\"{expected}\"}}\n")
        );
    }

    #[test]
    fn empty_object_seals() {
        let s = seal("{}", GENESIS);
        assert!(s.line.starts_with("{\"prev_hash\""));
        assert!(check_line(s.line.trim_end()).is_ok());
    }

    #[test]
    fn edits_and_garbage_are_refused_without_panicking() {
        let s = seal(r#"{"team":"web","n":1}"#, GENESIS);
        let line = s.line.trim_end();
        let edited = line.replace("\"web\"", "\"ops\"");
        assert!(check_line(&edited).unwrap_err().contains("hash mismatch"));
        let spaced = line.replacen(',', ", ", 1);
        assert!(check_line(&spaced).is_err());
        for bad in [
            "",
            "   ",
            "{",
            "not json at all",
            "{\"hash\":\"x\"}",
            "ééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééééé",
            &line[..line.len() - 3],
        ] {
            assert!(check_line(bad).is_err(), "{bad:?}");
        }
    }
}
