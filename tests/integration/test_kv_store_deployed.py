"""The KV block store on real Ray (two simulated nodes, each with its own object store) and a real Redis:
replica A computes a long prompt, replica B on the other node imports A's blocks and prefills only the rest,
token-identical; then the failure cases (a corrupt block, a holder gone, Redis down and back, new weights) are
misses, never errors or wrong tokens."""

import threading
import time

import httpx
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from served_apps import NODE_A, NODE_B, start_app
from specserve.cluster.kv.holder import HOLDER_NAMESPACE
from specserve.cluster.redis_server import EmbeddedRedis
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
BLOCK = 16
NAME = "kv-tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("kv-target"), arch="llama", seed=21, num_layers=2)


def prompt(seed: int, n: int = 200) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(base_url: str, ids: list[int], max_tokens: int = 8) -> dict:
    r = httpx.post(f"{base_url}/v1/completions", timeout=120,
                   json={"model": NAME, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def stats(app: str) -> dict:
    return serve.get_deployment_handle("Verifier", app).stats.remote().result(timeout_s=60)


def wait_exported(app: str, at_least: int, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = stats(app)["kv_store"]
        if st["exported_blocks"] >= at_least:
            return st
        time.sleep(0.2)
    raise AssertionError(f"{app} exported fewer than {at_least} blocks: {st}")


def hf_greedy(model_dir, ids: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()


def test_blocks_move_between_replicas_on_two_nodes_and_failures_are_misses(ray_cluster, model_dir, tmp_path):
    redis_server = EmbeddedRedis().start()
    common = {"model.served_name": NAME, "engine.block_size": BLOCK, "server.redis_url": redis_server.url,
              "kv_store.retry_after_s": 0.5, "kv_store.timeout_s": 2.0}
    apps = []
    try:
        a = start_app(ray_cluster, str(model_dir), "kv-a", **common, **{
            "server.route_prefix": "/kv-a", "verifier.resources": {NODE_A: 1}})
        apps.append(a)
        b = start_app(ray_cluster, str(model_dir), "kv-b", **common, **{
            "server.route_prefix": "/kv-b", "verifier.resources": {NODE_B: 1}})
        apps.append(b)
        assert stats("kv-a")["kv_namespace"] == stats("kv-b")["kv_namespace"]

        # 1. A computes a 200-token prompt (12 full blocks); B, on the other node, imports all 12 from A's holder
        #    and prefills only the last 8 tokens. Same tokens as A's cold run.
        p1 = prompt(1)
        cold = complete(a.url, p1)
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        wait_exported("kv-a", 12)
        computed_before = stats("kv-b")["prompt_tokens_computed"]
        warm = complete(b.url, p1)
        assert warm["choices"][0]["token_ids"] == cold["choices"][0]["token_ids"]
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 12 * BLOCK
        assert warm["usage"]["kv_store"]["imported_tokens"] == 12 * BLOCK
        sb = stats("kv-b")
        assert sb["prompt_tokens_computed"] - computed_before == len(p1) - 12 * BLOCK
        assert sb["kv_store"]["hit_blocks"] == 12
        holder_a = stats("kv-a")["kv_store"]["local_holder"]
        assert holder_a["get_blocks"] == 12 and sb["kv_store"]["local_holder"]["get_blocks"] == 0  # cross-node
        assert ray.get_actor(holder_a["name"], namespace=HOLDER_NAMESPACE) is not None
        assert cold["choices"][0]["token_ids"] == hf_greedy(model_dir, p1, 8)

        # 2. A checksum that does not match the bytes (as if a payload byte flipped): B imports up to that block,
        #    counts a checksum miss, prefills the rest; same tokens.
        p2 = prompt(2)
        cold2 = complete(a.url, p2)
        wait_exported("kv-a", 24)
        r = redis_server_client(redis_server)
        from specserve.actors.engine.block_hash import block_hashes
        ns = stats("kv-a")["kv_namespace"]
        h3 = block_hashes(p2, BLOCK, namespace=ns)[3]
        key = f"specserve:kv:{{{ns}}}:e:{h3.hex()}"
        r.hset(key, "crc", (int(r.hget(key, "crc")) ^ 1))
        warm2 = complete(b.url, p2)
        assert warm2["choices"][0]["token_ids"] == cold2["choices"][0]["token_ids"]
        assert warm2["usage"]["kv_store"]["imported_tokens"] == 3 * BLOCK
        assert stats("kv-b")["kv_store"]["miss_blocks"]["checksum"] == 9
        # The bad entry was dropped; B, which computed that block itself, published a good one in its place.
        holder_b = stats("kv-b")["kv_store"]["local_holder"]["name"]
        deadline = time.monotonic() + 10
        while r.hget(key, "holder") != holder_b.encode() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert r.hget(key, "holder") == holder_b.encode()

        # 3. A's holder is killed for good: its entries point nowhere. B misses (holder_gone), same tokens; A's
        #    next export starts a new holder.
        p3 = prompt(3)
        cold3 = complete(a.url, p3)
        wait_exported("kv-a", 36)
        ray.kill(ray.get_actor(holder_a["name"], namespace=HOLDER_NAMESPACE), no_restart=True)
        warm3 = complete(b.url, p3)
        assert warm3["choices"][0]["token_ids"] == cold3["choices"][0]["token_ids"]
        assert warm3["usage"]["kv_store"]["imported_tokens"] == 0
        assert stats("kv-b")["kv_store"]["miss_blocks"]["holder_gone"] == 12

        # 4. Redis dies while A streams a request: it completes; B misses (redis_unavailable); when Redis is back
        #    on its port, the store works again without restarting anything.
        p4 = prompt(4)
        result = {}
        t = threading.Thread(target=lambda: result.update(complete(a.url, p4, max_tokens=48)))
        t.start()
        time.sleep(0.3)
        port = redis_server.port
        redis_server.stop()
        t.join(timeout=120)
        assert len(result["choices"][0]["token_ids"]) == 48
        warm4 = complete(b.url, p4, max_tokens=48)
        assert warm4["choices"][0]["token_ids"] == result["choices"][0]["token_ids"]
        assert stats("kv-b")["kv_store"]["miss_blocks"]["redis_unavailable"] >= 12
        redis_server = EmbeddedRedis(port=port).start()
        time.sleep(1.0)  # retry_after_s
        p5 = prompt(5)
        exported = stats("kv-a")["kv_store"]["exported_blocks"]
        cold5 = complete(a.url, p5)
        wait_exported("kv-a", exported + 12)
        warm5 = complete(b.url, p5)
        assert warm5["choices"][0]["token_ids"] == cold5["choices"][0]["token_ids"]
        assert warm5["usage"]["kv_store"]["imported_tokens"] == 12 * BLOCK

        # 5. New weights under the same model name and path: a new namespace, so nothing of the old one is hit,
        #    and the output is the new model's.
        for app in apps:
            app.stop()
        apps.clear()
        make_tiny_model(model_dir, arch="llama", seed=22, num_layers=2)
        c = start_app(ray_cluster, str(model_dir), "kv-c", **common, **{
            "server.route_prefix": "/kv-c", "verifier.resources": {NODE_A: 1}})
        apps.append(c)
        assert stats("kv-c")["kv_namespace"] != ns
        fresh = complete(c.url, p1)
        assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert stats("kv-c")["kv_store"]["hit_blocks"] == 0
        assert fresh["choices"][0]["token_ids"] == hf_greedy(model_dir, p1, 8)
        assert fresh["choices"][0]["token_ids"] != cold["choices"][0]["token_ids"]
    finally:
        for app in apps:
            app.stop()
        redis_server.stop()


def redis_server_client(server):
    import redis

    return redis.Redis.from_url(server.url, decode_responses=False)


def test_bench_kv_micro_runs_on_a_tiny_model(ray_cluster, model_dir):
    """The shipped benchmark's micro part, small: every block imported, first token unchanged, figures present."""
    from specserve.tools.bench_kv import format_micro, run_micro

    res = run_micro(str(model_dir), "float32", 64, 1, ["holder", "redis"], None)
    for payload in ("holder", "redis"):
        p = res["payloads"][payload]
        assert p["all_blocks_imported"] and p["all_same_token"]
        assert p["lookup_blocks"] == 4 and p["import_s"] > 0 and p["read_mb_s"] > 0
    assert "holder" in format_micro(res)
