//! The Vault Transit API under `/v1/transit/`: keys (create, read, list, rotate, config),
//! encrypt, decrypt, rewrap, datakey (plaintext/wrapped), random — what hvac and Ceph RGW's
//! SSE-KMS (`rgw_crypt_vault_secret_engine = transit`) speak. Transit keys are the store's CMKs:
//! the key `NAME` is the CMK with alias `alias/NAME`, so both APIs and the CLI share one key
//! namespace and one audit log.
//!
//! Ciphertexts are `vault:v<version>:<base64 of our self-describing blob>`. As Vault does for
//! non-derived keys, `context` is accepted and not bound (RGW sends one); `associated_data` is
//! bound. CMK material is never exported, and keys are deleted through `schedule-key-deletion`
//! (DEW API or CLI), so `export` and `DELETE keys/NAME` are refused with a reason.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use super::authz::Caller;
use super::creds;
use super::dew::{b64, unb64};
use super::dew_fields::unb64_secret;
use super::errors::{Api, ApiError};
use super::limits::RateLimiter;
use super::{json_object, Outcome, RawRequest};
use crate::crypto::SecretBytes;
use crate::kms::{EncryptionContext, KeyMetadata, KeyStore, KmsError};

const API: Api = Api::Vault;

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(API, "KMS.0203", msg)
}

fn kms(e: KmsError) -> ApiError {
    ApiError::from_kms(API, &e, true)
}

fn ok(data: Value) -> Response {
    axum::Json(json!({
        "request_id": uuid::Uuid::new_v4().to_string(),
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": null,
    }))
    .into_response()
}

fn field<'a>(body: &'a Map<String, Value>, f: &str) -> Result<Option<&'a str>, ApiError> {
    match body.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(format!("the field {f} must be a string"))),
    }
}

fn number(body: &Map<String, Value>, f: &str) -> Result<Option<u64>, ApiError> {
    match body.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("the field {f} must be a non-negative integer"))),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|_| bad(format!("the field {f} must be a non-negative integer"))),
        Some(_) => Err(bad(format!("the field {f} must be an integer"))),
    }
}

/// `associated_data` (base64) is bound; `context` is accepted and ignored (non-derived keys).
fn context(body: &Map<String, Value>) -> Result<EncryptionContext, ApiError> {
    let mut c = EncryptionContext::new();
    if let Some(ad) = field(body, "associated_data")? {
        unb64(ad).ok_or_else(|| bad("the field associated_data must be base64"))?;
        c.insert("vault:associated_data".into(), ad.into());
    }
    if let Some(ctx) = field(body, "context")? {
        unb64(ctx).ok_or_else(|| bad("the field context must be base64"))?;
    }
    Ok(c)
}

fn ciphertext(w: &crate::kms::WrappedDataKey) -> String {
    format!("vault:v{}:{}", w.key_version, b64(&w.cipher_text))
}

fn parse_ciphertext(s: &str) -> Result<Vec<u8>, ApiError> {
    let rest = s
        .strip_prefix("vault:v")
        .ok_or_else(|| bad("invalid ciphertext: no vault prefix"))?;
    let (ver, data) = rest
        .split_once(':')
        .ok_or_else(|| bad("invalid ciphertext: no version"))?;
    ver.parse::<u32>()
        .map_err(|_| bad("invalid ciphertext: bad version"))?;
    unb64(data).ok_or_else(|| bad("invalid ciphertext: not base64"))
}

fn key_info(m: &KeyMetadata, name: &str) -> Value {
    let keys: Map<String, Value> = (1..=m.version_count)
        .map(|v| (v.to_string(), json!(m.creation_date)))
        .collect();
    json!({
        "name": name,
        "type": "aes256-gcm96",
        "keys": keys,
        "latest_version": m.current_version,
        "min_available_version": 0,
        "min_decryption_version": 1,
        "min_encryption_version": 0,
        "derived": false,
        "exportable": false,
        "allow_plaintext_backup": false,
        "deletion_allowed": false,
        "supports_encryption": true,
        "supports_decryption": true,
        "supports_derivation": true,
        "supports_signing": false,
        "auto_rotate_period": m.rotation_interval_days.map(|d| u64::from(d) * 86_400).unwrap_or(0),
        "key_state": m.key_state.code().to_string(),
    })
}

/// The Vault request path: authenticate, rate-limit, parse, dispatch.
pub(super) fn work(
    ks: &KeyStore,
    rate: &RateLimiter,
    raw: &RawRequest,
    outcome: &mut Outcome,
) -> Result<Response, ApiError> {
    let rest = raw.path.strip_prefix("/v1/transit/").unwrap_or_default();
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    outcome.operation = format!("transit {} {}", raw.method, segs.first().unwrap_or(&""));
    let caller = creds::authenticate_vault(ks, raw).inspect_err(|e| {
        outcome.auth_failure = Some(e.message.clone());
    })?;
    outcome.credential = Some(caller.name.clone());
    if !rate.allow(&caller.name) {
        return Err(ApiError::new(
            API,
            StatusCode::TOO_MANY_REQUESTS,
            "APIGW.0308",
            format!("credential {} is over its request rate", caller.name),
        ));
    }
    let body = json_object(API, &raw.body)?;
    let listing = raw.method == "LIST"
        || (raw.method == "GET"
            && raw
                .query
                .as_deref()
                .is_some_and(|q| q.split('&').any(|p| p == "list=true")));
    let method = raw.method.as_str();
    // The right each route needs (Transit's names map onto these: `rights::TRANSIT_OPERATIONS`).
    let use_key = |name: &str, op: &str, outcome: &mut Outcome| -> Result<(), ApiError> {
        outcome.key = Some(name.to_string());
        caller
            .check(ks, API, name, &[op], &context(&body)?, outcome)
            .map(|_| ())
    };
    match (method, segs.as_slice()) {
        (_, ["keys"]) if listing => list(ks, &caller),
        ("POST" | "PUT", ["keys", name]) => {
            use_key(name, "describe-key", outcome)?;
            create(ks, &caller, name, &body)
        }
        ("GET", ["keys", name]) => {
            use_key(name, "describe-key", outcome)?;
            Ok(ok(key_info(&ks.describe_key(name).map_err(kms)?, name)))
        }
        ("DELETE", ["keys", name]) => {
            outcome.key = Some(name.to_string());
            Err(bad(format!("deletion is not allowed for key {name}: schedule it with the DEW API's schedule-key-deletion or `cryptnbd kms schedule-key-deletion`")))
        }
        ("POST" | "PUT", ["keys", name, "rotate"]) => {
            use_key(name, "manage", outcome)?;
            writable(&caller)?;
            let m = ks.rotate_key(name).map_err(kms)?;
            Ok(ok(key_info(&m, name)))
        }
        ("POST" | "PUT", ["keys", name, "config"]) => {
            use_key(name, "manage", outcome)?;
            writable(&caller)?;
            config(ks, name, &body)
        }
        ("POST" | "PUT", ["encrypt", name]) => {
            use_key(name, "encrypt-data", outcome)?;
            let plain =
                field(&body, "plaintext")?.ok_or_else(|| bad("missing plaintext to encrypt"))?;
            let plain =
                unb64_secret(plain).ok_or_else(|| bad("the field plaintext must be base64"))?;
            if ks.resolve_key_id(name).is_err() {
                // Vault creates the key on first encrypt ("upsert").
                create(ks, &caller, name, &Map::new())?;
            }
            let w = ks
                .encrypt_data(name, &plain, &context(&body)?)
                .map_err(kms)?;
            Ok(ok(
                json!({"ciphertext": ciphertext(&w), "key_version": w.key_version}),
            ))
        }
        ("POST" | "PUT", ["decrypt", name]) => {
            use_key(name, "decrypt-data", outcome)?;
            let ct = parse_ciphertext(
                field(&body, "ciphertext")?.ok_or_else(|| bad("missing ciphertext to decrypt"))?,
            )?;
            let u = ks
                .decrypt_data(Some(name), &ct, &context(&body)?)
                .map_err(kms)?;
            Ok(ok(
                json!({"plaintext": b64(u.plain_text.dangerous_as_bytes())}),
            ))
        }
        ("POST" | "PUT", ["rewrap", name]) => {
            use_key(name, "re-encrypt", outcome)?;
            let ct = parse_ciphertext(
                field(&body, "ciphertext")?.ok_or_else(|| bad("missing ciphertext to rewrap"))?,
            )?;
            let w = ks.rewrap_data(name, &ct, &context(&body)?).map_err(kms)?;
            Ok(ok(
                json!({"ciphertext": ciphertext(&w), "key_version": w.key_version}),
            ))
        }
        ("POST" | "PUT", ["datakey", kind @ ("plaintext" | "wrapped"), name]) => {
            let op = if *kind == "plaintext" {
                "create-datakey"
            } else {
                "create-datakey-without-plaintext"
            };
            use_key(name, op, outcome)?;
            let bits = number(&body, "bits")?.unwrap_or(256);
            if !matches!(bits, 128 | 256 | 512) {
                return Err(bad("bits must be 128, 256 or 512"));
            }
            // Sealed like `encrypt`, so the `decrypt` endpoint opens it (as RGW does).
            let plain = SecretBytes::random(bits as usize / 8);
            let w = ks
                .encrypt_data(name, &plain, &context(&body)?)
                .map_err(kms)?;
            let mut data = json!({"ciphertext": ciphertext(&w), "key_version": w.key_version});
            if *kind == "plaintext" {
                data["plaintext"] = Value::String(b64(plain.dangerous_as_bytes()));
            }
            Ok(ok(data))
        }
        ("POST" | "PUT", ["random", tail @ ..]) => random(ks, &body, tail),
        (_, ["export", ..]) => Err(bad(
            "keys are not exportable: CMK material never leaves the key store",
        )),
        _ => Err(ApiError::new(
            API,
            StatusCode::NOT_FOUND,
            "KMS.0201",
            format!("unsupported path: {} /v1/transit/{rest}", raw.method),
        )),
    }
}

fn writable(caller: &Caller) -> Result<(), ApiError> {
    if caller.read_only {
        return Err(ApiError::forbidden(
            API,
            format!("credential {} is read-only", caller.name),
        ));
    }
    Ok(())
}

fn list(ks: &KeyStore, caller: &Caller) -> Result<Response, ApiError> {
    let names: Vec<String> = ks
        .list_keys()
        .map_err(kms)?
        .into_iter()
        .filter(|m| caller.allows_id(ks, m.key_id))
        .filter_map(|m| m.key_alias.strip_prefix("alias/").map(str::to_string))
        .collect();
    if names.is_empty() {
        return Err(ApiError::new(
            API,
            StatusCode::NOT_FOUND,
            "KMS.0207",
            "no keys",
        ));
    }
    Ok(ok(json!({"keys": names})))
}

fn create(
    ks: &KeyStore,
    caller: &Caller,
    name: &str,
    body: &Map<String, Value>,
) -> Result<Response, ApiError> {
    writable(caller)?;
    if let Some(t) = field(body, "type")? {
        if t != "aes256-gcm96" {
            return Err(bad(format!(
                "key type {t:?} is not supported (only aes256-gcm96)"
            )));
        }
    }
    for (f, allowed) in [
        ("derived", false),
        ("exportable", false),
        ("allow_plaintext_backup", false),
    ] {
        if body
            .get(f)
            .and_then(Value::as_bool)
            .is_some_and(|v| v != allowed)
        {
            return Err(bad(format!("{f}={} is not supported here", !allowed)));
        }
    }
    match ks.describe_key(name) {
        Ok(m) => return Ok(ok(key_info(&m, name))),
        Err(KmsError::KeyNotFound { .. }) => {}
        Err(e) => return Err(kms(e)),
    }
    caller.require_admin(API, "create keys")?;
    let m = ks
        .create_key(name, "created through the Vault transit API")
        .map_err(kms)?;
    Ok(ok(key_info(&m, name)))
}

fn config(ks: &KeyStore, name: &str, body: &Map<String, Value>) -> Result<Response, ApiError> {
    for f in ["deletion_allowed", "exportable", "allow_plaintext_backup"] {
        if body.get(f).and_then(Value::as_bool) == Some(true) {
            return Err(bad(format!("{f}=true is not supported: CMKs are never exported and are deleted with schedule-key-deletion")));
        }
    }
    for f in ["min_decryption_version", "min_encryption_version"] {
        if number(body, f)?.is_some_and(|v| v > 1) {
            return Err(bad(format!(
                "{f} above 1 is not supported: every version keeps decrypting"
            )));
        }
    }
    if let Some(p) = body.get("auto_rotate_period") {
        let secs = match p {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => humantime::parse_duration(s).ok().map(|d| d.as_secs()),
            _ => None,
        }
        .ok_or_else(|| bad("auto_rotate_period must be a duration"))?;
        if secs == 0 {
            ks.disable_key_rotation(name).map_err(kms)?;
        } else {
            let days =
                u32::try_from(secs / 86_400).map_err(|_| bad("auto_rotate_period is too long"))?;
            ks.enable_key_rotation(name, days).map_err(kms)?;
        }
    }
    Ok(ok(key_info(&ks.describe_key(name).map_err(kms)?, name)))
}

fn random(ks: &KeyStore, body: &Map<String, Value>, tail: &[&str]) -> Result<Response, ApiError> {
    let mut bytes = number(body, "bytes")?.unwrap_or(32);
    let mut format = field(body, "format")?.unwrap_or("base64").to_string();
    for t in tail {
        match *t {
            "hex" | "base64" => format = t.to_string(),
            n => {
                bytes = n
                    .parse()
                    .map_err(|_| bad(format!("{n:?} is not a byte count or format")))?
            }
        }
    }
    let r = ks.gen_random(bytes as usize).map_err(kms)?;
    let out = match format.as_str() {
        "hex" => hex::encode(r.dangerous_as_bytes()),
        "base64" => b64(r.dangerous_as_bytes()),
        f => return Err(bad(format!("format {f:?} is not base64 or hex"))),
    };
    Ok(ok(json!({"random_bytes": out})))
}
