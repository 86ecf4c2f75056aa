"""One real Ray instance (and Serve) per test session; apps are deployed and deleted by the tests."""

import os

import pytest

from specserve.cluster.config import SpecserveConfig
from specserve.cluster.launcher import LocalServer
from specserve.cluster.redis_server import free_port


# Two simulated nodes (each its own raylet and object store); tests pin replicas with these resources.
NODE_A, NODE_B = "test_node_a", "test_node_b"


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    # Logical CPUs above the 2 real cores: deployments ask for fractions, and tests must not wait for slots.
    store = 300 * 1024 * 1024
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {NODE_A: 100}, "object_store_memory": store, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={NODE_B: 100}, object_store_memory=store)
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                       # autoscaling tests: load reaches Serve's autoscaler in a second, not ten
                                       "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
                                       "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1"}})
    port = free_port()
    # One HTTP proxy: both simulated nodes share this machine's ports.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


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
