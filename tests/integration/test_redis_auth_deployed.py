"""`specserve serve`'s embedded Redis asks for a password (issue 19): the replicas of a served app (real Ray
Serve, real Redis) read it from the launcher's private file and use the KV store; a client without it is refused."""

import time

import httpx
import pytest
import redis
import torch
from ray import serve

from served_apps import start_app
from specserve.cluster.kv.redis_client import connect, read_password, redis_config
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "auth-tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("auth-target"), arch="llama", seed=5, num_layers=2)


def test_replicas_use_the_embedded_redis_with_its_password(ray_cluster, model_dir):
    server = start_app(ray_cluster, str(model_dir), NAME, **{"engine.block_size": 16, "server.route_prefix": "/auth"})
    try:
        cfg = server.config.server
        password = read_password(cfg.redis_password_file)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(cfg.redis_url, socket_timeout=2).ping()
        ids = torch.randint(3, 384, (200,), generator=torch.Generator().manual_seed(3)).tolist()
        r = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": NAME, "prompt": ids, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        # The verifier exports the prompt's 12 full blocks: index entries it wrote to Redis, authenticated.
        verifier = serve.get_deployment_handle("Verifier", NAME)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            st = verifier.stats.remote().result(timeout_s=60)["kv_store"]
            if st["exported_blocks"] >= 12:
                break
            time.sleep(0.2)
        assert st["exported_blocks"] >= 12 and st["available"], st
        assert connect(**redis_config(cfg, 2.0)).dbsize() > 0
        assert password not in server.config.model_dump_json()
    finally:
        server.stop()
