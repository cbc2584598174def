//! Examples for the `--help` of commands whose definition carries none, by command path, added to
//! the clap tree before it parses (so `--help`, the man pages and the completions all show them).
//! A command that already shows an example keeps its own; one that has other after-help text gets
//! the examples appended. `every_subcommand_has_an_example` (main.rs) keeps the set complete.

use clap::Command;

/// (command path below `cryptnbd`, examples).
const EXAMPLES: &[(&str, &str)] = &[
    ("kms", "cryptnbd kms init\n  cryptnbd kms create-key --alias vols\n  cryptnbd kms list-keys --json"),
    ("kms list-keys", "cryptnbd kms list-keys\n  cryptnbd kms list-keys --json"),
    ("kms enable-key", "cryptnbd kms enable-key alias/vols"),
    ("kms disable-key", "cryptnbd kms disable-key alias/vols   # the next attach of its volumes is refused"),
    ("kms cancel-key-deletion", "cryptnbd kms cancel-key-deletion alias/old   # the key comes back disabled"),
    ("kms rotate-key", "cryptnbd kms rotate-key alias/vols   # new version; old versions still unwrap"),
    ("kms enable-key-rotation", "cryptnbd kms enable-key-rotation alias/vols --interval-days 90"),
    ("kms disable-key-rotation", "cryptnbd kms disable-key-rotation alias/vols"),
    ("kms list-aliases", "cryptnbd kms list-aliases --json"),
    (
        "kms create-datakey-without-plaintext",
        "cryptnbd kms create-datakey-without-plaintext alias/apps --context app=billing --json",
    ),
    ("kms gen-random", "cryptnbd kms gen-random --bytes 32"),
    (
        "kms credential",
        "cryptnbd kms credential create storage-1 --project p1 --output storage-1.cred\n  \
         cryptnbd kms credential list --json",
    ),
    ("kms credential list", "cryptnbd kms credential list\n  cryptnbd kms credential list --json   # user ids to grant to"),
    ("kms credential delete", "cryptnbd kms credential delete storage-1"),
    ("kms credential enable", "cryptnbd kms credential enable storage-1"),
    (
        "kms token",
        "cryptnbd kms token create rgw --key alias/s3 --ops datakey,decrypt > vault.token",
    ),
    ("kms audit", "cryptnbd kms audit --tail 20\n  cryptnbd kms audit --json"),
    (
        "volume create",
        "cryptnbd volume create vm1 --size 20G --key alias/vols\n  \
         cryptnbd volume create vm2 --size 1T --key alias/vols --sector-size 512 --no-discard",
    ),
    ("volume list", "cryptnbd volume list\n  cryptnbd volume list --json"),
    ("volume info", "cryptnbd volume info vm1 --json   # key_id, cipher_text, encryption_context"),
    ("volume resize", "cryptnbd volume resize vm1 --size 40G"),
    (
        "volume rekey",
        "cryptnbd volume rekey vm1                       # under the key's newest version\n  \
         cryptnbd volume rekey vm1 --key alias/vols-2027  # under another CMK",
    ),
    ("volume delete", "cryptnbd volume delete vm2 --yes"),
    ("volume import", "cryptnbd volume import vm2 --from disk.raw --key alias/vols"),
    ("volume export", "cryptnbd volume export vm2 --to copy.raw   # sparse, plaintext: keep it safe"),
    (
        "volume snapshot",
        "cryptnbd volume snapshot vm1@monday\n  cryptnbd volume snapshot list vm1\n  \
         cryptnbd volume snapshot delete vm1@monday",
    ),
    ("volume snapshot list", "cryptnbd volume snapshot list vm1 --json"),
    ("volume snapshot delete", "cryptnbd volume snapshot delete vm1@monday"),
    (
        "volume clone",
        "cryptnbd volume clone vm1@monday vm3\n  \
         cryptnbd volume clone vm1@monday vm4 --key alias/tenant-b   # its own writes under another CMK",
    ),
    ("volume flatten", "cryptnbd volume flatten vm3   # copies the rest in; the snapshot is no longer needed"),
    (
        "volume copy",
        "cryptnbd volume copy vm1@monday vm5 --key alias/tenant-b\n  \
         cryptnbd volume copy vm1 vm6 --key alias/vols --backend rbd:volumes",
    ),
    (
        "serve",
        "cryptnbd serve\n  \
         cryptnbd serve --socket /run/cryptnbd/nbd.sock --socket-mode 660 --socket-group disk --allow gid:disk=*\n  \
         cryptnbd serve --listen 0.0.0.0:10809 --tls-cert server-cert.pem --tls-key server-key.pem \\\n      \
         --tls-client-ca ca-cert.pem --allow cn:compute7=vm1,vm2\n  \
         cryptnbd serve --vhost-user-blk /run/cryptnbd/vm1.sock=vm1 --metrics 127.0.0.1:9810",
    ),
    ("ctl", "cryptnbd ctl status\n  cryptnbd ctl detach vm1\n  cryptnbd ctl top"),
    ("ctl status", "cryptnbd ctl status\n  cryptnbd ctl status --json"),
    ("ctl detach", "cryptnbd ctl detach vm1   # clients closed, volume flushed, its key dropped"),
    ("ctl attach", "cryptnbd ctl attach vm1"),
    ("ctl reload", "cryptnbd ctl reload   # as SIGHUP: certificates, CRLs and --allow rules"),
    ("ctl snapshot", "cryptnbd ctl snapshot vm1@monday   # online: writes held for milliseconds"),
    ("ctl top", "cryptnbd ctl top\n  cryptnbd ctl top --iterations 5 --interval 2s"),
];

/// Adds the examples of [`EXAMPLES`] to the commands of `cmd` that show none.
pub fn with_examples(mut cmd: Command) -> Command {
    for (path, text) in EXAMPLES {
        cmd = add(cmd, &path.split(' ').collect::<Vec<_>>(), text);
    }
    cmd
}

fn add(cmd: Command, path: &[&str], text: &str) -> Command {
    match path {
        [] => {
            let existing = cmd.get_after_help().map(|t| t.to_string());
            match existing {
                Some(e) if e.contains("Example") => cmd,
                Some(e) => cmd.after_help(format!("{e}\n\nExamples:\n  {text}")),
                None => cmd.after_help(format!("Examples:\n  {text}")),
            }
        }
        [first, rest @ ..] => {
            if cmd.find_subcommand(first).is_none() {
                return cmd;
            }
            cmd.mut_subcommand(*first, |sub| add(sub, rest, text))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_are_added_and_existing_ones_kept() {
        let cmd = Command::new("cryptnbd")
            .subcommand(Command::new("kms").subcommand(Command::new("list-keys")))
            .subcommand(Command::new("ctl").after_help("Example:\n  mine"))
            .subcommand(Command::new("serve").after_help("Notes."));
        let cmd = with_examples(cmd);
        let after = |p: &[&str]| {
            let mut c = &cmd;
            for n in p {
                c = c.find_subcommand(n).unwrap();
            }
            c.get_after_help()
                .map(|t| t.to_string())
                .unwrap_or_default()
        };
        assert!(after(&["kms", "list-keys"]).contains("cryptnbd kms list-keys --json"));
        assert_eq!(after(&["ctl"]), "Example:\n  mine");
        assert!(after(&["serve"]).starts_with("Notes.\n\nExamples:\n  cryptnbd serve"));
    }
}
