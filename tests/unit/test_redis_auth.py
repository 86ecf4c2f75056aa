"""Redis AUTH for the KV index: the embedded Redis of `specserve serve` asks for a password that replicas read
from a file (only its path travels), and nothing the launcher prints carries a password. Real redis-server."""

import os
import stat

import pytest
import redis

from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.redis_client import connect, read_password, redact_url, redis_config
from specserve.deploy.launcher import LocalServer, kv_index_line
from specserve.cluster.redis_server import EmbeddedRedis


@pytest.mark.parametrize("url, shown", [
    ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:hunter2@redis.example:6380/1", "rediss://app:***@redis.example:6380/1"),
    ("redis://app@redis:6379/0", "redis://app@redis:6379/0"),  # a user name is no secret
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:p%40ss%3Aw@[::1]:6379", "redis://:***@[::1]:6379"),
    (None, None),
])
def test_redact_url_masks_only_the_password(url, shown):
    assert redact_url(url) == shown
    if url and "hunter2" in url:
        assert "hunter2" not in redact_url(url)


def test_kv_index_line_never_shows_a_password(tmp_path):
    cfg = SpecserveConfig.load(overrides={"server.redis_url": "redis://:hunter2@kv.internal:6379/0"})
    line = kv_index_line(cfg, embedded=False)
    assert "hunter2" not in line and line.startswith("redis://:***@kv.internal:6379/0")
    secret = tmp_path / "pw"
    secret.write_text("hunter2")
    cfg = SpecserveConfig.load(overrides={"server.redis_url": "redis://127.0.0.1:7000/0",
                                          "server.redis_password_file": str(secret)})
    assert kv_index_line(cfg, embedded=True) == "redis://127.0.0.1:7000/0 (embedded, password required)"


def test_read_password_names_the_field(tmp_path):
    assert read_password(None) is None
    (tmp_path / "pw").write_text("s3cret\n")  # as `echo` or a Secret made from a file leaves it
    assert read_password(str(tmp_path / "pw")) == "s3cret"
    with pytest.raises(ValueError, match="server.redis_password_file: cannot read"):
        read_password(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("")
    with pytest.raises(ValueError, match="server.redis_password_file: .* is empty"):
        read_password(str(tmp_path / "empty"))


def test_embedded_redis_with_a_password_refuses_clients_without_it(tmp_path):
    password = "pa ss\"wo\\rd"  # characters a config file would need quoted
    with EmbeddedRedis(password=password) as server:
        with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()  # not on the command line other users can read
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server.url, socket_timeout=2).ping()
        with pytest.raises(redis.AuthenticationError):
            connect(server.url, timeout_s=2.0, password_file=_write(tmp_path / "wrong", "wrong")).ping()
        client = connect(server.url, timeout_s=2.0, password_file=_write(tmp_path / "pw", password))
        assert client.ping() and client.set("k", b"v") and client.get("k") == b"v"


def test_local_server_gives_its_embedded_redis_a_random_password_in_a_private_file():
    server = LocalServer(SpecserveConfig())
    server._start_embedded_redis()
    try:
        server_cfg = server.config.server
        path = server_cfg.redis_password_file
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        password = read_password(path)
        assert len(password) >= 32 and password == server.redis.password
        # What travels to replicas, routers and holder actors: the URL and the file's path, no password.
        travels = redis_config(server_cfg, 2.0)
        assert password not in repr(travels) and password not in server.config.model_dump_json()
        assert connect(**travels).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(server_cfg.redis_url, socket_timeout=2).ping()
        assert password not in kv_index_line(server.config, embedded=True)
    finally:
        server.redis.stop()
        server.redis = None
        server.stop()  # no Ray was started: only the Redis and the password file go
    assert not os.path.exists(path)


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_a_cluster_deployment_refuses_a_password_in_the_redis_url(tmp_path):
    from specserve.deploy.serve_config import render

    cfg = SpecserveConfig.load(overrides={"server.redis_url": "redis://:hunter2@redis:6379/0"})
    with pytest.raises(ValueError, match="server.redis_url carries a password") as err:
        render(cfg)
    assert "hunter2" not in str(err.value)
    cfg = SpecserveConfig.load(overrides={"server.redis_url": "redis://redis:6379/0",
                                          "server.redis_password_file": _write(tmp_path / "pw", "hunter2")})
    rendered = render(cfg)  # the path goes into the Serve config; the password stays in the file
    assert rendered["applications"][0]["args"]["server"]["redis_password_file"] == str(tmp_path / "pw")
    assert "hunter2" not in repr(rendered)


def test_local_server_addresses_a_wildcard_bind_at_loopback():
    ports = {"server.http_port": 8123, "server.grpc_port": 9123, "server.route_prefix": "/app/"}
    wildcard = LocalServer(SpecserveConfig.load(overrides={"server.host": "0.0.0.0", **ports}))
    assert (wildcard.url, wildcard.grpc_target) == ("http://127.0.0.1:8123/app", "127.0.0.1:9123")
    named = LocalServer(SpecserveConfig.load(overrides={"server.host": "10.1.2.3", **ports}))
    assert (named.url, named.grpc_target) == ("http://10.1.2.3:8123/app", "10.1.2.3:9123")
