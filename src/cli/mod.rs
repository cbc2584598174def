//! Binary-only helpers shared by the subcommands: the global options and how they turn into a
//! key store handle, plus small parsers (sizes, `k=v` contexts) and output helpers.

pub mod check;
pub mod ctl;
pub mod docs;
pub mod examples;
pub mod kms;
mod kms_access;
mod kms_print;
mod kms_root;
pub mod kms_serve;
mod kms_store;
pub mod rbd;
pub mod remote;
pub mod serve;
pub mod serve_attach;
pub mod serve_config;
pub mod serve_ops;
pub mod vhost;
pub mod volume;
mod volume_snap;

use std::io::Write;
use std::path::PathBuf;

use serde_json::Value;

/// Options every subcommand sees.
#[derive(Debug, Clone)]
pub struct Global {
    pub data_dir: PathBuf,
    pub passphrase_file: Option<PathBuf>,
}

/// Parses a size such as `10G`, `512M`, `1T`, `4096` or `1.5GiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?} (use K, M, G, T)"
            ))
        }
    };
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (expected e.g. 10G)"));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (expected e.g. 10G)"))?;
    let v = f * mult as f64;
    if !(0.0..1.8e19).contains(&v) {
        return Err(format!("size {s:?} is out of range"));
    }
    Ok(v as u64)
}

/// Parses one `--context key=value` argument.
pub fn parse_context_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Prints `text` and a newline on standard output as one write, ignoring a closed output: a
/// daemon whose stdout reader went away (a supervisor, a test that read what it needed) must
/// keep serving, where `println!` would panic on the broken pipe.
pub fn say(text: &str) {
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes()).and_then(|()| out.flush());
}

/// Pretty JSON on standard output (the `--json` form of every command).
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Aligned `field: value` lines (the human form of a record).
pub fn print_fields(fields: &[(&str, String)]) {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        println!("{:width$} {v}", format!("{k}:"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("G").is_err());
        assert!(parse_size("10X").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn contexts() {
        assert_eq!(
            parse_context_pair("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_context_pair("=x").is_err());
        assert!(parse_context_pair("novalue").is_err());
    }
}
