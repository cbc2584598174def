//! The `cryptnbd` command line: parses arguments with clap, sets up tracing, turns arguments into the
//! library's typed values and calls it. No protocol or storage logic lives here.

#![deny(unsafe_code)]

mod cli;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// cryptnbd: an NBD server for AES-256-XTS encrypted virtual disks, with an embedded key store.
///
/// Each volume has its own data key (DEK), wrapped by a customer master key (CMK) held in the
/// key store in the data directory. `cryptnbd serve` with nothing set up creates a key store, a
/// CMK `alias/default` and a 1 GiB volume `disk0`, serves it and prints how to attach it.
#[derive(Parser, Debug)]
#[command(name = "cryptnbd", version, propagate_version = true, after_help = cli::rbd::RBD_SUPPORT)]
struct Cli {
    /// Directory holding the key store, the audit log and the volumes.
    #[arg(
        long,
        global = true,
        env = "CRYPTNBD_DATA_DIR",
        default_value = "./cryptnbd-data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,

    /// Read the key store passphrase from this file (for a store created with
    /// `kms init --passphrase-file`). Without it, $CRYPTNBD_PASSPHRASE is used if set, else the
    /// key file `root.key` in the data directory.
    #[arg(long, global = true, value_name = "FILE")]
    passphrase_file: Option<PathBuf>,

    /// More log output (-v: debug, -vv: trace). $RUST_LOG overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Log line format (logs go to standard error).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the embedded key store: customer master keys and data keys (envelope encryption).
    Kms(cli::kms::KmsArgs),
    /// Create, inspect, resize, rekey, import and export encrypted volumes.
    Volume(cli::volume::VolumeArgs),
    /// Serve volumes over NBD (TCP and Unix sockets) until SIGINT/SIGTERM.
    Serve(Box<cli::serve::ServeArgs>),
    /// Verify the key store and volumes (header copies, key references, sizes, permissions).
    Check(cli::check::CheckArgs),
    /// Talk to a running `serve` through its control socket.
    Ctl(cli::ctl::CtlArgs),
    /// Write the man pages (cryptnbd.1, cryptnbd-serve.1, …) into a directory.
    Manpages(cli::docs::ManpagesArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions(cli::docs::CompletionsArgs),
}

fn init_tracing(verbose: u8, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The whole command tree, with the examples of `cli::examples` in every `--help`.
fn command() -> clap::Command {
    cli::examples::with_examples(Cli::command())
}

fn main() -> ExitCode {
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    init_tracing(cli.verbose, cli.log_format);
    // Every subcommand may hold unwrapped keys (a data key, a volume's DEK): a crash must not write
    // them to a core file.
    if let Err(e) = cryptnbd::crypto::locked::disable_core_dumps() {
        tracing::warn!("could not turn off core dumps: {e}");
    }
    let global = cli::Global {
        data_dir: cli.data_dir,
        passphrase_file: cli.passphrase_file,
    };
    let result = match cli.command {
        Command::Kms(args) => cli::kms::run(&global, args).map(|()| ExitCode::SUCCESS),
        Command::Volume(args) => cli::volume::run(&global, args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => cli::serve::run(&global, *args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => cli::check::run(&global, args),
        Command::Ctl(args) => cli::ctl::run(&global, args).map(|()| ExitCode::SUCCESS),
        Command::Manpages(args) => {
            cli::docs::manpages(command(), &args).map(|()| ExitCode::SUCCESS)
        }
        Command::Completions(args) => {
            cli::docs::completions(command(), &args).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// One line from an error and its sources, leaving out a source whose text the line already
/// holds (many of our errors name their cause in their own message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command a user can run shows at least one example in `--help` (and so in its man
    /// page's EXAMPLES section).
    #[test]
    fn every_subcommand_has_an_example() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                if sub.is_hide_set() || sub.get_name() == "help" {
                    continue;
                }
                let name = format!("{path} {}", sub.get_name());
                let text = sub
                    .get_after_help()
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                if !text.contains("Example") || !text.contains("cryptnbd ") {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut cmd = command();
        cmd.build();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "cryptnbd", &mut missing);
        assert!(missing.is_empty(), "no example in --help: {missing:#?}");
    }
}
