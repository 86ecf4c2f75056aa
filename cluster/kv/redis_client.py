"""Redis connections for the KV index, from config: a URL, or Sentinel (the master of a monitored group).

Short socket timeouts: a slow or dead Redis must turn into a cache miss quickly, not stall a request.
"""

from __future__ import annotations


def redis_config(server_cfg, timeout_s: float) -> dict:
    """Plain-data connection settings (they travel to holder actors)."""
    return {"url": server_cfg.redis_url, "sentinels": list(server_cfg.redis_sentinels),
            "master": server_cfg.redis_sentinel_master, "timeout_s": timeout_s}


def connect(url: str | None = None, sentinels: list[str] | None = None, master: str = "mymaster",
            timeout_s: float = 2.0):
    import redis

    opts = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, "health_check_interval": 10}
    if sentinels:
        from redis.sentinel import Sentinel

        hosts = [(h, int(p)) for h, _, p in (s.rpartition(":") for s in sentinels)]
        return Sentinel(hosts, sentinel_kwargs={"socket_timeout": timeout_s}, **opts).master_for(master)
    if not url:
        raise ValueError("no Redis configured: set server.redis_url or server.redis_sentinels")
    return redis.Redis.from_url(url, **opts)
