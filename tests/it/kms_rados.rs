//! The key store on Ceph RADOS (feature `rbd`), on the shared throw-away cluster, each test in a
//! RADOS namespace of its own: the CLI round trip on a RADOS store and a second host joining it;
//! two writers racing on the same object (every change present); two `kms serve` instances on one
//! store hammered concurrently by the official SDK (every acknowledged change visible through
//! both); one instance SIGKILLed mid-change (the store stays consistent, `check` is clean, the other
//! instance carries on); hvac against the joined instance; a storage gateway with both instances'
//! URLs attaching while the first is stopped; export/import between a file store and RADOS.
#![cfg(feature = "rbd")]

use crate::kms_http_support;
use crate::rbd_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cryptnbd::kms::{KeyStore, RootSecret};
use kms_http_support::{access_key, cli, run_python, venv_python, KmsServer, BIN};

/// A RADOS store for one test: host A created it, host B joined it (with a copy of A's root key).
struct Shared {
    _tmp: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    spec: String,
    conf: PathBuf,
}

fn shared(test: &str) -> Option<Shared> {
    let conf = rbd_common::ceph_conf(test)?;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let spec = format!(
        "rados:{}/{}",
        rbd_common::POOL,
        rbd_common::unique_image("kmsrados")
    );
    let c = conf.to_str().unwrap();
    cli(&a, &["kms", "init", "--store", &spec, "--ceph-conf", c]);
    let key = tmp.path().join("root-copy.key");
    std::fs::copy(a.join("root.key"), &key).unwrap();
    let k = key.to_str().unwrap();
    cli(
        &b,
        &[
            "kms",
            "init",
            "--store",
            &spec,
            "--ceph-conf",
            c,
            "--join",
            "--root-key-file",
            k,
        ],
    );
    Some(Shared {
        _tmp: tmp,
        a,
        b,
        spec,
        conf,
    })
}

/// Runs the CLI, expecting failure; returns stderr.
fn cli_fails(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

fn key_ids(dir: &Path) -> Vec<String> {
    json(&cli(dir, &["kms", "list-keys", "--json"]))["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn cli_round_trip_on_a_rados_store_and_a_joined_host() {
    let Some(s) = shared("cli_round_trip_on_a_rados_store_and_a_joined_host") else {
        return;
    };
    // Only the marker, the root key and the audit log are local: no store files.
    assert!(s.a.join("store.json").exists() && !s.a.join("keystore.json").exists());
    assert!(!s.b.join("keystore.json").exists());
    let k = json(&cli(
        &s.a,
        &["kms", "create-key", "--alias", "apps", "--json"],
    ));
    let dk = json(&cli(
        &s.a,
        &[
            "kms",
            "create-datakey",
            "apps",
            "--context",
            "app=x",
            "--json",
        ],
    ));
    // Host B sees the key at once, rotates it; A sees the rotation; both unwrap A's data key.
    assert_eq!(key_ids(&s.b), vec![k["key_id"].as_str().unwrap()]);
    cli(&s.b, &["kms", "rotate-key", "apps"]);
    let d = json(&cli(&s.a, &["kms", "describe-key", "apps", "--json"]));
    assert_eq!(d["current_version"], 2, "{d}");
    for dir in [&s.a, &s.b] {
        let u = json(&cli(
            dir,
            &[
                "kms",
                "decrypt-datakey",
                "apps",
                "--cipher-text",
                dk["cipher_text"].as_str().unwrap(),
                "--context",
                "app=x",
                "--json",
            ],
        ));
        assert_eq!(u["plain_text"], dk["plain_text"]);
    }
    // Credentials and grants are shared too.
    let cred = access_key(&s.a, "gw1", &[]);
    assert!(cli(&s.b, &["kms", "credential", "list"]).contains("gw1"));
    let listed = cli(&s.b, &["kms", "credential", "list", "--json"]);
    assert!(listed.contains(&cred.ak), "{listed}");
    cli(
        &s.b,
        &[
            "kms",
            "create-grant",
            "apps",
            "--grantee",
            "gw1",
            "--ops",
            "decrypt-datakey",
        ],
    );
    assert!(cli(&s.a, &["kms", "list-grants", "apps"]).contains("decrypt-datakey"));
    // Both hosts check the store clean; each has its own audit log.
    for dir in [&s.a, &s.b] {
        let out = cli(dir, &["check"]);
        assert!(out.contains("no problems"), "{out}");
    }
    assert!(std::fs::read_to_string(s.b.join("audit.log"))
        .unwrap()
        .contains("rotate-key"));
    // A second `init` of the same store is refused, and so is joining with another root key.
    let c = s.conf.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let err = cli_fails(
        &tmp.path().join("c"),
        &["kms", "init", "--store", &s.spec, "--ceph-conf", c],
    );
    assert!(err.contains("already exists"), "{err}");
    let other = tmp.path().join("other");
    cli(&other, &["kms", "init"]);
    let err = cli_fails(
        &tmp.path().join("d"),
        &[
            "kms",
            "init",
            "--store",
            &s.spec,
            "--ceph-conf",
            c,
            "--join",
            "--root-key-file",
            other.join("root.key").to_str().unwrap(),
        ],
    );
    assert!(err.contains("wrong passphrase or root key"), "{err}");
    assert!(!tmp.path().join("d").join("store.json").exists());
}

/// Two writers (separate connections, separate caches) create keys in the same store object at
/// once: compare-and-swap conflicts are retried, so all of both writers' keys are there.
#[test]
fn two_writers_racing_on_one_object_lose_no_update() {
    let Some(s) = shared("two_writers_racing_on_one_object_lose_no_update") else {
        return;
    };
    const EACH: usize = 25;
    let open = |dir: &Path| {
        Arc::new(KeyStore::open(dir, RootSecret::KeyFile(dir.join("root.key"))).unwrap())
    };
    let stores = [open(&s.a), open(&s.b)];
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = stores
        .iter()
        .enumerate()
        .map(|(w, ks)| {
            let (ks, barrier) = (ks.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..EACH {
                    ks.create_key(&format!("w{w}-{i}"), "").unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for ks in &stores {
        let keys = ks.list_keys().unwrap();
        assert_eq!(keys.len(), 2 * EACH, "every key of both writers is there");
    }
    assert_eq!(key_ids(&s.a).len(), 2 * EACH);
}

fn admin_key(dir: &Path) -> kms_http_support::AccessKey {
    access_key(dir, "hammer", &["--admin"])
}

fn hammer(
    py: &Path,
    endpoints: &[&str],
    key: &kms_http_support::AccessKey,
    threads: u32,
    rounds: u32,
    mode: &str,
    acks: &Path,
) -> String {
    run_python(
        py,
        "rados_hammer.py",
        &[
            ("KMS_ENDPOINTS", endpoints.join(",")),
            ("KMS_AK", key.ak.clone()),
            ("KMS_SK", key.sk.clone()),
            ("KMS_PROJECT", key.project.clone()),
            ("THREADS", threads.to_string()),
            ("ROUNDS", rounds.to_string()),
            ("MODE", mode.into()),
            ("ACKS", acks.display().to_string()),
        ],
        Duration::from_secs(600),
    )
}

#[test]
fn two_instances_hammered_by_the_official_sdk_keep_every_change() {
    let Some(py) = venv_python(&["huaweicloudsdkkms"]) else {
        return;
    };
    let Some(s) = shared("two_instances_hammered_by_the_official_sdk_keep_every_change") else {
        return;
    };
    let key = admin_key(&s.a);
    let (a, b) = (KmsServer::start(&s.a, &[]), KmsServer::start(&s.b, &[]));
    let acks = s.a.join("acks");
    let out = hammer(&py, &[&a.url, &b.url], &key, 4, 6, "verify", &acks);
    assert!(out.contains("ALL OK"), "{out}");
    // The CLI on either host agrees, and the store checks clean.
    let listed = key_ids(&s.b);
    for line in std::fs::read_to_string(&acks).unwrap().lines() {
        if let Some(id) = line.strip_prefix("key ") {
            assert!(listed.iter().any(|k| k == id), "{id} missing");
        }
    }
    assert_eq!(listed.len(), 24);
    assert!(cli(&s.a, &["check"]).contains("no problems"));
}

#[test]
fn an_instance_killed_mid_change_leaves_the_store_consistent() {
    let Some(py) = venv_python(&["huaweicloudsdkkms"]) else {
        return;
    };
    let Some(s) = shared("an_instance_killed_mid_change_leaves_the_store_consistent") else {
        return;
    };
    let key = admin_key(&s.a);
    let (mut a, b) = (KmsServer::start(&s.a, &[]), KmsServer::start(&s.b, &[]));
    let acks = s.a.join("acks");
    let url = a.url.clone();
    let (py2, key2, acks2) = (py.clone(), key.ak.clone(), acks.clone());
    let (sk, project) = (key.sk.clone(), key.project.clone());
    let load = std::thread::spawn(move || {
        let k = kms_http_support::AccessKey {
            ak: key2,
            sk,
            project,
        };
        hammer(&py2, &[&url], &k, 3, 1000, "until-error", &acks2)
    });
    // Kill instance A (SIGKILL) while it is busy changing the store.
    let deadline = Instant::now() + Duration::from_secs(300);
    while std::fs::read_to_string(&acks)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 30
    {
        assert!(Instant::now() < deadline, "the load made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let out = load.join().unwrap();
    assert!(out.contains("STOPPED"), "{out}");
    // Every change A acknowledged is in the store; the store checks clean from B's host.
    let listed = key_ids(&s.b);
    let text = std::fs::read_to_string(&acks).unwrap();
    for line in text.lines() {
        if let Some(id) = line.strip_prefix("key ") {
            assert!(
                listed.iter().any(|k| k == id),
                "{id} acknowledged but missing"
            );
        }
        if let Some(id) = line.strip_prefix("rotated ") {
            let d = json(&cli(&s.b, &["kms", "describe-key", id, "--json"]));
            assert_eq!(d["version_count"], 2, "{d}");
        }
    }
    let out = cli(&s.b, &["check"]);
    assert!(out.contains("no problems"), "{out}");
    // B carries on: the full cycle through B alone.
    let acks_b = s.b.join("acks");
    let out = hammer(&py, &[&b.url], &key, 1, 2, "verify", &acks_b);
    assert!(out.contains("ALL OK"), "{out}");
}

#[test]
fn hvac_against_the_joined_instance() {
    let Some(py) = venv_python(&["hvac", "requests"]) else {
        return;
    };
    let Some(s) = shared("hvac_against_the_joined_instance") else {
        return;
    };
    // Everything set up on host A, served by host B.
    cli(&s.a, &["kms", "create-key", "--alias", "frozen"]);
    cli(&s.a, &["kms", "disable-key", "frozen"]);
    cli(&s.a, &["kms", "create-key", "--alias", "scoped-key"]);
    let token = cli(&s.a, &["kms", "token", "create", "rgw", "--admin"])
        .trim()
        .to_string();
    let scoped = cli(
        &s.a,
        &["kms", "token", "create", "scoped", "--keys", "scoped-key"],
    )
    .trim()
    .to_string();
    let server = KmsServer::start(&s.b, &[]);
    let out = run_python(
        &py,
        "vault_hvac.py",
        &[
            ("VAULT_ADDR", server.url.clone()),
            ("VAULT_TOKEN", token),
            ("VAULT_TOKEN_SCOPED", scoped),
        ],
        Duration::from_secs(300),
    );
    assert!(out.contains("ALL OK"), "{out}");
    // The keys hvac made through B are A's keys too.
    assert!(cli(&s.a, &["kms", "list-keys"]).contains("alias/orders"));
}

/// A file store moves to RADOS (`import-store --store rados:…`) and back (`export-store`):
/// the same root key opens every copy, the keys and their data keys survive, nothing is
/// overwritten without --force, and no copy holds a plaintext key.
#[test]
fn export_import_round_trip_file_to_rados_and_back() {
    let Some(conf) = rbd_common::ceph_conf("export_import_round_trip_file_to_rados_and_back")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (file, host, back) = (
        tmp.path().join("file"),
        tmp.path().join("host"),
        tmp.path().join("back"),
    );
    cli(&file, &["kms", "init"]);
    cli(&file, &["kms", "create-key", "--alias", "moved"]);
    let dk = json(&cli(&file, &["kms", "create-datakey", "moved", "--json"]));
    access_key(&file, "app", &["--admin"]);
    let spec = format!(
        "rados:{}/{}",
        rbd_common::POOL,
        rbd_common::unique_image("kmsimport")
    );
    let c = conf.to_str().unwrap();
    let f = file.to_str().unwrap();
    cli(
        &host,
        &["kms", "import-store", f, "--store", &spec, "--ceph-conf", c],
    );
    assert!(host.join("store.json").exists() && host.join("root.key").exists());
    let unwrap = |dir: &Path| {
        json(&cli(
            dir,
            &[
                "kms",
                "decrypt-datakey",
                "moved",
                "--cipher-text",
                dk["cipher_text"].as_str().unwrap(),
                "--json",
            ],
        ))["plain_text"]
            .clone()
    };
    assert_eq!(unwrap(&host), dk["plain_text"]);
    assert!(cli(&host, &["kms", "credential", "list"]).contains("app"));
    assert!(cli(&host, &["check"]).contains("no problems"));
    // Importing again over the RADOS store is refused; with --force it is replaced.
    let other = tempfile::tempdir().unwrap();
    let o = other.path().join("d");
    let err = cli_fails(
        &o,
        &["kms", "import-store", f, "--store", &spec, "--ceph-conf", c],
    );
    assert!(err.contains("already exists"), "{err}");
    // Back to a file store: the export opens with the same root key.
    let b = back.to_str().unwrap();
    cli(&host, &["kms", "export-store", b]);
    let err = cli_fails(&host, &["kms", "export-store", b]);
    assert!(err.contains("already exists"), "{err}");
    std::fs::copy(file.join("root.key"), back.join("root.key")).unwrap();
    assert_eq!(unwrap(&back), dk["plain_text"]);
    for name in ["keystore.json", "credentials.json"] {
        let text = std::fs::read_to_string(back.join(name)).unwrap();
        assert!(
            !text.contains(dk["plain_text"].as_str().unwrap()),
            "no plaintext key in {name}"
        );
    }
}

/// A change made through one host reaches the other host's cached copy (watch/notify, or at
/// the latest the cache bound): a key disabled on A refuses data keys on B.
#[test]
fn a_change_on_one_host_reaches_the_other_hosts_cache() {
    let Some(s) = shared("a_change_on_one_host_reaches_the_other_hosts_cache") else {
        return;
    };
    let open = |dir: &Path| KeyStore::open(dir, RootSecret::KeyFile(dir.join("root.key"))).unwrap();
    let (a, b) = (open(&s.a), open(&s.b));
    let ctx = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    // B has the store cached (opening read it); A creates a key, which B then sees.
    a.create_key("alias/live", "").unwrap();
    while b.create_data_key("alias/live", &ctx, 256).is_err() {
        assert!(Instant::now() < deadline, "B never saw the new key");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A disables it: B refuses data keys under it.
    a.disable_key("alias/live").unwrap();
    while b.create_data_key("alias/live", &ctx, 256).is_ok() {
        assert!(Instant::now() < deadline, "B never saw the key disabled");
        std::thread::sleep(Duration::from_millis(10));
    }
    // And grants: one created on A is listed by B.
    let g = a
        .create_grant(cryptnbd::kms::NewGrant {
            key: "alias/live".into(),
            grantee_principal: "gw".into(),
            grantee_principal_type: cryptnbd::kms::PrincipalType::User,
            operations: vec!["decrypt-datakey".into()],
            name: None,
            retiring_principal: None,
            encryption_context_subset: Default::default(),
            issuing_principal: "owner".into(),
        })
        .unwrap();
    let key_id = g.key_id;
    while !b
        .grant_index()
        .unwrap()
        .on_key(key_id)
        .any(|x| x.grant_id == g.grant_id)
    {
        assert!(Instant::now() < deadline, "B never saw the grant");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The compare-and-swap itself, on one RADOS object: two connections read the same version, both
/// write; the OSD refuses the second (`assert_version`), whose writer re-reads and re-applies its
/// change. Both changes are there, and the loser's change function ran again.
#[test]
fn compare_and_swap_on_one_rados_object_retries_the_loser() {
    use cryptnbd::kms::objects::{update, Obj};
    use std::sync::atomic::{AtomicU32, Ordering};
    let Some(s) = shared("compare_and_swap_on_one_rados_object_retries_the_loser") else {
        return;
    };
    let spec = cryptnbd::kms::RadosStore::parse(&s.spec).unwrap();
    let mut store = spec;
    store.ceph.ceph_conf = Some(s.conf.clone());
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let calls = Arc::new(AtomicU32::new(0));
    let writers: Vec<_> = ["gw-a", "gw-b"]
        .into_iter()
        .map(|name| {
            let objects = cryptnbd::kms::location::connect(&store).unwrap();
            let (barrier, calls) = (barrier.clone(), calls.clone());
            std::thread::spawn(move || {
                let mut first = true;
                update(&*objects, Obj::Credentials, |cur| {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let mut v: serde_json::Value = match cur {
                        Some(b) => serde_json::from_slice(b).unwrap(),
                        None => serde_json::json!({"names": []}),
                    };
                    if std::mem::take(&mut first) {
                        // Both have read the same version before either writes.
                        barrier.wait();
                    }
                    v["names"].as_array_mut().unwrap().push(name.into());
                    Ok((Some(serde_json::to_vec(&v).unwrap()), ()))
                })
                .unwrap();
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let objects = cryptnbd::kms::location::connect(&store).unwrap();
    let (bytes, _) = objects.read(Obj::Credentials).unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let mut names: Vec<_> = v["names"].as_array().unwrap().iter().collect();
    names.sort_by_key(|n| n.as_str().unwrap().to_string());
    assert_eq!(names, ["gw-a", "gw-b"], "both changes are present");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "the loser re-applied its change once"
    );
}

#[test]
fn a_gateway_attaches_while_one_rados_instance_is_stopped() {
    use crate::kms_http_failover::{attaches, create};
    use crate::kms_http_remote::start_serve;
    if !crate::common::require_tool("/usr/bin/nbdinfo") {
        return;
    }
    let Some(s) = shared("a_gateway_attaches_while_one_rados_instance_is_stopped") else {
        return;
    };
    cli(&s.a, &["kms", "create-key", "--alias", "vols"]);
    let cred = s.a.parent().unwrap().join("storage.cred");
    let c = cred.to_str().unwrap();
    cli(
        &s.a,
        &[
            "kms",
            "credential",
            "create",
            "storage-1",
            "--project",
            "p1",
            "--admin",
            "--output",
            c,
        ],
    );
    let (mut a, b) = (KmsServer::start(&s.a, &[]), KmsServer::start(&s.b, &[]));
    let store = s.a.parent().unwrap().join("storage-host");
    let ab = format!("{},{}", a.url, b.url);
    let out = create(&store, "v1", &ab, &cred);
    assert!(out.status.success(), "{out:?}");
    // Host A (the instance every client tries first) goes down: attach and create go through B.
    a.stop();
    let sock = s.a.parent().unwrap().join("gw.sock");
    let serve = start_serve(&store, &sock, &ab, &cred);
    attaches(&sock, "v1", &serve);
    let out = create(&store, "v2", &ab, &cred);
    assert!(out.status.success(), "{out:?}");
    attaches(&sock, "v2", &serve);
    let log = std::fs::read_to_string(&serve.log).unwrap();
    assert!(log.contains(&format!("url={}", b.url)), "{log}");
}
