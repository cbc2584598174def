//! The DEW KMS API's request fields and answers: typed access to a JSON body (every refusal
//! names the field and uses the API's code), the `KeyDetails` form of a key, base64 helpers, and
//! the operations with more than a few lines (re-encrypt, list-keys with its marker pagination,
//! the data key length rules). Dispatch is in `dew.rs`, which depends on this file, never the
//! other way round: the API's constants live here.

use serde_json::{json, Map, Value};

use super::authz::Caller;
use super::errors::{Api, ApiError};
use super::Outcome;
use crate::crypto::SecretBytes;
use crate::kms::{blob, EncryptionContext, KeyMetadata, KeyStore};

pub(super) const API: Api = Api::Dew;
/// Largest page of `list-keys` (and the default).
pub(super) const MAX_LIST_LIMIT: usize = 1000;
/// Largest `additional_authenticated_data` the API accepts.
pub(super) const MAX_AAD_BYTES: usize = 128;

/// Typed access to the JSON body; every refusal names the field.
pub(crate) struct Body<'a>(pub &'a Map<String, Value>);

pub(super) fn bad_param(field: &str, what: &str) -> ApiError {
    ApiError::bad_request(API, "KMS.0203", format!("the parameter {field} {what}"))
}

impl Body<'_> {
    pub(super) fn str_opt(&self, f: &str) -> Result<Option<&str>, ApiError> {
        match self.0.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(ApiError::bad_request(
                API,
                "KMS.0202",
                format!("the parameter {f} must be a string"),
            )),
        }
    }

    pub(super) fn str_req(&self, f: &str) -> Result<&str, ApiError> {
        self.str_opt(f)?.ok_or_else(|| {
            ApiError::bad_request(API, "KMS.0204", format!("the parameter {f} is missing"))
        })
    }

    pub(super) fn num_opt(&self, f: &str) -> Result<Option<u64>, ApiError> {
        match self.0.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| bad_param(f, "must be a non-negative integer")),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| bad_param(f, "must be a non-negative integer")),
            Some(_) => Err(ApiError::bad_request(
                API,
                "KMS.0202",
                format!("the parameter {f} must be an integer"),
            )),
        }
    }

    /// A required hex field holding a secret (a plaintext data key), decoded straight into
    /// locked pages rather than through an ordinary `Vec`.
    pub(super) fn hex_secret_req(&self, f: &str) -> Result<SecretBytes, ApiError> {
        let s = self.str_req(f)?;
        SecretBytes::try_fill(s.len() / 2, |out| hex::decode_to_slice(s, out))
            .map_err(|_| bad_param(f, "must be hexadecimal"))
    }

    /// `additional_authenticated_data` (≤ 128 bytes) and/or the older `encryption_context`.
    pub(super) fn context(&self) -> Result<EncryptionContext, ApiError> {
        self.context_with_prefix("")
    }

    /// The context of one side of `re-encrypt`: `{prefix}additional_authenticated_data` and
    /// `{prefix}encryption_context` (`prefix` is `source_` or `destination_`), bound under the
    /// same names as [`Body::context`] binds them, so a blob made with an AAD re-encrypts with the
    /// same AAD given as the source one.
    pub(super) fn context_with_prefix(&self, prefix: &str) -> Result<EncryptionContext, ApiError> {
        let mut c = EncryptionContext::new();
        let f = format!("{prefix}additional_authenticated_data");
        if let Some(aad) = self.str_opt(&f)? {
            if aad.len() > MAX_AAD_BYTES {
                return Err(bad_param(&f, "must be at most 128 bytes"));
            }
            c.insert("additional_authenticated_data".into(), aad.into());
        }
        let f = format!("{prefix}encryption_context");
        match self.0.get(&f) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let v = v
                        .as_str()
                        .ok_or_else(|| bad_param(&f, "must map names to strings"))?;
                    c.insert(k.clone(), v.into());
                }
            }
            Some(_) => return Err(bad_param(&f, "must be an object")),
        }
        Ok(c)
    }
}

fn ms(unix: u64) -> String {
    (unix * 1000).to_string()
}

pub(super) fn key_details(m: &KeyMetadata, domain: &str) -> Value {
    json!({
        "key_id": m.key_id.to_string(),
        "domain_id": domain,
        "key_alias": m.key_alias,
        "realm": "local",
        "key_spec": "AES_256",
        "key_usage": "ENCRYPT_DECRYPT",
        "key_description": m.key_description,
        "creation_date": ms(m.creation_date),
        "scheduled_deletion_date": m.scheduled_deletion_date.map(ms).unwrap_or_default(),
        "key_state": m.key_state.code().to_string(),
        "default_key_flag": "0",
        "key_type": "1",
        "expiration_time": "",
        "origin": "kms",
        "key_rotation_enabled": m.rotation_interval_days.is_some().to_string(),
        "sys_enterprise_project_id": "0",
        "keystore_id": "0",
    })
}

/// Re-wraps a data key from `source_key_id` to `destination_key_id` without exposing it.
pub(super) fn re_encrypt(
    ks: &KeyStore,
    caller: &Caller,
    body: &Body<'_>,
    outcome: &mut Outcome,
) -> Result<Value, ApiError> {
    let source = body.str_req("source_key_id")?;
    let dest = body.str_opt("destination_key_id")?.unwrap_or(source);
    outcome.key = Some(source.to_string());
    caller.check_re_encrypt(ks, API, source, dest, outcome)?;
    let ct = hex::decode(body.str_req("cipher_text")?).map_err(|_| {
        ApiError::bad_request(
            API,
            "KMS.2201",
            "the parameter cipher_text must be hexadecimal",
        )
    })?;
    // The blob names its key: it must be the source key the caller named.
    let source_id = ks
        .resolve_key_id(source)
        .map_err(|e| ApiError::from_kms(API, &e, false))?;
    match blob::parse(&ct) {
        Ok(p) if p.key_id == source_id => {}
        Ok(p) => {
            return Err(ApiError::bad_request(
                API,
                "KMS.2202",
                format!(
                    "the ciphertext was made under key {}, not under source_key_id {source}",
                    p.key_id
                ),
            ))
        }
        Err(e) => {
            return Err(ApiError::bad_request(
                API,
                "KMS.2202",
                format!("cannot decrypt data key: {e}"),
            ))
        }
    }
    let w = ks
        .re_encrypt(
            &ct,
            &body.context_with_prefix("source_")?,
            Some(dest),
            &body.context_with_prefix("destination_")?,
        )
        .map_err(|e| ApiError::from_kms(API, &e, true))?;
    Ok(
        json!({"key_id": w.key_id.to_string(), "source_key_id": source_id.to_string(), "cipher_text": hex::encode(&w.cipher_text)}),
    )
}

/// `datakey_length` in bits (8..=512, a multiple of 8), or `key_spec` AES_256/AES_128; 256 by default.
pub(super) fn datakey_bits(body: &Body<'_>) -> Result<u32, ApiError> {
    if let Some(bits) = body.num_opt("datakey_length")? {
        if bits == 0 || bits % 8 != 0 || bits > (blob::MAX_PLAINTEXT * 8) as u64 {
            return Err(bad_param(
                "datakey_length",
                "must be a multiple of 8 from 8 to 512 bits",
            ));
        }
        return Ok(bits as u32);
    }
    match body.str_opt("key_spec")? {
        None | Some("AES_256") => Ok(256),
        Some("AES_128") => Ok(128),
        Some(_) => Err(bad_param("key_spec", "must be AES_256 or AES_128")),
    }
}

/// The `limit` (default `default`, 1..=1000) and `marker` (an index this server gave) of a list
/// request: `(start, limit)`.
pub(super) fn page_request(body: &Body<'_>, default: u64) -> Result<(usize, usize), ApiError> {
    let limit = body.num_opt("limit")?.unwrap_or(default);
    if limit == 0 || limit > MAX_LIST_LIMIT as u64 {
        return Err(bad_param("limit", "must be 1 to 1000"));
    }
    let start: usize = match body.str_opt("marker")? {
        None | Some("") => 0,
        Some(m) => m
            .parse()
            .map_err(|_| bad_param("marker", "is not a marker this server gave"))?,
    };
    Ok((start, limit as usize))
}

/// The page a list request asks for out of `total` items: `(start, end)`.
pub(super) fn page_range(
    body: &Body<'_>,
    default: u64,
    total: usize,
) -> Result<(usize, usize), ApiError> {
    let (start, limit) = page_request(body, default)?;
    Ok((start.min(total), start.saturating_add(limit).min(total)))
}

pub(super) fn list_keys(
    ks: &KeyStore,
    caller: &Caller,
    body: &Body<'_>,
    domain: &str,
) -> Result<Value, ApiError> {
    let (start, limit) = page_request(body, MAX_LIST_LIMIT as u64)?;
    let state = match body.str_opt("key_state")? {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u8>()
                .ok()
                .filter(|c| (1..=5).contains(c))
                .ok_or_else(|| bad_param("key_state", "must be 1 to 5"))?,
        ),
    };
    let all: Vec<KeyMetadata> = ks
        .list_keys()
        .map_err(|e| ApiError::from_kms(API, &e, false))?
        .into_iter()
        .filter(|m| state.is_none_or(|s| m.key_state.code() == s))
        .filter(|m| caller.allows_id(ks, m.key_id))
        .collect();
    let end = start.saturating_add(limit).min(all.len());
    let page = all.get(start.min(all.len())..end).unwrap_or_default();
    let truncated = end < all.len();
    Ok(json!({
        "keys": page.iter().map(|m| m.key_id.to_string()).collect::<Vec<_>>(),
        "key_details": page.iter().map(|m| key_details(m, domain)).collect::<Vec<_>>(),
        "next_marker": if truncated { end.to_string() } else { String::new() },
        "truncated": truncated.to_string(),
        "total": all.len(),
    }))
}

pub(super) fn b64(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub(super) fn unb64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Decodes base64 holding a secret (a plaintext to encrypt) straight into locked pages, so the
/// plaintext never sits in an ordinary heap buffer. Padded standard base64 only, as [`unb64`].
pub(super) fn unb64_secret(s: &str) -> Option<SecretBytes> {
    use base64::Engine;
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let pad = s.bytes().rev().take(2).take_while(|&b| b == b'=').count();
    let len = s.len() / 4 * 3 - pad;
    SecretBytes::try_fill(len, |out| {
        match base64::engine::general_purpose::STANDARD.decode_slice(s, out) {
            Ok(n) if n == len => Ok(()),
            _ => Err(()),
        }
    })
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_base64_decodes_like_the_plain_decoder() {
        for n in 0..40usize {
            let plain: Vec<u8> = (0..n as u8).map(|i| i.wrapping_mul(37)).collect();
            let s = b64(&plain);
            let secret = unb64_secret(&s).expect("valid base64");
            assert_eq!(secret.dangerous_as_bytes(), &plain[..], "length {n}");
        }
        for bad in ["abc", "ab=c", "a===", "@@@@", "YQ", "YQ=", "YWJj\n"] {
            assert_eq!(unb64_secret(bad).is_some(), unb64(bad).is_some(), "{bad:?}");
            assert!(unb64_secret(bad).is_none(), "{bad:?}");
        }
    }
}
