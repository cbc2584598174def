"""Drives the Vault Transit API of `cryptnbd kms serve` with hvac, and sends RGW-style requests
(no `bits`, the X-Vault-Token header twice) with requests.

Run by tests/kms_http_vault.rs with the venv's interpreter. Environment: VAULT_ADDR, VAULT_TOKEN,
VAULT_TOKEN_SCOPED (a token limited to key "scoped-key"). Any failure raises (non-zero exit).
"""
import base64
import http.client
import json
import os
import urllib.parse

import hvac
import hvac.exceptions
import requests

ADDR, TOKEN = os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"]
client = hvac.Client(url=ADDR, token=TOKEN)
t = client.secrets.transit


def b64(b):
    return base64.b64encode(b).decode()


def expect(exc, fn, words=()):
    try:
        fn()
    except exc as e:
        text = str(e)
        for w in words:
            assert w in text, f"{w!r} not in {text!r}"
        print(f"ok: {exc.__name__}: {text}")
        return e
    raise AssertionError(f"expected {exc.__name__}")


# keys: create, read, list, rotate, config
t.create_key(name="orders")
k = t.read_key(name="orders")["data"]
assert k["name"] == "orders" and k["type"] == "aes256-gcm96" and k["latest_version"] == 1, k
t.create_key(name="invoices")
names = t.list_keys()["data"]["keys"]
assert "orders" in names and "invoices" in names, names
print("ok: create, read, list")

# encrypt / decrypt / rotate / rewrap
ct1 = t.encrypt_data(name="orders", plaintext=b64(b"order 1234"))["data"]["ciphertext"]
assert ct1.startswith("vault:v1:"), ct1
assert base64.b64decode(t.decrypt_data(name="orders", ciphertext=ct1)["data"]["plaintext"]) == b"order 1234"
t.rotate_key(name="orders")
assert t.read_key(name="orders")["data"]["latest_version"] == 2
ct2 = t.rewrap_data(name="orders", ciphertext=ct1)["data"]["ciphertext"]
assert ct2.startswith("vault:v2:"), ct2
assert base64.b64decode(t.decrypt_data(name="orders", ciphertext=ct2)["data"]["plaintext"]) == b"order 1234"
assert base64.b64decode(t.decrypt_data(name="orders", ciphertext=ct1)["data"]["plaintext"]) == b"order 1234"
print("ok: encrypt, decrypt, rotate, rewrap; old versions still decrypt")

# associated data is bound
ct3 = t.encrypt_data(name="orders", plaintext=b64(b"x"), associated_data=b64(b"ad-1"))["data"]["ciphertext"]
expect(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data(name="orders", ciphertext=ct3, associated_data=b64(b"ad-2")))

# config
r = t.update_key_configuration(name="orders", min_decryption_version=1)
expect(hvac.exceptions.InvalidRequest, lambda: t.update_key_configuration(name="orders", deletion_allowed=True), ["not supported"])
expect(hvac.exceptions.InvalidRequest, lambda: t.update_key_configuration(name="orders", exportable=True), ["not supported"])
print("ok: config")

# datakey plaintext / wrapped; bits default 256
dk = t.generate_data_key(name="orders", key_type="plaintext")["data"]
assert len(base64.b64decode(dk["plaintext"])) == 32, dk
back = base64.b64decode(t.decrypt_data(name="orders", ciphertext=dk["ciphertext"])["data"]["plaintext"])
assert back == base64.b64decode(dk["plaintext"])
for bits in (128, 256, 512):
    dk = t.generate_data_key(name="orders", key_type="plaintext", bits=bits)["data"]
    assert len(base64.b64decode(dk["plaintext"])) == bits // 8
w = t.generate_data_key(name="orders", key_type="wrapped")["data"]
assert "plaintext" not in w and w["ciphertext"].startswith("vault:v2:"), w
print("ok: datakey plaintext/wrapped, bits 128/256/512, default 256")

# random
r = t.generate_random_bytes(n_bytes=16)["data"]["random_bytes"]
assert len(base64.b64decode(r)) == 16
r = t.generate_random_bytes(n_bytes=8, output_format="hex")["data"]["random_bytes"]
assert len(bytes.fromhex(r)) == 8
print("ok: random")

# errors: Vault's {"errors": [...]} format
expect(hvac.exceptions.InvalidPath, lambda: t.read_key(name="no-such-key"), ["not found"])
expect(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data(name="orders", ciphertext="vault:v1:AAAA"))
expect(hvac.exceptions.InvalidRequest, lambda: t.decrypt_data(name="orders", ciphertext="not-vault"), ["invalid ciphertext"])
raw = requests.post(f"{ADDR}/v1/transit/decrypt/orders", headers={"X-Vault-Token": TOKEN}, data=b"{bad json")
assert raw.status_code == 400 and "errors" in raw.json(), raw.text
raw = requests.post(f"{ADDR}/v1/transit/encrypt/orders", headers={"X-Vault-Token": TOKEN}, json={"plaintext": 5})
assert raw.status_code == 400 and "plaintext" in raw.json()["errors"][0], raw.text
expect(hvac.exceptions.Forbidden, lambda: hvac.Client(url=ADDR, token="cnt.wrong").secrets.transit.read_key(name="orders"), ["permission denied"])
scoped = hvac.Client(url=ADDR, token=os.environ["VAULT_TOKEN_SCOPED"]).secrets.transit
scoped.encrypt_data(name="scoped-key", plaintext=b64(b"ok"))
expect(hvac.exceptions.InvalidPath, lambda: scoped.encrypt_data(name="orders", plaintext=b64(b"no")), ["not found"])
print("ok: errors")

# a key disabled through the CLI (the Rust test made "frozen" and disabled it) names its state
expect(hvac.exceptions.InvalidRequest, lambda: t.encrypt_data(name="frozen", plaintext=b64(b"x")), ["disabled"])

# RGW-style: datakey/plaintext without bits, X-Vault-Token twice, context = b64 canonical JSON
ctx = b64(json.dumps({"aws:s3:arn": "arn:aws:s3:::bucket/object"}, sort_keys=True).encode())
hdrs = [("X-Vault-Token", TOKEN), ("X-Vault-Token", TOKEN)]

u = urllib.parse.urlparse(ADDR)
conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
conn.putrequest("POST", "/v1/transit/datakey/plaintext/orders")
for k_, v_ in hdrs:
    conn.putheader(k_, v_)
body = json.dumps({"context": ctx}).encode()
conn.putheader("Content-Type", "application/json")
conn.putheader("Content-Length", str(len(body)))
conn.endheaders(body)
resp = conn.getresponse()
data = json.loads(resp.read())
assert resp.status == 200, data
key = base64.b64decode(data["data"]["plaintext"])
assert len(key) == 32
conn.putrequest("POST", "/v1/transit/decrypt/orders")
for k_, v_ in hdrs:
    conn.putheader(k_, v_)
body = json.dumps({"context": ctx, "ciphertext": data["data"]["ciphertext"]}).encode()
conn.putheader("Content-Type", "application/json")
conn.putheader("Content-Length", str(len(body)))
conn.endheaders(body)
resp = conn.getresponse()
dec = json.loads(resp.read())
assert resp.status == 200 and base64.b64decode(dec["data"]["plaintext"]) == key, dec
print("ok: RGW-style datakey (no bits -> 32 bytes) and decrypt with the token header twice")
print("ALL OK")
