"""API keys -> tenants, and per-tenant limits (routing/auth.py)."""

import os
import time

import pytest

from specserve.cluster.config import AuthConfig, TenantLimits
from specserve.routing.auth import ApiKeys, TenantLimiter, bearer_token, resolve_tenant
from specserve.routing.errors import APIError


def status(fn):
    try:
        fn()
    except APIError as exc:
        return exc.status, exc.code
    return 200, None


def test_inline_keys_map_to_tenants_and_unknown_or_missing_keys_are_401():
    keys = ApiKeys(AuthConfig(api_keys={"k1": "team-a", "k2": "team-b"}))
    assert keys.enabled and keys.tenant_of("k1") == "team-a" and keys.tenant_of("k2") == "team-b"
    assert status(lambda: keys.tenant_of(None)) == (401, "missing_api_key")
    assert status(lambda: keys.tenant_of("k3")) == (401, "invalid_api_key")
    assert status(lambda: keys.tenant_of("k1 ")) == (401, "invalid_api_key")


def test_no_keys_means_no_auth_and_requests_may_name_their_tenant():
    keys = ApiKeys(AuthConfig())
    assert not keys.enabled and keys.tenant_of(None) is None
    assert resolve_tenant(keys, None, None, "default") == "default"
    assert resolve_tenant(keys, "anything", "team-x", "default") == "team-x"
    assert status(lambda: resolve_tenant(keys, None, "bad tenant!", "default"))[0] == 400


def test_a_key_may_only_act_as_its_own_tenant():
    keys = ApiKeys(AuthConfig(api_keys={"k1": "team-a"}))
    assert resolve_tenant(keys, "k1", None, "default") == "team-a"
    assert resolve_tenant(keys, "k1", "team-a", "default") == "team-a"
    assert status(lambda: resolve_tenant(keys, "k1", "team-b", "default")) == (403, "tenant_forbidden")


def test_keys_file_is_reread_when_it_changes(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("old-key: team-a\n")
    keys = ApiKeys(AuthConfig(api_keys_file=str(path)))
    assert keys.tenant_of("old-key") == "team-a"
    path.write_text("new-key: team-b\nother: team-c\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))  # a rotated Secret: new mtime
    time.sleep(1.05)  # the file is checked at most once a second
    assert keys.tenant_of("new-key") == "team-b"
    assert status(lambda: keys.tenant_of("old-key"))[0] == 401
    # While a Secret is swapped the file may be missing or half written: the last good keys stay.
    path.unlink()
    time.sleep(1.05)
    assert keys.tenant_of("other") == "team-c"
    path.write_text("other: [unclosed\n")
    time.sleep(1.05)
    assert keys.tenant_of("other") == "team-c"
    path.write_text("bad: not a tenant!\n")
    time.sleep(1.05)
    assert keys.tenant_of("other") == "team-c"


def test_bad_keys_file_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="api_keys_file"):
        ApiKeys(AuthConfig(api_keys_file=str(tmp_path / "missing.yaml")))
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        ApiKeys(AuthConfig(api_keys_file=str(bad)))


def test_bearer_token():
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("abc") == "abc" and bearer_token(None) is None and bearer_token("") is None


def test_concurrency_limit_is_per_tenant_and_released():
    lim = TenantLimiter(TenantLimits(), {"small": TenantLimits(max_concurrent_requests=1)})
    with lim.admit("small"):
        err = pytest.raises(APIError, lambda: lim.admit("small").__enter__())
        assert err.value.status == 429 and err.value.retry_after_s and err.value.code == "tenant_concurrency_limit"
        with lim.admit("other"), lim.admit("other"):  # the default has no limit
            pass
    with lim.admit("small"):  # released on exit
        pass
    assert lim.in_flight == {}


def test_rate_limit_token_bucket_refills():
    lim = TenantLimiter(TenantLimits(requests_per_s=20, burst=2))
    for _ in range(2):
        with lim.admit("t"):
            pass
    with pytest.raises(APIError) as err:
        lim.admit("t").__enter__()
    assert err.value.status == 429 and 0 < err.value.retry_after_s <= 0.05 + 1e-9
    time.sleep(0.06)
    with lim.admit("t"):
        pass
