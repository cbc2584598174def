//! An independent implementation of the documented formats unwraps our data keys: Debian's
//! `/usr/bin/python3` with the `cryptography` package reads `root.key` and `keystore.json`,
//! unseals the CMK material and opens a wrapped data key using only the layout described in
//! `src/kms/blob.rs`. If our encoding drifted from its description, this fails.
//!
//! Needs `/usr/bin/python3` with `cryptography`: fails when CI=true and it is missing, else skips
//! with a loud message.

use std::process::Command;

use cryptnbd::kms::{EncryptionContext, InitRoot, KeyStore};

const PYTHON: &str = "/usr/bin/python3";

const SCRIPT: &str = r#"
import json, struct, sys, uuid
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

d, key_alias, ct_hex, ctx_json = sys.argv[1:5]
root = open(d + "/root.key", "rb").read()
store = json.load(open(d + "/keystore.json"))
sid = uuid.UUID(store["store_id"]).bytes

def lp(b):
    return struct.pack(">Q", len(b)) + b

def gcm_open(key, aad, sealed):
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)

# Root verifier.
gcm_open(root, lp(b"cryptnbd/kms/root-verifier/v1") + sid, bytes.fromhex(store["verifier"]))

blob = bytes.fromhex(ct_hex)
assert blob[:4] == b"CNDK" and blob[4] == 1
kid = blob[5:21]
(ver,) = struct.unpack(">I", blob[21:25])
key = next(k for k in store["keys"] if uuid.UUID(k["key_id"]).bytes == kid)
assert key["key_alias"] == key_alias
v = next(v for v in key["versions"] if v["version"] == ver)
material = gcm_open(root, lp(b"cryptnbd/kms/cmk-material/v1") + sid + kid + struct.pack(">I", ver),
                    bytes.fromhex(v["material"]))
ctx = json.loads(ctx_json)
aad = lp(b"cryptnbd/kms/datakey/v1") + sid + kid + struct.pack(">I", ver) + struct.pack(">Q", len(ctx))
for k in sorted(ctx):
    aad += lp(k.encode()) + lp(ctx[k].encode())
print(gcm_open(material, aad, blob[25:]).hex())
"#;

fn python_ok() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import cryptography.hazmat.primitives.ciphers.aead"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn python_cryptography_unwraps_our_data_keys() {
    if !python_ok() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{PYTHON} with the `cryptography` package is required (apt install python3-cryptography)");
        }
        eprintln!("SKIPPED: {PYTHON} with the `cryptography` package not found");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ks = KeyStore::init(dir.path(), InitRoot::GenerateKeyFile).unwrap();
    ks.create_key("oracle", "").unwrap();
    ks.rotate_key("oracle").unwrap();
    let mut ctx = EncryptionContext::new();
    ctx.insert("volume_id".into(), "vol-ø".into());
    ctx.insert("a".into(), "first".into());
    for bits in [256, 512] {
        let dk = ks.create_data_key("oracle", &ctx, bits).unwrap();
        assert_eq!(dk.wrapped.key_version, 2);
        let out = Command::new(PYTHON)
            .args(["-c", SCRIPT])
            .arg(dir.path())
            .arg("alias/oracle")
            .arg(hex::encode(&dk.wrapped.cipher_text))
            .arg(serde_json::to_string(&ctx).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "python: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            hex::encode(dk.plain_text.dangerous_as_bytes())
        );
    }
}
