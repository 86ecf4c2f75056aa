"""`specserve serve --ray-address` joins a running cluster (here the test session's): its app serves through that
cluster's Serve, and Ctrl-C removes only that app, leaving Serve and the cluster's other apps running."""

import httpx
import pytest
import ray
from ray import serve

from served_apps import ServeProcess
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-joined"


@serve.deployment(ray_actor_options={"num_cpus": 0.05})
class Neighbour:
    """Another user's app on the same cluster."""

    def __call__(self, request) -> str:
        return "still here"


def test_ctrl_c_on_a_joined_cluster_removes_only_its_own_app(ray_cluster, tmp_path):
    port = ray_cluster
    serve.run(Neighbour.bind(), name="neighbour", route_prefix="/neighbour")
    try:
        model = make_tiny_model(tmp_path / "model", arch="llama", seed=5)
        config = tmp_path / "joined.yaml"
        config.write_text("server:\n  app_name: joined\n  route_prefix: /joined\n")
        args = ["--config", str(config), "--ray-address", ray.get_runtime_context().gcs_address,
                "--model", str(model), "--served-name", NAME, "--dtype", "float32", "--port", str(port),
                "--grpc-port", "0"]
        with ServeProcess(args) as server:
            assert {"neighbour", "joined"} <= set(serve.status().applications)
            models = httpx.get(f"http://127.0.0.1:{port}/joined/v1/models", timeout=30)
            assert [m["id"] for m in models.json()["data"]] == [NAME], models.text
            assert server.interrupt() == 0, server.tail()
        apps = serve.status().applications
        assert "joined" not in apps and apps["neighbour"].status == "RUNNING", apps
        assert httpx.get(f"http://127.0.0.1:{port}/neighbour", timeout=30).text == "still here"
    finally:
        serve.delete("neighbour")
