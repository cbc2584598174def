//! The wrapped data key format and the canonical associated data (AAD) that binds it.
//!
//! A wrapped data key ("cipher_text" on the CLI, hex) is self-describing so that a volume header or
//! an application only has to store one opaque blob:
//!
//! ```text
//! magic "CNDK" (4) | format 0x01 (1) | key id (16) | key version u32 BE (4) | aead::seal output
//! ```
//!
//! The AEAD's associated data is a canonical, unambiguous encoding (every variable-length field is
//! length-prefixed, the context is sorted by key) of: a domain string, the key store id, the key id,
//! the key version and the encryption context. So another store, another key, another version,
//! another context or any flipped bit in the header or ciphertext fails authentication. The header
//! fields are only hints for finding the CMK version; they are authenticated through the AAD.
//!
//! CMK version material (256 bits, sealed under the root key) has its own AAD with another domain
//! string, so a sealed CMK can never be presented as a wrapped data key or moved between keys.

use uuid::Uuid;

use super::EncryptionContext;
use crate::crypto::aead;

pub const MAGIC: &[u8; 4] = b"CNDK";
pub const FORMAT: u8 = 1;
/// Bytes before the sealed part.
pub const HEADER_LEN: usize = 4 + 1 + 16 + 4;
/// Largest data key we wrap (KMS limit for encrypt-datakey: 64 bytes).
pub const MAX_PLAINTEXT: usize = 64;
/// Largest blob we accept: anything longer is not one of ours, refuse before touching it.
pub const MAX_BLOB: usize = HEADER_LEN + aead::OVERHEAD + MAX_PLAINTEXT;
/// Largest plaintext `encrypt-data` seals (the DEW KMS limit is 4096 bytes; Vault's transit
/// `encrypt` carries the same limit here).
pub const MAX_DATA_PLAINTEXT: usize = 32 * 1024;
/// Largest `encrypt-data` blob.
pub const MAX_DATA_BLOB: usize = HEADER_LEN + aead::OVERHEAD + MAX_DATA_PLAINTEXT;

const DATAKEY_DOMAIN: &[u8] = b"cryptnbd/kms/datakey/v1";
const MATERIAL_DOMAIN: &[u8] = b"cryptnbd/kms/cmk-material/v1";
const VERIFIER_DOMAIN: &[u8] = b"cryptnbd/kms/root-verifier/v1";
const DATA_DOMAIN: &[u8] = b"cryptnbd/kms/data/v1";
const CREDENTIAL_DOMAIN: &[u8] = b"cryptnbd/kms/credential-secret/v1";

/// The parsed header of a wrapped data key; `sealed` borrows the AEAD part.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedBlob<'a> {
    pub key_id: Uuid,
    pub key_version: u32,
    pub sealed: &'a [u8],
}

/// Builds a wrapped data key from its header fields and the sealed bytes.
pub fn encode(key_id: Uuid, key_version: u32, sealed: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + sealed.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(sealed);
    out
}

/// Parses a wrapped data key; the error string says what is wrong (never any data).
pub fn parse(blob: &[u8]) -> Result<ParsedBlob<'_>, String> {
    parse_bounded(blob, MAX_BLOB)
}

/// Parses a blob of at most `max_blob` bytes (data keys: [`MAX_BLOB`]; data: [`MAX_DATA_BLOB`]).
pub fn parse_bounded(blob: &[u8], max_blob: usize) -> Result<ParsedBlob<'_>, String> {
    if blob.len() < HEADER_LEN + aead::OVERHEAD + 1 {
        return Err(format!(
            "the ciphertext is {} bytes, too short to be a wrapped data key (at least {})",
            blob.len(),
            HEADER_LEN + aead::OVERHEAD + 1
        ));
    }
    if blob.len() > max_blob {
        return Err(format!(
            "the ciphertext is {} bytes, too long (at most {max_blob})",
            blob.len()
        ));
    }
    if &blob[..4] != MAGIC {
        return Err("the ciphertext is not a cryptnbd wrapped data key (bad magic)".into());
    }
    if blob[4] != FORMAT {
        return Err(format!(
            "unknown wrapped data key format {} (this program reads format {FORMAT})",
            blob[4]
        ));
    }
    let id: [u8; 16] = blob[5..21]
        .try_into()
        .map_err(|_| "truncated key id".to_string())?;
    let ver: [u8; 4] = blob[21..25]
        .try_into()
        .map_err(|_| "truncated key version".to_string())?;
    Ok(ParsedBlob {
        key_id: Uuid::from_bytes(id),
        key_version: u32::from_be_bytes(ver),
        sealed: &blob[HEADER_LEN..],
    })
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Lengths are bounded by what fits in memory; u64 keeps the encoding unambiguous regardless.
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

/// The associated data of a wrapped data key.
pub fn datakey_aad(
    store_id: Uuid,
    key_id: Uuid,
    key_version: u32,
    context: &EncryptionContext,
) -> Vec<u8> {
    context_aad(DATAKEY_DOMAIN, store_id, key_id, key_version, context)
}

/// The associated data of an `encrypt-data` blob: like [`datakey_aad`] under another domain, so
/// a data blob is never accepted as a wrapped data key (nor the other way round).
pub fn data_aad(
    store_id: Uuid,
    key_id: Uuid,
    key_version: u32,
    context: &EncryptionContext,
) -> Vec<u8> {
    context_aad(DATA_DOMAIN, store_id, key_id, key_version, context)
}

/// The associated data of a credential's sealed secret key, bound to its access key id.
pub fn credential_aad(store_id: Uuid, access_key: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    put_bytes(&mut out, CREDENTIAL_DOMAIN);
    out.extend_from_slice(store_id.as_bytes());
    put_bytes(&mut out, access_key.as_bytes());
    out
}

fn context_aad(
    domain: &[u8],
    store_id: Uuid,
    key_id: Uuid,
    key_version: u32,
    context: &EncryptionContext,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    put_bytes(&mut out, domain);
    out.extend_from_slice(store_id.as_bytes());
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(&(context.len() as u64).to_be_bytes());
    // BTreeMap iterates in sorted key order: the encoding does not depend on insertion order.
    for (k, v) in context {
        put_bytes(&mut out, k.as_bytes());
        put_bytes(&mut out, v.as_bytes());
    }
    out
}

/// The associated data of one CMK version's sealed material.
pub fn material_aad(store_id: Uuid, key_id: Uuid, key_version: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    put_bytes(&mut out, MATERIAL_DOMAIN);
    out.extend_from_slice(store_id.as_bytes());
    out.extend_from_slice(key_id.as_bytes());
    out.extend_from_slice(&key_version.to_be_bytes());
    out
}

/// The associated data of the root key verifier.
pub fn verifier_aad(store_id: Uuid) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    put_bytes(&mut out, VERIFIER_DOMAIN);
    out.extend_from_slice(store_id.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn header_round_trip() {
        let id = Uuid::new_v4();
        let sealed = vec![9u8; aead::OVERHEAD + 32];
        let blob = encode(id, 7, &sealed);
        let p = parse(&blob).unwrap();
        assert_eq!((p.key_id, p.key_version, p.sealed), (id, 7, &sealed[..]));
    }

    #[test]
    fn truncated_and_oversized_blobs_are_refused() {
        let blob = encode(Uuid::new_v4(), 1, &[0u8; aead::OVERHEAD + 32]);
        for n in 0..HEADER_LEN + aead::OVERHEAD + 1 {
            assert!(parse(&blob[..n]).is_err(), "length {n}");
        }
        assert!(parse(&[0u8; MAX_BLOB + 1]).is_err());
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert!(parse(&bad).unwrap_err().contains("magic"));
        let mut bad = blob;
        bad[4] = 2;
        assert!(parse(&bad).unwrap_err().contains("format 2"));
    }

    #[test]
    fn context_encoding_is_unambiguous() {
        let (s, k) = (Uuid::new_v4(), Uuid::new_v4());
        // Same concatenated text, different split: must differ.
        let a = datakey_aad(s, k, 1, &ctx(&[("ab", "c")]));
        let b = datakey_aad(s, k, 1, &ctx(&[("a", "bc")]));
        assert_ne!(a, b);
        let c = datakey_aad(s, k, 1, &ctx(&[("a", ""), ("b", "")]));
        let d = datakey_aad(s, k, 1, &ctx(&[("a", "b")]));
        assert_ne!(c, d);
        assert_ne!(
            datakey_aad(s, k, 1, &ctx(&[])),
            datakey_aad(s, k, 2, &ctx(&[]))
        );
        // Different domains never collide.
        assert_ne!(material_aad(s, k, 1), datakey_aad(s, k, 1, &ctx(&[])));
    }

    #[test]
    fn context_order_does_not_matter() {
        let (s, k) = (Uuid::new_v4(), Uuid::new_v4());
        let mut x = EncryptionContext::new();
        x.insert("z".into(), "1".into());
        x.insert("a".into(), "2".into());
        let mut y = EncryptionContext::new();
        y.insert("a".into(), "2".into());
        y.insert("z".into(), "1".into());
        assert_eq!(datakey_aad(s, k, 3, &x), datakey_aad(s, k, 3, &y));
    }
}
