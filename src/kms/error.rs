//! The key store's error type. Each variant is something a caller can match on and a user can act
//! on; none ever carries key material (only ids, aliases, states, dates, paths and modes).

use std::path::PathBuf;

use uuid::Uuid;

use super::KeyState;

/// Key store errors (of the embedded store or of a remote KMS).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KmsError {
    /// No key store file in the directory.
    #[error("no key store in {}: run `cryptnbd kms init`", dir.display())]
    StoreMissing { dir: PathBuf },

    /// `init` found an existing store (or its root key file) and will not overwrite it.
    #[error("a key store already exists in {} ({} is present): refusing to overwrite it", dir.display(), found.display())]
    StoreExists { dir: PathBuf, found: PathBuf },

    /// `init` found a root key file without a store (an interrupted `init`?).
    #[error("{} exists but there is no key store beside it (an interrupted `init`?): move it away, then run `cryptnbd kms init` again", path.display())]
    OrphanRootKey { path: PathBuf },

    /// No key with this id or alias.
    #[error("key {key:?} not found (give a key id or an alias such as alias/name; `cryptnbd kms list-keys` shows them)")]
    KeyNotFound { key: String },

    /// Another live key already has this alias.
    #[error("alias {alias} is already used by key {key_id}")]
    AliasExists { alias: String, key_id: Uuid },

    /// No live key has this alias (or, with `key_id`, that key does not have it).
    #[error("alias {alias} not found{}", key_id.map(|k| format!(" on key {k}")).unwrap_or_default())]
    AliasNotFound { alias: String, key_id: Option<Uuid> },

    /// The key is disabled or pending deletion, so it refuses this operation.
    #[error("key {key_id} is {} (state {}): {}", state.name(), state.code(), state.hint())]
    KeyNotUsable { key_id: Uuid, state: KeyState },

    /// The operation does not apply to a key in this state (e.g. cancelling a deletion that is
    /// not scheduled).
    #[error("cannot {operation} key {key_id}: it is {} (state {})", state.name(), state.code())]
    WrongState {
        key_id: Uuid,
        state: KeyState,
        operation: &'static str,
    },

    /// The key passed its deletion date: its material was destroyed.
    #[error("key {key_id} was deleted on {date}: its key material is destroyed and nothing it wrapped can be decrypted")]
    KeyDeleted { key_id: Uuid, date: String },

    /// A wrapped data key did not open: wrong key, wrong encryption context, another store,
    /// a tampered or truncated ciphertext.
    #[error("cannot decrypt data key: {reason}")]
    CannotDecrypt { reason: String },

    /// The root key (passphrase or key file) does not unlock this store.
    #[error("cannot unlock the key store in {}: wrong passphrase or root key file (or the store was sealed under another root)", dir.display())]
    WrongRootKey { dir: PathBuf },

    /// The store uses a passphrase and a key file was given, or the other way round.
    #[error("the key store in {} is protected by {expected}, not by {given}", dir.display())]
    RootKindMismatch {
        dir: PathBuf,
        expected: &'static str,
        given: &'static str,
    },

    /// The root key file is readable or writable by group or others.
    #[error("key file {} has mode {mode:04o}, which lets group or others access it: run `chmod 600 {}`", path.display(), path.display())]
    KeyFilePermissions { path: PathBuf, mode: u32 },

    /// The root key file does not exist.
    #[error("key file {} does not exist (the key store's root key; restore it from your backup or use the passphrase the store was created with)", path.display())]
    KeyFileMissing { path: PathBuf },

    /// The root key file is not 32 bytes.
    #[error("key file {} must hold exactly 32 bytes, it holds {len}", path.display())]
    KeyFileInvalid { path: PathBuf, len: u64 },

    /// A caller-supplied value is out of range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The store file is damaged or inconsistent.
    #[error("key store file {} is corrupt: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    /// The store file has a format or version this program does not know.
    #[error("key store file {} has format {format:?} version {version}, this program reads {} versions {} to {}", path.display(), super::store::FORMAT_NAME, super::store::BASE_FORMAT_VERSION, super::store::FORMAT_VERSION)]
    UnsupportedFormat {
        path: PathBuf,
        format: String,
        version: u32,
    },

    /// A remote KMS could not be reached (connection refused, TLS failure, timeout), after retries.
    #[error("cannot reach the KMS at {url} for {operation} (tried {attempts} times)")]
    Unreachable {
        url: String,
        operation: &'static str,
        attempts: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// A remote KMS answered with an error: its HTTP status, its error code and its own reason.
    #[error("{0}")]
    RemoteRefused(Box<RemoteRefusal>),

    /// A compare-and-swap kept failing: other writers changed the object every time.
    #[error("could not change {} after {attempts} attempts: other writers changed it every time; try again", object.display())]
    Contended { object: PathBuf, attempts: u32 },

    /// The data directory names a RADOS store but this build cannot reach Ceph.
    #[error("the key store is {location}, but this cryptnbd was built without Ceph support (cargo feature `rbd`)")]
    NoCephSupport { location: String },

    /// An I/O operation failed.
    /// (The cause is the error's `source()`; print with `{:#}` / a chain to see it.)
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a remote KMS said when it refused a request (boxed in [`KmsError::RemoteRefused`] so
/// the error stays small).
#[derive(Debug, thiserror::Error)]
#[error("the KMS at {url} refused {operation}: {code} (HTTP {status}): {message}")]
pub struct RemoteRefusal {
    pub url: String,
    pub operation: &'static str,
    pub status: u16,
    /// The KMS's error code, e.g. `KMS.0209` (key disabled).
    pub code: String,
    /// The KMS's own reason.
    pub message: String,
}

impl KmsError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        KmsError::Io {
            what,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn cannot_decrypt(reason: impl Into<String>) -> Self {
        KmsError::CannotDecrypt {
            reason: reason.into(),
        }
    }
}
