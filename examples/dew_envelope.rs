//! Envelope encryption of a file through the DEW KMS API of `cryptnbd kms serve` — the
//! user-application half of the KMS model:
//!
//! 1. `create-datakey` gives a fresh data key twice: in plaintext and wrapped under the CMK;
//! 2. the file is encrypted locally with AES-256-GCM under the plaintext key, which is then
//!    forgotten; the wrapped key is stored beside the ciphertext (`FILE.enc` holds both);
//! 3. to read it back, `decrypt-datakey` unwraps the stored key (if the CMK is still enabled)
//!    and the file is decrypted locally. The KMS never sees the file.
//!
//! ```text
//! cryptnbd kms credential create app --project p1 --key alias/apps --ops create-datakey,decrypt-datakey --output app.cred
//! cargo run --example dew_envelope -- encrypt https://kms:8443 app.cred alias/apps report.pdf
//! cargo run --example dew_envelope -- decrypt https://kms:8443 app.cred alias/apps report.pdf.enc
//! ```
//! (add `--ca ca.pem` for a KMS with a private CA; `http://127.0.0.1:PORT` works on loopback.)

use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use anyhow::{bail, Context};
use cryptnbd::kms_http::client::{RemoteKms, RemoteKmsConfig};
use serde_json::json;
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"DEWENV01";

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let ca = match args.iter().position(|a| a == "--ca") {
        Some(i) => {
            let v = args.get(i + 1).context("--ca needs a file")?.clone();
            args.drain(i..i + 2);
            Some(PathBuf::from(v))
        }
        None => None,
    };
    let [mode, url, cred, key, file] = args.as_slice() else {
        bail!("usage: dew_envelope encrypt|decrypt URL CREDENTIAL_FILE KEY FILE [--ca CA.pem]");
    };
    let kms = RemoteKms::new(&RemoteKmsConfig {
        url: vec![url.clone()],
        credential_file: cred.into(),
        ca_file: ca,
    })?;
    // The file name is bound to the wrapped key: a key stored beside another file won't unwrap.
    match mode.as_str() {
        "encrypt" => {
            let aad = file.rsplit('/').next().unwrap_or(file).to_string();
            let plain = std::fs::read(file).with_context(|| format!("reading {file}"))?;
            let dk = kms.call_json(
                "create-datakey",
                &json!({"key_id": key, "datakey_length": "256", "additional_authenticated_data": aad}),
            )?;
            let dek = Zeroizing::new(hex::decode(
                dk["plain_text"].as_str().context("no plain_text")?,
            )?);
            let wrapped = hex::decode(dk["cipher_text"].as_str().context("no cipher_text")?)?;
            let mut nonce = [0u8; 12];
            getrandom::getrandom(&mut nonce)?;
            let sealed = Aes256Gcm::new_from_slice(&dek)?
                .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
                .map_err(|_| anyhow::anyhow!("AES-GCM failed"))?;
            let mut out = MAGIC.to_vec();
            out.extend_from_slice(&(aad.len() as u16).to_be_bytes());
            out.extend_from_slice(aad.as_bytes());
            out.extend_from_slice(&(wrapped.len() as u16).to_be_bytes());
            out.extend_from_slice(&wrapped);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&sealed);
            let dest = format!("{file}.enc");
            std::fs::write(&dest, out).with_context(|| format!("writing {dest}"))?;
            println!(
                "encrypted {file} -> {dest} (data key wrapped by {})",
                dk["key_id"]
            );
        }
        "decrypt" => {
            let data = std::fs::read(file).with_context(|| format!("reading {file}"))?;
            let Parts {
                aad,
                wrapped,
                nonce,
                sealed,
            } = parse(&data).context("not a dew_envelope file")?;
            let dk = kms.call_json(
                "decrypt-datakey",
                &json!({"key_id": key, "cipher_text": hex::encode(wrapped),
                        "datakey_cipher_length": "32", "additional_authenticated_data": aad}),
            )?;
            let dek = Zeroizing::new(hex::decode(
                dk["data_key"].as_str().context("no data_key")?,
            )?);
            let plain = Aes256Gcm::new_from_slice(&dek)?
                .decrypt(Nonce::from_slice(nonce), sealed)
                .map_err(|_| anyhow::anyhow!("the file does not decrypt (altered?)"))?;
            let dest = file
                .strip_suffix(".enc")
                .map(|f| format!("{f}.dec"))
                .unwrap_or(format!("{file}.dec"));
            std::fs::write(&dest, plain).with_context(|| format!("writing {dest}"))?;
            println!("decrypted {file} -> {dest}");
        }
        m => bail!("unknown mode {m:?}: encrypt or decrypt"),
    }
    Ok(())
}

/// Splits a `.enc` file into (aad, wrapped key, nonce, sealed data), checking every length.
fn take(r: &[u8]) -> Option<(usize, &[u8])> {
    let n = u16::from_be_bytes(r.get(..2)?.try_into().ok()?) as usize;
    Some((n, r.get(2..)?))
}

/// The parts of a `.enc` file: the bound file name, the wrapped key, the nonce, the sealed data.
struct Parts<'a> {
    aad: String,
    wrapped: &'a [u8],
    nonce: &'a [u8],
    sealed: &'a [u8],
}

fn parse(d: &[u8]) -> Option<Parts<'_>> {
    let rest = d.strip_prefix(MAGIC)?;
    let (n, rest) = take(rest)?;
    let aad = String::from_utf8(rest.get(..n)?.to_vec()).ok()?;
    let (m, rest) = take(rest.get(n..)?)?;
    let wrapped = rest.get(..m)?;
    let rest = rest.get(m..)?;
    Some(Parts {
        aad,
        wrapped,
        nonce: rest.get(..12)?,
        sealed: rest.get(12..)?,
    })
}
