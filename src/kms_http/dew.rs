//! The DEW KMS API: `POST /v1.0/{project_id}/kms/{operation}` with JSON bodies, the field names,
//! formats (hex, lengths in bits or bytes as the API has them), key-state codes and error codes of
//! Huawei Cloud's DEW KMS, authenticated by SDK-HMAC-SHA256 access-key signatures (`creds.rs`).
//! The alias endpoints, which are resource paths rather than operations, are in `dew_alias.rs`.
//!
//! Numeric fields arrive as JSON strings (as the SDK sends them) or numbers; both are accepted.
//! A credential with `--read-only` may use keys (data-key and data operations, describe, list) but
//! not change them (create, enable/disable, deletion, rotation, alias, description).

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::authz::{dew_right, Caller};
pub(super) use super::dew_fields::{b64, unb64, Body, API};
use super::dew_fields::{bad_param, datakey_bits, key_details, list_keys, re_encrypt};
use super::errors::ApiError;
use super::Outcome;
use crate::crypto::SecretBytes;
use crate::kms::{blob, KeyMetadata, KeyStore, KmsError};

const DEFAULT_ROTATION_DAYS: u32 = 365;

/// Every operation served (others get 404 before anything else is checked).
const KNOWN: &[&str] = &[
    "create-key",
    "describe-key",
    "list-keys",
    "enable-key",
    "disable-key",
    "schedule-key-deletion",
    "cancel-key-deletion",
    "create-datakey",
    "create-datakey-without-plaintext",
    "encrypt-datakey",
    "decrypt-datakey",
    "re-encrypt",
    "encrypt-data",
    "decrypt-data",
    "gen-random",
    "enable-key-rotation",
    "disable-key-rotation",
    "get-key-rotation-status",
    "update-key-rotation-interval",
    "rotate-on-demand",
    "update-key-alias",
    "update-key-description",
];

/// Operations that change a key (refused to read-only credentials).
fn changes_keys(op: &str) -> bool {
    matches!(
        op,
        "create-key"
            | "enable-key"
            | "disable-key"
            | "schedule-key-deletion"
            | "cancel-key-deletion"
            | "enable-key-rotation"
            | "disable-key-rotation"
            | "update-key-rotation-interval"
            | "rotate-on-demand"
            | "update-key-alias"
            | "update-key-description"
    )
}

/// Runs one DEW operation for an authenticated caller. `outcome.key` is set for the audit line.
pub(super) fn dispatch(
    ks: &KeyStore,
    caller: &Caller,
    op: &str,
    body: &Body<'_>,
    outcome: &mut Outcome,
) -> Result<Value, ApiError> {
    if super::dew_grants::OPERATIONS.contains(&op) {
        return super::dew_grants::dispatch(ks, caller, op, body, outcome);
    }
    if !KNOWN.contains(&op) {
        return Err(ApiError::new(
            API,
            axum::http::StatusCode::NOT_FOUND,
            "KMS.0201",
            format!(
                "unknown operation {:?}",
                op.chars().take(64).collect::<String>()
            ),
        ));
    }
    if caller.read_only && changes_keys(op) {
        return Err(ApiError::forbidden(
            API,
            format!("credential {} is read-only: it cannot {op}", caller.name),
        ));
    }
    let kms = |e: KmsError| ApiError::from_kms(API, &e, false);
    let domain = ks.store_id().simple().to_string();
    // Every operation but a few names its key in key_id: check the caller's rights on it first.
    let key = match op {
        "create-key" | "list-keys" | "gen-random" | "decrypt-data" | "re-encrypt" => None,
        _ => {
            let k = body.str_req("key_id")?;
            outcome.key = Some(k.to_string());
            caller.check_id(ks, API, k, &[dew_right(op)], &body.context()?, outcome)?;
            Some(k)
        }
    };
    let key = || key.unwrap_or_default();
    let info = |m: KeyMetadata| json!({"key_info": {"key_id": m.key_id.to_string(), "key_state": m.key_state.code().to_string()}});
    Ok(match op {
        "create-key" => {
            caller.require_admin(API, "create keys")?;
            if let Some(spec) = body.str_opt("key_spec")? {
                if spec != "AES_256" {
                    return Err(bad_param(
                        "key_spec",
                        "must be AES_256 (the only CMK type here)",
                    ));
                }
            }
            if let Some(usage) = body.str_opt("key_usage")? {
                if usage != "ENCRYPT_DECRYPT" {
                    return Err(bad_param("key_usage", "must be ENCRYPT_DECRYPT"));
                }
            }
            let alias = body.str_req("key_alias")?;
            outcome.key = Some(alias.to_string());
            let m = ks
                .create_key(alias, body.str_opt("key_description")?.unwrap_or(""))
                .map_err(kms)?;
            json!({"key_info": {"key_id": m.key_id.to_string(), "domain_id": domain}})
        }
        "describe-key" => {
            json!({"key_info": key_details(&ks.describe_key(key()).map_err(kms)?, &domain)})
        }
        "list-keys" => list_keys(ks, caller, body, &domain)?,
        "enable-key" => info(ks.enable_key(key()).map_err(kms)?),
        "disable-key" => info(ks.disable_key(key()).map_err(kms)?),
        "schedule-key-deletion" => {
            let days = body.num_opt("pending_days")?.ok_or_else(|| {
                ApiError::bad_request(API, "KMS.0204", "the parameter pending_days is missing")
            })?;
            let days =
                u32::try_from(days).map_err(|_| bad_param("pending_days", "must be 7 to 1096"))?;
            let m = ks.schedule_key_deletion(key(), days).map_err(kms)?;
            json!({"key_id": m.key_id.to_string(), "key_state": m.key_state.code().to_string()})
        }
        "cancel-key-deletion" => {
            let m = ks.cancel_key_deletion(key()).map_err(kms)?;
            json!({"key_id": m.key_id.to_string(), "key_state": m.key_state.code().to_string()})
        }
        "create-datakey" | "create-datakey-without-plaintext" => {
            let bits = datakey_bits(body)?;
            let context = body.context()?;
            let (plain, wrapped) = if bits == 256 || bits == 512 {
                if op == "create-datakey" {
                    let d = ks.create_data_key(key(), &context, bits).map_err(kms)?;
                    (Some(d.plain_text), d.wrapped)
                } else {
                    let w = ks
                        .create_data_key_without_plaintext(key(), &context, bits)
                        .map_err(kms)?;
                    (None, w)
                }
            } else {
                // Other lengths (e.g. key_spec AES_128): a fresh random key wrapped as given.
                let plain = SecretBytes::random(bits as usize / 8);
                let w = ks.encrypt_data_key(key(), &plain, &context).map_err(kms)?;
                (Some(plain).filter(|_| op == "create-datakey"), w)
            };
            let mut v = json!({"key_id": wrapped.key_id.to_string(), "cipher_text": hex::encode(&wrapped.cipher_text)});
            if let Some(p) = plain {
                v["plain_text"] = Value::String(hex::encode(p.dangerous_as_bytes()));
            }
            v
        }
        "encrypt-datakey" => {
            let raw = body.hex_secret_req("plain_text")?;
            let len = body.num_opt("datakey_plain_length")?.ok_or_else(|| {
                ApiError::bad_request(
                    API,
                    "KMS.0204",
                    "the parameter datakey_plain_length is missing",
                )
            })? as usize;
            let bytes = raw.dangerous_as_bytes();
            if len == 0 || len > blob::MAX_PLAINTEXT || bytes.len() != len + 32 {
                return Err(ApiError::bad_request(API, "KMS.2101", format!(
                    "plain_text must be the data key ({len} bytes, 1 to {}) followed by its SHA-256 digest", blob::MAX_PLAINTEXT)));
            }
            let (dek, dgst) = bytes.split_at(len);
            if !bool::from(subtle::ConstantTimeEq::ct_eq(
                &Sha256::digest(dek)[..],
                dgst,
            )) {
                return Err(ApiError::bad_request(
                    API,
                    "KMS.2103",
                    "the SHA-256 digest in plain_text does not match the data key",
                ));
            }
            let w = ks
                .encrypt_data_key(key(), &SecretBytes::new(dek.to_vec()), &body.context()?)
                .map_err(kms)?;
            json!({"key_id": w.key_id.to_string(), "cipher_text": hex::encode(&w.cipher_text), "datakey_length": len.to_string()})
        }
        "decrypt-datakey" => {
            let ct = hex::decode(body.str_req("cipher_text")?).map_err(|_| {
                ApiError::bad_request(
                    API,
                    "KMS.2201",
                    "the parameter cipher_text must be hexadecimal",
                )
            })?;
            let want = body.num_opt("datakey_cipher_length")?;
            let u = ks
                .decrypt_data_key(key(), &ct, &body.context()?)
                .map_err(|e| ApiError::from_kms(API, &e, true))?;
            let dek = u.plain_text.dangerous_as_bytes();
            if want.is_some_and(|w| w as usize != dek.len()) {
                return Err(ApiError::bad_request(
                    API,
                    "KMS.2201",
                    format!(
                        "datakey_cipher_length does not match: the data key has {} bytes",
                        dek.len()
                    ),
                ));
            }
            json!({"data_key": hex::encode(dek), "datakey_length": dek.len().to_string(), "datakey_dgst": hex::encode(Sha256::digest(dek))})
        }
        "re-encrypt" => re_encrypt(ks, caller, body, outcome)?,
        "encrypt-data" => {
            let plain = body.str_req("plain_text")?;
            if plain.is_empty() || plain.len() > 4096 {
                return Err(bad_param("plain_text", "must be 1 to 4096 bytes"));
            }
            let w = ks
                .encrypt_data(
                    key(),
                    &SecretBytes::new(plain.as_bytes().to_vec()),
                    &body.context()?,
                )
                .map_err(kms)?;
            json!({"key_id": w.key_id.to_string(), "cipher_text": b64(&w.cipher_text)})
        }
        "decrypt-data" => {
            let ct = unb64(body.str_req("cipher_text")?)
                .ok_or_else(|| bad_param("cipher_text", "must be base64"))?;
            // The blob names its key: that key must be in the caller's scope.
            if let Ok(p) = blob::parse_bounded(&ct, blob::MAX_DATA_BLOB) {
                let id = p.key_id.to_string();
                outcome.key = Some(id.clone());
                caller.check_id(ks, API, &id, &["decrypt-data"], &body.context()?, outcome)?;
            }
            let u = ks
                .decrypt_data(body.str_opt("key_id")?, &ct, &body.context()?)
                .map_err(|e| ApiError::from_kms(API, &e, true))?;
            let text = String::from_utf8_lossy(u.plain_text.dangerous_as_bytes()).into_owned();
            json!({"key_id": u.key_id.to_string(), "plain_text": text, "plain_text_base64": b64(u.plain_text.dangerous_as_bytes())})
        }
        "gen-random" => {
            let bits = body.num_opt("random_data_length")?.ok_or_else(|| {
                ApiError::bad_request(
                    API,
                    "KMS.0204",
                    "the parameter random_data_length is missing",
                )
            })?;
            if bits == 0 || bits % 8 != 0 || bits > 8192 {
                return Err(bad_param(
                    "random_data_length",
                    "must be a multiple of 8 from 8 to 8192 bits",
                ));
            }
            let r = ks.gen_random(bits as usize / 8).map_err(kms)?;
            json!({"random_data": hex::encode(r.dangerous_as_bytes())})
        }
        "enable-key-rotation" => {
            let m = ks.describe_key(key()).map_err(kms)?;
            let days = m.rotation_interval_days.unwrap_or(DEFAULT_ROTATION_DAYS);
            ks.enable_key_rotation(key(), days).map_err(kms)?;
            json!({})
        }
        "disable-key-rotation" => {
            ks.disable_key_rotation(key()).map_err(kms)?;
            json!({})
        }
        "update-key-rotation-interval" => {
            let days = body.num_opt("rotation_interval")?.ok_or_else(|| {
                ApiError::bad_request(
                    API,
                    "KMS.0204",
                    "the parameter rotation_interval is missing",
                )
            })?;
            let days = u32::try_from(days)
                .map_err(|_| bad_param("rotation_interval", "must be 30 to 365"))?;
            ks.enable_key_rotation(key(), days).map_err(kms)?;
            json!({})
        }
        "get-key-rotation-status" => {
            let m = ks.describe_key(key()).map_err(kms)?;
            json!({
                "key_rotation_enabled": m.rotation_interval_days.is_some(),
                "rotation_interval": m.rotation_interval_days.unwrap_or(DEFAULT_ROTATION_DAYS),
                "number_of_rotations": m.version_count.saturating_sub(1),
                "key_materials": [],
            })
        }
        "rotate-on-demand" => {
            let m = ks.rotate_key(key()).map_err(kms)?;
            json!({"key_id": m.key_id.to_string()})
        }
        "update-key-alias" => {
            let m = ks
                .update_alias(key(), body.str_req("key_alias")?)
                .map_err(kms)?;
            json!({"key_info": {"key_id": m.key_id.to_string(), "key_alias": m.key_alias}})
        }
        "update-key-description" => {
            let m = ks
                .update_description(key(), body.str_req("key_description")?)
                .map_err(kms)?;
            json!({"key_info": {"key_id": m.key_id.to_string(), "key_description": m.key_description}})
        }
        other => {
            return Err(ApiError::new(
                API,
                axum::http::StatusCode::NOT_FOUND,
                "KMS.0201",
                format!(
                    "unknown operation {:?}",
                    other.chars().take(64).collect::<String>()
                ),
            ))
        }
    })
}
