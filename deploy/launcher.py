"""`specserve serve`: start (or join) Ray, start the embedded Redis when no URL is given, deploy the app,
print the endpoints, and shut everything down cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from typing import NamedTuple

from specserve.cluster.config import ServerConfig, SpecserveConfig

log = logging.getLogger("specserve")

# CLI flag -> dotted config key. One schema: flags only override fields of SpecserveConfig.
FLAGS = {
    "--model": ("model.source", str, "model: registry name (smollm2-135m), local HF directory or hub id"),
    "--served-name": ("model.served_name", str, "name clients use in requests (default: --model)"),
    "--device": ("model.device", str, "auto | cpu | cuda"),
    "--dtype": ("model.dtype", str, "auto | float32 | bfloat16 | float16"),
    "--cache-dir": ("model.cache_dir", str, "model cache directory"),
    "--torch-threads": ("model.torch_threads", int, "torch threads per replica (0 = default)"),
    "--block-size": ("engine.block_size", int, "KV block size in tokens"),
    "--num-blocks": ("engine.num_blocks", int, "KV pool size in blocks (0 = from --kv-cache-gb)"),
    "--kv-cache-gb": ("engine.kv_cache_memory_gb", float, "KV pool size in GiB"),
    "--max-num-seqs": ("engine.max_num_seqs", int, "max sequences per batch"),
    "--max-num-batched-tokens": ("engine.max_num_batched_tokens", int, "token budget per step"),
    "--max-model-len": ("engine.max_model_len", int, "context window (0 = the model's)"),
    "--verifier-replicas": ("verifier.num_replicas", int, "verifier replicas"),
    "--verifier-cpus": ("verifier.num_cpus", float, "CPUs reserved per verifier replica"),
    "--verifier-gpus": ("verifier.num_gpus", float, "GPUs per verifier replica"),
    "--host": ("server.host", str, "HTTP bind address"),
    "--port": ("server.http_port", int, "HTTP port"),
    "--ray-address": ("server.ray_address", str, "join this Ray cluster instead of starting one"),
    "--grpc-port": ("server.grpc_port", int, "gRPC port (0 = off)"),
    "--redis-url": ("server.redis_url", str, "Redis for the KV index (default: embedded redis-server); "
                    "no password in it: use --redis-password-file"),
    "--redis-password-file": ("server.redis_password_file", str, "file holding the Redis password (AUTH)"),
    "--api-keys-file": ("auth.api_keys_file", str, "YAML of API key: tenant (default: no keys needed)"),
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (flags override it)")
    for flag, (_, typ, help_) in FLAGS.items():
        parser.add_argument(flag, type=typ, default=None, help=help_)


def config_from_args(args: argparse.Namespace) -> SpecserveConfig:
    overrides = {key: getattr(args, flag[2:].replace("-", "_")) for flag, (key, _, _) in FLAGS.items()}
    return SpecserveConfig.load(args.config, overrides)


class DirectIngress(NamedTuple):
    http_port: int  # the ingress replica's
    proxy_port: int  # Serve's own proxy, which direct ingress keeps on the head node


# Set where this process started Ray with direct ingress (start_local_ray), until it stops it.
_direct_ingress: DirectIngress | None = None
# Whether the Ray instance start_local_ray connected to is one it started (not a cluster it joined).
_own_ray = False


def direct_ingress_env(server: ServerConfig) -> dict[str, str]:
    """Environment of a Ray instance whose Serve runs direct ingress (server.direct_ingress). Serve's controller
    and replicas read it when they start, so the Ray processes get it when they are spawned: direct ingress, the
    ingress replica's HTTP port pinned to server.http_port, and neither a port quarantine nor a draining hold on
    shutdown: both give a load balancer in front (HAProxy) time to notice a replica going, and a local server has
    none."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(server.http_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(server.http_port + 1),
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def port_below_ephemeral() -> int:
    """A free port below Linux's ephemeral range (32768+), where Ray's own processes bind theirs: a port from
    that range can be taken by a Ray worker between choosing it and binding it."""
    import random
    import socket

    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def ray_address(server: ServerConfig) -> str | None:
    """The Ray cluster to join (server.ray_address, else RAY_ADDRESS); None: start one."""
    return server.ray_address or os.environ.get("RAY_ADDRESS")


class _RayCalls:
    """start_local_ray's and stop_local_ray's calls into Ray. Unit tests replace them here, not on the ray module:
    Ray's own background threads in a test process call that module's init and is_initialized too (auto-init)."""

    @staticmethod
    def init(**kwargs) -> None:
        import ray
        ray.init(**kwargs)

    @staticmethod
    def is_initialized() -> bool:
        import ray
        return ray.is_initialized()

    @staticmethod
    def serve_shutdown() -> None:
        from ray import serve
        serve.shutdown()

    @staticmethod
    def shutdown() -> None:
        import ray
        ray.shutdown()


_ray = _RayCalls()


def start_local_ray(server: ServerConfig, **init_kwargs) -> None:
    """ray.init for `specserve serve` and the bench: join server.ray_address (or RAY_ADDRESS), else start a Ray
    instance of its own ("local": not one that `ray start` left running on this machine, which is joined only by
    its address, e.g. "auto"). With server.direct_ingress, the environment Ray's processes need is this process's
    only while they are spawned from it."""
    global _direct_ingress, _own_ray
    address = ray_address(server)
    env = direct_ingress_env(server) if not address and server.direct_ingress else {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        _ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING, **init_kwargs)
        _own_ray = not address
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _direct_ingress = DirectIngress(server.http_port, port_below_ephemeral()) if env else None


def stop_local_ray() -> None:
    """Disconnect from the Ray instance start_local_ray started or joined, shutting Serve down only on one it
    started: on a joined cluster serve.shutdown would delete every application there, other users' too (callers
    delete their own)."""
    global _direct_ingress, _own_ray
    own, _own_ray, _direct_ingress = _own_ray, False, None
    if _ray.is_initialized():
        try:
            if own:
                _ray.serve_shutdown()
        finally:
            _ray.shutdown()


def serve_proxy_port(server: ServerConfig) -> int:
    """Where Serve's own HTTP proxy binds: server.http_port, unless the ingress replica serves that port itself
    (direct ingress), where the proxy gets the port start_local_ray chose for it."""
    if _direct_ingress is None:
        if server.direct_ingress:
            log.warning("server.direct_ingress applies only where specserve starts Ray itself: HTTP goes through "
                        "Serve's proxy on port %d", server.http_port)
        return server.http_port
    if server.http_port != _direct_ingress.http_port:
        raise ValueError(f"server.http_port {server.http_port}: this process started Ray with direct ingress on "
                         f"port {_direct_ingress.http_port}, and every app on it serves there")
    return _direct_ingress.proxy_port


class LocalServer:
    """Everything `specserve serve` runs, as an object tests and scripts can start and stop."""

    def __init__(self, config: SpecserveConfig):
        self.config = config
        self.redis = None
        self._secrets_dir: str | None = None
        self._started_ray = False
        self._deployed = False  # serve.run was called for this app

    def start(self, *, progress: bool = True) -> "LocalServer":
        import ray
        from ray import serve

        from specserve.actors.model_loader import resolve_model_path
        from specserve.deploy.app import build_app

        cfg = self.config
        # Pull/convert once here, so replicas only load from the cache.
        path = resolve_model_path(cfg.model.source, cfg.model.cache_dir, progress=progress)
        cfg.model.served_name = cfg.model.name
        cfg.model.source = str(path)
        try:
            if not cfg.server.redis_url and not cfg.server.redis_sentinels:
                self._start_embedded_redis()
            if not ray.is_initialized():
                self._started_ray = True  # before: an interrupted ray.init may have connected
                start_local_ray(cfg.server, runtime_env={"env_vars": {"SPECSERVE_CACHE": str(cfg.model.cache_dir)}}
                                if ray_address(cfg.server) else None)
            serve.start(http_options={"host": cfg.server.host, "port": serve_proxy_port(cfg.server)})
            self._deployed = True  # before: an interrupted serve.run may have created the app
            serve.run(build_app(cfg), name=cfg.server.app_name, route_prefix=cfg.server.route_prefix,
                      blocking=False)
        except BaseException:  # Ctrl-C or a failed deploy: nothing this start began outlives it
            try:
                self.stop()
            except Exception as exc:  # noqa: BLE001 - the original error is the one to see
                log.warning("cleaning up after a failed start: %s", exc)
            raise
        return self

    def _start_embedded_redis(self) -> None:
        """A local redis-server that asks for a fresh random password. Replicas read it from a file only this
        user can read (0600 in a 0700 directory): a file reaches them however Ray was started (by us, joined,
        or already running in this process), where an environment variable would not, and other users of the
        machine can connect to 127.0.0.1 but not authenticate."""
        from specserve.cluster.redis_server import EmbeddedRedis

        cfg = self.config
        self._secrets_dir = tempfile.mkdtemp(prefix="specserve-secrets-")
        path = os.path.join(self._secrets_dir, "redis-password")
        password = secrets.token_urlsafe(32)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(password)
        self.redis = EmbeddedRedis(password=password)  # held before it starts: an interrupted start is stopped
        self.redis.start()
        cfg.server.redis_url = self.redis.url
        cfg.server.redis_password_file = path

    @property
    def _client_host(self) -> str:
        """Where a local client reaches the server: 127.0.0.1 when it binds every address."""
        host = self.config.server.host
        return "127.0.0.1" if host in ("0.0.0.0", "::") else host

    @property
    def url(self) -> str:
        """Base URL of the app (its route prefix included)."""
        prefix = self.config.server.route_prefix.rstrip("/")
        return f"http://{self._client_host}:{self.config.server.http_port}{prefix}"

    @property
    def grpc_target(self) -> str:
        return f"{self._client_host}:{self.config.server.grpc_port}"

    def stop(self) -> None:
        """Delete the app (if start deployed it); shut Serve and Ray down only if this server started Ray; stop
        the embedded Redis. Safe to call again, and after a start that failed part way."""
        import ray
        from ray import serve

        from specserve.cluster.kv.holder import kill_holders

        try:
            if self._deployed and ray.is_initialized():
                serve.delete(self.config.server.app_name)
                kill_holders(self.config.server.app_name)  # detached: they would outlive the app
            self._deployed = False
        finally:
            try:
                if self._started_ray:
                    self._started_ray = False
                    stop_local_ray()
            finally:
                self._stop_embedded_redis()

    def _stop_embedded_redis(self) -> None:
        try:
            if self.redis:
                redis, self.redis = self.redis, None
                redis.stop()
                self.config.server.redis_url = None  # a later start starts a fresh one
                self.config.server.redis_password_file = None
        finally:
            if self._secrets_dir:
                shutil.rmtree(self._secrets_dir, ignore_errors=True)
                self._secrets_dir = None


def kv_index_line(config: SpecserveConfig, *, embedded: bool) -> str:
    """Where the KV index lives, as `specserve serve` prints it: never a password (one in the URL is masked)."""
    from specserve.cluster.kv.redis_client import redact_url

    server = config.server
    where = redact_url(server.redis_url) if server.redis_url else \
        f"sentinels {', '.join(server.redis_sentinels)} (master {server.redis_sentinel_master})"
    notes = (["embedded"] if embedded else []) + (["password required"] if server.redis_password_file else [])
    return f"{where} ({', '.join(notes)})" if notes else where


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specserve serve", description="Serve a model on local (or joined) Ray.")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
    except Exception as exc:  # noqa: BLE001 - one line for a bad config
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    from specserve.actors.model_loader import ModelLoadError

    server = LocalServer(config)
    t0 = time.time()
    try:
        server.start()  # Ctrl-C here raises KeyboardInterrupt and cleans up below
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        server.stop()
        return 2
    except BaseException:
        server.stop()
        raise
    name = config.model.name
    example = json.dumps({"model": name, "messages": [{"role": "user", "content": "Write a haiku about the sea."}],
                          "max_tokens": 64, "stream": True})
    print(f"""
specserve is serving '{name}' (ready in {time.time() - t0:.0f}s)
  OpenAI API   {server.url}/v1   (chat/completions, completions, models)
  gRPC API     {server.grpc_target}   (specserve.v1.Generation, grpc.health.v1, reflection){'' if config.server.grpc_port else ' - off'}
  health       {server.url}/health      metrics  {server.url}/metrics
  KV index     {kv_index_line(config, embedded=server.redis is not None)}

Try it:
  curl -N {server.url}/v1/chat/completions -H 'Content-Type: application/json' -d '{example}'

Ctrl-C stops everything.
""", flush=True)
    # The handler only appends to a list: setting a threading.Event from a signal handler can deadlock on the
    # Event's own lock when the signal lands while the main thread holds it (seen with a second Ctrl-C).
    stop_signals: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stop_signals.append(signum))
    try:
        while not stop_signals:
            time.sleep(0.2)
    finally:
        print("shutting down...", flush=True)
        server.stop()
    return 0
