"""The DEW alias endpoints of `cryptnbd kms serve`, driven by the official Huawei Cloud SDK.

Run by tests/it/kms_http_dew_sdk.rs with the venv's interpreter. Environment: KMS_ENDPOINT, KMS_PROJECT,
KMS_AK/KMS_SK (full access), SCOPED_AK/SCOPED_SK (limited to alias/orders), RO_AK/RO_SK (read-only),
ORDERS_ID and BILLING_ID (two keys made by the CLI as alias/orders and alias/billing).
Prints one line per check; any failure raises (non-zero exit).
"""
import os
import sys

from huaweicloudsdkkms.v2 import model as m
from sdk_common import expect_error, client as sdk_client

ENDPOINT, PROJECT = os.environ["KMS_ENDPOINT"], os.environ["KMS_PROJECT"]
ORDERS, BILLING = os.environ["ORDERS_ID"], os.environ["BILLING_ID"]


def client(ak, sk):
    return sdk_client(ENDPOINT, PROJECT, ak, sk)


kms = client(os.environ["KMS_AK"], os.environ["KMS_SK"])
scoped = client(os.environ["SCOPED_AK"], os.environ["SCOPED_SK"])
ro = client(os.environ["RO_AK"], os.environ["RO_SK"])


def create(c, key_id, alias):
    return c.create_alias(m.CreateAliasRequest(body=m.CreateAliasRequestBody(key_id=key_id, alias=alias)))


def describe(key):
    return kms.list_key_detail(m.ListKeyDetailRequest(body=m.OperateKeyRequestBody(key_id=key))).key_info


def list_all(c, key_id=None, limit="2"):
    """Every alias, following next_marker; returns (aliases, pages)."""
    seen, marker, pages = [], None, 0
    while True:
        resp = c.list_aliases(m.ListAliasesRequest(key_id=key_id, limit=limit, marker=marker))
        assert isinstance(resp.body, list) and len(resp.body) == 1, resp
        page = resp.body[0]
        assert page.page_info.current_count == len(page.aliases), page
        seen += page.aliases
        pages += 1
        assert pages < 50, "pagination does not end"
        if not page.page_info.next_marker:
            return seen, pages
        marker = page.page_info.next_marker


# --- create-alias: several aliases on one key, every field of the answer ---
a = create(kms, ORDERS, "alias/orders-2")
assert a.key_id == ORDERS and a.alias == "alias/orders-2", a
assert a.domain_id and a.alias_urn.endswith(":alias/orders-2"), a
assert int(a.create_time) > 1_600_000_000_000 and a.update_time == a.create_time, a
for n in (3, 4, 5):
    create(kms, "alias/orders", f"alias/orders-{n}")  # the key named by an alias
print("ok: create-alias, four more aliases on one key")

# Every alias names the key wherever a key id is accepted.
dk = kms.create_datakey(m.CreateDatakeyRequest(body=m.CreateDatakeyRequestBody(key_id="alias/orders-3", datakey_length="256")))
assert dk.key_id == ORDERS, dk.key_id
back = kms.decrypt_datakey(
    m.DecryptDatakeyRequest(body=m.DecryptDatakeyRequestBody(key_id="alias/orders-2", cipher_text=dk.cipher_text, datakey_cipher_length="32"))
)
assert back.data_key == dk.plain_text
assert describe("alias/orders-4").key_id == ORDERS
assert describe("alias/orders").key_alias == "alias/orders", "the main alias stays the first one"
print("ok: data keys made and unwrapped through other aliases")

# --- refusals ---
expect_error(lambda: create(kms, BILLING, "alias/orders-2"), 400, "KMS.0212", ["already used", "alias/orders-2"])
expect_error(lambda: create(kms, ORDERS, "alias/billing"), 400, "KMS.0212", ["already used"])
expect_error(lambda: create(kms, "0d0d0d0d-1111-4222-8333-444455556666", "alias/x"), 404, "KMS.0207")
expect_error(lambda: create(kms, ORDERS, "alias/not valid!"), 400, "KMS.0203", ["alias"])
expect_error(lambda: create(kms, ORDERS, None), 400, "KMS.0204", ["alias"])
expect_error(lambda: create(kms, None, "alias/x"), 400, "KMS.0204", ["key_id"])

# --- list-aliases with pagination ---
mine, pages = list_all(kms, key_id=ORDERS)
names = [x.alias for x in mine]
assert names == ["alias/orders", "alias/orders-2", "alias/orders-3", "alias/orders-4", "alias/orders-5"], names
assert pages == 3 and all(x.key_id == ORDERS for x in mine), (pages, mine)
everything, pages = list_all(kms, limit="4")
assert sorted(x.alias for x in everything) == sorted(names + ["alias/billing"]) and pages == 2, everything
one = kms.list_aliases(m.ListAliasesRequest(key_id="alias/orders-5")).body[0]
assert len(one.aliases) == 5, "a key named by an alias lists all its aliases"
expect_error(lambda: kms.list_aliases(m.ListAliasesRequest(limit="0")), 400, "KMS.0203", ["limit"])
expect_error(lambda: kms.list_aliases(m.ListAliasesRequest(key_id="0d0d0d0d-1111-4222-8333-444455556666")), 404, "KMS.0207")
print("ok: list-aliases, 5 aliases of one key in 3 pages, 6 in all in 2 pages")

# --- associate-alias: move an alias to another key ---
moved = kms.associate_alias(m.AssociateAliasRequest(body=m.AssociateAliasRequestBody(alias="alias/orders-5", target_key_id=BILLING)))
assert moved.key_id == BILLING and moved.alias == "alias/orders-5", moved
assert moved.create_time == [x for x in mine if x.alias == "alias/orders-5"][0].create_time, "it keeps its creation time"
assert describe("alias/orders-5").key_id == BILLING
expect_error(
    lambda: kms.associate_alias(m.AssociateAliasRequest(body=m.AssociateAliasRequestBody(alias="alias/nobody", target_key_id=BILLING))),
    404,
    "KMS.0207",
    ["alias/nobody"],
)
print("ok: associate-alias moved alias/orders-5 to the billing key")

# --- delete-alias (DELETE with a JSON body) ---
kms.delete_alias(m.DeleteAliasRequest(body=m.DeleteAliasRequestBody(key_id=ORDERS, aliases=["alias/orders-4", "alias/orders-3"])))
left = [x.alias for x in list_all(kms, key_id=ORDERS)[0]]
assert left == ["alias/orders", "alias/orders-2"], left
expect_error(lambda: describe("alias/orders-3"), 404, "KMS.0207")
expect_error(
    lambda: kms.delete_alias(m.DeleteAliasRequest(body=m.DeleteAliasRequestBody(key_id=ORDERS, aliases=["alias/orders-5"]))),
    404,
    "KMS.0207",
    ["alias/orders-5"],
)
expect_error(lambda: kms.delete_alias(m.DeleteAliasRequest(body=m.DeleteAliasRequestBody(key_id=ORDERS))), 400, "KMS.0204", ["aliases"])
create(kms, BILLING, "alias/orders-3")  # a deleted alias is free again
print("ok: delete-alias")

# --- scope: a credential limited to alias/orders ---
seen = list_all(scoped, limit="10")[0]
assert seen and all(x.key_id == ORDERS for x in seen), seen
create(scoped, ORDERS, "alias/orders-scoped")
# Outside its rights a key answers like an unknown one (no probing for key ids).
expect_error(lambda: create(scoped, BILLING, "alias/b2"), 404, "KMS.0207")
expect_error(
    lambda: scoped.associate_alias(m.AssociateAliasRequest(body=m.AssociateAliasRequestBody(alias="alias/orders-2", target_key_id=BILLING))),
    404,
    "KMS.0207",
)
expect_error(
    lambda: scoped.associate_alias(m.AssociateAliasRequest(body=m.AssociateAliasRequestBody(alias="alias/orders-5", target_key_id=ORDERS))),
    404,
    "KMS.0207",
)
expect_error(lambda: scoped.list_aliases(m.ListAliasesRequest(key_id=BILLING)), 404, "KMS.0207")
expect_error(lambda: scoped.delete_alias(m.DeleteAliasRequest(body=m.DeleteAliasRequestBody(key_id=BILLING, aliases=["alias/orders-5"]))), 404, "KMS.0207")
print("ok: a credential limited to one key sees and changes only that key's aliases")

# --- read-only: may list, not change ---
assert len(list_all(ro, limit="100")[0]) == len(list_all(kms, limit="100")[0])
expect_error(lambda: create(ro, ORDERS, "alias/ro"), 403, "KMS.0303", ["read-only"])
expect_error(lambda: ro.delete_alias(m.DeleteAliasRequest(body=m.DeleteAliasRequestBody(key_id=ORDERS, aliases=["alias/orders-2"]))), 403, "KMS.0303")
print("ok: a read-only credential lists aliases but cannot change them")

# --- a bad signature on the GET (query) path ---
expect_error(lambda: client(os.environ["KMS_AK"], os.environ["KMS_SK"] + "x").list_aliases(m.ListAliasesRequest(limit="1")), 401, "APIGW.0301")
print("ALL OK")
sys.exit(0)
