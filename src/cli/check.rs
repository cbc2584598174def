//! `cryptnbd check [VOLUME…] [--json] [--repair]`: argument parsing and output for the data
//! directory check (`cryptnbd::datadir::DataDir::check` does the work). Exit code 0 when no
//! problem is left (warnings allowed), 1 when one is.

use std::process::ExitCode;

use clap::Args;
use cryptnbd::datadir::{DataDir, Finding, Severity};
use serde_json::json;

use super::kms::open_keystore;
use super::{print_json, Global};

const CHECK_AFTER_HELP: &str = "\
Checks the key store (every key version opens under the root key), each volume's two header
copies, its key (CMK exists, version present, enabled), its file size, and the permissions of the
data directory, root.key and the volume files. Changes nothing unless --repair, which may only
rewrite a damaged or stale header copy from the good one (the volume must not be attached).

Exit status: 0 no problems (warnings allowed), 1 problems found.

Examples:
  cryptnbd check
  cryptnbd check disk0 --json
  cryptnbd check disk0 --repair";

#[derive(Args, Debug)]
#[command(after_help = CHECK_AFTER_HELP)]
pub struct CheckArgs {
    /// Volumes to check (default: every volume).
    volumes: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Rewrite a damaged or stale header copy from the good one.
    #[arg(long)]
    repair: bool,
}

pub fn run(global: &Global, args: CheckArgs) -> anyhow::Result<ExitCode> {
    let dd = DataDir::new(&global.data_dir);
    if !global.data_dir.is_dir() {
        anyhow::bail!("no data directory {}", global.data_dir.display());
    }
    let (ks, ks_error) = match open_keystore(global) {
        Ok(ks) => (Some(ks), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let mut report = dd.check(ks.as_ref(), &args.volumes, args.repair)?;
    if let Some(e) = ks_error {
        report.findings.insert(
            0,
            Finding {
                subject: "key store".into(),
                severity: Severity::Problem,
                message: format!("cannot open it ({e}); key references were not checked"),
                repaired: false,
            },
        );
    }
    let problems = report.unresolved_problems();
    if args.json {
        print_json(&json!({
            "ok": problems == 0,
            "problems": problems,
            "volumes": report.volumes,
            "findings": report.findings,
        }))?;
    } else {
        for f in &report.findings {
            let label = match (f.severity, f.repaired) {
                (_, true) => "repaired",
                (Severity::Problem, false) => "PROBLEM",
                (Severity::Warning, false) => "warning",
            };
            println!("{label}: {}: {}", f.subject, f.message);
        }
        let warnings = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Warning)
            .count();
        println!(
            "checked the key store and {} volume(s): {}",
            report.volumes.len(),
            match (problems, warnings) {
                (0, 0) => "no problems".to_string(),
                (0, w) => format!("no problems, {w} warning(s)"),
                (p, w) => format!("{p} problem(s), {w} warning(s)"),
            }
        );
    }
    Ok(if problems == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
