"""The rendered Serve config deploys with Serve's own `serve run` (what `serve deploy` and a RayService apply)
and serves: the application is built from `args` alone, autoscaling config included."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import torch
from ray import serve

from served_apps import listen_port
from specserve.actors.model_loader import auto_dtype
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.holder import kill_holders
from specserve.cluster.redis_server import EmbeddedRedis
from specserve.deploy.serve_config import render, to_yaml, validate
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-rendered"


def test_rendered_config_deploys_with_serve_run_and_serves(ray_cluster, tmp_path):
    model = make_tiny_model(tmp_path / "model", arch="llama", seed=13)
    with EmbeddedRedis() as redis_server:
        cfg = SpecserveConfig.load(overrides={
            # model.dtype stays at its default, auto: resolved on the replica, with the KV store's block layout
            "model.source": str(model), "model.served_name": NAME,
            "server.app_name": NAME, "server.route_prefix": f"/{NAME}", "server.redis_url": redis_server.url,
            "server.grpc_port": listen_port(), "verifier.num_cpus": 0.5, "ingress.num_cpus": 0.25,
            "verifier.autoscaling": {"min_replicas": 1, "max_replicas": 2}})
        serve_config = render(cfg)
        validate(serve_config)
        path = tmp_path / "serve.yaml"
        path.write_text(to_yaml(serve_config))
        serve_cli = Path(sys.executable).with_name("serve")
        done = subprocess.run([str(serve_cli), "run", "--non-blocking", "-a", ray.get_runtime_context().gcs_address,
                               str(path)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        try:
            url = f"http://127.0.0.1:{ray_cluster}/{NAME}"
            deadline = time.time() + 180
            while True:
                try:
                    r = httpx.post(f"{url}/v1/completions", timeout=60, json={
                        "model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.time() < deadline, "the rendered app never answered"
                time.sleep(1)
            assert r.json()["usage"]["completion_tokens"] == 8
            status = serve.status().applications[NAME]
            assert status.deployments["Verifier"].status == "HEALTHY"
            details = serve.get_deployment_handle("Verifier", app_name=NAME).stats.remote().result(timeout_s=30)
            assert details["kv_store"] is not None  # built from args alone: the Redis URL reached the replicas
            card = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]
            assert card["dtype"] == str(auto_dtype(torch.device("cpu"))[0]).removeprefix("torch.")
        finally:
            serve.delete(NAME)
            kill_holders(NAME)
