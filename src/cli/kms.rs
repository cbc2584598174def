//! `cryptnbd kms …`: the key store commands, named after the DEW KMS / AWS KMS API operations.
//! The CLI side only parses arguments, finds the root secret and prints results (aligned
//! `field: value` lines for people, `--json` with the DEW KMS field names for scripts); all key
//! handling is in `cryptnbd::kms`. This file parses and dispatches; beside it are `kms_root`
//! (the root of trust: passphrase, key file, opening the store, `kms init`) and `kms_print` (the
//! output formats).

use std::path::PathBuf;

use anyhow::bail;
use clap::{Args, Subcommand};
use cryptnbd::crypto::SecretBytes;
use cryptnbd::kms::{clock, EncryptionContext};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use super::kms_print::{metadata_json, print_aliases, print_audit, print_metadata, print_wrapped};
use super::kms_root::init;
pub use super::kms_root::{open_keystore, PASSPHRASE_ENV};
use super::{print_fields, print_json, Global};

const KMS_AFTER_HELP: &str = "\
KEY is a key id (UUID) or an alias (alias/NAME, or just NAME).

Getting started:
  cryptnbd kms init                               # key store + root.key in the data dir
  cryptnbd kms create-key --alias apps --description 'application keys'
  cryptnbd kms create-datakey apps --context app=billing --json
  cryptnbd kms decrypt-datakey apps --cipher-text HEX --context app=billing
  cryptnbd kms audit --tail 20

A store created with `kms init --passphrase-file F` needs `--passphrase-file F` or
$CRYPTNBD_PASSPHRASE on every later command. Back up root.key (or remember the passphrase):
without it nothing the store wrapped can ever be decrypted.";

#[derive(Args, Debug)]
#[command(after_help = KMS_AFTER_HELP)]
pub struct KmsArgs {
    #[command(subcommand)]
    command: KmsCommand,
}

#[derive(Args, Debug)]
struct JsonFlag {
    /// Print JSON (DEW KMS field names) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct KeyArg {
    /// The key: its id, or its alias (alias/NAME or NAME).
    key: String,
    #[command(flatten)]
    out: JsonFlag,
}

#[derive(Args, Debug)]
struct ContextArgs {
    /// Encryption context entry KEY=VALUE (repeatable). The same context must be given to
    /// decrypt: it is bound into the ciphertext, it is not secret (it is written to the audit log).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = super::parse_context_pair)]
    context: Vec<(String, String)>,
}

#[derive(Subcommand, Debug)]
enum KmsCommand {
    /// Create a new key store in the data directory. By default its root of trust is a fresh
    /// random key file `root.key` (mode 0600); with --passphrase-file (or $CRYPTNBD_PASSPHRASE) it
    /// is derived from a passphrase with Argon2id. Refuses to overwrite an existing store.
    #[command(
        after_help = "Examples:\n  cryptnbd --data-dir /srv/cryptnbd kms init\n  \
        cryptnbd kms init --passphrase-file ~/.cryptnbd-pass\n  \
        cryptnbd kms init --root-key-file /run/secrets/cryptnbd.key\n  \
        cryptnbd kms init --store rados:kms/prod --ceph-id kms     # shared by several hosts\n  \
        cryptnbd kms init --store rados:kms/prod --ceph-id kms --join --root-key-file KEY"
    )]
    Init {
        /// Use a copy of this existing 32-byte key file (mode 0600) as the root key.
        #[arg(long, value_name = "FILE")]
        root_key_file: Option<PathBuf>,
        #[command(flatten)]
        store: super::kms_root::StoreArgs,
        /// Join an existing RADOS store (another host's `kms init --store rados:…`) instead of
        /// creating one: checks the root key (--root-key-file, root.key here, or the
        /// passphrase) against the store and writes only the marker (and the root key copy).
        #[arg(long)]
        join: bool,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Create a customer master key (CMK), enabled, with a first version of key material.
    #[command(
        after_help = "Example:\n  cryptnbd kms create-key --alias volumes --description 'volume data keys'"
    )]
    CreateKey {
        /// Unique alias: alias/NAME or NAME, with letters, digits, '/', '_' and '-'.
        #[arg(long)]
        alias: String,
        /// Free text describing what the key is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// List the keys (deleted keys are not shown).
    ListKeys {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Show a key's metadata: id, alias, state, versions, dates (never key material).
    #[command(after_help = "Example:\n  cryptnbd kms describe-key alias/volumes --json")]
    DescribeKey(KeyArg),
    /// Enable a disabled key (state 3 → 2).
    EnableKey(KeyArg),
    /// Disable a key (state 2 → 3): it then refuses every data key operation, so volumes under
    /// it cannot be attached, until it is enabled again. Attached volumes keep working.
    DisableKey(KeyArg),
    /// Schedule the deletion of a key after a waiting period (state → 4). When the date passes,
    /// its key material is destroyed for good and everything it wrapped becomes unreadable.
    #[command(
        after_help = "Example:\n  cryptnbd kms schedule-key-deletion alias/old --pending-days 30\n\
        Changed your mind? `cryptnbd kms cancel-key-deletion alias/old` (the key comes back disabled)."
    )]
    ScheduleKeyDeletion {
        #[command(flatten)]
        key: KeyArg,
        /// Waiting period in days, 7 to 1096.
        #[arg(long, value_name = "N")]
        pending_days: u32,
    },
    /// Cancel a scheduled deletion; the key comes back disabled (enable it to use it).
    CancelKeyDeletion(KeyArg),
    /// Add a new version of the key's material: new data keys are wrapped under it; data keys
    /// wrapped under older versions still decrypt.
    RotateKey(KeyArg),
    /// Rotate the key automatically every N days (30 to 365); applied at the first use after.
    EnableKeyRotation {
        #[command(flatten)]
        key: KeyArg,
        /// Rotation interval in days.
        #[arg(long, value_name = "N")]
        interval_days: u32,
    },
    /// Stop rotating the key automatically.
    DisableKeyRotation(KeyArg),
    /// Give a key a new alias (the old alias is freed).
    #[command(after_help = "Example:\n  cryptnbd kms update-alias alias/old --alias new")]
    UpdateAlias {
        #[command(flatten)]
        key: KeyArg,
        /// The new alias.
        #[arg(long)]
        alias: String,
    },
    /// List every alias of every key (a key may have several; its main alias comes first).
    ListAliases {
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Give a key one more alias (the key keeps its others).
    #[command(
        after_help = "Example:\n  cryptnbd kms create-alias alias/volumes --alias tenant-a/volumes"
    )]
    CreateAlias {
        #[command(flatten)]
        key: KeyArg,
        /// The alias to add: alias/NAME or NAME, unique in the store.
        #[arg(long)]
        alias: String,
    },
    /// Remove aliases from a key (all of them must be its aliases, else nothing is removed); the
    /// key stays reachable by its id.
    #[command(
        after_help = "Example:\n  cryptnbd kms delete-alias alias/volumes --alias tenant-a/volumes"
    )]
    DeleteAlias {
        #[command(flatten)]
        key: KeyArg,
        /// An alias to remove (repeatable).
        #[arg(long, required = true)]
        alias: Vec<String>,
    },
    /// Move an existing alias to another key (what rotating to a new CMK by alias looks like:
    /// new data keys are then made under TARGET, old ones still unwrap under their own key).
    #[command(
        after_help = "Example:\n  cryptnbd kms associate-alias tenant-a/volumes --key alias/volumes-2027"
    )]
    AssociateAlias {
        /// The alias to move.
        alias: String,
        /// The key that gets it: id or alias.
        #[arg(long = "key", value_name = "TARGET")]
        target: String,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Generate a random data key: prints it in plaintext (use it, then forget it) and wrapped
    /// under KEY (store that beside your data).
    #[command(
        after_help = "Example:\n  cryptnbd kms create-datakey alias/apps --context app=billing --json"
    )]
    CreateDatakey(DatakeyArgs),
    /// Generate a random data key and print only its wrapped form.
    CreateDatakeyWithoutPlaintext(DatakeyArgs),
    /// Wrap a data key you supply (1 to 64 bytes, hex) under KEY.
    #[command(
        after_help = "Example:\n  cryptnbd kms encrypt-datakey alias/apps --plain-text 00112233445566778899aabbccddeeff"
    )]
    EncryptDatakey {
        #[command(flatten)]
        key: KeyArg,
        /// The data key in hex.
        #[arg(long, value_name = "HEX")]
        plain_text: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Unwrap a wrapped data key (prints the plaintext). KEY must be the key that wrapped it and
    /// the context must be the one given when it was created.
    #[command(
        after_help = "Example:\n  cryptnbd kms decrypt-datakey alias/apps --cipher-text 434e444b01… --context app=billing"
    )]
    DecryptDatakey {
        #[command(flatten)]
        key: KeyArg,
        /// The wrapped data key in hex.
        #[arg(long, value_name = "HEX")]
        cipher_text: String,
        #[command(flatten)]
        context: ContextArgs,
    },
    /// Re-wrap a wrapped data key under the newest version of its key, or under another key,
    /// without showing the plaintext.
    #[command(
        after_help = "Example:\n  cryptnbd kms re-encrypt --cipher-text HEX --source-context app=a \\\n      \
        --destination-key alias/new --destination-context app=a"
    )]
    ReEncrypt {
        /// The wrapped data key in hex.
        #[arg(long, value_name = "HEX")]
        cipher_text: String,
        /// The context it was wrapped with (KEY=VALUE, repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = super::parse_context_pair)]
        source_context: Vec<(String, String)>,
        /// The key to wrap it under (default: the newest version of its current key).
        #[arg(long, value_name = "KEY")]
        destination_key: Option<String>,
        /// The context to bind the new ciphertext to (KEY=VALUE, repeatable).
        #[arg(long, value_name = "KEY=VALUE", value_parser = super::parse_context_pair)]
        destination_context: Vec<(String, String)>,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Print random bytes (hex) from the operating system's CSPRNG.
    GenRandom {
        /// How many bytes, 1 to 1024 (a size such as 32 or 1K).
        #[arg(long, value_name = "N", value_parser = super::parse_size)]
        bytes: u64,
        #[command(flatten)]
        out: JsonFlag,
    },
    /// Serve the key store over HTTPS: the DEW KMS API and the Vault Transit API.
    Serve(super::kms_serve::ServeArgs),
    /// Access keys (AK/SK) for the DEW KMS API, each with a user id to grant to.
    #[command(subcommand)]
    Credential(super::kms_access::CredentialCommand),
    /// Tokens for the Vault Transit API.
    #[command(subcommand)]
    Token(super::kms_access::TokenCommand),
    /// Let a credential (by user id) run named operations on one key, optionally only with a
    /// given encryption context (e.g. one volume_id).
    CreateGrant(super::kms_access::CreateGrantArgs),
    /// List the grants on a key.
    ListGrants(super::kms_access::ListGrantsArgs),
    /// Take a grant back (the key owner's side): the grantee's next request under it is refused.
    RevokeGrant(super::kms_access::RemoveGrantArgs),
    /// Retire a grant that is no longer needed (the grantee's or retiring principal's side).
    RetireGrant(super::kms_access::RemoveGrantArgs),
    /// Copy this data directory's key store (files or RADOS) into DIR as a file store: sealed
    /// material and metadata only, no root key. Refuses to overwrite a store in DIR without --force.
    #[command(after_help = "Example:\n  cryptnbd kms export-store /backup/kms-2026-12-07")]
    ExportStore(super::kms_store::ExportArgs),
    /// Copy a file store (DIR) into this data directory's store, or with --store rados:POOL[/NS]
    /// into RADOS (this data directory then points at it, and gets DIR's root.key if it has none).
    /// Refuses to overwrite an existing store without --force.
    #[command(after_help = "Example (move a host's file store to RADOS):\n  \
        cryptnbd --data-dir /srv/kms kms import-store /srv/cryptnbd --store rados:kms/prod --ceph-id kms")]
    ImportStore(super::kms_store::ImportArgs),
    /// Show the audit log (one line per key operation; never any key material).
    Audit {
        /// Only the last N entries.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        #[command(flatten)]
        out: JsonFlag,
    },
}

#[derive(Args, Debug)]
struct DatakeyArgs {
    #[command(flatten)]
    key: KeyArg,
    #[command(flatten)]
    context: ContextArgs,
    /// Data key length: 256, or 512 for an AES-256-XTS key.
    #[arg(long, default_value_t = 256, value_parser = parse_length_bits)]
    length_bits: u32,
}

fn parse_length_bits(s: &str) -> Result<u32, String> {
    match s {
        "256" => Ok(256),
        "512" => Ok(512),
        _ => Err(format!("{s:?}: a data key is 256 or 512 bits")),
    }
}

fn context_of(pairs: Vec<(String, String)>) -> anyhow::Result<EncryptionContext> {
    let mut ctx = EncryptionContext::new();
    for (k, v) in pairs {
        if ctx.insert(k.clone(), v).is_some() {
            bail!("encryption context key {k:?} is given twice");
        }
    }
    Ok(ctx)
}

fn decode_hex(what: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    hex::decode(s.trim()).map_err(|e| anyhow::anyhow!("{what} is not valid hex: {e}"))
}

pub fn run(global: &Global, args: KmsArgs) -> anyhow::Result<()> {
    use KmsCommand as C;
    let cmd = match args.command {
        C::Init {
            root_key_file,
            store,
            join,
            out,
        } => return init(global, root_key_file, &store, join, out.json),
        C::ImportStore(a) => return super::kms_store::import(global, a),
        other => other,
    };
    let ks = open_keystore(global)?;
    match cmd {
        C::Init { .. } | C::ImportStore(_) => unreachable!("handled above"),
        C::ExportStore(a) => super::kms_store::export(global, a),
        C::Serve(a) => super::kms_serve::serve(ks, a),
        C::Credential(c) => super::kms_access::credential(&ks, c),
        C::Token(c) => super::kms_access::token(&ks, c),
        C::CreateGrant(a) => super::kms_access::create_grant(&ks, a),
        C::ListGrants(a) => super::kms_access::list_grants(&ks, a),
        C::RevokeGrant(a) => super::kms_access::remove_grant(&ks, "revoke-grant", a),
        C::RetireGrant(a) => super::kms_access::remove_grant(&ks, "retire-grant", a),
        C::CreateKey {
            alias,
            description,
            out,
        } => print_metadata(&ks.create_key(&alias, &description)?, out.json),
        C::ListKeys { out } => {
            let keys = ks.list_keys()?;
            if out.json {
                let list: Vec<Value> = keys.iter().map(metadata_json).collect();
                return print_json(&json!({ "keys": list, "total": keys.len() }));
            }
            if keys.is_empty() {
                println!("no keys (create one with `cryptnbd kms create-key --alias NAME`)");
                return Ok(());
            }
            println!(
                "{:<36}  {:<24}  {:<20}  {:>8}  CREATED",
                "KEY ID", "ALIAS", "STATE", "VERSIONS"
            );
            for m in &keys {
                println!(
                    "{:<36}  {:<24}  {:<20}  {:>8}  {}",
                    m.key_id,
                    m.key_alias,
                    format!("{} {}", m.key_state.code(), m.key_state.name()),
                    m.version_count,
                    clock::rfc3339(m.creation_date)
                );
            }
            Ok(())
        }
        C::DescribeKey(k) => print_metadata(&ks.describe_key(&k.key)?, k.out.json),
        C::EnableKey(k) => print_metadata(&ks.enable_key(&k.key)?, k.out.json),
        C::DisableKey(k) => print_metadata(&ks.disable_key(&k.key)?, k.out.json),
        C::ScheduleKeyDeletion { key, pending_days } => print_metadata(
            &ks.schedule_key_deletion(&key.key, pending_days)?,
            key.out.json,
        ),
        C::CancelKeyDeletion(k) => print_metadata(&ks.cancel_key_deletion(&k.key)?, k.out.json),
        C::RotateKey(k) => print_metadata(&ks.rotate_key(&k.key)?, k.out.json),
        C::EnableKeyRotation { key, interval_days } => print_metadata(
            &ks.enable_key_rotation(&key.key, interval_days)?,
            key.out.json,
        ),
        C::DisableKeyRotation(k) => print_metadata(&ks.disable_key_rotation(&k.key)?, k.out.json),
        C::UpdateAlias { key, alias } => {
            print_metadata(&ks.update_alias(&key.key, &alias)?, key.out.json)
        }
        C::ListAliases { out } => print_aliases(&ks.list_aliases()?, out.json),
        C::CreateAlias { key, alias } => {
            print_aliases(&[ks.create_alias(&key.key, &alias)?], key.out.json)
        }
        C::DeleteAlias { key, alias } => {
            let id = ks.delete_aliases(&key.key, &alias)?;
            if key.out.json {
                print_json(&json!({"key_id": id.to_string(), "deleted_aliases": alias}))
            } else {
                println!("removed {} from key {id}", alias.join(", "));
                Ok(())
            }
        }
        C::AssociateAlias { alias, target, out } => {
            print_aliases(&[ks.associate_alias(&alias, &target)?], out.json)
        }
        C::CreateDatakey(a) => {
            let ctx = context_of(a.context.context)?;
            let dk = ks.create_data_key(&a.key.key, &ctx, a.length_bits)?;
            print_wrapped(&dk.wrapped, Some(&dk.plain_text), &ctx, a.key.out.json)
        }
        C::CreateDatakeyWithoutPlaintext(a) => {
            let ctx = context_of(a.context.context)?;
            let w = ks.create_data_key_without_plaintext(&a.key.key, &ctx, a.length_bits)?;
            print_wrapped(&w, None, &ctx, a.key.out.json)
        }
        C::EncryptDatakey {
            key,
            plain_text,
            context,
        } => {
            let plain_text = Zeroizing::new(plain_text);
            let ctx = context_of(context.context)?;
            // No detail from the hex parser: it would quote a character of the secret.
            let plain = SecretBytes::new(hex::decode(plain_text.trim()).map_err(|_| {
                anyhow::anyhow!("--plain-text is not valid hex (expected 2 to 128 hex digits)")
            })?);
            let w = ks.encrypt_data_key(&key.key, &plain, &ctx)?;
            print_wrapped(&w, None, &ctx, key.out.json)
        }
        C::DecryptDatakey {
            key,
            cipher_text,
            context,
        } => {
            let ctx = context_of(context.context)?;
            let ct = decode_hex("--cipher-text", &cipher_text)?;
            let u = ks.decrypt_data_key(&key.key, &ct, &ctx)?;
            let plain_hex = Zeroizing::new(hex::encode(u.plain_text.dangerous_as_bytes()));
            if key.out.json {
                return print_json(&json!({
                    "key_id": u.key_id,
                    "key_version": u.key_version,
                    "plain_text": plain_hex.as_str(),
                    "datakey_length": u.plain_text.len() * 8,
                }));
            }
            print_fields(&[
                ("key_id", u.key_id.to_string()),
                ("key_version", u.key_version.to_string()),
                ("plain_text", plain_hex.to_string()),
            ]);
            Ok(())
        }
        C::ReEncrypt {
            cipher_text,
            source_context,
            destination_key,
            destination_context,
            out,
        } => {
            let sctx = context_of(source_context)?;
            let dctx = context_of(destination_context)?;
            let ct = decode_hex("--cipher-text", &cipher_text)?;
            let w = ks.re_encrypt(&ct, &sctx, destination_key.as_deref(), &dctx)?;
            print_wrapped(&w, None, &dctx, out.json)
        }
        C::GenRandom { bytes, out } => {
            let r = ks.gen_random(usize::try_from(bytes).unwrap_or(usize::MAX))?;
            let h = Zeroizing::new(hex::encode(r.dangerous_as_bytes()));
            if out.json {
                return print_json(&json!({ "random_data": h.as_str() }));
            }
            println!("{}", h.as_str());
            Ok(())
        }
        C::Audit { tail, out } => print_audit(&ks.audit_tail(tail)?, out.json),
    }
}
