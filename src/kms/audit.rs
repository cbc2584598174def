//! The audit log: `audit.log` in the store directory, one JSON object per line per key operation
//! (time, operation, key id and version, encryption context, outcome and error message).
//!
//! Lines are appended with `O_APPEND`, one `write` per line, and fsynced before the operation
//! returns. Nothing secret is ever passed in: callers give ids, versions, contexts (which KMS
//! treats as non-secret, like CloudTrail does) and error messages, which by construction never
//! contain key material.
//!
//! The log rotates: an append that would take `audit.log` past [`AuditRotation::max_bytes`]
//! first renames `audit.log.N-1` → `audit.log.N` … `audit.log` → `audit.log.1` (dropping the
//! oldest beyond `keep`) and fsyncs the directory. Appending and rotating happen under one
//! exclusive `flock` on `audit.lock` (held by every process that appends: the CLI, `serve`,
//! `kms serve`), so a line is never written into a file being renamed, never torn, never lost;
//! readers take the same lock shared and read across the rotated files.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::store::AUDIT_FILE;
use super::{EncryptionContext, KmsError};

/// One audit log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339, UTC.
    pub time: String,
    /// The CLI name of the operation (`create-datakey`, `disable-key`, …).
    pub operation: String,
    /// The key as the caller named it (id or alias), when the operation names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_version: Option<u32>,
    #[serde(default, skip_serializing_if = "EncryptionContext::is_empty")]
    pub encryption_context: EncryptionContext,
    /// `success` or `error`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The name of the network credential (access key or token) that made the request; absent
    /// for local (CLI, attach) operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// The client's address, on aggregated lines of refused network requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// How many requests an aggregated line stands for (absent: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The grant that allowed a network request (its id), or why none applied (`none: …`);
    /// absent where no grant was looked at (admins, key scopes, local operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// Default size past which the log rotates.
pub const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: u32 = 4;
/// Rotated files looked for by readers (more than anyone keeps).
const MAX_ROTATED: u32 = 1000;
const LOCK_FILE: &str = "audit.lock";

/// When the audit log rotates and how many old files are kept (at least one: rotation never
/// throws the current log away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRotation {
    pub max_bytes: u64,
    pub keep: u32,
}

impl Default for AuditRotation {
    fn default() -> Self {
        AuditRotation {
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
        }
    }
}

/// `audit.log` (n = 0) or `audit.log.n`.
fn file_path(dir: &Path, n: u32) -> PathBuf {
    match n {
        0 => dir.join(AUDIT_FILE),
        n => dir.join(format!("{AUDIT_FILE}.{n}")),
    }
}

/// Holds the audit lock (exclusive to append or rotate, shared to read) until dropped.
fn lock(dir: &Path, exclusive: bool) -> Result<File, KmsError> {
    let path = dir.join(LOCK_FILE);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| KmsError::io("opening audit lock", &path, e))?;
    if exclusive { f.lock() } else { f.lock_shared() }
        .map_err(|e| KmsError::io("locking audit log", &path, e))?;
    Ok(f)
}

fn open_append(path: &Path) -> Result<File, KmsError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KmsError::io("opening audit log", path, e))
}

/// Shifts `audit.log.k` → `audit.log.k+1` (the oldest beyond `keep` is removed), then
/// `audit.log` → `audit.log.1`. The caller holds the exclusive lock.
fn rotate(dir: &Path, keep: u32) -> Result<(), KmsError> {
    let keep = keep.max(1);
    let oldest = file_path(dir, keep);
    match std::fs::remove_file(&oldest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(KmsError::io("removing old audit log", &oldest, e)),
    }
    for n in (0..keep).rev() {
        let (from, to) = (file_path(dir, n), file_path(dir, n + 1));
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(KmsError::io("rotating audit log", &from, e)),
        }
    }
    Ok(())
}

/// Appends one record and fsyncs it, rotating first when the log would pass the size.
pub fn append(dir: &Path, record: &AuditRecord, rotation: &AuditRotation) -> Result<(), KmsError> {
    let path = dir.join(AUDIT_FILE);
    let mut line = serde_json::to_vec(record).expect("an audit record serializes");
    line.push(b'\n');
    let f = {
        let _lock = lock(dir, true)?;
        let mut f = open_append(&path)?;
        let size = f
            .metadata()
            .map_err(|e| KmsError::io("reading audit log size", &path, e))?
            .len();
        if size > 0 && size + line.len() as u64 > rotation.max_bytes {
            rotate(dir, rotation.keep)?;
            f = open_append(&path)?;
            super::store::sync_dir(dir)?;
        }
        // One write call per line: with O_APPEND the kernel places it atomically at the end.
        f.write_all(&line)
            .map_err(|e| KmsError::io("writing audit log", &path, e))?;
        f
    };
    // The fsync runs outside the lock, so concurrent appenders share the file system's commits
    // instead of queueing one fsync each. A rotation in between only renames the file; this
    // descriptor still syncs the inode that holds the line (the rename is synced by the rotator).
    f.sync_data()
        .map_err(|e| KmsError::io("syncing audit log", &path, e))
}

/// The last `n` records (all if `n` is `None`), oldest first, across the rotated files. Lines
/// that do not parse (e.g. a line cut short by a crash) are skipped rather than failing the
/// whole read.
pub fn tail(dir: &Path, n: Option<usize>) -> Result<Vec<AuditRecord>, KmsError> {
    if !dir.join(AUDIT_FILE).exists() && !file_path(dir, 1).exists() {
        return Ok(Vec::new());
    }
    // Shared, so a rotation cannot move files under the reader; a reader that may not create
    // the lock file (a read-only directory) still reads, only without that guarantee.
    let _lock = lock(dir, false).ok();
    // Newest file first; stop once `n` records are in hand.
    let mut out = std::collections::VecDeque::new();
    for k in 0..=MAX_ROTATED {
        if n.is_some_and(|n| out.len() >= n) {
            break;
        }
        let path = file_path(dir, k);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && k > 0 => break,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(KmsError::io("opening audit log", &path, e)),
        };
        let want = n.map(|n| n - out.len());
        let mut older = std::collections::VecDeque::new();
        for line in BufReader::new(f).lines() {
            let line = line.map_err(|e| KmsError::io("reading audit log", &path, e))?;
            if let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) {
                older.push_back(rec);
                if want.is_some_and(|w| older.len() > w) {
                    older.pop_front();
                }
            }
        }
        while let Some(rec) = older.pop_back() {
            out.push_front(rec);
        }
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: &str) -> AuditRecord {
        AuditRecord {
            time: "2026-01-01T00:00:00Z".into(),
            operation: op.into(),
            key: None,
            key_id: None,
            key_version: None,
            encryption_context: EncryptionContext::new(),
            outcome: "success".into(),
            error: None,
            credential: None,
            source: None,
            count: None,
            grant: None,
        }
    }

    #[test]
    fn append_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        assert!(tail(dir.path(), None).unwrap().is_empty());
        for i in 0..5 {
            append(
                dir.path(),
                &rec(&format!("op{i}")),
                &AuditRotation::default(),
            )
            .unwrap();
        }
        let t = tail(dir.path(), Some(2)).unwrap();
        assert_eq!(t, vec![rec("op3"), rec("op4")]);
        assert_eq!(tail(dir.path(), None).unwrap().len(), 5);
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &rec("ok"), &AuditRotation::default()).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .unwrap();
        f.write_all(b"{\"time\":\"2026").unwrap();
        assert_eq!(tail(dir.path(), None).unwrap(), vec![rec("ok")]);
    }

    #[test]
    fn rotation_keeps_every_line_whole_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let line_len = serde_json::to_vec(&rec("op000")).unwrap().len() as u64 + 1;
        // Three lines per file; keep 3 rotated files.
        let rot = AuditRotation {
            max_bytes: 3 * line_len,
            keep: 3,
        };
        for i in 0..11 {
            append(dir.path(), &rec(&format!("op{i:03}")), &rot).unwrap();
        }
        // 11 lines of at most 3 per file: audit.log.3, .2, .1 hold 0-2, 3-5, 6-8; audit.log 9-10.
        let sizes: Vec<u64> = (0..=3)
            .map(|k| std::fs::metadata(file_path(dir.path(), k)).unwrap().len())
            .collect();
        assert!(
            sizes
                .iter()
                .all(|s| *s <= 3 * line_len && *s % line_len == 0),
            "{sizes:?}"
        );
        assert!(!file_path(dir.path(), 4).exists());
        // All 11 are still readable, in order.
        let all: Vec<String> = tail(dir.path(), None)
            .unwrap()
            .into_iter()
            .map(|r| r.operation)
            .collect();
        let want: Vec<String> = (0..11).map(|i| format!("op{i:03}")).collect();
        assert_eq!(all, want);
        // A tail that spans the boundary between the current file and audit.log.1.
        let last4: Vec<String> = tail(dir.path(), Some(4))
            .unwrap()
            .into_iter()
            .map(|r| r.operation)
            .collect();
        assert_eq!(last4, ["op007", "op008", "op009", "op010"]);
        // One more rotation drops the oldest file: lines 0-2 go, 3.. stay.
        for i in 11..13 {
            append(dir.path(), &rec(&format!("op{i:03}")), &rot).unwrap();
        }
        let all = tail(dir.path(), None).unwrap();
        assert_eq!(all.first().unwrap().operation, "op003");
        assert_eq!(all.len(), 10);
    }

    #[test]
    fn concurrent_appends_with_rotation_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let rot = AuditRotation {
            max_bytes: 2000,
            keep: 1000,
        };
        std::thread::scope(|s| {
            for t in 0..4 {
                let d = dir.path();
                s.spawn(move || {
                    for i in 0..50 {
                        append(d, &rec(&format!("t{t}-{i}")), &rot).unwrap();
                    }
                });
            }
        });
        let all = tail(dir.path(), None).unwrap();
        assert_eq!(
            all.len(),
            200,
            "every line of every writer survives rotation"
        );
        let mut ops: Vec<String> = all.into_iter().map(|r| r.operation).collect();
        ops.sort();
        ops.dedup();
        assert_eq!(ops.len(), 200);
        assert!(file_path(dir.path(), 2).exists(), "it did rotate");
    }
}
