"""Helpers the integration tests share: the simulated nodes, a free listen port, and deploying an app."""

import os

from specserve.cluster.config import SpecserveConfig
from specserve.deploy.launcher import LocalServer


# Two simulated nodes (each its own raylet and object store); tests pin replicas with these resources.
NODE_A, NODE_B = "test_node_a", "test_node_b"


def listen_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where Ray's own processes bind theirs: a port from
    the ephemeral range can be taken by a Ray worker between choosing it and binding it."""
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


def start_app(ray_cluster, source: str, name: str, **overrides) -> LocalServer:
    base = {"model.source": source, "model.served_name": name, "model.dtype": "float32",
            "verifier.num_cpus": 0.5, "ingress.num_cpus": 0.25, "server.http_port": ray_cluster,
            "server.app_name": name, "server.grpc_port": listen_port(),
            "model.cache_dir": os.environ.get("SPECSERVE_CACHE")}
    base.update(overrides)
    return LocalServer(SpecserveConfig.load(overrides=base)).start(progress=False)
