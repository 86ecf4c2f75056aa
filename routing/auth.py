"""API keys -> tenants, and per-tenant admission (rate and concurrency). Pure Python; the front ends call it.

Keys are kept only as sha256 digests, so a lookup compares digests, never the secret itself byte by byte.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import contextmanager

import yaml

from specserve.cluster.config import AuthConfig, TenantLimits
from specserve.routing.errors import APIError

log = logging.getLogger(__name__)
_TENANT_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def check_tenant_name(name: str, param: str = "tenant") -> str:
    if not name or len(name) > 64 or not set(name) <= _TENANT_CHARS:
        raise APIError(400, f"{param}: a tenant is 1-64 characters of letters, digits, '-', '_' or '.'",
                       param=param)
    return name


class ApiKeys:
    """Which tenant a key belongs to. Inline keys from config plus a YAML file, re-read when its mtime changes
    (a rotated Kubernetes Secret shows up without a restart)."""

    def __init__(self, config: AuthConfig):
        self._inline = {_digest(k): check_tenant_name(t, "auth.api_keys") for k, t in config.api_keys.items()}
        self._file = config.api_keys_file
        self._file_keys: dict[bytes, str] = {}
        self._file_stamp: tuple | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if self._file:
            self._reload(force=True)

    @property
    def enabled(self) -> bool:
        return bool(self._inline or self._file)

    def _parse(self) -> dict[bytes, str]:
        with open(self._file) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ValueError("expected a mapping of key: tenant")
        return {_digest(str(k)): check_tenant_name(str(t), "auth.api_keys_file") for k, t in data.items()}

    def _reload(self, *, force: bool = False) -> None:
        """Startup (force): a bad file is a config error. Later: a missing, half-written or bad file keeps the
        last good keys (a Secret being swapped), logged once per change; checked at most once a second."""
        now = time.monotonic()
        if not force and now - self._checked_at < 1.0:
            return
        self._checked_at = now
        try:
            st = os.stat(self._file)
        except OSError as exc:
            if force:
                raise ValueError(f"auth.api_keys_file {self._file}: {exc}") from exc
            return  # gone for a moment while a Secret is swapped
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._file_stamp:
            return
        self._file_stamp = stamp  # a bad file is reported once, not on every request
        try:
            keys = self._parse()
        except (OSError, ValueError, yaml.YAMLError, APIError) as exc:
            if force:
                raise ValueError(f"auth.api_keys_file {self._file}: {exc}") from exc
            log.error("auth.api_keys_file %s unreadable (%s): keeping the previous keys", self._file, exc)
            return
        with self._lock:
            self._file_keys = keys

    def tenant_of(self, key: str | None) -> str | None:
        """The key's tenant; None when auth is off. Raises 401 for a missing or unknown key."""
        if not self.enabled:
            return None
        if not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>' (HTTP) or 'authorization' "
                                "metadata (gRPC)", code="missing_api_key")
        if self._file:
            self._reload()
        d = _digest(key)
        tenant = self._inline.get(d) or self._file_keys.get(d)
        if tenant is None:
            raise APIError(401, "invalid API key", code="invalid_api_key")
        return tenant


def bearer_token(value: str | None) -> str | None:
    """The key of an 'Authorization: Bearer <key>' value (the bare key is accepted too, e.g. gRPC metadata)."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    return rest.strip() if scheme.lower() == "bearer" and rest else value.strip()


def api_key(credentials: Mapping[str, str]) -> str | None:
    """The API key in HTTP headers or gRPC metadata (lower-case names): `authorization: Bearer <key>` or
    `x-api-key: <key>`."""
    return bearer_token(credentials.get("authorization")) or credentials.get("x-api-key")


def resolve_tenant(keys: ApiKeys, key: str | None, requested: str | None, default: str) -> str:
    """The tenant a request runs as. With keys on, the key decides and a different requested tenant is 403; with
    them off, the request may name its tenant (a gateway in front authenticates), else the default."""
    owner = keys.tenant_of(key)
    if requested:
        check_tenant_name(requested)
    if owner is None:
        return requested or default
    if requested and requested != owner:
        raise APIError(403, f"tenant: this API key belongs to another tenant than '{requested}'",
                       param="tenant", code="tenant_forbidden")
    return owner


class _Bucket:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> float:
        """0 if a request may go now (and takes its token), else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class TenantLimiter:
    """Per-tenant request rate (token bucket) and concurrency, for one ingress replica."""

    MAX_BUCKETS = 10_000  # with keys off, clients name tenants: the least recently used buckets go first

    def __init__(self, default: TenantLimits, overrides: dict[str, TenantLimits] | None = None):
        self.default, self.overrides = default, dict(overrides or {})
        self.in_flight: dict[str, int] = {}
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def limits(self, tenant: str) -> TenantLimits:
        return self.overrides.get(tenant, self.default)

    @contextmanager
    def admit(self, tenant: str):
        """Hold a slot of `tenant` for the body; 429 with Retry-After when the tenant is over a limit."""
        lim = self.limits(tenant)
        if lim.max_concurrent_requests and self.in_flight.get(tenant, 0) >= lim.max_concurrent_requests:
            raise APIError(429, f"tenant '{tenant}' has {lim.max_concurrent_requests} requests in flight, its "
                                "limit", code="tenant_concurrency_limit", retry_after_s=1.0)
        if lim.requests_per_s:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = _Bucket(lim.requests_per_s, lim.burst or max(1, int(lim.requests_per_s)))
                if len(self._buckets) > self.MAX_BUCKETS:
                    self._buckets.popitem(last=False)
            self._buckets.move_to_end(tenant)
            wait = bucket.take()
            if wait:
                raise APIError(429, f"tenant '{tenant}' is over its rate of {lim.requests_per_s:g} requests/s",
                               code="tenant_rate_limit", retry_after_s=wait)
        self.in_flight[tenant] = self.in_flight.get(tenant, 0) + 1
        try:
            yield
        finally:
            n = self.in_flight[tenant] - 1
            if n:
                self.in_flight[tenant] = n
            else:
                del self.in_flight[tenant]
