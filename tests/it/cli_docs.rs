//! The documentation a user can find: `cryptnbd manpages DIR` writes a page for every command that
//! groff renders without a warning and `man -l` displays; `cryptnbd completions bash` loads into
//! bash and completes subcommands; every relative link in README.md and docs/ resolves; and the
//! format specification in docs/format.md is precise enough to decode the golden volume header with
//! nothing but the offsets it states (`docs/decode-header.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::require_tool;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cryptnbd"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_man_page_renders_without_warnings() {
    if !require_tool("/usr/bin/groff") || !require_tool("/usr/bin/man") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = bin().arg("manpages").arg(dir.path()).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    pages.sort();
    let names: Vec<String> = pages
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for must in [
        "cryptnbd.1",
        "cryptnbd-serve.1",
        "cryptnbd-kms.1",
        "cryptnbd-kms-create-key.1",
        "cryptnbd-volume-create.1",
        "cryptnbd-check.1",
        "cryptnbd-completions.1",
    ] {
        assert!(
            names.iter().any(|n| n == must),
            "{must} missing in {names:?}"
        );
    }
    // One line per page on stdout, so a packaging script can list what was installed.
    let listed = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(listed, pages.len());
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        assert!(
            text.is_ascii(),
            "{} is not plain ASCII roff",
            page.display()
        );
        assert!(
            text.contains(".SH EXAMPLES"),
            "{} has no examples",
            page.display()
        );
        let g = Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(page)
            .output()
            .unwrap();
        assert!(
            g.status.success() && g.stderr.is_empty(),
            "groff warns on {}: {}",
            page.display(),
            String::from_utf8_lossy(&g.stderr)
        );
        let m = Command::new("man")
            .arg("-l")
            .arg(page)
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100")
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&m.stdout);
        assert!(m.status.success(), "man -l {}", page.display());
        assert!(
            shown.contains("SYNOPSIS") && shown.contains("cryptnbd"),
            "{shown}"
        );
    }
}

#[test]
fn bash_completion_loads_and_completes_subcommands() {
    if !require_tool("/bin/bash") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("cryptnbd.bash");
    let out = bin().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    std::fs::write(&script, &out.stdout).unwrap();
    // Load it into a fresh bash, check it registered, and ask it to complete `cryptnbd se` and
    // `cryptnbd kms create-`, as bash does when the user presses Tab.
    let probe = format!(
        "set -e; source '{}'; complete -p cryptnbd >/dev/null; \
         COMP_WORDS=(cryptnbd se); COMP_CWORD=1; COMP_LINE='cryptnbd se'; COMP_POINT=11; \
         _cryptnbd cryptnbd se cryptnbd; echo \"top:${{COMPREPLY[*]}}\"; \
         COMP_WORDS=(cryptnbd kms create-); COMP_CWORD=2; COMP_LINE='cryptnbd kms create-'; \
         COMP_POINT=20; _cryptnbd cryptnbd create- kms; echo \"kms:${{COMPREPLY[*]}}\"",
        script.display()
    );
    let b = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &probe])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&b.stdout);
    assert!(
        b.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&b.stderr)
    );
    let top = text.lines().find(|l| l.starts_with("top:")).unwrap();
    assert!(
        top.split_whitespace().any(|w| w.ends_with("serve")),
        "{text}"
    );
    let kms = text.lines().find(|l| l.starts_with("kms:")).unwrap();
    assert!(
        kms.contains("create-key") && kms.contains("create-datakey"),
        "{text}"
    );
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = bin().args(["completions", shell]).output().unwrap();
        assert!(out.status.success() && !out.stdout.is_empty(), "{shell}");
    }
    let bad = bin().args(["completions", "tcsh"]).output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values"));
}

/// Relative links `[text](path#anchor)` of a Markdown file: each path must exist (the anchor,
/// when given, must match a heading of the target).
fn check_links(file: &Path, broken: &mut Vec<String>) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let Some(end) = rest.find(')') else { break };
        let target = &rest[..end];
        rest = &rest[end..];
        if target.contains("://") || target.starts_with("mailto:") || target.contains(' ') {
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target, None),
        };
        let resolved = if path.is_empty() {
            file.to_path_buf()
        } else {
            file.parent().unwrap().join(path)
        };
        if !resolved.exists() {
            broken.push(format!("{}: {target} (no such file)", file.display()));
            continue;
        }
        if let Some(anchor) = anchor {
            if resolved.extension().is_some_and(|e| e == "md") {
                let target_text = std::fs::read_to_string(&resolved).unwrap();
                let found = target_text
                    .lines()
                    .filter(|l| l.starts_with('#'))
                    .any(|l| slug(l.trim_start_matches('#').trim()) == anchor);
                if !found {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
}

/// GitHub's heading anchor: lower case, spaces to '-', punctuation other than '-' and '_' dropped.
fn slug(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn readme_and_docs_links_resolve() {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    assert!(
        files.len() >= 7,
        "docs/ should hold one file per subject: {files:?}"
    );
    let mut broken = Vec::new();
    for f in &files {
        check_links(f, &mut broken);
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    // Every file in docs/ is reachable from the README.
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for f in files.iter().skip(1) {
        let name = format!("docs/{}", f.file_name().unwrap().to_string_lossy());
        assert!(readme.contains(&name), "README does not link {name}");
    }
    assert!(slug("Volume header (format 1)") == "volume-header-format-1");
}

#[test]
fn format_spec_decodes_the_golden_header() {
    if !require_tool("/usr/bin/python3") {
        return;
    }
    let root = repo();
    let out = Command::new("/usr/bin/python3")
        .arg(root.join("docs/decode-header.py"))
        .arg(root.join("tests/data/volume-header-v1.bin"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The same fields the Rust decoder reads (tests/it/volume_header.rs pins them too).
    let header = std::fs::read(root.join("tests/data/volume-header-v1.bin")).unwrap();
    let parsed = cryptnbd::volume::VolumeHeader::decode(&header).unwrap();
    for want in [
        format!("volume_id: {}", parsed.volume_id),
        format!("size: {}", parsed.size),
        format!("sector_size: {}", parsed.sector_size),
        format!("generation: {}", parsed.generation),
        format!("cmk_id: {}", parsed.key_id),
        format!("cmk_version: {}", parsed.key_version),
        format!("cipher: {}", parsed.cipher),
        format!("tweak: {}", parsed.tweak),
        format!("wrapped_dek_len: {}", parsed.wrapped_dek.len()),
        "checksum: ok".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
    }
    // Format 2 (layered volumes): the layer and parent fields the document adds.
    let v2 = root.join("tests/data/volume-header-v2.bin");
    let out = Command::new("/usr/bin/python3")
        .arg(root.join("docs/decode-header.py"))
        .arg(&v2)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let parsed = cryptnbd::volume::VolumeHeader::decode(&std::fs::read(&v2).unwrap()).unwrap();
    let parent = parsed
        .parent
        .as_ref()
        .expect("the golden v2 header has a parent");
    for want in [
        "format_version: 2".to_string(),
        format!("layer_id: {}", parsed.layer_id.unwrap()),
        format!("parent_volume_id: {}", parent.volume_id),
        format!("parent_layer_id: {}", parent.layer_id),
        format!("parent_size: {}", parent.size),
        format!("parent_name: {}", parent.name),
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
    }
    // A flipped byte is caught by the checksum the document describes.
    let dir = tempfile::tempdir().unwrap();
    let mut bad = header.clone();
    bad[60] ^= 1;
    let p = dir.path().join("bad.bin");
    std::fs::write(&p, &bad).unwrap();
    let out = Command::new("/usr/bin/python3")
        .arg(root.join("docs/decode-header.py"))
        .arg(&p)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("checksum"));
}
