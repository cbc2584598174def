"""Drives `cryptnbd kms serve` with the official Huawei Cloud SDK (huaweicloudsdkkms).

Run by tests/kms_http_dew_sdk.rs with the venv's interpreter. Environment: KMS_ENDPOINT (http://127.0.0.1:PORT),
KMS_AK, KMS_SK, KMS_PROJECT, WORKDIR. Prints one line per check; any failure raises (non-zero exit).
"""
import datetime
import hashlib
import os
import sys

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
import huaweicloudsdkcore.signer.signer as sdk_signer
from huaweicloudsdkkms.v2 import KmsClient
from huaweicloudsdkkms.v2 import model as m
from sdk_common import expect_error, seq

ENDPOINT = os.environ["KMS_ENDPOINT"]
AK, SK, PROJECT = os.environ["KMS_AK"], os.environ["KMS_SK"], os.environ["KMS_PROJECT"]
WORKDIR = os.environ["WORKDIR"]


def client(sk=SK):
    cfg = HttpConfig.get_default_config()
    cfg.retry_times = 0
    return (
        KmsClient.new_builder()
        .with_http_config(cfg)
        .with_credentials(BasicCredentials(AK, sk, PROJECT))
        .with_endpoint(ENDPOINT)
        .build()
    )


kms = client()


# --- the user-application envelope flow ---
key = kms.create_key(m.CreateKeyRequest(body=m.CreateKeyRequestBody(key_alias="app-files", key_description="files"))).key_info
key_id = key.key_id
print("created key", key_id)

dk = kms.create_datakey(
    m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=key_id, datakey_length="256", additional_authenticated_data="file-1"))
)
assert len(dk.plain_text) == 64, dk.plain_text
plain_dek = bytes.fromhex(dk.plain_text)
secret = os.urandom(100_000) + b"the file's last words"
nonce = os.urandom(12)
with open(os.path.join(WORKDIR, "file.enc"), "wb") as f:
    f.write(nonce + AESGCM(plain_dek).encrypt(nonce, secret, None))
with open(os.path.join(WORKDIR, "file.dek"), "w") as f:
    f.write(dk.cipher_text)
del plain_dek, dk
print("ok: file encrypted with the plaintext DEK, ciphertext DEK stored beside it")

# ... later: only the ciphertext DEK and the file
stored = open(os.path.join(WORKDIR, "file.dek")).read()
dec = kms.decrypt_datakey(
    m.DecryptDatakeyRequest(
        body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=stored, datakey_cipher_length="32", additional_authenticated_data="file-1", sequence=seq())
    )
)
dek = bytes.fromhex(dec.data_key)
assert dec.datakey_length == "32", dec.datakey_length
assert dec.datakey_dgst == hashlib.sha256(dek).hexdigest()
blob = open(os.path.join(WORKDIR, "file.enc"), "rb").read()
assert AESGCM(dek).decrypt(blob[:12], blob[12:], None) == secret
print("ok: decrypt-datakey gave the DEK back and the file decrypts")

# wrong AAD fails
expect_error(
    lambda: kms.decrypt_datakey(
        m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=stored, datakey_cipher_length="32", additional_authenticated_data="file-2"))
    ),
    400,
    "KMS.2202",
)

# create-datakey-without-plaintext, encrypt-datakey (DEK || SHA256(DEK)), re-encrypt
wp = kms.create_datakey_without_plaintext(
    m.CreateDatakeyWithoutPlaintextRequest(body=m.CreateDatakeyRequestBody(key_id=key_id, datakey_length="512"))
)
assert wp.cipher_text and not getattr(wp, "plain_text", None)
mine = os.urandom(32)
enc = kms.encrypt_datakey(
    m.EncryptDatakeyRequest(
        body=m.EncryptDatakeyRequestBody(key_id=key_id, plain_text=(mine + hashlib.sha256(mine).digest()).hex(), datakey_plain_length="32")
    )
)
assert enc.datakey_length == "32"
back = kms.decrypt_datakey(m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=enc.cipher_text, datakey_cipher_length="32")))
assert bytes.fromhex(back.data_key) == mine
print("ok: encrypt-datakey / decrypt-datakey round trip")
expect_error(
    lambda: kms.encrypt_datakey(
        m.EncryptDatakeyRequest(body=m.EncryptDatakeyRequestBody(key_id=key_id, plain_text=(mine + b"\0" * 32).hex(), datakey_plain_length="32"))
    ),
    400,
    "KMS.2103",
)
key2 = kms.create_key(m.CreateKeyRequest(body=m.CreateKeyRequestBody(key_alias="app-files-2"))).key_info.key_id
re = kms.re_encrypt(
    m.ReEncryptRequest(body=m.ReEncryptRequestBody(source_key_id=key_id, destination_key_id=key2, cipher_text=enc.cipher_text, datakey_cipher_length="32"))
)
assert re.key_id == key2 and re.source_key_id == key_id
back = kms.decrypt_datakey(m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key2, cipher_text=re.cipher_text, datakey_cipher_length="32")))
assert bytes.fromhex(back.data_key) == mine
print("ok: re-encrypt to another key")

# tampered ciphertext
t = bytearray(bytes.fromhex(stored))
t[-1] ^= 1
expect_error(
    lambda: kms.decrypt_datakey(
        m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=t.hex(), datakey_cipher_length="32", additional_authenticated_data="file-1"))
    ),
    400,
    "KMS.2202",
)

# encrypt-data / decrypt-data, gen-random
ed = kms.encrypt_data(m.EncryptDataRequest(body=m.EncryptDataRequestBody(key_id=key_id, plain_text="hello, kms")))
dd = kms.decrypt_data(m.DecryptDataRequest(body=m.DecryptDataRequestBody(cipher_text=ed.cipher_text)))
assert dd.plain_text == "hello, kms" and dd.key_id == key_id
rnd = kms.create_random(m.CreateRandomRequest(body=m.GenRandomRequestBody(random_data_length="512")))
assert len(bytes.fromhex(rnd.random_data)) == 64
print("ok: encrypt-data, decrypt-data, gen-random")

# --- lifecycle ---
d = kms.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id=key_id))).key_info
assert d.key_alias == "alias/app-files" and d.key_state == "2" and d.key_description == "files", d
kms.disable_key(m.DisableKeyRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
e = expect_error(
    lambda: kms.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=key_id, datakey_length="256"))),
    400,
    "KMS.0209",
    ["disabled"],
)
kms.enable_key(m.EnableKeyRequest(body=m.OperateKeyRequestBody(key_id=key_id, sequence=seq())))
r = kms.delete_key(m.DeleteKeyRequest(body=m.ScheduleKeyDeletionRequestBody(key_id=key_id, pending_days="7")))
assert r.key_state == "4", r
expect_error(
    lambda: kms.decrypt_datakey(
        m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=stored, datakey_cipher_length="32", additional_authenticated_data="file-1", sequence=seq()))
    ),
    400,
    "KMS.0210",
    ["pending deletion"],
)
r = kms.cancel_key_deletion(m.CancelKeyDeletionRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
assert r.key_state == "3", r
kms.enable_key(m.EnableKeyRequest(body=m.OperateKeyRequestBody(key_id=key_id, sequence=seq())))
kms.enable_key_rotation(m.EnableKeyRotationRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
kms.update_key_rotation_interval(m.UpdateKeyRotationIntervalRequest(body=m.UpdateKeyRotationIntervalRequestBody(key_id=key_id, rotation_interval=90)))
st = kms.show_key_rotation_status(m.ShowKeyRotationStatusRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
assert st.key_rotation_enabled is True and st.rotation_interval == 90, st
kms.rotate_on_demand(m.RotateOnDemandRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
st = kms.show_key_rotation_status(m.ShowKeyRotationStatusRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
assert st.number_of_rotations == 1, st
kms.disable_key_rotation(m.DisableKeyRotationRequest(body=m.OperateKeyRequestBody(key_id=key_id)))
# the old DEK still decrypts after rotation
back = kms.decrypt_datakey(
    m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=key_id, cipher_text=stored, datakey_cipher_length="32", additional_authenticated_data="file-1", sequence=seq()))
)
assert bytes.fromhex(back.data_key) == dek
kms.update_key_alias(m.UpdateKeyAliasRequest(body=m.UpdateKeyAliasRequestBody(key_id=key_id, key_alias="alias/app-files-renamed")))
kms.update_key_description(m.UpdateKeyDescriptionRequest(body=m.UpdateKeyDescriptionRequestBody(key_id=key_id, key_description="renamed")))
d = kms.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id=key_id))).key_info
assert d.key_alias == "alias/app-files-renamed" and d.key_description == "renamed" and d.key_rotation_enabled == "false", d
print("ok: lifecycle (disable/enable, deletion scheduled and cancelled, rotation, alias, description)")

# --- unknown key, pagination ---
expect_error(
    lambda: kms.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id="0d0d0d0d-1111-4222-8333-444455556666"))),
    404,
    "KMS.0207",
)
for i in range(5):
    kms.create_key(m.CreateKeyRequest(body=m.CreateKeyRequestBody(key_alias=f"page-{i}")))
seen, marker, pages = [], None, 0
while True:
    resp = kms.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody(limit="3", marker=marker)))
    seen += resp.keys
    pages += 1
    assert resp.total == 7, resp.total
    if resp.truncated != "true":
        break
    marker = resp.next_marker
assert pages == 3 and len(seen) == 7 and len(set(seen)) == 7, (pages, seen)
print("ok: list-keys pagination, 7 keys in 3 pages")

# --- authentication ---
expect_error(lambda: client(sk=SK[:-1] + ("x" if SK[-1] != "x" else "y")).list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())), 401, "APIGW.0301", ["signature"])


class _Skewed(datetime.datetime):
    @classmethod
    def utcnow(cls):
        return datetime.datetime.utcnow() - datetime.timedelta(minutes=20)


sdk_signer.datetime = _Skewed
expect_error(lambda: kms.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())), 401, "APIGW.0301", ["expired"])
sdk_signer.datetime = datetime.datetime
kms.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody()))
print("ALL OK")
sys.exit(0)
