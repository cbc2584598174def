//! How the key commands print their results: aligned `field: value` lines (or a table) for
//! people, `--json` with the DEW KMS field names for scripts, one line per record for the audit
//! log. Apart from `kms`, which parses and dispatches, so that the output formats (which scripts
//! depend on) sit in one place. Plaintext key material passes through here only in
//! `print_wrapped`, as hex in a zeroized string.

use std::io::Write;

use cryptnbd::crypto::SecretBytes;
use cryptnbd::kms::{
    clock, AliasInfo, AuditRecord, EncryptionContext, KeyMetadata, WrappedDataKey,
};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::{print_fields, print_json};

pub(super) fn metadata_json(m: &KeyMetadata) -> Value {
    let mut v = serde_json::to_value(m).expect("metadata serializes");
    v["key_state_name"] = json!(m.key_state.name());
    v
}

pub(super) fn print_metadata(m: &KeyMetadata, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        return print_json(&metadata_json(m));
    }
    let mut f = vec![
        ("key_id", m.key_id.to_string()),
        ("key_alias", m.key_alias.clone()),
        ("key_description", m.key_description.clone()),
        (
            "key_state",
            format!("{} ({})", m.key_state.code(), m.key_state.name()),
        ),
        ("creation_date", clock::rfc3339(m.creation_date)),
        ("current_version", m.current_version.to_string()),
        ("version_count", m.version_count.to_string()),
    ];
    if let Some(d) = m.scheduled_deletion_date {
        f.push(("scheduled_deletion_date", clock::rfc3339(d)));
    }
    if let Some(d) = m.rotation_interval_days {
        f.push(("rotation_interval_days", d.to_string()));
    }
    print_fields(&f);
    Ok(())
}

pub(super) fn print_aliases(aliases: &[AliasInfo], json_out: bool) -> anyhow::Result<()> {
    if json_out {
        let v: Vec<Value> = aliases
            .iter()
            .map(|a| {
                json!({
                    "alias": a.alias,
                    "key_id": a.key_id.to_string(),
                    "creation_date": clock::rfc3339(a.creation_date),
                    "update_date": clock::rfc3339(a.update_date),
                })
            })
            .collect();
        return print_json(&json!({ "aliases": v }));
    }
    let width = aliases
        .iter()
        .map(|a| a.alias.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:width$}  {:36}  UPDATED", "ALIAS", "KEY ID");
    for a in aliases {
        println!(
            "{:width$}  {}  {}",
            a.alias,
            a.key_id,
            clock::rfc3339(a.update_date)
        );
    }
    Ok(())
}

pub(super) fn print_wrapped(
    w: &WrappedDataKey,
    plain: Option<&SecretBytes>,
    ctx: &EncryptionContext,
    json_out: bool,
) -> anyhow::Result<()> {
    let plain_hex = plain.map(|p| Zeroizing::new(hex::encode(p.dangerous_as_bytes())));
    if json_out {
        let mut v = json!({
            "key_id": w.key_id,
            "key_version": w.key_version,
            "cipher_text": hex::encode(&w.cipher_text),
            "encryption_context": ctx,
        });
        if let Some(p) = &plain_hex {
            v["plain_text"] = json!(p.as_str());
            v["datakey_length"] = json!(plain.map(|p| p.len() * 8));
        }
        return print_json(&v);
    }
    let mut f = vec![
        ("key_id", w.key_id.to_string()),
        ("key_version", w.key_version.to_string()),
    ];
    if let Some(p) = &plain_hex {
        f.push(("plain_text", p.to_string()));
    }
    f.push(("cipher_text", hex::encode(&w.cipher_text)));
    print_fields(&f);
    Ok(())
}

pub(super) fn print_audit(records: &[AuditRecord], json_out: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for r in records {
        if json_out {
            serde_json::to_writer(&mut out, r)?;
            writeln!(out)?;
            continue;
        }
        let key = match (r.key_id, &r.key) {
            (Some(id), _) => id.to_string(),
            (None, Some(k)) => k.clone(),
            (None, None) => "-".into(),
        };
        let ver = r.key_version.map(|v| format!("v{v}")).unwrap_or_default();
        let ctx = if r.encryption_context.is_empty() {
            String::new()
        } else {
            let pairs: Vec<_> = r
                .encryption_context
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!(" context {}", pairs.join(","))
        };
        let outcome = match &r.error {
            Some(e) => format!("error: {e}"),
            None => r.outcome.clone(),
        };
        // Aggregated lines (refused requests counted per client address).
        let agg = match (r.count, &r.source) {
            (Some(n), Some(src)) => format!("  ×{n} from {src}"),
            (Some(n), None) => format!("  ×{n}"),
            (None, Some(src)) => format!("  from {src}"),
            (None, None) => String::new(),
        };
        writeln!(
            out,
            "{}  {:<32} {key} {ver}{ctx}  {outcome}{agg}",
            r.time, r.operation
        )?;
    }
    Ok(())
}
