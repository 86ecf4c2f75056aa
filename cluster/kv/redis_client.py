"""Redis connections for the KV index, from config: a URL, or Sentinel (the master of a monitored group).

Short socket timeouts: a slow or dead Redis must turn into a cache miss quickly, not stall a request.

The password (Redis AUTH) comes from a file (server.redis_password_file: a mounted Kubernetes Secret, or the file
`specserve serve` writes for its embedded Redis), read here, where every client is made: only its path travels in
configs, Serve args and actor arguments, so no password ends up in a RayService, `serve status` or a log line.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redis_config(server_cfg, timeout_s: float) -> dict:
    """Plain-data connection settings (they travel to holder actors): never the password itself."""
    return {"url": server_cfg.redis_url, "sentinels": list(server_cfg.redis_sentinels),
            "master": server_cfg.redis_sentinel_master, "timeout_s": timeout_s,
            "password_file": server_cfg.redis_password_file}


def read_password(path: str | None) -> str | None:
    """The password in `path` (a trailing newline, as `echo` or kubectl leave it, is not part of it)."""
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            password = f.read().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"server.redis_password_file: cannot read {path}: {exc.strerror}") from None
    if not password:
        raise ValueError(f"server.redis_password_file: {path} is empty")
    return password


def connect(url: str | None = None, *, timeout_s: float, sentinels: list[str] | None = None,
            master: str | None = None, password_file: str | None = None):
    """A client of the Redis at `url`, or of the master named `master` that `sentinels` monitor (the arguments
    `redis_config` gives)."""
    import redis

    opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "health_check_interval": 10}
    password = read_password(password_file)
    if password is not None:
        opts["password"] = password
    if sentinels:
        from redis.sentinel import Sentinel

        if not master:
            raise ValueError("Redis Sentinel needs the monitored master's name (server.redis_sentinel_master)")

        hosts = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in sentinels)]
        # The password is the master's (and its replicas'); sentinels themselves are asked without one.
        return Sentinel(hosts, sentinel_kwargs={"socket_timeout": timeout_s}, **opts).master_for(master)
    if not url:
        raise ValueError("no Redis configured: set server.redis_url or server.redis_sentinels")
    return redis.Redis.from_url(url, **opts)


def redact_url(url: str | None) -> str | None:
    """`url` with any password replaced by ***, for printing and logging (the user name stays)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can parse: print nothing of it rather than a secret
        return "<unparsable URL>"
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
