//! The root of trust: the 256-bit key that seals every secret in the store.
//!
//! Either a key file (`root.key`, 32 random bytes, mode 0600; refused when group or others may
//! access it, the error says which mode it has and how to fix it) or a passphrase stretched with
//! Argon2id. The Argon2 parameters and salt are stored in the store file so they can be raised
//! later without breaking existing stores; the defaults (m = 19 MiB, t = 2, p = 1, OWASP's
//! recommendation) measured 63 ms per derivation in a release build here (m = 64 MiB, t = 3 took
//! 400 ms), so every CLI command stays interactive while a guess costs an attacker real memory.
//!
//! A sealed verifier (a constant sealed under the root key, bound to the store id) tells "wrong
//! passphrase / wrong key file / store sealed under another root" apart from a corrupt store: if
//! the verifier opens but a CMK does not, the store is corrupt, not the root key wrong.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use argon2::{Algorithm, Argon2, Params, Version};
use serde::{Deserialize, Serialize};

use super::KmsError;
use crate::crypto::locked::LockedBox;
use crate::crypto::Key256;

/// Default Argon2id memory cost in KiB (19 MiB).
pub const DEFAULT_M_COST_KIB: u32 = 19 * 1024;
pub const DEFAULT_T_COST: u32 = 2;
pub const DEFAULT_P_COST: u32 = 1;
/// Upper bounds accepted from a store file, so a damaged file cannot make us allocate 4 TiB.
const MAX_M_COST_KIB: u32 = 4 * 1024 * 1024;
const MAX_T_COST: u32 = 100;
const MAX_P_COST: u32 = 64;
pub const SALT_LEN: usize = 16;
/// Shortest passphrase `init` accepts.
pub const MIN_PASSPHRASE_LEN: usize = 8;

/// How the store's root key is obtained, as recorded in the store file (no secret in it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootParams {
    /// The root key is the 32 bytes of `root.key` in the store directory.
    KeyFile,
    /// The root key is Argon2id(passphrase, salt) with these parameters.
    Passphrase {
        kdf: String,
        m_cost_kib: u32,
        t_cost: u32,
        p_cost: u32,
        /// Hex.
        salt: String,
    },
}

impl RootParams {
    /// Fresh passphrase parameters with a random salt.
    pub fn new_passphrase() -> Self {
        let mut salt = [0u8; SALT_LEN];
        getrandom::getrandom(&mut salt).expect("the OS random number generator failed");
        RootParams::Passphrase {
            kdf: "argon2id".into(),
            m_cost_kib: DEFAULT_M_COST_KIB,
            t_cost: DEFAULT_T_COST,
            p_cost: DEFAULT_P_COST,
            salt: hex::encode(salt),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            RootParams::KeyFile => "a key file (root.key)",
            RootParams::Passphrase { .. } => "a passphrase",
        }
    }
}

/// Derives the root key from a passphrase with the stored parameters.
pub fn derive_from_passphrase(
    passphrase: &str,
    params: &RootParams,
    store_path: &Path,
) -> Result<Key256, KmsError> {
    let corrupt = |reason: String| KmsError::Corrupt {
        path: store_path.to_path_buf(),
        reason,
    };
    let RootParams::Passphrase {
        kdf,
        m_cost_kib,
        t_cost,
        p_cost,
        salt,
    } = params
    else {
        return Err(corrupt(
            "root parameters are not passphrase parameters".into(),
        ));
    };
    if kdf != "argon2id" {
        return Err(corrupt(format!("unknown key derivation function {kdf:?}")));
    }
    if *m_cost_kib > MAX_M_COST_KIB || *t_cost > MAX_T_COST || *p_cost > MAX_P_COST {
        return Err(corrupt(format!(
            "Argon2 parameters m={m_cost_kib} KiB t={t_cost} p={p_cost} are beyond the accepted limits"
        )));
    }
    let salt = hex::decode(salt).map_err(|e| corrupt(format!("salt is not hex: {e}")))?;
    if salt.len() < 8 || salt.len() > 64 {
        return Err(corrupt(format!("salt has {} bytes", salt.len())));
    }
    let params = Params::new(*m_cost_kib, *t_cost, *p_cost, Some(32))
        .map_err(|e| corrupt(format!("invalid Argon2 parameters: {e}")))?;
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    // Derived straight into the key's locked pages.
    Key256::try_fill(|out| {
        argon
            .hash_password_into(passphrase.as_bytes(), &salt, &mut out[..])
            .map_err(|e| corrupt(format!("Argon2 failed: {e}")))
    })
}

/// Reads a root key file, refusing it when group or others can access it.
pub fn read_key_file(path: &Path) -> Result<Key256, KmsError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KmsError::KeyFileMissing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(KmsError::io("reading key file", path, e)),
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(KmsError::KeyFilePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() != 32 {
        return Err(KmsError::KeyFileInvalid {
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    let mut f = fs::File::open(path).map_err(|e| KmsError::io("opening key file", path, e))?;
    // Read into locked pages, never into a stack buffer.
    let mut buf = LockedBox::<[u8; 33]>::new_with(|_| {});
    let mut n = 0;
    // Read at most 33 bytes: a file that grew since the metadata check is refused, not buffered.
    loop {
        let r = f
            .read(&mut buf[n..])
            .map_err(|e| KmsError::io("reading key file", path, e))?;
        if r == 0 || n + r == buf.len() {
            n += r;
            break;
        }
        n += r;
    }
    if n != 32 {
        return Err(KmsError::KeyFileInvalid {
            path: path.to_path_buf(),
            len: n as u64,
        });
    }
    Ok(Key256::from_slice(&buf[..32]).expect("32 bytes"))
}

/// Writes a new key file (mode 0600, must not exist yet) and fsyncs it.
pub fn write_key_file(path: &Path, key: &Key256) -> Result<(), KmsError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| KmsError::io("creating key file", path, e))?;
    f.write_all(key.dangerous_as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| KmsError::io("writing key file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passphrase_derivation_is_deterministic_per_salt() {
        let p = RootParams::Passphrase {
            kdf: "argon2id".into(),
            m_cost_kib: 64,
            t_cost: 1,
            p_cost: 1,
            salt: "00112233445566778899aabbccddeeff".into(),
        };
        let a = derive_from_passphrase("correct horse", &p, Path::new("x")).unwrap();
        let b = derive_from_passphrase("correct horse", &p, Path::new("x")).unwrap();
        let c = derive_from_passphrase("correct horsf", &p, Path::new("x")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn absurd_argon2_parameters_are_refused_as_corrupt() {
        let p = RootParams::Passphrase {
            kdf: "argon2id".into(),
            m_cost_kib: u32::MAX,
            t_cost: 1,
            p_cost: 1,
            salt: "00112233445566778899aabbccddeeff".into(),
        };
        assert!(matches!(
            derive_from_passphrase("x", &p, Path::new("x")),
            Err(KmsError::Corrupt { .. })
        ));
    }

    #[test]
    fn key_file_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.key");
        assert!(matches!(
            read_key_file(&path),
            Err(KmsError::KeyFileMissing { .. })
        ));
        let key = Key256::generate();
        write_key_file(&path, &key).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), key);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        match read_key_file(&path) {
            Err(KmsError::KeyFilePermissions { mode, .. }) => assert_eq!(mode, 0o644),
            other => panic!("{other:?}"),
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&path, [1u8; 31]).unwrap();
        assert!(matches!(
            read_key_file(&path),
            Err(KmsError::KeyFileInvalid { len: 31, .. })
        ));
    }
}
