//! Composition: which key provider, which data directory, which exports. [`DataDirProvider`]
//! is the server's [`ExportProvider`] over the volumes of a [`DataDir`]: it attaches volumes
//! (unwrapping their data keys through a [`KeyProvider`], the embedded key store or a remote KMS)
//! at start or on a client's first request, and caches one `Arc<Volume>` per export so every
//! connection to it shares one open volume (a FLUSH on one covers all). This is the one place
//! that joins `server`, `datadir` and `kms`; the server itself knows neither of the latter two.
//!
//! A refused attach (disabled or deleted CMK, corrupt header, volume in use) is logged at warn with
//! its reason and returned, typed, to the server, which tells the client only the public part
//! (`public_reason`: what it can act on, never a path, a KMS URL or a key id); it is remembered
//! for a few seconds (see [`crate::server::refusals`]) so repeated requests cost neither an unwrap nor an audit
//! record, and re-enabling the key is enough for a client shortly after. An attached volume keeps
//! working until the server stops or the operator detaches it ([`DataDirProvider::detach`], from
//! the control socket): then it is refused until attached again ([`DataDirProvider::attach_now`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::{info, warn};

use crate::datadir::{DataDir, DataDirError};
use crate::kms::{KeyProvider, KmsError};
use crate::server::refusals::{Refusal, RefusalCache, RememberedRefusal};
use crate::server::{error_chain, AttachError, ExportInfo, ExportProvider};
use crate::volume::Volume;

/// Which volumes of the data directory are exported, and how.
#[derive(Debug, Clone, Default)]
pub struct ExportSelection {
    /// Only these names (plus `read_only`); `None` = every volume, including ones created later.
    pub only: Option<Vec<String>>,
    /// Exported read-only.
    pub read_only: HashSet<String>,
}

impl ExportSelection {
    fn includes(&self, name: &str) -> bool {
        match &self.only {
            None => true,
            Some(v) => v.iter().any(|n| n == name) || self.read_only.contains(name),
        }
    }
}

/// A snapshot [`DataDirProvider::snapshot`] took.
#[derive(Debug, Clone)]
pub struct TakenSnapshot {
    /// The snapshot's header.
    pub header: crate::volume::VolumeHeader,
    /// Taken online: how long the volume's writes were held.
    pub writes_held: Option<Duration>,
}

/// Serves the volumes of a data directory, with data keys from a key provider.
pub struct DataDirProvider {
    dir: DataDir,
    keys: Arc<dyn KeyProvider>,
    selection: ExportSelection,
    /// Attached volumes; looked up by every handshake, so never held during an attach.
    attached: RwLock<HashMap<String, Arc<Volume>>>,
    /// Serializes attaches (unwrapping a DEK can be slow), so a volume is opened once.
    attaching: Mutex<()>,
    /// Recent refusals, answered without touching the volume or the key store again.
    refusals: RefusalCache,
    /// Exports the operator detached: refused until attached again.
    detached: Mutex<HashSet<String>>,
    /// Attaches that failed, by reason (`crate::metrics::nbd::attach_reason`), for metrics.
    failures: Mutex<HashMap<&'static str, u64>>,
}

/// How long a refused attach is answered from memory (and so how soon re-enabling a key helps).
const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// A repeated refusal of one volume is logged at most this often.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// The client-facing error of a refusal: typed when it was just found (`fresh`), quiet when the
/// cache says it was logged recently, with a count when earlier repeats went unlogged.
fn refusal(name: &str, r: Refusal, fresh: Option<Cause>) -> AttachError {
    let name = name.to_string();
    let public = r.public.clone();
    let remembered = |reason: String| -> Cause { Box::new(RememberedRefusal { reason, public }) };
    match r.log {
        Some(0) => AttachError::Refused {
            name,
            source: fresh.unwrap_or_else(|| remembered(r.reason)),
        },
        Some(n) => AttachError::Refused {
            name,
            source: remembered(format!(
                "{} (refused {n} more times since the last report)",
                r.reason
            )),
        },
        None => AttachError::RefusedQuietly {
            name,
            source: fresh.unwrap_or_else(|| remembered(r.reason)),
        },
    }
}

impl DataDirProvider {
    /// `keys` unwraps the volumes' data keys at attach (e.g. a `KeyStore`).
    pub fn new(dir: DataDir, keys: impl KeyProvider + 'static, selection: ExportSelection) -> Self {
        Self::with_provider(dir, Arc::new(keys), selection)
    }

    /// [`DataDirProvider::new`] with a shared provider (the embedded key store or a remote KMS
    /// client, chosen at run time).
    pub fn with_provider(
        dir: DataDir,
        keys: Arc<dyn KeyProvider>,
        selection: ExportSelection,
    ) -> Self {
        Self {
            dir,
            keys,
            selection,
            attached: RwLock::new(HashMap::new()),
            attaching: Mutex::new(()),
            refusals: RefusalCache::new(REFUSAL_TTL, REFUSAL_LOG_INTERVAL),
            detached: Mutex::new(HashSet::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn detached(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.detached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `name` from now on and hands back its cached volume (the caller closes the
    /// connections and drops it, which zeroizes the data key once the last user is gone).
    pub fn detach(&self, name: &str) -> Option<Arc<Volume>> {
        let _attaching = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        self.detached().insert(name.to_string());
        self.attached
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
    }

    /// Attaches `name` now (a volume created after the server started, or one detached),
    /// forgetting an earlier refusal.
    pub fn attach_now(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        self.detached().remove(name);
        self.refusals.clear(name);
        self.attach_volume(name)
    }

    /// Takes snapshot `target` (`NAME@SNAP`): online when NAME is attached read-write here
    /// ([`DataDir::snapshot_online`]), else offline, with attaches waiting meanwhile so that
    /// none is refused for the moment the snapshot holds the volume.
    pub fn snapshot(&self, target: &str) -> Result<TakenSnapshot, DataDirError> {
        let (name, _) = crate::datadir::split_layer_name(target)?;
        let _attaching = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        match self.attached_volume(name) {
            Some(v) if v.is_read_only() => Err(DataDirError::Invalid {
                name: name.to_string(),
                reason: "it is served read-only by this server, which holds it shared: detach it (`cryptnbd ctl detach`) and snapshot it offline".into(),
            }),
            Some(v) => self.dir.snapshot_online(target, &v).map(|s| TakenSnapshot {
                header: s.header,
                writes_held: Some(s.writes_held),
            }),
            None => self.dir.snapshot(target).map(|header| TakenSnapshot {
                header,
                writes_held: None,
            }),
        }
    }

    /// Attaches that failed since start, by reason, sorted.
    pub fn attach_failures(&self) -> Vec<(&'static str, u64)> {
        let m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = m.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort();
        v
    }

    /// Whether the operator detached `name`.
    pub fn is_detached(&self, name: &str) -> bool {
        self.detached().contains(name)
    }

    /// Drops every attached volume (at shutdown, after the server has flushed them): each is
    /// closed once its last user is gone, its data key zeroized and its lock released, even
    /// while other threads (the control socket's) still hold the provider. Returns how many.
    pub fn release_all(&self) -> usize {
        let mut attached = self.attached.write().unwrap_or_else(|p| p.into_inner());
        let n = attached.len();
        attached.clear();
        n
    }

    /// The state of the CMK `key_id` as the key provider reports it (`None`: it does not say).
    pub fn key_state(&self, key_id: uuid::Uuid) -> Option<String> {
        self.keys.key_state(key_id)
    }

    /// The volume of `name` if it is attached now.
    pub fn attached_volume(&self, name: &str) -> Option<Arc<Volume>> {
        self.attached
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    /// The names exported now (volumes that exist and are selected).
    pub fn names(&self) -> Vec<String> {
        let mut names = match self.dir.list_volumes() {
            Ok(v) => v,
            Err(e) => {
                warn!(
                    "cannot list the volumes in the data directory: {}",
                    error_chain(&e)
                );
                Vec::new()
            }
        };
        names.retain(|n| self.selection.includes(n));
        // Explicitly named exports come first, in the order given (the first is the default).
        if let Some(order) = &self.selection.only {
            names.sort_by_key(|n| order.iter().position(|o| o == n).unwrap_or(usize::MAX));
        }
        names
    }

    /// Attaches every selected volume now; returns the names that attached. Refusals are logged.
    pub fn attach_all(&self) -> Vec<String> {
        let mut ok = Vec::new();
        if let Some(only) = &self.selection.only {
            let existing = self.names();
            for n in only.iter().chain(self.selection.read_only.iter()) {
                if !existing.contains(n) {
                    warn!(export = %n, "no volume named {n:?} in the data directory (yet)");
                }
            }
        }
        for n in self.names() {
            match self.attach_volume(&n) {
                Ok(_) => ok.push(n),
                Err(e) => warn!(export = %n, "attach refused: {}", error_chain(&e)),
            }
        }
        ok
    }

    fn attach_volume(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        let cached = |name: &str| {
            self.attached
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned()
        };
        if let Some(v) = cached(name) {
            return Ok(v);
        }
        if let Some(r) = self.refusals.cached(name) {
            return Err(refusal(name, r, None));
        }
        let _attaching = self.attaching.lock().unwrap_or_else(|p| p.into_inner());
        // Another client may have attached it while we waited.
        if let Some(v) = cached(name) {
            return Ok(v);
        }
        if !self.selection.includes(name) {
            return Err(AttachError::NotFound(name.to_string()));
        }
        if self.detached().contains(name) {
            let reason = format!("detached by the operator (`cryptnbd ctl attach {name}`)");
            return Err(AttachError::Refused {
                name: name.to_string(),
                source: Box::new(RememberedRefusal {
                    public: "detached by the operator".into(),
                    reason,
                }),
            });
        }
        let ro = self.selection.read_only.contains(name);
        match self.dir.attach(&*self.keys, name, ro) {
            Ok(vol) => {
                let h = vol.header();
                info!(
                    export = %name,
                    volume_id = %h.volume_id,
                    key_id = %h.key_id,
                    key_version = h.key_version,
                    size = vol.size(),
                    read_only = ro,
                    "volume attached"
                );
                self.refusals.clear(name);
                let v = Arc::new(vol);
                self.attached
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_string(), v.clone());
                Ok(v)
            }
            // A name that cannot be a volume (e.g. `../x`) is simply not an export.
            Err(DataDirError::NotFound { .. } | DataDirError::InvalidName { .. }) => {
                Err(AttachError::NotFound(name.to_string()))
            }
            // Logged by the caller (with the client that asked, or at start).
            Err(e) => {
                *self
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .entry(crate::metrics::nbd::attach_reason(&e))
                    .or_default() += 1;
                let r = self
                    .refusals
                    .refused(name, &error_chain(&e), &public_reason(&e));
                Err(refusal(name, r, Some(Box::new(e))))
            }
        }
    }
}

impl ExportProvider for DataDirProvider {
    fn list(&self) -> Vec<ExportInfo> {
        let names = self.names();
        // Snapshots (`NAME@SNAP`, served read-only) follow the volumes they belong to.
        let snapshots: Vec<String> = self
            .dir
            .all_snapshots()
            .into_iter()
            .filter(|s| {
                self.selection.includes(s)
                    && s.split_once('@')
                        .is_some_and(|(v, _)| names.iter().any(|n| n == v))
            })
            .collect();
        let n = names.len();
        names
            .into_iter()
            .chain(snapshots)
            .enumerate()
            .map(|(i, name)| {
                let description = match self.dir.info(&name) {
                    Ok(info) if i >= n => {
                        format!("{} (snapshot, read-only)", info.header.describe())
                    }
                    Ok(info) => info.header.describe(),
                    Err(e) => {
                        // The listing reaches clients: the cause (with its path) only in the log.
                        warn!(export = %name, "cannot read the volume header: {}", error_chain(&e));
                        "unreadable volume (the server log says why)".into()
                    }
                };
                ExportInfo { name, description }
            })
            .collect()
    }

    fn exists(&self, name: &str) -> bool {
        // Without reading every header, as `list` does. Snapshots (`NAME@SNAP`, served
        // read-only) are exported when selected (all of them when no names were given).
        self.names().iter().any(|n| n == name)
            || (name.contains('@')
                && self.selection.includes(name)
                && self.dir.layer_path(name).is_ok_and(|p| p.exists()))
    }

    fn default_export(&self) -> Option<String> {
        self.names().into_iter().next()
    }

    fn attach(&self, name: &str) -> Result<Arc<Volume>, AttachError> {
        self.attach_volume(name)
    }

    fn refusal_message(&self, e: &AttachError) -> String {
        let public = match e {
            AttachError::Refused { source, .. } | AttachError::RefusedQuietly { source, .. } => {
                if let Some(d) = source.downcast_ref::<DataDirError>() {
                    public_reason(d)
                } else if let Some(r) = source.downcast_ref::<RememberedRefusal>() {
                    r.public.clone()
                } else {
                    return e.to_string();
                }
            }
            AttachError::NotFound(_) => return e.to_string(),
        };
        format!("{e}: {public}")
    }
}

/// What a client may learn about a refused attach: the kind of trouble in words it can act on,
/// without the data directory's paths, the KMS's URL or the CMK's id (those go to the log).
fn public_reason(e: &DataDirError) -> String {
    match e {
        DataDirError::InUse { .. } => {
            "the volume is in use (attached read-write by another server or command)".into()
        }
        DataDirError::Kms { source, .. } => kms_reason(source),
        DataDirError::ContextMismatch { .. } => {
            "its header's encryption context names another volume".into()
        }
        DataDirError::BadDataKey { .. } => "the key provider returned an unusable data key".into(),
        DataDirError::Volume { .. } => "its volume file cannot be used (header or I/O)".into(),
        DataDirError::Rbd { source, .. } if source.is_busy() => {
            "the RBD image is in use by another gateway".into()
        }
        DataDirError::Rbd { .. } => "its RBD image cannot be opened".into(),
        _ => "the server cannot open it".into(),
    }
}

fn kms_reason(e: &KmsError) -> String {
    match e {
        KmsError::KeyNotUsable { state, .. } | KmsError::WrongState { state, .. } => {
            format!("its CMK is {} (state {})", state.name(), state.code())
        }
        KmsError::KeyDeleted { .. } => "its CMK was deleted".into(),
        KmsError::KeyNotFound { .. } | KmsError::AliasNotFound { .. } => {
            "its CMK does not exist".into()
        }
        KmsError::Unreachable { .. } => "the KMS cannot be reached".into(),
        KmsError::RemoteRefused(r) => {
            // DEW error codes name the key state (KMS-API.md); the KMS's own message may name
            // the key id, so it stays in the log.
            let state = match r.code.as_str() {
                "KMS.0209" => " (its CMK is disabled)",
                "KMS.0210" => " (its CMK is pending deletion)",
                "KMS.0208" => " (its CMK is pending activation)",
                "KMS.0207" => " (its CMK does not exist)",
                "KMS.0303" => " (this server has no grant for its CMK)",
                _ => "",
            };
            format!("the KMS refused the data key: {}{state}", r.code)
        }
        KmsError::CannotDecrypt { .. } => "its data key cannot be decrypted".into(),
        _ => "the key provider refused".into(),
    }
}
