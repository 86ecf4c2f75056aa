"""The OpenAI-compatible HTTP API through real Ray Serve, with a tiny random model."""

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from served_apps import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny"

CHATS = [
    "Hello there!", "What is 2 + 2?", "Tell me a story about a fox.", "def add(a, b):",
    "The capital of France is", "Count: one, two, three,", "Why is the sky blue? Explain briefly and clearly.", "Hi",
    "Speculative decoding drafts tokens cheaply and verifies them in one forward pass. Summarize.",
]


@pytest.fixture(scope="module")
def tiny(ray_cluster, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2", seed=3)
    # Small blocks, pool (400 tokens, below the 512-token window) and budget: concurrent requests exercise
    # chunked prefill, prefix sharing, batching and preemption.
    server = start_app(ray_cluster, str(path), NAME, **{"engine.block_size": 4, "engine.num_blocks": 100,
                                                       "engine.max_num_batched_tokens": 32})
    yield server, path
    server.stop()


def hf_reference(path, prompt_ids, max_tokens):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_greedy_concurrent_chat_is_token_identical_to_hf_generate(tiny):
    server, path = tiny
    tok = AutoTokenizer.from_pretrained(path)

    async def one(client, content, max_tokens):
        r = await client.post(f"{server.url}/v1/chat/completions", json={
            "model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[one(client, c, 10 + 3 * i) for i, c in enumerate(CHATS)])

    results = asyncio.run(run())
    for i, (content, res) in enumerate(zip(CHATS, results)):
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        expected = hf_reference(path, prompt_ids, 10 + 3 * i)
        choice = res["choices"][0]
        assert choice["token_ids"] == expected, content
        assert res["usage"]["completion_tokens"] == len(expected)
        assert res["usage"]["prompt_tokens"] == len(prompt_ids)
        assert choice["message"]["content"] == tok.decode(expected, skip_special_tokens=True)
        assert choice["finish_reason"] == ("stop" if expected[-1] == tok.eos_token_id else "length")


def test_streaming_completion_with_usage_matches_non_streaming(tiny):
    server, _ = tiny
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    events = []
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["choices"][0]["text"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "length"
    assert plain["usage"]["completion_tokens"] == 12


def test_official_openai_client_streams_chat(tiny):
    server, _ = tiny
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == [NAME]
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8
    full = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hello"}],
                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


def test_seeded_sampling_is_reproducible_over_http(tiny):
    server, _ = tiny
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 16, "temperature": 1.0, "seed": 11,
            "ignore_eos": True, "return_token_ids": True}
    a = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
    b = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["token_ids"]
    c = httpx.post(f"{server.url}/v1/completions", json={**body, "seed": 12}, timeout=60).json()["choices"][0]["token_ids"]
    assert a == b and a != c


def test_stop_string_ends_generation(tiny):
    server, path = tiny
    body = {"model": NAME, "prompt": "The quick brown fox", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    free = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    stop = free[8:11]
    assert stop and stop in free
    got = httpx.post(f"{server.url}/v1/completions", json={**body, "stop": [stop], "return_token_ids": True},
                     timeout=60).json()
    assert got["choices"][0]["text"] == free[:free.index(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"
    assert len(got["choices"][0]["token_ids"]) == got["usage"]["completion_tokens"]


def test_request_too_big_for_the_kv_pool_is_refused_before_streaming(tiny):
    server, _ = tiny
    body = {"model": NAME, "prompt": list(range(3, 303)), "max_tokens": 200, "stream": True}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "KV cache capacity" in r.json()["error"]["message"]
    # Without max_tokens the same prompt is served, up to what the pool holds.
    r = httpx.post(f"{server.url}/v1/completions", json={**body, "max_tokens": None, "stream": False,
                                                          "ignore_eos": True}, timeout=120)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 100


@pytest.mark.parametrize("body,status,param", [
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ({"model": NAME, "messages": []}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": 2.5}, 400, "temperature"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ({"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
])
def test_invalid_chat_requests_get_openai_errors(tiny, body, status, param):
    server, _ = tiny
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_bad_completion_prompts(tiny):
    server, _ = tiny
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": ', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": ""}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": NAME, "prompt": [1, 2, 10 ** 6]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_health_and_models(tiny):
    server, _ = tiny
    assert httpx.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert models["data"][0]["id"] == NAME and models["data"][0]["max_model_len"] == 512
    # What the verifier resolved and runs (served_apps pins float32 on the CPU).
    assert (models["data"][0]["dtype"], models["data"][0]["device"]) == ("float32", "cpu")


def test_client_disconnect_frees_the_sequence(tiny):
    server, _ = tiny
    verifier = serve.get_deployment_handle("Verifier", app_name=NAME)
    before = verifier.stats.remote().result()
    body = {"model": NAME, "prompt": "Hello", "max_tokens": 350, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(g.startswith("data: ") for g in got)
    deadline = time.time() + 20
    while time.time() < deadline:
        stats = verifier.stats.remote().result()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.1)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["generated_tokens"] - before["generated_tokens"] < 350  # stopped early, not run to the end
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
