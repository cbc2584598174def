//! The audit log: `audit.log` in the store directory, one JSON object per line per key operation
//! (time, operation, key id and version, encryption context, outcome and error message).
//!
//! Lines are appended with `O_APPEND` (so concurrent processes never overwrite each other's lines)
//! and fsynced before the operation returns. Nothing secret is ever passed in: callers give ids,
//! versions, contexts (which KMS treats as non-secret, like CloudTrail does) and error messages,
//! which by construction never contain key material.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

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
    /// The grant that allowed a network request (its id), or why none applied (`none: …`);
    /// absent where no grant was looked at (admins, key scopes, local operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
}

/// Appends one record and fsyncs it.
pub fn append(dir: &Path, record: &AuditRecord) -> Result<(), KmsError> {
    let path = dir.join(AUDIT_FILE);
    let mut line = serde_json::to_vec(record).expect("an audit record serializes");
    line.push(b'\n');
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| KmsError::io("opening audit log", &path, e))?;
    // One write call per line: with O_APPEND the kernel places it atomically at the end.
    f.write_all(&line)
        .and_then(|_| f.sync_data())
        .map_err(|e| KmsError::io("writing audit log", &path, e))
}

/// The last `n` records (all if `n` is `None`), oldest first. Lines that do not parse (e.g. a
/// line cut short by a crash) are skipped rather than failing the whole read.
pub fn tail(dir: &Path, n: Option<usize>) -> Result<Vec<AuditRecord>, KmsError> {
    let path = dir.join(AUDIT_FILE);
    let f = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(KmsError::io("opening audit log", &path, e)),
    };
    let mut out = std::collections::VecDeque::new();
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| KmsError::io("reading audit log", &path, e))?;
        if let Ok(rec) = serde_json::from_str::<AuditRecord>(&line) {
            out.push_back(rec);
            if n.is_some_and(|n| out.len() > n) {
                out.pop_front();
            }
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
            grant: None,
        }
    }

    #[test]
    fn append_and_tail() {
        let dir = tempfile::tempdir().unwrap();
        assert!(tail(dir.path(), None).unwrap().is_empty());
        for i in 0..5 {
            append(dir.path(), &rec(&format!("op{i}"))).unwrap();
        }
        let t = tail(dir.path(), Some(2)).unwrap();
        assert_eq!(t, vec![rec("op3"), rec("op4")]);
        assert_eq!(tail(dir.path(), None).unwrap().len(), 5);
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        append(dir.path(), &rec("ok")).unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(AUDIT_FILE))
            .unwrap();
        f.write_all(b"{\"time\":\"2026").unwrap();
        assert_eq!(tail(dir.path(), None).unwrap(), vec![rec("ok")]);
    }
}
