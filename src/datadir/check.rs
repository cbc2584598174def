//! `cryptnbd check` in the library: verifies a data directory without changing it — the key
//! store's integrity, each volume's two header copies, its key reference (CMK exists, version
//! present, state), its file size and the permissions of everything holding secrets — and
//! reports findings in plain words; RBD volumes are checked the same way through their images,
//! and interrupted RBD creates and deletes are reported. With `repair`, the changes it makes are
//! rewriting a damaged or stale header copy from the good one (under the volume's exclusive
//! lock) and resolving interrupted RBD operations (removing only images proven ours).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde::Serialize;

use super::{DataDir, DataDirError};
use crate::backend::rbd::{Access, RbdBackend};
use crate::backend::{Backend, FileBackend};
use crate::kms::store::{AUDIT_FILE, ROOT_KEY_FILE, STORE_FILE};
use crate::kms::{KeyReference, KeyState, KeyStore};
use crate::volume::VolumeHeader;

/// How bad a finding is: a `Problem` makes `check` fail; a `Warning` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Problem,
}

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `key store`, `data directory` or `volume NAME`.
    pub subject: String,
    pub severity: Severity,
    pub message: String,
    /// Fixed by `--repair`.
    pub repaired: bool,
}

/// The result of a check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Volumes looked at.
    pub volumes: Vec<String>,
    pub findings: Vec<Finding>,
}

impl CheckReport {
    /// Problems not repaired: the check fails when there are any.
    pub fn unresolved_problems(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Problem && !f.repaired)
            .count()
    }

    fn add(&mut self, subject: &str, severity: Severity, message: impl Into<String>) {
        self.findings.push(Finding {
            subject: subject.to_string(),
            severity,
            message: message.into(),
            repaired: false,
        });
    }
}

/// Whether `path` is reachable by group or others (`mode & 0o077`), as a finding message.
fn loose_mode(path: &Path, what: &str, want: u32) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "{what} {} has mode {mode:04o}: group or others can reach it (should be {want:04o}; chmod {want:o} it)",
            path.display()
        )
    })
}

impl DataDir {
    /// Checks the data directory: the key store (`ks`, or `None` when it could not be opened —
    /// the caller reports why), and the volumes `names` (every volume when empty). With `repair`,
    /// a damaged or stale header copy is rewritten from the good one.
    pub fn check(
        &self,
        ks: Option<&KeyStore>,
        names: &[String],
        repair: bool,
    ) -> Result<CheckReport, DataDirError> {
        let mut r = CheckReport::default();
        self.check_files(&mut r, repair);
        self.check_intents(repair, &mut r);
        if let Some(ks) = ks {
            match ks.check_integrity() {
                Ok(problems) => {
                    for p in problems {
                        r.add("key store", Severity::Problem, p);
                    }
                }
                Err(e) => r.add(
                    "key store",
                    Severity::Problem,
                    format!("cannot read it: {e}"),
                ),
            }
        }
        let names = if names.is_empty() {
            let mut all = self.list_volumes()?;
            all.extend(self.all_snapshots());
            all
        } else {
            names.to_vec()
        };
        for name in names {
            self.check_volume(ks, &name, repair, &mut r);
            r.volumes.push(name);
        }
        Ok(r)
    }

    /// Interrupted RBD creates and deletes (see [`super::rbd_intent`]): reported, and resolved
    /// with `repair` — which removes only images proven to be orphans of ours.
    fn check_intents(&self, repair: bool, r: &mut CheckReport) {
        match self.rbd_intents(repair) {
            Ok(found) => {
                for f in found {
                    r.findings.push(Finding {
                        subject: format!("volume {}", f.name),
                        severity: if f.problem {
                            Severity::Problem
                        } else {
                            Severity::Warning
                        },
                        message: f.message,
                        repaired: f.resolved,
                    });
                }
            }
            Err(e) => r.add(
                "data directory",
                Severity::Problem,
                format!("cannot look for interrupted RBD operations: {e}"),
            ),
        }
    }

    fn check_files(&self, r: &mut CheckReport, repair: bool) {
        let s = "data directory";
        // The files holding secrets are checked one by one below; the directory also guards the
        // Unix socket, so a loose mode is worth a warning.
        if let Some(m) = loose_mode(self.root(), "the data directory", 0o700) {
            r.add(s, Severity::Warning, m);
        }
        let root_key = self.root().join(ROOT_KEY_FILE);
        if let Some(m) = loose_mode(&root_key, "the root key file", 0o600) {
            r.add(s, Severity::Problem, m);
        }
        for f in [STORE_FILE, AUDIT_FILE] {
            if let Some(m) = loose_mode(&self.root().join(f), "the key store file", 0o600) {
                r.add(s, Severity::Warning, m);
            }
        }
        let vdir = self.volumes_dir();
        if let Some(m) = loose_mode(&vdir, "the volumes directory", 0o700) {
            r.add(s, Severity::Warning, m);
        }
        if let Ok(entries) = std::fs::read_dir(&vdir) {
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with('.') && n.ends_with(".tmp") {
                    r.findings.push(self.partial_file(&e.path(), repair));
                }
            }
        }
    }

    /// A `.NAME.vol.*.tmp` file: a volume being built now (its builder holds it locked), or
    /// one an interrupted create, import, copy, clone or snapshot left, which `repair` removes
    /// (the operation was undone: the volume it was building never appeared).
    fn partial_file(&self, path: &Path, repair: bool) -> Finding {
        let live = std::fs::File::open(path).is_ok_and(|f| f.try_lock().is_err());
        let shown = path.display();
        let (message, repaired) = if live {
            (
                format!("{shown} is a volume being built by a running command"),
                false,
            )
        } else if repair && std::fs::remove_file(path).is_ok() {
            let _ = super::sync_dir(&self.volumes_dir());
            (format!("removed {shown}, a partial volume left by an interrupted create, import, copy, clone or snapshot"), true)
        } else {
            (format!(
                "{shown} is a partial volume left by an interrupted create, import, copy, clone or snapshot (`cryptnbd check --repair` removes it, as does the next one of that name)"
            ), false)
        };
        Finding {
            subject: "data directory".into(),
            severity: Severity::Warning,
            message,
            repaired,
        }
    }

    fn check_volume(&self, ks: Option<&KeyStore>, name: &str, repair: bool, r: &mut CheckReport) {
        let subject = format!("volume {name}");
        let rbd = match self.rbd_location(name) {
            Ok(l) => l,
            Err(e) => return r.add(&subject, Severity::Problem, e.to_string()),
        };
        // Reading needs no lock: headers change only under the exclusive lock, and a torn read
        // of one copy shows as damage of that copy only.
        let backend: Box<dyn Backend> = if let Some(loc) = &rbd {
            match RbdBackend::open(loc, Access::ReadShared) {
                Ok(b) => Box::new(b),
                Err(e) => {
                    return r.add(&subject, Severity::Problem, format!("cannot open it: {e}"))
                }
            }
        } else if let Ok(Some((loc, snap))) = self.rbd_snapshot_location(name) {
            match RbdBackend::open_snapshot(&loc, &snap) {
                Ok(b) => Box::new(b),
                Err(e) => {
                    return r.add(&subject, Severity::Problem, format!("cannot open it: {e}"))
                }
            }
        } else {
            let path = match self.existing(name) {
                Ok(p) => p,
                Err(e) => return r.add(&subject, Severity::Problem, e.to_string()),
            };
            if let Some(m) = loose_mode(&path, "the volume file", 0o600) {
                r.add(&subject, Severity::Warning, m);
            }
            match FileBackend::open(&path, true) {
                Ok(b) => Box::new(b),
                Err(e) => {
                    return r.add(
                        &subject,
                        Severity::Problem,
                        format!("cannot open {}: {e}", path.display()),
                    )
                }
            }
        };
        let backend = &*backend;
        let copies = match VolumeHeader::read_copies(backend) {
            Ok(c) => c,
            Err(e) => return r.add(&subject, Severity::Problem, e.to_string()),
        };
        let mut copy_problem = None;
        match &copies {
            [Ok(p), Ok(b)] if p == b => {}
            [Ok(p), Ok(b)] => {
                copy_problem = Some(format!(
                    "the header copies disagree (primary generation {}, backup generation {}): an update was interrupted; the newer copy is used",
                    p.generation, b.generation
                ));
            }
            [Ok(_), Err(e)] | [Err(e), Ok(_)] => {
                let (bad, good) = if copies[0].is_err() {
                    ("primary", "backup")
                } else {
                    ("backup", "primary")
                };
                copy_problem = Some(format!(
                    "the {bad} header copy is damaged ({e}); the {good} copy is good"
                ));
            }
            [Err(_), Err(_)] => {}
        }
        let header = match VolumeHeader::read_from(backend) {
            Ok(h) => h,
            Err(e) => {
                return r.add(
                    &subject,
                    Severity::Problem,
                    format!("{e} (not repairable by check)"),
                )
            }
        };
        if let Some(msg) = copy_problem {
            let repaired = repair && self.repair_header(name, r, &subject);
            r.findings.push(Finding {
                subject: subject.clone(),
                severity: Severity::Problem,
                message: if repaired {
                    format!("{msg}; rewrote the stale copy from the good one")
                } else if repair {
                    msg
                } else {
                    format!("{msg}; `cryptnbd check --repair {name}` rewrites it")
                },
                repaired,
            });
        }
        if let Ok(len) = backend.len() {
            let needed = header.data_offset() + header.size;
            if len > needed {
                r.add(&subject, Severity::Warning, format!(
                    "the file is {len} bytes, longer than the {needed} its header needs (an interrupted resize; harmless)"
                ));
            }
        }
        let ctx = header.encryption_context.get("volume_id");
        if ctx != Some(&header.volume_id.to_string()) {
            r.add(&subject, Severity::Problem, format!(
                "the header's encryption context names volume {ctx:?}, not this volume's id {}: its wrapped data key belongs to another volume",
                header.volume_id
            ));
        }
        if let Some(ks) = ks {
            check_key(ks, &header, &subject, r);
        }
        for (problem, m) in self.layer_problems(name, &header) {
            let severity = if problem {
                Severity::Problem
            } else {
                Severity::Warning
            };
            r.add(&subject, severity, m);
        }
    }

    /// Rewrites the stale header copy of `name`; false (with a finding) when it cannot.
    fn repair_header(&self, name: &str, r: &mut CheckReport, subject: &str) -> bool {
        let opened: Result<Box<dyn Backend>, DataDirError> = match self.rbd_location(name) {
            Ok(Some(loc)) => self
                .open_rbd_exclusive(name, &loc)
                .map(|b| Box::new(b) as _),
            Ok(None) => self.open_locked(name, true, true).map(|b| Box::new(b) as _),
            Err(e) => Err(e),
        };
        let backend = match opened {
            Ok(b) => b,
            Err(e) => {
                r.add(subject, Severity::Problem, format!("cannot repair: {e}"));
                return false;
            }
        };
        match VolumeHeader::repair(&*backend) {
            Ok(_) => true,
            Err(e) => {
                r.add(subject, Severity::Problem, format!("repair failed: {e}"));
                false
            }
        }
    }
}

fn check_key(ks: &KeyStore, h: &VolumeHeader, subject: &str, r: &mut CheckReport) {
    let key = format!("CMK {} version {}", h.key_id, h.key_version);
    match ks.key_reference(h.key_id, h.key_version) {
        Err(e) => r.add(subject, Severity::Problem, format!("cannot look up {key}: {e}")),
        Ok(KeyReference::Missing) => r.add(subject, Severity::Problem, format!(
            "its data key is wrapped by {key}, which is not in this key store: it cannot be attached"
        )),
        Ok(KeyReference::Deleted { date }) => r.add(subject, Severity::Problem, format!(
            "its data key is wrapped by {key}, which was deleted on {}: its data is unrecoverable (crypto-shredded)",
            crate::kms::clock::date(date)
        )),
        Ok(KeyReference::VersionMissing { versions }) => r.add(subject, Severity::Problem, format!(
            "its data key is wrapped by {key}, but that key has only {versions} version(s): it cannot be attached"
        )),
        Ok(KeyReference::Present { state: KeyState::Enabled, .. }) => {}
        Ok(KeyReference::Present { state: KeyState::PendingDeletion, scheduled_deletion_date, alias }) => r.add(subject, Severity::Warning, format!(
            "{key}{} is pending deletion (on {}): attaching is refused, and after that date the data is unrecoverable; cancel the deletion to keep it",
            alias.map(|a| format!(" ({a})")).unwrap_or_default(),
            scheduled_deletion_date.map(crate::kms::clock::date).unwrap_or_else(|| "an unknown date".into())
        )),
        Ok(KeyReference::Present { state, alias, .. }) => r.add(subject, Severity::Warning, format!(
            "{key}{} is {}: attaching is refused until it is enabled",
            alias.map(|a| format!(" ({a})")).unwrap_or_default(),
            state.name()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_modes_are_spotted() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(loose_mode(&f, "the file", 0o600), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let m = loose_mode(&f, "the file", 0o600).unwrap();
        assert!(m.contains("0640") && m.contains("chmod 600"), "{m}");
    }
}
