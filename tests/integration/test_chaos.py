"""Fault injection under load (tools/chaos.py) on one app with every part that can fail: a verifier replica,
a drafter's worker, an expert actor, the Redis server and a KV holder are killed in turn while clients send
greedy requests. Every request completes with the right tokens or fails with a retriable status; none hangs or
returns a wrong token; the app heals on its own."""

import pytest
import torch

from served_apps import start_app
from specserve.tools.chaos import FAULTS, SteadyLoad, format_table, prompts_for, reference, run_chaos
from test_expert_actors import _load
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "chaos"


@pytest.mark.timeout(900)
def test_every_fault_under_load_loses_nothing_and_heals(ray_cluster, tmp_path):
    path = make_tiny_model(tmp_path / "model", arch="mixtral", seed=31, num_layers=2)
    server = start_app(ray_cluster, str(path), NAME, **{
        "engine.block_size": 4, "engine.num_blocks": 300, "experts.num_actors": 2, "experts.num_cpus": 0.1,
        "speculative.method": "layer_skip", "speculative.adaptive": False, "drafter.num_cpus": 0.25,
        "verifier.num_cpus": 0.25, "kv_store.timeout_s": 1.0, "kv_store.retry_after_s": 1.0})
    try:
        # The reference the load is judged by is the plain model's greedy output (so "wrong" means wrong).
        load = SteadyLoad(server.url, NAME, prompts_for(4, 300, seed=3), [], max_tokens=12)
        expected = reference(load)
        hf = _load(path)
        for prompt, tokens in zip(load.prompts, expected):
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
            assert tokens == want[0, len(prompt):].tolist()
        results = run_chaos(server, list(FAULTS), clients=2, max_tokens=12, prompts=load.prompts,
                            expected=expected, recovery_timeout_s=150, log=print)
        print("\n" + format_table(results))
        assert [r.fault for r in results] == list(FAULTS) and not any(r.skipped for r in results)
        for r in results:
            assert r.recovery_s is not None, f"{r.fault} never recovered: {r.details}"
            assert r.wrong == r.failed == r.lost == 0, (r.fault, r.details)
            assert r.requests > 0 and r.completed + r.retriable == r.requests, r
    finally:
        server.stop()
