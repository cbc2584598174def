//! Who may use the keys: `kms credential create|list|delete|disable|enable` (DEW access keys),
//! `kms token create` (Vault tokens) and the grant commands (`kms create-grant`, `list-grants`,
//! `revoke-grant`, `retire-grant`). A new credential can do nothing with keys until it is made
//! `--admin`, given a key scope (`--key KEY --ops …`) or granted operations on a key. Secrets are
//! printed once and never again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use cryptnbd::kms::rights::transit_operations;
use cryptnbd::kms::{
    clock, CredentialKind, CredentialRecord, CredentialScope, Grant, KeyStore, NewGrant,
    PrincipalType,
};
use serde_json::json;

use super::{print_fields, print_json};

const RIGHTS_HELP: &str = "\
Rights: nothing by default. --admin: every key and operation, creating keys and grants.
--key KEY --ops OPS: named operations on KEY (its id is stored, so moving an alias later does
not move the right). OPS are create-datakey, create-datakey-without-plaintext, encrypt-datakey,
decrypt-datakey, describe-key, create-grant, retire-grant, encrypt-data, decrypt-data,
re-encrypt, manage (enable/disable, rotation, aliases, deletion, grants) or all.
Or leave it without rights and grant it operations on a key: `cryptnbd kms create-grant`.";

#[derive(Args, Debug)]
pub struct RoleArgs {
    /// Every key and every operation, including creating keys and grants.
    #[arg(long, conflicts_with_all = ["key", "keys"])]
    admin: bool,
    /// A key (id or alias) the operations of --ops apply to (repeatable, or comma-separated).
    #[arg(long, value_name = "KEY", value_delimiter = ',', requires = "ops")]
    key: Vec<String>,
    /// The operations allowed on the --key keys (comma-separated; see below).
    #[arg(long, value_name = "OPS", value_delimiter = ',', requires = "key")]
    ops: Vec<String>,
    /// Older form: every operation on these keys (same as --key KEYS --ops all).
    #[arg(long, value_name = "KEY,…", value_delimiter = ',', hide = true)]
    keys: Vec<String>,
    /// May use keys but not change them or their grants.
    #[arg(long)]
    read_only: bool,
}

impl RoleArgs {
    fn scope(self, project_id: Option<String>, transit: bool) -> anyhow::Result<CredentialScope> {
        let ops = if transit && !self.ops.is_empty() {
            transit_operations(&self.ops)?
        } else {
            self.ops
        };
        let mut scopes: Vec<(String, Vec<String>)> =
            self.key.into_iter().map(|k| (k, ops.clone())).collect();
        scopes.extend(self.keys.into_iter().map(|k| (k, vec!["all".to_string()])));
        Ok(CredentialScope {
            project_id,
            admin: self.admin,
            scopes,
            read_only: self.read_only,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum CredentialCommand {
    /// Create an access key (AK/SK) for the DEW KMS API; the secret key is shown only now, with
    /// the credential's user id (the principal to grant to).
    #[command(after_help = const_format_help())]
    Create {
        /// A name for the credential (shown in the audit log).
        name: String,
        /// The project id it signs for (the {project_id} of the API path); any when omitted.
        #[arg(long, value_name = "ID")]
        project: Option<String>,
        #[command(flatten)]
        role: RoleArgs,
        /// Also write {access_key, secret_key, project_id} to FILE (mode 0600, must not exist):
        /// the --kms-credential file of a storage host.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List credentials (names, access key ids, user ids, rights; never secrets).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a credential (access key or token) by name.
    Delete { name: String },
    /// Disable a credential: every request made with it is refused until it is enabled.
    #[command(after_help = "Example:\n  cryptnbd kms credential disable storage-1")]
    Disable { name: String },
    /// Enable a disabled credential again.
    Enable { name: String },
}

fn const_format_help() -> String {
    format!(
        "Examples:\n  cryptnbd kms credential create ops --project p1 --admin --output ops.cred\n  \
         cryptnbd kms credential create billing --project p1 --key alias/apps \\\n      \
         --ops create-datakey,decrypt-datakey --output billing.cred\n  \
         cryptnbd kms credential create storage-1 --project p1 --output storage-1.cred   # no rights: grant them\n\n{RIGHTS_HELP}"
    )
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Create a token for the Vault Transit API; it is shown only now (stored hashed). Rights
    /// are Transit's: encrypt, decrypt, datakey, rewrap, read, manage (rotate, config), all.
    #[command(
        after_help = "Examples:\n  cryptnbd kms token create rgw --key s3 --ops datakey,decrypt > /etc/ceph/vault.token\n  \
        cryptnbd kms token create ops --admin > ops.token"
    )]
    Create {
        name: String,
        #[command(flatten)]
        role: RoleArgs,
    },
}

/// `kms create-grant`.
#[derive(Args, Debug)]
#[command(after_help = "\
Examples:
  cryptnbd kms create-grant alias/vols --grantee 3f9c… --ops create-datakey,decrypt-datakey
  cryptnbd kms create-grant alias/vols --grantee 3f9c… --ops decrypt-datakey \\
      --context volume_id=6b1d… --name gw1-vol --retiring-principal 3f9c…

The grantee is a credential's user id (`cryptnbd kms credential list`). With --context the grant
applies only to requests whose encryption context contains those pairs (a volume's data key is
bound to its volume_id). Revoke it with `cryptnbd kms revoke-grant KEY GRANT_ID`.")]
pub struct CreateGrantArgs {
    /// The key: its id or alias (the grant holds the id).
    key: String,
    /// The user id to grant to (or a domain id with --grantee-type domain).
    #[arg(long, value_name = "PRINCIPAL")]
    grantee: String,
    /// user (default) or domain.
    #[arg(long, value_name = "TYPE", default_value = "user")]
    grantee_type: String,
    /// Operations granted (comma-separated): create-datakey, create-datakey-without-plaintext,
    /// encrypt-datakey, decrypt-datakey, describe-key, create-grant, retire-grant,
    /// encrypt-data, decrypt-data.
    #[arg(long, value_name = "OPS", value_delimiter = ',', required = true)]
    ops: Vec<String>,
    /// A name for the grant.
    #[arg(long)]
    name: Option<String>,
    /// The user id that may retire the grant.
    #[arg(long, value_name = "PRINCIPAL")]
    retiring_principal: Option<String>,
    /// Only for requests whose encryption context holds KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE", value_parser = super::parse_context_pair)]
    context: Vec<(String, String)>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `kms list-grants`.
#[derive(Args, Debug)]
#[command(after_help = "Example:\n  cryptnbd kms list-grants alias/vols --json")]
pub struct ListGrantsArgs {
    key: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `kms revoke-grant` and `kms retire-grant`.
#[derive(Args, Debug)]
#[command(
    after_help = "Example:\n  cryptnbd kms revoke-grant alias/vols 9c1e…  (GRANT_ID from list-grants)"
)]
pub struct RemoveGrantArgs {
    key: String,
    grant_id: String,
}

fn write_private_file(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// The rights of a credential in one line: `admin`, `KEYID:op,op;…`, or `none (grants only)`.
fn rights_text(c: &CredentialRecord) -> String {
    let mut s = if c.admin {
        "admin".to_string()
    } else if c.scopes.is_empty() {
        "none (grants only)".to_string()
    } else {
        c.scopes
            .iter()
            .map(|s| format!("{}:{}", s.key_id, s.operations.join(",")))
            .collect::<Vec<_>>()
            .join(";")
    };
    if c.read_only {
        s.push_str(" read-only");
    }
    if c.disabled {
        s.push_str(" DISABLED");
    }
    s
}

fn record_json(c: &CredentialRecord) -> serde_json::Value {
    json!({"name": c.name, "kind": c.kind, "id": c.id, "user_id": c.user_id,
           "project_id": c.project_id, "admin": c.admin, "scopes": c.scopes,
           "read_only": c.read_only, "disabled": c.disabled, "creation_date": c.creation_date})
}

/// Migrates a format-1 credentials file first, saying what each credential became.
fn migrate(ks: &KeyStore) -> anyhow::Result<()> {
    for note in ks.migrate_credentials()? {
        eprintln!("credentials.json format 1 → 2: {note}");
    }
    Ok(())
}

pub fn credential(ks: &KeyStore, c: CredentialCommand) -> anyhow::Result<()> {
    migrate(ks)?;
    match c {
        CredentialCommand::Create {
            name,
            project,
            role,
            output,
            json: json_out,
        } => {
            let scope = role.scope(project.clone(), false)?;
            let s = ks.create_credential(&name, CredentialKind::AccessKey, scope)?;
            let file = json!({
                "access_key": s.record.id,
                "secret_key": s.dangerous_secret(),
                "project_id": project,
            });
            if let Some(path) = &output {
                let mut bytes = serde_json::to_vec_pretty(&file)?;
                bytes.push(b'\n');
                write_private_file(path, &bytes)?;
            }
            if json_out {
                let mut v = record_json(&s.record);
                v["access_key"] = file["access_key"].clone();
                v["secret_key"] = file["secret_key"].clone();
                return print_json(&v);
            }
            print_fields(&[
                ("name", s.record.name.clone()),
                ("access_key", s.record.id.clone()),
                ("secret_key", s.dangerous_secret().to_string()),
                ("project_id", project.unwrap_or_else(|| "(any)".into())),
                ("user_id", s.record.user_id.clone()),
                ("rights", rights_text(&s.record)),
            ]);
            eprintln!("The secret key is shown only now: keep it (it cannot be shown again).");
            if !s.record.admin && s.record.scopes.is_empty() {
                eprintln!(
                    "It has no rights yet: grant them with `cryptnbd kms create-grant KEY --grantee {} --ops …` \
                     (or `volume create … --grant-to {}`).",
                    s.record.user_id, s.record.name
                );
            }
            Ok(())
        }
        CredentialCommand::List { json: json_out } => {
            let list = ks.list_credentials()?;
            if json_out {
                let v: Vec<_> = list.iter().map(record_json).collect();
                return print_json(&json!({ "credentials": v }));
            }
            for c in list {
                println!(
                    "{:<20} {:<11} {:<22} user={} {}",
                    c.name,
                    match c.kind {
                        CredentialKind::AccessKey => "access-key",
                        CredentialKind::Token => "token",
                    },
                    c.id,
                    c.user_id,
                    rights_text(&c)
                );
            }
            Ok(())
        }
        CredentialCommand::Delete { name } => {
            ks.delete_credential(&name)?;
            println!("deleted credential {name}");
            Ok(())
        }
        CredentialCommand::Disable { name } => {
            ks.set_credential_disabled(&name, true)?;
            println!("disabled credential {name}");
            Ok(())
        }
        CredentialCommand::Enable { name } => {
            ks.set_credential_disabled(&name, false)?;
            println!("enabled credential {name}");
            Ok(())
        }
    }
}

pub fn token(ks: &KeyStore, c: TokenCommand) -> anyhow::Result<()> {
    migrate(ks)?;
    let TokenCommand::Create { name, role } = c;
    let s = ks.create_credential(&name, CredentialKind::Token, role.scope(None, true)?)?;
    // Only the token on stdout, so `> token-file` gives what RGW's rgw_crypt_vault_token_file wants.
    println!("{}", s.dangerous_secret());
    eprintln!(
        "token for {} (user {}, rights: {}) — shown only now",
        s.record.name,
        s.record.user_id,
        rights_text(&s.record)
    );
    Ok(())
}

fn print_grants(grants: &[Grant], json_out: bool) -> anyhow::Result<()> {
    if json_out {
        return print_json(&json!({ "grants": grants, "total": grants.len() }));
    }
    if grants.is_empty() {
        println!("no grants");
    }
    for g in grants {
        let ctx: Vec<String> = g
            .encryption_context_subset
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{}  {} {}  {}{}{}  {}",
            g.grant_id,
            g.grantee_principal_type.as_str(),
            g.grantee_principal,
            g.operations.join(","),
            if ctx.is_empty() {
                String::new()
            } else {
                format!("  context {}", ctx.join(","))
            },
            g.name
                .as_ref()
                .map(|n| format!("  name {n}"))
                .unwrap_or_default(),
            clock::rfc3339(g.creation_date)
        );
    }
    Ok(())
}

pub fn create_grant(ks: &KeyStore, a: CreateGrantArgs) -> anyhow::Result<()> {
    let grantee_principal_type = match a.grantee_type.as_str() {
        "user" => PrincipalType::User,
        "domain" => PrincipalType::Domain,
        t => anyhow::bail!("--grantee-type {t:?} must be user or domain"),
    };
    let mut ctx = cryptnbd::kms::EncryptionContext::new();
    for (k, v) in a.context {
        if ctx.insert(k.clone(), v).is_some() {
            anyhow::bail!("--context {k} is given twice");
        }
    }
    let g = ks.create_grant(NewGrant {
        key: a.key,
        grantee_principal: a.grantee,
        grantee_principal_type,
        operations: a.ops,
        name: a.name,
        retiring_principal: a.retiring_principal,
        encryption_context_subset: ctx,
        issuing_principal: ks.store_id().simple().to_string(),
    })?;
    if a.json {
        return print_json(&serde_json::to_value(&g)?);
    }
    print_fields(&[
        ("grant_id", g.grant_id.clone()),
        ("key_id", g.key_id.to_string()),
        ("grantee_principal", g.grantee_principal.clone()),
        ("operations", g.operations.join(",")),
    ]);
    Ok(())
}

pub fn list_grants(ks: &KeyStore, a: ListGrantsArgs) -> anyhow::Result<()> {
    let id = ks.resolve_key_id(&a.key)?;
    let ix = ks.grant_index()?;
    let grants: Vec<Grant> = ix.on_key(id).cloned().collect();
    print_grants(&grants, a.json)
}

/// `revoke-grant` (the key's owner takes it back) or `retire-grant` (the grant is done with);
/// from the CLI, which acts as the owner, both remove it.
pub fn remove_grant(ks: &KeyStore, operation: &str, a: RemoveGrantArgs) -> anyhow::Result<()> {
    let g = ks.remove_grant(operation, &a.key, &a.grant_id)?;
    println!(
        "{operation}: grant {} on key {} to {} removed",
        g.grant_id, g.key_id, g.grantee_principal
    );
    Ok(())
}

/// `volume create --grant-to WHO`: grants WHO create-datakey and decrypt-datakey on the volume's
/// key, only for its `volume_id`. Through the remote KMS (`--kms-url`, as the caller's
/// credential) WHO must be a user id; with the local key store it may also be a credential name.
/// Returns the grant id.
pub fn grant_volume(
    global: &super::Global,
    remote: &super::remote::RemoteKmsArgs,
    who: &str,
    h: &cryptnbd::volume::VolumeHeader,
) -> anyhow::Result<String> {
    let ops = ["create-datakey", "decrypt-datakey"];
    let mut ctx = cryptnbd::kms::EncryptionContext::new();
    ctx.insert("volume_id".into(), h.volume_id.to_string());
    let name = format!("volume-{}", h.volume_id.simple());
    if let (Some(url), Some(cred)) = (&remote.kms_url, &remote.kms_credential) {
        if !cryptnbd::kms::grants::valid_principal(who) {
            anyhow::bail!("with --kms-url, --grant-to takes the credential's user id (`cryptnbd kms credential list` on the KMS host), not {who:?}");
        }
        let kms = cryptnbd::kms_http::client::RemoteKms::new(
            &cryptnbd::kms_http::client::RemoteKmsConfig {
                url: url.clone(),
                credential_file: cred.clone(),
                ca_file: remote.kms_ca.clone(),
            },
        )?;
        let v = kms.call_json(
            "create-grant",
            &json!({"key_id": h.key_id.to_string(), "grantee_principal": who, "operations": ops,
                    "name": name, "encryption_context_subset": ctx}),
        )?;
        return v["grant_id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("the KMS answered create-grant without a grant_id"));
    }
    let ks = super::kms::open_keystore(global)?;
    let user_id = match ks.list_credentials()?.into_iter().find(|c| c.name == who) {
        Some(c) => c.user_id,
        None if cryptnbd::kms::grants::valid_principal(who) => who.to_string(),
        None => anyhow::bail!("no credential named {who:?} (see `cryptnbd kms credential list`)"),
    };
    let g = ks.create_grant(NewGrant {
        key: h.key_id.to_string(),
        grantee_principal: user_id,
        grantee_principal_type: PrincipalType::User,
        operations: ops.iter().map(|s| s.to_string()).collect(),
        name: Some(name),
        retiring_principal: None,
        encryption_context_subset: ctx,
        issuing_principal: ks.store_id().simple().to_string(),
    })?;
    Ok(g.grant_id)
}
