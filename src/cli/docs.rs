//! The documentation the binary writes about itself: man pages (`cryptnbd manpages DIR`) and shell
//! completion scripts (`cryptnbd completions SHELL`), both generated from the clap definitions so
//! they cannot drift from `--help`.
//!
//! A page is clap_mangen's NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS sections, then an
//! EXAMPLES section from the command's `after_help` (every subcommand has one, a test checks it),
//! then SEE ALSO naming the parent and child pages, so `man cryptnbd-kms-create-key` leads on.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Command, ValueEnum};
use clap_complete::Shell;
use roff::{bold, roman, Roff};

const MANUAL: &str = "cryptnbd manual";

/// `cryptnbd manpages DIR`.
#[derive(Args, Debug)]
#[command(
    after_help = "Examples:\n  cryptnbd manpages /usr/local/share/man/man1 && mandb -q\n  \
    cryptnbd manpages /tmp/man && man -l /tmp/man/cryptnbd-serve.1"
)]
pub struct ManpagesArgs {
    /// Directory to write the pages into (created if missing).
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

/// `cryptnbd completions SHELL`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  \
    cryptnbd completions bash > /etc/bash_completion.d/cryptnbd\n  \
    cryptnbd completions zsh > \"${fpath[1]}/_cryptnbd\"\n  \
    cryptnbd completions fish > ~/.config/fish/completions/cryptnbd.fish")]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: CompletionShell,
}

/// The shells clap_complete writes for (a local enum so `--help` lists them).
#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
    Elvish,
    Powershell,
}

impl From<CompletionShell> for Shell {
    fn from(s: CompletionShell) -> Self {
        match s {
            CompletionShell::Bash => Shell::Bash,
            CompletionShell::Zsh => Shell::Zsh,
            CompletionShell::Fish => Shell::Fish,
            CompletionShell::Elvish => Shell::Elvish,
            CompletionShell::Powershell => Shell::PowerShell,
        }
    }
}

/// Writes one page per command and subcommand into `args.dir`; prints the files written.
pub fn manpages(cmd: Command, args: &ManpagesArgs) -> anyhow::Result<()> {
    fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating the man page directory {}", args.dir.display()))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write_pages(&cmd, None, &args.dir, &mut written)?;
    written.sort();
    for p in &written {
        println!("{}", p.display());
    }
    Ok(())
}

/// The page's name: `cryptnbd`, `cryptnbd-kms`, `cryptnbd-kms-create-key`, …
fn page_name(cmd: &Command) -> String {
    cmd.get_display_name()
        .unwrap_or_else(|| cmd.get_name())
        .to_string()
}

fn write_pages(
    cmd: &Command,
    parent: Option<&str>,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> anyhow::Result<()> {
    let name = page_name(cmd);
    let path = dir.join(format!("{name}.1"));
    let mut page = Vec::new();
    render_page(cmd, parent, &mut page)?;
    let page = ascii_roff(&String::from_utf8_lossy(&page));
    fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, Some(&name), dir, written)?;
    }
    Ok(())
}

/// Renders one page: clap_mangen's sections, then EXAMPLES and SEE ALSO of our own.
pub fn render_page(cmd: &Command, parent: Option<&str>, w: &mut dyn Write) -> anyhow::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).manual(MANUAL);
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(w)?;
    }
    let mut roff = Roff::new();
    if let Some(text) = cmd.get_after_help() {
        roff.control("SH", ["EXAMPLES"]);
        // The after_help text is laid out by hand (indented command lines): keep it as it is.
        roff.control("nf", [] as [&str; 0]);
        for line in text.to_string().lines() {
            let line = line.strip_prefix("Examples:").unwrap_or(line);
            let line = line.strip_prefix("Example:").unwrap_or(line);
            if line.trim().is_empty() {
                continue;
            }
            roff.text([roman(line)]);
        }
        roff.control("fi", [] as [&str; 0]);
    }
    let mut see_also: Vec<String> = Vec::new();
    if let Some(p) = parent {
        see_also.push(p.to_string());
    }
    see_also.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(page_name),
    );
    if !see_also.is_empty() {
        roff.control("SH", ["SEE ALSO"]);
        let mut inlines = Vec::new();
        for (i, name) in see_also.iter().enumerate() {
            if i > 0 {
                inlines.push(roman(", "));
            }
            inlines.push(bold(name.as_str()));
            inlines.push(roman("(1)"));
        }
        roff.text(inlines);
    }
    roff.to_writer(w)?;
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// Replaces every non-ASCII character with groff's `\[uXXXX]` escape, so a page renders the same
/// whatever input encoding the formatter assumes (groff without preconv reads Latin-1).
fn ascii_roff(page: &str) -> String {
    let mut out = String::with_capacity(page.len());
    for c in page.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", c as u32));
        }
    }
    out
}

/// Prints a completion script for `shell` on standard output.
pub fn completions(mut cmd: Command, args: &CompletionsArgs) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    clap_complete::generate(Shell::from(args.shell), &mut cmd, "cryptnbd", &mut out);
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Command {
        Command::new("tool")
            .about("a tool")
            .after_help("Examples:\n  tool sub --flag 'x' \\\n.starts with a dot → here")
            .subcommand(
                Command::new("sub")
                    .about("a sub")
                    .after_help("Example:\n  tool sub"),
            )
    }

    #[test]
    fn page_has_examples_and_see_also_with_escaped_text() {
        let mut cmd = sample().disable_help_subcommand(true);
        cmd.build();
        let mut out = Vec::new();
        render_page(&cmd, None, &mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        assert!(page.contains(".SH EXAMPLES"), "{page}");
        assert!(page.contains(".SH \"SEE ALSO\"") || page.contains(".SH SEE ALSO"));
        assert!(page.contains("tool\\-sub"), "{page}");
        // A line starting with a dot must not become a roff request.
        assert!(!page.lines().any(|l| l.starts_with(".starts")), "{page}");
        // The backslash of the shell continuation survives as a printed backslash.
        assert!(page.contains(" \\\\\n"), "{page}");
        assert!(!page.contains("tool\\-help"), "{page}");
        let ascii = ascii_roff(&page);
        assert!(ascii.is_ascii() && ascii.contains("\\[u2192]"), "{ascii}");
    }
}
