//! Crash safety and concurrency of the key store through the real binary: SIGKILL at random
//! moments while it changes the store leaves the old or the new state; processes changing the
//! store at once are serialized (every change is present).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cryptnbd::kms::{InitRoot, KeyStore, RootSecret};
use rand::Rng;

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(assert_cmd::cargo::cargo_bin("cryptnbd"))
        .env_remove("CRYPTNBD_PASSPHRASE")
        .env("RUST_LOG", "warn")
        .arg("--data-dir")
        .arg(dir)
        .arg("kms")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn open(dir: &Path) -> KeyStore {
    KeyStore::open(dir, RootSecret::KeyFile(dir.join("root.key"))).unwrap()
}

/// Every key's every version still unwraps what it wraps: no torn or half-sealed material.
fn check_usable(ks: &KeyStore) {
    for k in ks.list_keys().unwrap() {
        let id = k.key_id.to_string();
        let dk = ks.create_data_key(&id, &Default::default(), 256).unwrap();
        let un = ks
            .decrypt_data_key(&id, &dk.wrapped.cipher_text, &Default::default())
            .unwrap();
        assert_eq!(un.plain_text, dk.plain_text);
    }
}

#[test]
fn sigkill_during_changes_leaves_old_or_new_state() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    KeyStore::init(dir, InitRoot::GenerateKeyFile)
        .unwrap()
        .create_key("base", "")
        .unwrap();
    // How long one change takes here, to spread the kills over its whole run.
    let t = Instant::now();
    assert!(spawn(dir, &["rotate-key", "base"])
        .wait()
        .unwrap()
        .success());
    let typical = t.elapsed().as_micros().max(1000) as u64;

    let mut rng = rand::thread_rng();
    let (mut killed, mut finished) = (0, 0);
    for i in 0..60 {
        let ks = open(dir);
        let keys_before = ks.list_keys().unwrap().len();
        let versions_before = ks.describe_key("base").unwrap().version_count;
        let create = i % 2 == 0;
        let alias = format!("k{i}");
        let mut child = if create {
            spawn(dir, &["create-key", "--alias", &alias])
        } else {
            spawn(dir, &["rotate-key", "base"])
        };
        std::thread::sleep(Duration::from_micros(rng.gen_range(0..typical * 3 / 2)));
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        if status.success() {
            finished += 1;
        } else {
            killed += 1;
        }

        let ks = open(dir);
        let keys_after = ks.list_keys().unwrap().len();
        let versions_after = ks.describe_key("base").unwrap().version_count;
        if create {
            assert!(
                keys_after == keys_before || keys_after == keys_before + 1,
                "iteration {i}: {keys_before} keys before, {keys_after} after"
            );
            assert_eq!(versions_after, versions_before);
            if status.success() {
                assert_eq!(keys_after, keys_before + 1, "a finished change is durable");
            }
        } else {
            assert!(
                versions_after == versions_before || versions_after == versions_before + 1,
                "iteration {i}: {versions_before} versions before, {versions_after} after"
            );
            assert_eq!(keys_after, keys_before);
            if status.success() {
                assert_eq!(versions_after, versions_before + 1);
            }
        }
        check_usable(&ks);
    }
    eprintln!("{killed} killed, {finished} finished");
    assert!(
        killed > 0,
        "no process was killed: the test did not test anything"
    );
    // The next writer cleans up temp files a killed writer left behind.
    open(dir).create_key("after", "").unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn concurrent_processes_are_serialized() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    KeyStore::init(dir, InitRoot::GenerateKeyFile)
        .unwrap()
        .create_key("shared", "")
        .unwrap();
    let mut children = Vec::new();
    for i in 0..6 {
        children.push(spawn(dir, &["create-key", "--alias", &format!("p{i}")]));
        children.push(spawn(dir, &["rotate-key", "shared"]));
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let ks = open(dir);
    assert_eq!(
        ks.list_keys().unwrap().len(),
        7,
        "every create-key is present"
    );
    assert_eq!(
        ks.describe_key("shared").unwrap().version_count,
        7,
        "every rotate-key is present"
    );
    check_usable(&ks);
}
