"""The DEW grant operations of `cryptnbd kms serve`, driven by the official Huawei Cloud SDK:
create_grant, list_grants (pagination), list_retirable_grants, cancel_grant (revoke-grant),
cancel_self_grant (retire-grant); validation errors; a grantee using its grant; the
encryption-context constraint (this server's `encryption_context_subset` extension).

Run by tests/it/kms_http_grants.rs with the venv's interpreter. Environment: KMS_ENDPOINT,
KMS_PROJECT, KMS_AK/KMS_SK + ADMIN_USER (an --admin credential), GW_AK/GW_SK + GW_USER and
RET_AK/RET_SK + RET_USER (credentials with no rights), VOLS_ID and OTHER_ID (two keys).
Prints one line per check; any failure raises (non-zero exit).
"""
import os
import re

from huaweicloudsdkkms.v2 import model as m
from sdk_common import expect_error, seq, client as sdk_client

ENDPOINT, PROJECT = os.environ["KMS_ENDPOINT"], os.environ["KMS_PROJECT"]
VOLS, OTHER = os.environ["VOLS_ID"], os.environ["OTHER_ID"]
ADMIN_USER, GW_USER, RET_USER = os.environ["ADMIN_USER"], os.environ["GW_USER"], os.environ["RET_USER"]


def client(ak, sk):
    return sdk_client(ENDPOINT, PROJECT, ak, sk)


admin = client(os.environ["KMS_AK"], os.environ["KMS_SK"])
gw = client(os.environ["GW_AK"], os.environ["GW_SK"])
ret = client(os.environ["RET_AK"], os.environ["RET_SK"])


def grant(c, key, user, ops, **kw):
    body = m.CreateGrantRequestBody(key_id=key, grantee_principal=user, operations=ops, sequence=seq(), **kw)
    return c.create_grant(m.CreateGrantRequest(body=body)).grant_id


def datakey(c, key, aad=None):
    return c.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id=key, datakey_length="512", additional_authenticated_data=aad, sequence=seq())))


def decrypt(c, key, ct, aad=None):
    body = m.DecryptDatakeyRequestBody(key_id=key, cipher_text=ct, datakey_cipher_length="64", additional_authenticated_data=aad, sequence=seq())
    return c.decrypt_datakey(m.DecryptDatakeyRequest(body=body))


def list_all(fn, limit):
    """Every grant, following next_marker; returns (grants, pages)."""
    seen, marker, pages = [], None, []
    while True:
        r = fn(limit, marker)
        pages.append(r)
        seen += r.grants
        if r.truncated == "false":
            assert r.next_marker in ("", None), r
            return seen, pages
        assert r.truncated == "true" and r.next_marker, r
        marker = r.next_marker


def grants_on(c, key):
    return lambda limit, marker: c.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=key, limit=limit, marker=marker)))


def retirable(c):
    return lambda limit, marker: c.list_retirable_grants(m.ListRetirableGrantsRequest(body=m.ListRetirableGrantsRequestBody(limit=limit, marker=marker)))


def revoke(c, key, gid):
    return c.cancel_grant(m.CancelGrantRequest(body=m.RevokeGrantRequestBody(key_id=key, grant_id=gid, sequence=seq())))


def retire(c, key, gid):
    return c.cancel_self_grant(m.CancelSelfGrantRequest(body=m.RevokeGrantRequestBody(key_id=key, grant_id=gid, sequence=seq())))


# --- a new credential can do nothing, and cannot tell a key it may not use from no key ---
e1 = expect_error(lambda: datakey(gw, VOLS), 404, "KMS.0207")
e2 = expect_error(lambda: datakey(gw, "0" * 8 + "-0000-0000-0000-" + "0" * 12), 404, "KMS.0207")
assert e1.error_msg.replace(VOLS, "K") == e2.error_msg.replace("0" * 8 + "-0000-0000-0000-" + "0" * 12, "K"), (e1.error_msg, e2.error_msg)
assert gw.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())).keys == []
print("ok: no rights until granted; unknown and forbidden keys answer alike")

# --- create-grant and what the grantee can then do ---
g1 = grant(admin, VOLS, GW_USER, ["create-datakey", "decrypt-datakey"], name="gw1", retiring_principal=RET_USER)
assert re.fullmatch(r"[0-9a-f]{64}", g1), g1
dk = datakey(gw, VOLS)
assert decrypt(gw, VOLS, dk.cipher_text).data_key == dk.plain_text
expect_error(lambda: gw.delete_key(m.DeleteKeyRequest(body=m.ScheduleKeyDeletionRequestBody(key_id=VOLS, pending_days="7"))), 404, "KMS.0207")
expect_error(lambda: gw.disable_key(m.DisableKeyRequest(body=m.OperateKeyRequestBody(key_id=VOLS))), 404, "KMS.0207")
expect_error(lambda: datakey(gw, OTHER), 404, "KMS.0207")
expect_error(lambda: gw.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id=VOLS))), 404, "KMS.0207")
assert gw.list_keys(m.ListKeysRequest(body=m.ListKeysRequestBody())).keys == [VOLS]
print("ok: the grantee makes and unwraps data keys, and cannot delete, disable or describe the key")

# --- validation ---
for kw, code, word in [
    (dict(grantee_principal="not-a-user!"), "KMS.0203", "grantee_principal"),
    (dict(operations=["create-grant"]), "KMS.0203", "operations"),
    (dict(operations=["schedule-key-deletion"]), "KMS.0203", "schedule-key-deletion"),
    (dict(operations=[]), "KMS.0203", "operations"),
    (dict(name="has space"), "KMS.0203", "name"),
    (dict(grantee_principal_type="group"), "KMS.0203", "grantee_principal_type"),
    (dict(retiring_principal="x" * 65), "KMS.0203", "retiring_principal"),
]:
    body = dict(key_id=VOLS, grantee_principal=GW_USER, operations=["decrypt-datakey"])
    body.update(kw)
    expect_error(lambda: admin.create_grant(m.CreateGrantRequest(body=m.CreateGrantRequestBody(**body))), 400, code, [word])
expect_error(lambda: admin.create_grant(m.CreateGrantRequest(body=m.CreateGrantRequestBody(key_id=VOLS, grantee_principal=GW_USER))), 400, "KMS.0204", ["operations"])
expect_error(lambda: grant(admin, "alias/missing", GW_USER, ["decrypt-datakey"]), 404, "KMS.0207")
print("ok: invalid grants are refused naming the field")

# --- list-grants pagination and fields ---
extra = [grant(admin, VOLS, GW_USER, ["describe-key"], name=f"extra-{i}") for i in range(3)]
g5 = grant(admin, VOLS, RET_USER, ["encrypt-datakey"], grantee_principal_type="user", retiring_principal=RET_USER)
seen, pages = list_all(grants_on(admin, VOLS), "2")
assert [len(p.grants) for p in pages] == [2, 2, 1] and all(p.total == 5 for p in pages), pages
assert [g.grant_id for g in seen] == [g1, *extra, g5]
first = seen[0]
assert (first.key_id, first.grantee_principal, first.grantee_principal_type, first.issuing_principal, first.name, first.retiring_principal) == (VOLS, GW_USER, "user", ADMIN_USER, "gw1", RET_USER), first
assert first.operations == ["create-datakey", "decrypt-datakey"] and first.creation_date.isdigit(), first
assert list_all(grants_on(admin, OTHER), "10")[0] == []
expect_error(lambda: admin.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=VOLS, limit="0"))), 400, "KMS.0203", ["limit"])
expect_error(lambda: admin.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=VOLS, marker="x"))), 400, "KMS.0203", ["marker"])
expect_error(lambda: gw.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=VOLS))), 404, "KMS.0207")
print("ok: list-grants pages with next_marker/truncated/total; a grantee cannot list them")

# --- list-retirable-grants ---
mine, pages = list_all(retirable(ret), "1")
assert [g.grant_id for g in mine] == [g1, g5] and len(pages) == 2 and pages[0].total == 2, mine
assert list_all(retirable(gw), "10")[0] == []
print("ok: list-retirable-grants shows the grants the caller may retire")

# --- retire-grant by the retiring principal; revoke-grant by the owner ---
expect_error(lambda: retire(gw, VOLS, g1), 404, "KMS.0207")  # gw1 does not grant retire-grant
retire(ret, VOLS, g1)
expect_error(lambda: datakey(gw, VOLS), 404, "KMS.0207")
expect_error(lambda: retire(ret, VOLS, g1), 404, "KMS.0207")
g6 = grant(admin, VOLS, GW_USER, ["decrypt-datakey", "retire-grant"])
assert decrypt(gw, VOLS, dk.cipher_text).data_key == dk.plain_text
expect_error(lambda: revoke(gw, VOLS, g6), 404, "KMS.0207")
retire(gw, VOLS, g6)  # a grantee whose grant allows retire-grant
g7 = grant(admin, VOLS, GW_USER, ["decrypt-datakey"])
revoke(admin, VOLS, g7)
expect_error(lambda: decrypt(gw, VOLS, dk.cipher_text), 404, "KMS.0207")
expect_error(lambda: revoke(admin, VOLS, g7), 400, "KMS.0203", [g7])
print("ok: retire-grant by its retiring principal or a grantee allowed to; revoke-grant by the owner")

# --- a grantee holding create-grant passes on only what it holds ---
g8 = grant(admin, OTHER, GW_USER, ["create-datakey", "create-grant"])
g9 = grant(gw, OTHER, RET_USER, ["create-datakey"])
datakey(ret, OTHER)
expect_error(lambda: grant(gw, OTHER, RET_USER, ["decrypt-datakey"]), 403, "KMS.0303", ["decrypt-datakey"])
created = [g for g in list_all(grants_on(admin, OTHER), "10")[0] if g.grant_id == g9][0]
assert created.issuing_principal == GW_USER, created
for g in (g8, g9):
    revoke(admin, OTHER, g)
print("ok: create-grant passes on only operations the issuer holds")

# --- encryption-context constraint (extension field, sent as a plain body) ---
body = {"key_id": VOLS, "grantee_principal": GW_USER, "operations": ["create-datakey", "decrypt-datakey"],
        "encryption_context_subset": {"additional_authenticated_data": "vol-1"}}
gc = admin.create_grant(m.CreateGrantRequest(body=body)).grant_id
dk1 = datakey(gw, VOLS, aad="vol-1")
assert decrypt(gw, VOLS, dk1.cipher_text, aad="vol-1").data_key == dk1.plain_text
expect_error(lambda: datakey(gw, VOLS, aad="vol-2"), 404, "KMS.0207")
expect_error(lambda: datakey(gw, VOLS), 404, "KMS.0207")
dk2 = datakey(admin, VOLS, aad="vol-2")
expect_error(lambda: decrypt(gw, VOLS, dk2.cipher_text, aad="vol-2"), 404, "KMS.0207")
listed = [g for g in admin.list_grants(m.ListGrantsRequest(body=m.ListGrantsRequestBody(key_id=VOLS))).grants if g.grant_id == gc]
assert len(listed) == 1
revoke(admin, VOLS, gc)
print("ok: a grant limited to an encryption context allows only requests carrying it")
print("ALL OK")
