"""Prefix-aware routing on real Ray Serve with two verifier replicas: requests sharing a long prefix land on the
replica that holds it (KV events through a real Redis stream), and a replica removed mid-run gets no traffic and
loses no requests."""

import threading

import httpx
import pytest
import torch
from ray import serve

from served_apps import start_app
from specserve.deploy.app import build_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "route-tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("route-target"), arch="llama", seed=31, num_layers=2)


def ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(url: str, prompt: list[int], max_tokens: int = 4, session: str | None = None) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=120, headers={"x-session-id": session} if session else {},
                   json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                         "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_shared_prefixes_meet_their_holder_and_a_removed_replica_loses_nothing(ray_cluster, model_dir):
    server = start_app(ray_cluster, str(model_dir), "route", **{
        "model.served_name": NAME, "verifier.num_replicas": 2, "verifier.num_cpus": 0.25,
        "router.policy": "prefix_cost", "router.stats_period_s": 0.5, "kv_store.enabled": False,
        "speculative.method": "none"})
    try:
        # Two tenants' long prefixes (10 blocks each), many short questions each, interleaved.
        prefixes = [ids(100, 160), ids(200, 160)]
        hits, predicted, routes = [], [], []
        for i in range(12):
            p = prefixes[i % 2] + ids(i, 12)
            out = complete(server.url, p)
            hits.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
            predicted.append(out["usage"]["routing"]["predicted_cached_tokens"])
            routes.append(out["usage"]["routing"])
        # After each tenant's first request, every request finds its prefix where it lands: with two replicas
        # and no store, that means it went to the replica that computed it.
        assert hits[:2] == [0, 0]
        assert all(h >= 160 for h in hits[2:]), f"hits {hits}, routes {routes}"
        assert predicted == hits  # the router's prediction per request, against what the verifier found

        stats = httpx.get(f"{server.url}/router/stats", timeout=30).json()
        outcomes, (router,) = stats["outcomes"], stats["routers"]
        assert outcomes["requests"] == 12 and outcomes["predicted"]["mean_abs_error_tokens"] == 0
        assert outcomes["hit_rate"] == pytest.approx(sum(hits) / (12 * 172))
        assert sum(router["decisions"].values()) == router["decision_latency"]["count"] == 12
        assert router["index_blocks"] >= 20 and len(router["replicas"]) == 2

        # Session affinity: unrelated prompts with one session id all go to one replica.
        before = {rid: v["indexed_blocks"] for rid, v in router["replicas"].items()}
        for j in range(3):
            out = complete(server.url, ids(300 + j, 64), session="user-7")
            assert out["usage"]["routing"]["reason"] == "session"
        after = httpx.get(f"{server.url}/router/stats", timeout=30).json()["routers"][0]["replicas"]
        gained = sorted(after[rid]["indexed_blocks"] - before[rid] for rid in before)
        assert gained[0] == 0 and gained[1] >= 9, gained  # 3 blocks of each prompt (and what it generated)

        # Scale to one replica while requests stream in: every request completes in full.
        results, errors = [], []

        def client(k):
            try:
                for j in range(6):
                    out = complete(server.url, prefixes[k % 2] + ids(1000 + 10 * k + j, 8), max_tokens=16)
                    results.append(out["usage"]["completion_tokens"])
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        cfg = server.config.model_copy(deep=True)
        cfg.verifier.num_replicas = 1
        serve.run(build_app(cfg), name=cfg.server.app_name, route_prefix=cfg.server.route_prefix, blocking=False)
        for t in threads:
            t.join(timeout=300)
        assert not errors, errors
        assert results == [16] * 18
        status = serve.status().applications[cfg.server.app_name].deployments["Verifier"]
        assert sum(status.replica_states.values()) == 1
        assert complete(server.url, prefixes[0] + ids(5000, 8))["usage"]["completion_tokens"] == 4
    finally:
        server.stop()
