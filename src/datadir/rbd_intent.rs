//! Crash safety for the two-step RBD operations. Creating (or importing) an RBD volume makes an
//! image in the cluster and then writes its reference in the data directory; deleting removes the
//! image and then the reference. A crash between the steps would leave an image nobody knows
//! about, or a reference to nothing. So each operation first writes an intent record,
//! `volumes/.NAME.rbd-intent` (JSON: the operation, the image, and for a create the new volume's
//! id), fsynced before the cluster is touched and removed once both steps are done.
//!
//! The record is `flock`ed by the process doing the work, so a record whose lock can be taken
//! belongs to a process that died. The next RBD create, import or delete, and `cryptnbd check
//! --repair`, resolve such records (`check` alone reports them):
//! - an interrupted **create**: if the reference exists, the create completed. Otherwise the image
//!   is removed only when it can be proven ours — its header carries the volume id the record
//!   names (the id is random, chosen before the image was made). An image without a readable
//!   header (a crash between making and formatting it) cannot be told from someone else's image
//!   of that name, so it is reported with the `rbd rm` command and left alone; an image with
//!   another volume's header is not ours and is left alone.
//! - an interrupted **delete**: if the image is gone, the delete is completed by removing the
//!   reference; if the image and the reference are both still there, nothing had happened and the
//!   volume is kept (a delete that did not happen is safer than one that happens later).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::PathBuf;

use uuid::Uuid;

use super::{check_name, io_err, sync_dir, DataDir, DataDirError};
use crate::backend::rbd::{self as rbd, Access, RbdBackend, RbdError, RbdLocation};
use crate::volume::VolumeHeader;

const INTENT_KIND: &str = "cryptnbd-rbd-intent";
const INTENT_SUFFIX: &str = ".rbd-intent";
/// Records are small; anything bigger is not one of ours.
const MAX_INTENT_LEN: u64 = 64 * 1024;

/// The environment variable naming a failpoint (debug builds only): the process aborts there.
pub const FAILPOINT_ENV: &str = "CRYPTNBD_FAILPOINT";

/// Aborts the process (no unwinding, no cleanup: like a crash) when `CRYPTNBD_FAILPOINT` names
/// `point`. Compiled to nothing in release builds; tests use it to crash between two steps.
pub(super) fn failpoint(point: &str) {
    if cfg!(debug_assertions) && std::env::var(FAILPOINT_ENV).is_ok_and(|v| v == point) {
        eprintln!("cryptnbd: failpoint {point}: aborting");
        std::process::abort();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Op {
    Create,
    Delete,
    /// A clone of an RBD snapshot: like a create, but the new image starts as a copy-on-write
    /// clone carrying its parent's header until the clone's own is written.
    Clone,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    kind: String,
    version: u32,
    op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    volume_id: Option<Uuid>,
    /// For a clone: the parent snapshot's volume id, which the new image's header names until
    /// the clone's own header is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent_volume_id: Option<Uuid>,
    #[serde(flatten)]
    location: RbdLocation,
}

/// An intent record this process holds (locked) while it works; [`Intent::finish`] removes it.
/// Dropped without `finish` (an error path that could not undo its work), it stays for recovery.
pub(super) struct Intent {
    path: PathBuf,
    _lock: File,
}

impl Intent {
    /// Removes the record: the operation is complete (or fully undone).
    pub(super) fn finish(self, dd: &DataDir) -> Result<(), DataDirError> {
        std::fs::remove_file(&self.path)
            .map_err(io_err("removing the intent record", &self.path))?;
        sync_dir(&dd.volumes_dir())
    }
}

/// What resolving (or, for a dry run, inspecting) one intent record found.
#[derive(Debug, Clone)]
pub struct IntentFinding {
    /// The volume name the record is for.
    pub name: String,
    pub message: String,
    /// Whether it needs the operator (or `--repair`): false for an operation still in progress.
    pub problem: bool,
    /// Whether the record was resolved (completed or rolled back) and removed.
    pub resolved: bool,
}

/// What to do about a record.
enum Action {
    /// Only drop the record.
    Forget,
    RemoveImage,
    RemoveReference,
    /// Leave everything (the operator must decide).
    Keep,
}

impl DataDir {
    fn intent_path(&self, name: &str) -> Result<PathBuf, DataDirError> {
        check_name(name)?;
        Ok(self.volumes_dir().join(format!(".{name}{INTENT_SUFFIX}")))
    }

    /// Writes and fsyncs the intent record for `op` on `name` before the cluster is touched. The
    /// record appears complete (written under a temporary name, locked, then linked into place)
    /// or not at all; an unresolved earlier record for `name` refuses the operation.
    pub(super) fn begin_intent(
        &self,
        name: &str,
        op: Op,
        loc: &RbdLocation,
        volume_id: Option<Uuid>,
    ) -> Result<Intent, DataDirError> {
        self.begin_intent_with(name, op, loc, volume_id, None)
    }

    /// [`DataDir::begin_intent`] naming also the parent snapshot's volume id (a clone).
    pub(super) fn begin_intent_with(
        &self,
        name: &str,
        op: Op,
        loc: &RbdLocation,
        volume_id: Option<Uuid>,
        parent_volume_id: Option<Uuid>,
    ) -> Result<Intent, DataDirError> {
        let path = self.intent_path(name)?;
        let dir = self.volumes_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io_err("creating the volumes directory", &dir))?;
        let body = serde_json::to_vec_pretty(&Record {
            kind: INTENT_KIND.into(),
            version: 1,
            op,
            volume_id,
            parent_volume_id,
            location: loc.clone(),
        })
        .map_err(|e| DataDirError::Invalid {
            name: name.to_string(),
            reason: format!("cannot encode the intent record: {e}"),
        })?;
        let tmp = dir.join(format!(".{name}{INTENT_SUFFIX}.{}.tmp", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err("creating the intent record", &tmp))?;
        let linked = file
            .try_lock()
            .map_err(io::Error::from)
            .and_then(|()| (&file).write_all(&body))
            .and_then(|()| file.sync_all())
            .map_err(io_err("writing the intent record", &tmp))
            .and_then(|()| {
                std::fs::hard_link(&tmp, &path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        DataDirError::Invalid {
                            name: name.to_string(),
                            reason: format!(
                                "an earlier create or delete of this volume was interrupted and is not resolved yet ({}): `cryptnbd check` says what is left to do",
                                path.display()
                            ),
                        }
                    } else {
                        io_err("linking the intent record to", &path)(e)
                    }
                })
            });
        let _ = std::fs::remove_file(&tmp);
        linked?;
        sync_dir(&dir)?;
        Ok(Intent { path, _lock: file })
    }

    /// Resolves every intent record left by a process that died (`apply`), or only says what
    /// resolving would do (`!apply`, for `check`). Records still locked by a live process are
    /// reported as in progress and left alone.
    pub fn rbd_intents(&self, apply: bool) -> Result<Vec<IntentFinding>, DataDirError> {
        let dir = self.volumes_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("listing", &dir)(e)),
        };
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.to_string();
                let name = n.strip_prefix('.')?.strip_suffix(INTENT_SUFFIX)?;
                check_name(name).is_ok().then(|| name.to_string())
            })
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            out.extend(self.resolve_intent(&name, apply)?);
        }
        Ok(out)
    }

    /// [`DataDir::rbd_intents`] before a create or delete: resolves what it can and logs it.
    pub(super) fn resolve_stale_intents(&self) {
        match self.rbd_intents(true) {
            Ok(found) => {
                for f in found {
                    if f.resolved {
                        tracing::info!(volume = %f.name, "interrupted RBD operation resolved: {}", f.message);
                    } else {
                        tracing::warn!(volume = %f.name, "interrupted RBD operation: {}", f.message);
                    }
                }
            }
            Err(e) => tracing::warn!("cannot look for interrupted RBD operations: {e}"),
        }
    }

    fn resolve_intent(
        &self,
        name: &str,
        apply: bool,
    ) -> Result<Option<IntentFinding>, DataDirError> {
        let path = self.intent_path(name)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("opening the intent record", &path)(e)),
        };
        let finding = |problem: bool, resolved: bool, message: String| IntentFinding {
            name: name.to_string(),
            message,
            problem,
            resolved,
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Ok(Some(finding(false, false, format!(
                    "a create or delete of this RBD volume is in progress (its intent record {} is held by a running process)",
                    path.display()
                ))))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err("locking the intent record", &path)(e))
            }
        }
        // The owner may have finished and removed the record between our open and our lock.
        let same = std::fs::metadata(&path)
            .ok()
            .zip(file.metadata().ok())
            .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
        if !same {
            return Ok(None);
        }
        let mut body = Vec::new();
        (&mut file)
            .take(MAX_INTENT_LEN + 1)
            .read_to_end(&mut body)
            .map_err(io_err("reading the intent record", &path))?;
        let record = match serde_json::from_slice::<Record>(&body) {
            Ok(r)
                if r.kind == INTENT_KIND
                    && r.version == 1
                    && body.len() as u64 <= MAX_INTENT_LEN =>
            {
                r
            }
            Ok(_) => {
                return Ok(Some(finding(
                    true,
                    false,
                    format!(
                        "{} is not an intent record this version understands; left alone",
                        path.display()
                    ),
                )))
            }
            Err(e) => {
                return Ok(Some(finding(
                    true,
                    false,
                    format!(
                        "{} is not a valid intent record ({e}); left alone",
                        path.display()
                    ),
                )))
            }
        };
        let loc = &record.location;
        let (action, what) = match self.decide(name, &record) {
            Ok(d) => d,
            Err(e) => {
                return Ok(Some(finding(
                    true,
                    false,
                    format!(
                        "an interrupted {} of {loc} could not be looked at: {e}",
                        op_name(record.op)
                    ),
                )))
            }
        };
        let what = format!("an interrupted {} of {loc}: {what}", op_name(record.op));
        if matches!(action, Action::Keep) {
            return Ok(Some(finding(true, false, what)));
        }
        if !apply {
            return Ok(Some(finding(
                true,
                false,
                format!("{what}; `cryptnbd check --repair` does that"),
            )));
        }
        let done = match action {
            Action::RemoveImage => rbd::remove_image(loc).map_err(|e| e.to_string()),
            Action::RemoveReference => self.remove_reference(name).map_err(|e| e.to_string()),
            Action::Forget | Action::Keep => Ok(()),
        };
        if let Err(e) = done {
            return Ok(Some(finding(
                true,
                false,
                format!("{what}, but that failed: {e}"),
            )));
        }
        std::fs::remove_file(&path).map_err(io_err("removing the intent record", &path))?;
        sync_dir(&self.volumes_dir())?;
        Ok(Some(finding(true, true, format!("{what}; done"))))
    }

    /// Looks at the reference and the image and says what resolving `record` means.
    fn decide(&self, name: &str, record: &Record) -> Result<(Action, String), DataDirError> {
        let loc = &record.location;
        let referenced = self.rbd_location(name)?.as_ref() == Some(loc);
        let image = probe_image(loc);
        Ok(match (record.op, referenced, image) {
            (Op::Clone, false, Ok(Probe::Header(id))) if record.parent_volume_id == Some(id) => (
                Action::RemoveImage,
                format!("the image is a clone of ours that still carries its parent's header (volume {id}, as the intent record says): remove it"),
            ),
            (Op::Create | Op::Clone, true, _) => (Action::Forget, "it had completed (the reference exists)".into()),
            (Op::Create | Op::Clone, false, Ok(Probe::Missing)) => (Action::Forget, "no image had been made yet".into()),
            (Op::Create | Op::Clone, false, Ok(Probe::Header(id))) if Some(id) == record.volume_id => (
                Action::RemoveImage,
                format!("the image is an orphan of ours (its header names volume {id}, as the intent record does): remove it"),
            ),
            (Op::Create | Op::Clone, false, Ok(Probe::Header(id))) => (
                Action::Forget,
                format!("the image there belongs to another volume ({id}), not to this create: left alone"),
            ),
            (Op::Create | Op::Clone, false, Ok(Probe::NoHeader)) => (
                Action::Keep,
                format!(
                    "the image exists but has no volume header, so it cannot be told from someone else's image of that name; if nothing else uses it, remove it (`rbd rm {}/{}`) and run `cryptnbd check --repair`",
                    loc.pool, loc.image
                ),
            ),
            (Op::Delete, true, Ok(Probe::Missing)) => (
                Action::RemoveReference,
                "the image is already removed: remove the reference to finish the delete".into(),
            ),
            (Op::Delete, false, Ok(Probe::Missing)) => (Action::Forget, "it had completed".into()),
            (Op::Delete, true, Ok(_)) => (
                Action::Forget,
                "nothing had been removed yet: the volume is kept (delete it again if that is still wanted)".into(),
            ),
            (Op::Delete, false, Ok(_)) => (
                Action::Keep,
                format!(
                    "the reference is gone but the image is not; remove it by hand if it is unwanted (`rbd rm {}/{}`) and run `cryptnbd check --repair`",
                    loc.pool, loc.image
                ),
            ),
            (_, _, Err(e)) => return Err(DataDirError::Rbd { name: name.to_string(), source: e }),
        })
    }

    /// Removes `volumes/NAME.rbd` durably (missing is fine).
    pub(super) fn remove_reference(&self, name: &str) -> Result<(), DataDirError> {
        let path = self.rbd_reference_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("deleting the RBD reference", &path)(e)),
        }
        sync_dir(&self.volumes_dir())
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Create => "create",
        Op::Delete => "delete",
        Op::Clone => "clone",
    }
}

/// What is at an image's name.
enum Probe {
    Missing,
    /// A cryptnbd volume header with this volume id.
    Header(Uuid),
    /// An image without a readable volume header.
    NoHeader,
}

fn probe_image(loc: &RbdLocation) -> Result<Probe, RbdError> {
    // Without the lock: a gateway may hold it, and looking changes nothing.
    let backend = match RbdBackend::open(loc, Access::ReadShared) {
        Ok(b) => b,
        Err(RbdError::Image { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(Probe::Missing)
        }
        Err(e) => return Err(e),
    };
    Ok(match VolumeHeader::read_from(&backend) {
        Ok(h) => Probe::Header(h.volume_id),
        Err(_) => Probe::NoHeader,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records written before clones existed (no `parent_volume_id`) still read; a clone's
    /// record names its op and the parent's volume id.
    #[test]
    fn records_old_and_clone() {
        let old = r#"{"kind":"cryptnbd-rbd-intent","version":1,"op":"create","volume_id":"6f1c7b3e-4a1d-4c55-9f57-0b7d8a7f1e11","pool":"rbd","image":"vm1"}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!(r.op, Op::Create);
        assert_eq!(r.parent_volume_id, None);
        let parent = Uuid::new_v4();
        let rec = Record {
            kind: INTENT_KIND.into(),
            version: 1,
            op: Op::Clone,
            volume_id: Some(Uuid::new_v4()),
            parent_volume_id: Some(parent),
            location: serde_json::from_str(r#"{"pool":"rbd","image":"c1"}"#).unwrap(),
        };
        let j = serde_json::to_string(&rec).unwrap();
        assert!(
            j.contains(r#""op":"clone""#) && j.contains("parent_volume_id"),
            "{j}"
        );
        let back: Record = serde_json::from_str(&j).unwrap();
        assert_eq!((back.op, back.parent_volume_id), (Op::Clone, Some(parent)));
        assert_eq!(op_name(Op::Clone), "clone");
    }
}
