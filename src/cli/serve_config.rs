//! `serve --config FILE`: a TOML file whose keys are the long option names of `serve`, merged
//! with the command line into one set of arguments that clap checks as if all were typed.
//!
//! Precedence: an option given on the command line wins over the file, and a list given there
//! (`--allow`, `--listen`, ...) replaces the file's list rather than adding to it, so what the
//! command line says is always exactly what runs. Values: a string or number is the option's
//! value, `true` a flag (`false` leaves it out), an array repeats the option.
//!
//! The file is read again on SIGHUP with the same command line, so one merge function serves
//! start and reload; a file that does not parse, names an unknown option or fails clap's checks
//! is an error naming the file, and a reload keeps the old settings.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::Path;

use anyhow::Context;
use clap::{Args, FromArgMatches};

use super::serve::ServeArgs;

/// The long option names set on the command line (`--name` or `--name=value`).
fn given_on_command_line(argv: &[OsString]) -> HashSet<String> {
    argv.iter()
        .filter_map(|a| a.to_str())
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a).to_string())
        .collect()
}

/// The file's settings as `--name value` arguments, leaving out what `skip` names.
fn file_args(text: &str, skip: &HashSet<String>) -> anyhow::Result<Vec<OsString>> {
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let mut out = Vec::new();
    for (key, value) in &table {
        if key == "config" {
            anyhow::bail!("`config` cannot be set in the file itself");
        }
        if skip.contains(key) {
            continue;
        }
        let flag = OsString::from(format!("--{key}"));
        let scalar = |v: &toml::Value| -> anyhow::Result<Option<String>> {
            Ok(match v {
                toml::Value::String(s) => Some(s.clone()),
                toml::Value::Integer(n) => Some(n.to_string()),
                toml::Value::Float(f) => Some(f.to_string()),
                toml::Value::Boolean(_) => None,
                _ => anyhow::bail!("{key}: expected a string, number, boolean or array of them"),
            })
        };
        match value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    let Some(v) = scalar(v)? else {
                        anyhow::bail!("{key}: an array holds strings or numbers");
                    };
                    out.push(flag.clone());
                    out.push(v.into());
                }
            }
            v => {
                if let Some(v) = scalar(v)? {
                    out.push(flag);
                    out.push(v.into());
                }
            }
        }
    }
    Ok(out)
}

/// Merges `file` under the `serve` arguments of `cli` (the options after `serve`) and parses the
/// result.
pub(super) fn merge(file: &Path, text: &str, cli: &[OsString]) -> anyhow::Result<ServeArgs> {
    let wrap =
        |e: anyhow::Error| e.context(format!("in the configuration file {}", file.display()));
    let mut argv: Vec<OsString> = vec!["serve".into()];
    argv.extend(file_args(text, &given_on_command_line(cli)).map_err(wrap)?);
    argv.extend(cli.iter().cloned());
    let cmd = ServeArgs::augment_args(clap::Command::new("serve").no_binary_name(false));
    let m = cmd
        .try_get_matches_from(argv)
        .map_err(|e| wrap(anyhow::anyhow!("{}", e.render().to_string().trim_end())))?;
    ServeArgs::from_arg_matches(&m).map_err(|e| wrap(e.into()))
}

/// The `serve` arguments of this process merged with `file` as it is now.
pub fn merged(file: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading the configuration file {}", file.display()))?;
    let argv: Vec<OsString> = std::env::args_os().collect();
    // Everything after the `serve` subcommand is its own (global options come before it).
    let at = argv
        .iter()
        .position(|a| a == "serve")
        .context("`--config` is an option of `cryptnbd serve`")?;
    merge(file, &text, &argv[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_command_line_wins_and_replaces_lists() {
        let text = r#"
            allow = ["cn:a=disk0", "uid:0=*"]
            max-connections = 7
            tls-no-client-auth = false
            handshake-timeout = "5s"
        "#;
        let f = Path::new("x.toml");
        let a = merge(f, text, &args(&["--config", "x.toml"])).unwrap();
        assert_eq!(a.allow, ["cn:a=disk0", "uid:0=*"]);
        assert_eq!(a.max_connections, 7);
        assert_eq!(a.handshake_timeout, std::time::Duration::from_secs(5));
        let a = merge(
            f,
            text,
            &args(&["--allow", "uid:1=d", "--max-connections=9"]),
        )
        .unwrap();
        assert_eq!(a.allow, ["uid:1=d"]);
        assert_eq!(a.max_connections, 9);
    }

    #[test]
    fn several_kms_urls_come_as_an_array_or_a_list() {
        let f = Path::new("x.toml");
        let text = r#"
            kms-url = ["http://127.0.0.1:1", "http://127.0.0.1:2,http://127.0.0.1:3"]
            kms-credential = "gw.cred"
            kms-connect-timeout = "500ms"
        "#;
        let a = merge(f, text, &[]).unwrap();
        let urls = a.remote.kms_url.unwrap();
        assert_eq!(
            urls,
            [
                "http://127.0.0.1:1",
                "http://127.0.0.1:2",
                "http://127.0.0.1:3"
            ]
        );
        assert_eq!(
            a.remote.kms_connect_timeout,
            Some(std::time::Duration::from_millis(500))
        );
        let a = merge(f, text, &args(&["--kms-url", "https://kms.example"])).unwrap();
        assert_eq!(a.remote.kms_url.unwrap(), ["https://kms.example"]);
    }

    #[test]
    fn errors_name_the_file_and_the_option() {
        let f = Path::new("/etc/c.toml");
        let e = merge(f, "no-such-option = 1", &[]).unwrap_err();
        let m = format!("{e:#}");
        assert!(
            m.contains("/etc/c.toml") && m.contains("no-such-option"),
            "{m}"
        );
        let e = merge(f, "allow = [", &[]).unwrap_err();
        assert!(format!("{e:#}").contains("TOML"), "{e:#}");
        assert!(merge(f, "config = \"x\"", &[]).is_err());
    }
}
