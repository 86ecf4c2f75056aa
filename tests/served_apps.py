"""Helpers the integration tests share: the simulated nodes, a free listen port, and deploying an app."""

import os

from specserve.cluster.config import SpecserveConfig
from specserve.deploy.launcher import LocalServer, port_below_ephemeral


# Two simulated nodes (each its own raylet and object store); tests pin replicas with these resources.
NODE_A, NODE_B = "test_node_a", "test_node_b"


listen_port = port_below_ephemeral  # a free port Ray's own processes will not take


def start_app(ray_cluster, source: str, name: str, **overrides) -> LocalServer:
    base = {"model.source": source, "model.served_name": name, "model.dtype": "float32",
            "verifier.num_cpus": 0.5, "ingress.num_cpus": 0.25, "server.http_port": ray_cluster,
            "server.app_name": name, "server.grpc_port": listen_port(),
            "model.cache_dir": os.environ.get("SPECSERVE_CACHE")}
    base.update(overrides)
    return LocalServer(SpecserveConfig.load(overrides=base)).start(progress=False)
