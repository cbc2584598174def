"""Request hardening of `cryptnbd kms serve`, driven by the official SDK (huaweicloudsdkkms).

Run by tests/it/kms_http_hardening.rs with the venv's interpreter. Environment: KMS_ENDPOINT, KMS_AK,
KMS_SK, KMS_PROJECT. Checks:
- re-encrypt binds the destination AAD and checks the source AAD;
- a request the SDK signed and sent, captured and re-sent byte for byte, is refused as a replay when
  it is a mutating operation (create-datakey), served again when it is a read (describe-key);
- the attack of issue 20: an SDK-signed describe-key of alias/a re-sent with X-Sdk-Content-Sha256 of
  that body and another body (alias/victim) is refused (401), not answered for alias/victim;
- an unknown access key and a wrong signature get the same answer.
Prints one line per check; any failure raises (non-zero exit).
"""
import hashlib
import os

import requests
from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkcore.http.http_handler import HttpHandler
from huaweicloudsdkkms.v2 import KmsClient
from huaweicloudsdkkms.v2 import model as m
from sdk_common import expect_error

ENDPOINT = os.environ["KMS_ENDPOINT"]
AK, SK, PROJECT = os.environ["KMS_AK"], os.environ["KMS_SK"], os.environ["KMS_PROJECT"]

captured = []


def capture(**kwargs):
    """Keeps the request exactly as the SDK signed and sent it (a requests.PreparedRequest)."""
    captured.append(kwargs["response"].request.copy())


def client(ak=AK, sk=SK):
    cfg = HttpConfig.get_default_config()
    cfg.retry_times = 0
    return (
        KmsClient.new_builder()
        .with_http_config(cfg)
        .with_credentials(BasicCredentials(ak, sk, PROJECT))
        .with_endpoint(ENDPOINT)
        .with_http_handler(HttpHandler().add_response_handler(capture))
        .build()
    )


kms = client()


def resend(prepared, body=None, extra_headers=None):
    """Sends a captured request again (same method, URL, headers; the same body unless given)."""
    p = prepared.copy()
    if body is not None:
        p.body = body
        p.headers["Content-Length"] = str(len(body))
    for k, v in (extra_headers or {}).items():
        p.headers[k] = v
    with requests.Session() as s:
        return s.send(p, timeout=30)


def key_id(alias):
    return kms.create_key(m.CreateKeyRequest(body=m.CreateKeyRequestBody(key_alias=alias))).key_info.key_id


src, dst = key_id("reenc-src"), key_id("reenc-dst")

# --- re-encrypt honours both AADs ---
dk = kms.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=src, datakey_length="256", additional_authenticated_data="src-aad")))
plain = dk.plain_text


def reencrypt(source_aad, dest_aad):
    return kms.re_encrypt(
        m.ReEncryptRequest(
            body=m.ReEncryptRequestBody(
                source_key_id=src,
                source_additional_authenticated_data=source_aad,
                destination_key_id=dst,
                destination_additional_authenticated_data=dest_aad,
                cipher_text=dk.cipher_text,
                datakey_cipher_length="32",
            )
        )
    )


re = reencrypt("src-aad", "dst-aad")
assert re.key_id == dst and re.source_key_id == src, re
print("ok: a blob made with an AAD re-encrypts with that AAD as the source AAD")


def decrypt(kid, ct, aad=None):
    return kms.decrypt_datakey(
        m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id=kid, cipher_text=ct, datakey_cipher_length="32", additional_authenticated_data=aad))
    )


expect_error(lambda: decrypt(dst, re.cipher_text), 400, "KMS.2202")
expect_error(lambda: decrypt(dst, re.cipher_text, "src-aad"), 400, "KMS.2202")
assert decrypt(dst, re.cipher_text, "dst-aad").data_key == plain
print("ok: the destination AAD is required to decrypt the new blob")
expect_error(lambda: reencrypt("wrong-aad", "dst-aad"), 400, "KMS.2202")
expect_error(lambda: reencrypt(None, "dst-aad"), 400, "KMS.2202")
print("ok: a wrong or missing source AAD fails")
expect_error(lambda: reencrypt("x" * 129, "dst-aad"), 400, "KMS.0203", ["source_additional_authenticated_data"])

# --- replay of an SDK-made request ---
captured.clear()
kms.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=src, datakey_length="256")))
sent = captured[-1]
assert sent.url.endswith("/kms/create-datakey"), sent.url
r = resend(sent)
assert r.status_code == 401, (r.status_code, r.text)
assert r.json()["error_code"] == "APIGW.0301" and "replay" in r.json()["error_msg"], r.text
print("ok: the SDK's create-datakey re-sent byte for byte is refused as a replay:", r.json()["error_msg"])

captured.clear()
info = kms.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id="alias/reenc-src")))
assert info.key_info.key_id == src
sent = captured[-1]
r = resend(sent)
assert r.status_code == 200 and r.json()["key_info"]["key_id"] == src, (r.status_code, r.text)
print("ok: a read (describe-key) re-sent is served again")

# --- the attack of issue 20: another body under the same signature ---
victim_body = ('{"key_id": "%s"}' % dst).encode()
first_hash = hashlib.sha256(sent.body if isinstance(sent.body, bytes) else sent.body.encode()).hexdigest()
r = resend(sent, body=victim_body, extra_headers={"X-Sdk-Content-Sha256": first_hash})
assert r.status_code == 401, (r.status_code, r.text)
assert dst not in r.text, r.text
print("ok: describe-key signed for alias/reenc-src, re-sent with X-Sdk-Content-Sha256 and another body: 401:", r.json()["error_msg"])
r = resend(sent, body=victim_body)
assert r.status_code == 401, (r.status_code, r.text)
r = resend(sent, extra_headers={"X-Sdk-Content-Sha256": "UNSIGNED-PAYLOAD"})
assert r.status_code == 401, (r.status_code, r.text)
print("ok: another body, or UNSIGNED-PAYLOAD, is refused")

# --- one answer for an unknown access key and a wrong signature ---
wrong_sk = expect_error(lambda: client(sk=SK[:-1] + ("x" if SK[-1] != "x" else "y")).list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())), 401, "APIGW.0301")
unknown_ak = expect_error(lambda: client(ak="NOSUCHACCESSKEY0000").list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())), 401, "APIGW.0301")
assert wrong_sk.error_msg == unknown_ak.error_msg, (wrong_sk.error_msg, unknown_ak.error_msg)
print("ok: unknown access key and wrong signature get the same answer")
print("ALL OK")
