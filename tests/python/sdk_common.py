"""Helpers shared by the official-SDK test scripts (dew_sdk*.py): a client with retries off, a
fresh request `sequence`, and the expected-refusal check. Imported from the scripts' own
directory (Python puts it first on sys.path)."""
import uuid

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkcore.http.http_config import HttpConfig
from huaweicloudsdkkms.v2 import KmsClient


def client(endpoint, project, ak, sk):
    """A KMS client for `endpoint` signing as (ak, sk) for `project`, with retries off so a
    refusal reaches the test as it was sent."""
    cfg = HttpConfig.get_default_config()
    cfg.retry_times = 0
    return KmsClient.new_builder().with_http_config(cfg).with_credentials(BasicCredentials(ak, sk, project)).with_endpoint(endpoint).build()


def seq():
    """A fresh `sequence` (the API's request id): the server refuses a mutating request whose
    signature it has seen before, and the same call repeated within one second is signed alike."""
    return str(uuid.uuid4())


def expect_error(fn, status, code, words=()):
    """Runs `fn`, which must be refused with HTTP `status`, error `code` and every one of `words`
    in the message; returns the exception."""
    try:
        fn()
    except ClientRequestException as e:
        assert e.status_code == status, f"status {e.status_code} != {status}: {e.error_code} {e.error_msg}"
        assert e.error_code == code, f"code {e.error_code} != {code}: {e.error_msg}"
        for w in words:
            assert w in e.error_msg, f"{w!r} not in {e.error_msg!r}"
        print(f"ok: refused with {status} {code}: {e.error_msg}")
        return e
    raise AssertionError(f"expected {status} {code}, the call succeeded")
