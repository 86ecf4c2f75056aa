"""Speculative decoding through the deployed path (HTTP ingress -> verifier -> drafter replicas on real Ray):
greedy output token-identical to HF generate for every draft method, and a drafter killed mid-request
changes nothing."""

import asyncio
import json
import time

import httpx
import pytest
import ray
import torch
from ray import serve
from transformers import AutoModelForCausalLM

from served_apps import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
MAX_TOKENS = [40, 25, 60, 33]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("spec-target"), arch="llama", seed=5, num_layers=4)


def prompts():
    g = torch.Generator().manual_seed(11)
    ps = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (7, 30, 18, 45)]
    return [p + p[: len(p) // 2] for p in ps]


@pytest.fixture(scope="module")
def reference(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return [model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p, n in zip(prompts(), MAX_TOKENS)]


def body(name, prompt, max_tokens, **kw):
    return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}


async def complete_all(url, name):
    async with httpx.AsyncClient(timeout=120) as client:
        rs = await asyncio.gather(*[client.post(f"{url}/v1/completions", json=body(name, p, n))
                                    for p, n in zip(prompts(), MAX_TOKENS)])
    for r in rs:
        assert r.status_code == 200, r.text
    return [r.json() for r in rs]


def verifier_stats(name):
    return serve.get_deployment_handle("Verifier", name).stats.remote().result(timeout_s=60)


def wait_for_drafter(name, timeout=240):
    """A drafter replica loads its model (the int8 one quantizes it) and, after a kill, Serve first has to find
    the replica unhealthy and replace it: on a loaded machine either can take minutes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        client = verifier_stats(name)["drafter_client"]
        if client and client["workers"] > 0:
            return client
        time.sleep(0.5)
    raise AssertionError("the verifier never attached a drafter worker")


@pytest.mark.parametrize("method", ["ngram", "suffix", "suffix@drafter", "model", "layer_skip", "int8"])
def test_every_draft_method_is_token_identical_through_the_deployed_path(ray_cluster, model_dir, reference, method):
    name = f"spec-{method.replace('_', '-').replace('@', '-')}"
    method, _, suffix_in = method.partition("@")
    overrides = {"speculative.method": method, "engine.block_size": 4, "engine.num_blocks": 200,
                 "drafter.num_cpus": 0.5, "speculative.adaptive": method != "model"}
    if method == "model":
        overrides["speculative.draft_model"] = str(model_dir)  # same tokenizer; here the checkpoint itself
    if suffix_in:
        overrides["speculative.suffix_in"] = suffix_in
    server = start_app(ray_cluster, str(model_dir), name, **overrides)
    try:
        if method not in ("ngram", "suffix") or suffix_in == "drafter":
            wait_for_drafter(name)
        results = asyncio.run(complete_all(server.url, name))
        for res, expected in zip(results, reference):
            assert res["choices"][0]["token_ids"] == expected
        stats = verifier_stats(name)
        spec = stats["speculation"]
        assert spec["rounds"] > 0 and spec["draft_tokens"] > 0, stats
        usage = results[2]["usage"]
        details = usage["completion_tokens_details"]
        assert details["accepted_prediction_tokens"] == usage["speculation"]["accepted_tokens"]
        assert details["accepted_prediction_tokens"] + details["rejected_prediction_tokens"] == \
            usage["speculation"]["draft_tokens"]
        if method == "model":  # the draft is the target itself: every draft token is accepted
            assert spec["acceptance_rate"] == 1.0
    finally:
        server.stop()


def test_drafter_killed_mid_request_changes_nothing(ray_cluster, model_dir):
    name = "spec-kill"
    server = start_app(ray_cluster, str(model_dir), name, **{
        "speculative.method": "layer_skip", "speculative.adaptive": False, "engine.block_size": 4,
        "engine.num_blocks": 300, "drafter.num_cpus": 0.5})
    try:
        wait_for_drafter(name)
        prompt = prompts()[1]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=400, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        worker_id, worker = serve.get_deployment_handle("Drafter", name).get_worker.remote().result(timeout_s=30)
        tokens = []
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=120,
                          json=body(name, prompt, 400, stream=True)) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                tokens.extend(chunk["choices"][0]["token_ids"])
                if worker is not None and len(tokens) >= 20:
                    ray.kill(worker)  # the draft worker dies while the request is decoding
                    worker = None
        assert worker is None, "the request finished before the drafter could be killed"
        assert tokens == expected
        client = verifier_stats(name)["drafter_client"]
        assert client["failures"] >= 1
        # Serve replaces the drafter replica; the verifier re-attaches and speculates again.
        client = wait_for_drafter(name)
        before = verifier_stats(name)["speculation"]["rounds"]
        res = asyncio.run(complete_all(server.url, name))
        assert all(r["choices"][0]["token_ids"] for r in res)
        assert verifier_stats(name)["speculation"]["rounds"] > before
        new_id, _ = serve.get_deployment_handle("Drafter", name).get_worker.remote().result(timeout_s=30)
        assert new_id != worker_id
    finally:
        server.stop()
