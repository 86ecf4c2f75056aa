"""One real Ray instance (and Serve) per test session; apps are deployed and deleted by the tests."""

import pytest

from specserve.cluster.redis_server import free_port
from served_apps import NODE_A, NODE_B


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
