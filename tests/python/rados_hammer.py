"""Hammers several `cryptnbd kms serve` instances sharing one key store with the official SDK.

Run by tests/it/kms_rados.rs with the venv's interpreter. Environment: KMS_ENDPOINTS (comma
separated), KMS_AK, KMS_SK, KMS_PROJECT, THREADS, ROUNDS, ACKS (a file: one line per
acknowledged change, flushed at once), MODE = "verify" (run, then check that every acknowledged
change is visible through every endpoint; prints ALL OK) or "until-error" (run until a request
fails, e.g. because the instance was killed; prints STOPPED).

Each round of each thread, on alternating instances: create a key, rotate it on the *other*
instance, create a grant on it, and make a data key on one instance that must decrypt on the other.
"""
import os
import threading
import uuid

from huaweicloudsdkkms.v2 import model as m
from sdk_common import client, seq

ENDPOINTS = os.environ["KMS_ENDPOINTS"].split(",")
AK, SK, PROJECT = os.environ["KMS_AK"], os.environ["KMS_SK"], os.environ["KMS_PROJECT"]
THREADS, ROUNDS = int(os.environ["THREADS"]), int(os.environ["ROUNDS"])
MODE = os.environ.get("MODE", "verify")
clients = [client(e, PROJECT, AK, SK) for e in ENDPOINTS]
acks = open(os.environ["ACKS"], "a", buffering=1)
lock = threading.Lock()
keys, grants, errors = {}, {}, []
run = uuid.uuid4().hex[:8]


def ack(line):
    with lock:
        acks.write(line + "\n")
        acks.flush()
        os.fsync(acks.fileno())


def worker(t):
    try:
        for r in range(ROUNDS):
            a, b = clients[(t + r) % len(clients)], clients[(t + r + 1) % len(clients)]
            alias = f"h-{run}-{t}-{r}"
            key = a.create_key(m.CreateKeyRequest(body=m.CreateKeyRequestBody(key_alias=alias, sequence=seq()))).key_info.key_id
            with lock:
                keys[key] = 0
            ack(f"key {key}")
            b.rotate_on_demand(m.RotateOnDemandRequest(body=m.OperateKeyRequestBody(key_id=key, sequence=seq())))
            with lock:
                keys[key] = 1
            ack(f"rotated {key}")
            body = m.CreateGrantRequestBody(key_id=key, grantee_principal=f"user{t}", operations=["create-datakey", "decrypt-datakey"], sequence=seq())
            gid = a.create_grant(m.CreateGrantRequest(body=body)).grant_id
            with lock:
                grants.setdefault(key, []).append(gid)
            ack(f"grant {key} {gid}")
            dk = a.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=key, datakey_length="512", sequence=seq())))
            dec = b.decrypt_datakey(m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key, cipher_text=dk.cipher_text, datakey_cipher_length="64", sequence=seq())))
            assert dec.data_key == dk.plain_text, "a data key made on one instance decrypts on the other"
            ack(f"datakey {key}")
    except Exception as e:  # noqa: BLE001 - reported below
        with lock:
            errors.append(f"thread {t}: {type(e).__name__}: {e}")


threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
for th in threads:
    th.start()
for th in threads:
    th.join()

if MODE == "until-error":
    print(f"STOPPED after {len(keys)} keys: {errors[:1]}")
    raise SystemExit(0)
assert not errors, errors
assert len(keys) == THREADS * ROUNDS, len(keys)

for i, c in enumerate(clients):
    seen, marker = set(), None
    while True:
        resp = c.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody(limit="100", marker=marker)))
        seen.update(resp.keys)
        if resp.truncated != "true":
            break
        marker = resp.next_marker
    missing = set(keys) - seen
    assert not missing, f"instance {i} does not list {len(missing)} acknowledged keys"
    for key, rotations in keys.items():
        st = c.show_key_rotation_status(m.ShowKeyRotationStatusRequest(body=m.OperateKeyRequestBody(key_id=key)))
        assert st.number_of_rotations == rotations, (i, key, st.number_of_rotations)
        listed = c.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=key, limit="100"))).grants
        ids = {g.grant_id for g in listed}
        assert set(grants[key]) <= ids, (i, key, grants[key], ids)
    print(f"ok: instance {i} lists all {len(keys)} keys, their rotations and grants")
print("ALL OK")
