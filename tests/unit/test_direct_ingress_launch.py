"""How `specserve serve` and the bench start Ray for direct ingress (deploy/launcher.py): the environment Serve
reads, where Serve's own proxy binds, and when a local instance is started rather than joined. The served path
itself runs in tests/integration/test_direct_ingress.py."""

import logging
import os

import pytest

from specserve.cluster.config import ServerConfig, SpecserveConfig
from specserve.deploy import launcher
from specserve.deploy.app import deployment_options

KEYS = set(launcher.direct_ingress_env(ServerConfig()))


@pytest.fixture
def fake_ray(monkeypatch):
    """Records the launcher's ray.init arguments, with the environment Ray's processes would be spawned with,
    instead of starting Ray; the environment and the module state are restored by monkeypatch. Only the launcher's
    own calls are replaced: Ray's background threads of this process (the integration tests' Serve handles) call
    the ray module's init and is_initialized themselves."""
    calls = []
    monkeypatch.setattr(launcher._ray, "init", lambda **kw: calls.append({**kw, "env": dict(os.environ)}))
    monkeypatch.setattr(launcher._ray, "is_initialized", lambda: False)
    monkeypatch.setattr(launcher, "_direct_ingress", None)
    monkeypatch.setattr(launcher, "_own_ray", False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    return calls


def test_the_environment_pins_the_ingress_http_port_and_drops_the_load_balancer_holds():
    env = launcher.direct_ingress_env(ServerConfig(http_port=8123))
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8123", "8124")  # a range of one port: the replica binds http_port or fails
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


def test_a_local_start_gets_a_fresh_instance_with_direct_ingress_and_the_proxy_moves_off_the_port(fake_ray):
    server = ServerConfig(http_port=8123, direct_ingress=True)
    launcher.start_local_ray(server)
    assert fake_ray[0]["address"] == "local"  # not a Ray found running on this machine: it lacks the environment
    assert all(fake_ray[0]["env"][k] == v for k, v in launcher.direct_ingress_env(server).items())
    assert not KEYS & set(os.environ)  # this process's own Serve (its handles) keeps the defaults
    proxy = launcher.serve_proxy_port(server)
    assert 20000 <= proxy < 32000 and launcher.serve_proxy_port(server) == proxy  # chosen once, for every app
    with pytest.raises(ValueError, match="direct ingress on port 8123"):
        launcher.serve_proxy_port(ServerConfig(http_port=9000))
    launcher.stop_local_ray()
    assert launcher.serve_proxy_port(server) == 8123


def test_the_environment_is_restored_when_ray_fails_to_start(fake_ray, monkeypatch):
    def fail(**kw):
        raise ConnectionError("no Ray")

    monkeypatch.setattr(launcher._ray, "init", fail)
    monkeypatch.setenv("RAY_SERVE_PORT_QUARANTINE_S", "7")
    with pytest.raises(ConnectionError):
        launcher.start_local_ray(ServerConfig(direct_ingress=True))
    assert os.environ["RAY_SERVE_PORT_QUARANTINE_S"] == "7" and "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ
    assert launcher._direct_ingress is None


@pytest.mark.parametrize("how", ["ray_address", "RAY_ADDRESS", "direct_ingress off"])
def test_joining_a_cluster_or_turning_it_off_keeps_serves_proxy_on_the_port(fake_ray, monkeypatch, caplog, how):
    server = ServerConfig(http_port=8123, ray_address="10.0.0.1:6379" if how == "ray_address" else None,
                          direct_ingress=how != "direct_ingress off")
    if how == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    launcher.start_local_ray(server)
    # No address: an instance of its own, never one that `ray start` left running (that one is joined by address).
    assert fake_ray[0]["address"] == {"ray_address": "10.0.0.1:6379", "RAY_ADDRESS": "10.0.0.2:6379",
                                      "direct_ingress off": "local"}[how]
    assert not KEYS & set(fake_ray[0]["env"])
    with caplog.at_level(logging.WARNING, logger="specserve"):
        assert launcher.serve_proxy_port(server) == 8123
    assert ("applies only where specserve starts Ray" in caplog.text) == server.direct_ingress


@pytest.mark.parametrize("address", [None, "10.0.0.1:6379"])
def test_stopping_shuts_serve_down_only_on_an_instance_of_its_own(fake_ray, monkeypatch, address):
    calls = []
    monkeypatch.setattr(launcher._ray, "serve_shutdown", lambda: calls.append("serve.shutdown"))
    monkeypatch.setattr(launcher._ray, "shutdown", lambda: calls.append("ray.shutdown"))
    launcher.start_local_ray(ServerConfig(ray_address=address))
    monkeypatch.setattr(launcher._ray, "is_initialized", lambda: True)
    launcher.stop_local_ray()
    # On a joined cluster serve.shutdown would delete every app there: only the connection is closed.
    assert calls == (["serve.shutdown", "ray.shutdown"] if address is None else ["ray.shutdown"])
    calls.clear()
    launcher.stop_local_ray()  # stopped: a second stop (or one without a start) shuts no Serve down
    assert calls == ["ray.shutdown"]


@pytest.mark.parametrize("grpc_port,direct,one_per_node", [(9000, False, True), (0, True, True), (0, False, False)])
def test_the_ingress_runs_one_replica_per_node_when_it_binds_a_port(grpc_port, direct, one_per_node):
    cfg = SpecserveConfig.load(overrides={"server.grpc_port": grpc_port, "server.direct_ingress": direct})
    assert (deployment_options(cfg)["Ingress"].get("max_replicas_per_node") == 1) == one_per_node


def test_an_interrupted_start_leaves_no_embedded_redis_behind(monkeypatch, tmp_path):
    """Ctrl-C once the embedded redis-server runs (here: raised right after it started) stops it and removes its
    password file; before, only a start that returned could be stopped. Nothing of Ray is patched: a fake ray.init
    that raises would also be called by Ray's auto-init from any background thread of this process (Serve's router
    loop of the integration tests' handles) and end that thread."""
    from tiny_models import make_tiny_model

    started = []
    original = launcher.LocalServer._start_embedded_redis

    def interrupted(self):
        original(self)
        started.append((self.redis.proc, self._secrets_dir))
        raise KeyboardInterrupt
    monkeypatch.setattr(launcher.LocalServer, "_start_embedded_redis", interrupted)
    path = make_tiny_model(tmp_path / "tiny", arch="llama", seed=1)
    server = launcher.LocalServer(SpecserveConfig.load(overrides={"model.source": str(path),
                                                                  "model.cache_dir": str(tmp_path / "cache")}))
    with pytest.raises(KeyboardInterrupt):
        server.start(progress=False)
    [(redis_server, secrets_dir)] = started
    assert redis_server.poll() is not None  # the process has exited (and was reaped)
    assert not os.path.exists(secrets_dir) and server.redis is None
    assert server.config.server.redis_url is None  # a later start starts a fresh one
