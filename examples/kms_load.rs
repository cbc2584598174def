//! A bounded load generator for `cryptnbd kms serve` (used by `tools/kms-load` and
//! `tools/bench-kms-ha`): N client threads call create-datakey (then decrypt-datakey on the
//! result) through the signed DEW API for a fixed time, and it prints requests/s and p50/p99
//! latency per operation.
//!
//! `kms_load URL[,URL…] CREDENTIAL_FILE KEY [CLIENTS=16] [SECONDS=10]`
//!
//! With several URLs (instances on one key store) the clients are spread round-robin: client i
//! starts at URL i mod n and keeps to it while it answers (the client's failover order), so the
//! load splits evenly. Each client has its own HTTP agent (one kept-alive connection), as
//! separate applications or gateways would.
//!
//! `kms_load --fill-grants DATA_DIR KEY USER_ID N` (before serving): puts N grants on KEY in the
//! key store at DATA_DIR (root key file): one to USER_ID (create-datakey, decrypt-datakey), the
//! others to N-1 other principals, written at once, so the load then measures the grant lookup
//! of a key with N grants.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cryptnbd::kms_http::client::{RemoteKms, RemoteKmsConfig};
use serde_json::json;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// `--fill-grants DATA_DIR KEY USER_ID N`.
fn fill_grants(args: &[String]) -> anyhow::Result<()> {
    use cryptnbd::kms::{EncryptionContext, KeyStore, NewGrant, PrincipalType, RootSecret};
    let [dir, key, user, n] = args else {
        bail!("usage: kms_load --fill-grants DATA_DIR KEY USER_ID N");
    };
    let n: usize = n.parse()?;
    let dir = std::path::Path::new(dir);
    let ks = KeyStore::open(dir, RootSecret::KeyFile(dir.join("root.key")))?;
    let grant = |grantee: String, ops: &[&str]| NewGrant {
        key: key.clone(),
        grantee_principal: grantee,
        grantee_principal_type: PrincipalType::User,
        operations: ops.iter().map(|s| s.to_string()).collect(),
        name: None,
        retiring_principal: None,
        encryption_context_subset: EncryptionContext::new(),
        issuing_principal: "load".into(),
    };
    let mut all: Vec<NewGrant> = (1..n)
        .map(|i| grant(format!("filler{i}"), &["decrypt-datakey"]))
        .collect();
    all.push(grant(user.clone(), &["create-datakey", "decrypt-datakey"]));
    ks.create_grants(&all)?;
    println!("{} grants on {key}", ks.grant_index()?.len());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--fill-grants") {
        return fill_grants(&args[1..]);
    }
    if args.len() < 3 {
        bail!("usage: kms_load URL[,URL…] CREDENTIAL_FILE KEY [CLIENTS] [SECONDS]");
    }
    let clients: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(16);
    let secs: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let urls: Vec<String> = args[0].split(',').map(str::to_string).collect();
    let client = |i: usize| {
        // URL i mod n first, then the others in order.
        let mut order = urls.clone();
        order.rotate_left(i % urls.len());
        RemoteKms::new(&RemoteKmsConfig {
            url: order,
            credential_file: args[1].clone().into(),
            ca_file: None,
        })
        .context("KMS client")
    };
    let kmss = (0..clients)
        .map(client)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let key = args[2].clone();
    let create = Arc::new(Mutex::new(Vec::new()));
    let decrypt = Arc::new(Mutex::new(Vec::new()));
    let errors = Arc::new(Mutex::new(0u64));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let threads: Vec<_> = kmss
        .into_iter()
        .map(|kms| {
            let (key, create, decrypt, errors) =
                (key.clone(), create.clone(), decrypt.clone(), errors.clone());
            std::thread::spawn(move || {
                let (mut c, mut d, mut e) = (Vec::new(), Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = kms.call_json("create-datakey", &json!({"key_id": key, "datakey_length": "256"}));
                    c.push(t.elapsed());
                    let Ok(v) = r else {
                        e += 1;
                        continue;
                    };
                    let t = Instant::now();
                    let r = kms.call_json(
                        "decrypt-datakey",
                        &json!({"key_id": key, "cipher_text": v["cipher_text"], "datakey_cipher_length": "32"}),
                    );
                    d.push(t.elapsed());
                    if r.is_err() {
                        e += 1;
                    }
                }
                create.lock().unwrap().extend(c);
                decrypt.lock().unwrap().extend(d);
                *errors.lock().unwrap() += e;
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let elapsed = start.elapsed().as_secs_f64();
    for (name, lat) in [("create-datakey", create), ("decrypt-datakey", decrypt)] {
        let mut l = lat.lock().unwrap().clone();
        l.sort();
        println!(
            "{name:<16} {:>7} requests  {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms",
            l.len(),
            l.len() as f64 / elapsed,
            pct(&l, 0.50).as_secs_f64() * 1e3,
            pct(&l, 0.99).as_secs_f64() * 1e3
        );
    }
    println!(
        "clients {clients} over {} instance(s), {elapsed:.1} s, errors {}",
        urls.len(),
        errors.lock().unwrap()
    );
    Ok(())
}
