"""Hostile requests against a served SmolLM2 (real Ray Serve, real model, API keys on): each is refused with the
right status naming its field, /health and gRPC health stay fast while they are being refused, and a greedy
control request gives the same tokens before and after."""

import asyncio
import json
import os
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from served_apps import start_app
from specserve.actors.model_loader import pull_model
from specserve.cluster.config import default_cache_dir
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]
NAME = "smollm2-135m"
KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEALTH_P99_S = 0.5  # the bound for health answers while hostile requests are refused


@pytest.fixture(scope="module")
def app(ray_cluster):
    path = pull_model(NAME, os.environ.get("SPECSERVE_CACHE") or default_cache_dir(), progress=False)
    server = start_app(ray_cluster, NAME, NAME, **{"model.cache_dir": str(path.parent.parent),
                                                  "auth.api_keys": {KEY: "tenant-a"}, "server.max_tokens": 16})
    yield server
    server.stop()


def control(url: str) -> list[int]:
    r = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": NAME, "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12,
        "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def error_count(url: str, code: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("specserve:request_errors_total") and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def post(client, url: str, body: dict, headers=AUTH):
    """JSON as a client may send it: lone surrogates escaped ("\\ud800"), which httpx's json= cannot encode."""
    return client.post(url, content=json.dumps(body), headers={**headers, "content-type": "application/json"})


def chat(content, **extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


# (what is sent, status, the field the error names); each body stays below server.max_request_bytes unless 413.
MANY_MESSAGES = {"model": NAME, "messages": [{"role": "user", "content": "hi"}] * 100_000}
CASES = {
    "100k messages (3.4 MB)": ("/v1/chat/completions", MANY_MESSAGES, 413, None),
    "5k messages": ("/v1/chat/completions", {**MANY_MESSAGES, "messages": MANY_MESSAGES["messages"][:5000]},
                    400, "messages"),
    "200k stop ids": ("/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": list(range(200_000))},
                      400, "stop_token_ids"),
    "stop id 1e12": ("/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": [10 ** 12]}, 400,
                     "stop_token_ids.0"),
    "stop id past the vocabulary": ("/v1/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": [49152]},
                                    400, "stop_token_ids"),
    "prompt id past the vocabulary": ("/v1/completions", {"model": NAME, "prompt": [1, 2, 10 ** 6]}, 400, "prompt"),
    "1M-character stop string": ("/v1/chat/completions", chat("hi", stop="x" * 1_000_000), 400, "stop"),
    "lone surrogate in chat": ("/v1/chat/completions", chat("\ud800 hi"), 400, "messages.0.content"),
    "lone surrogate in prompt": ("/v1/completions", {"model": NAME, "prompt": "\udfff"}, 400, "prompt"),
    "lone surrogate in stop": ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": ["\ud800"]}, 400, "stop"),
    # Served options (issue 21) with values out of their range; and one still refused.
    "logprobs": ("/v1/chat/completions", chat("hi", logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "echo on chat": ("/v1/chat/completions", chat("hi", echo=True), 400, "echo"),
    "response_format": ("/v1/chat/completions", chat("hi", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), 400, "response_format"),
    "tools": ("/v1/chat/completions", chat("hi", tools=[{"type": "function", "function": {"name": "a b"}}]), 400,
              "tools[0].function.name"),
    "presence_penalty": ("/v1/chat/completions", chat("hi", presence_penalty=2.5), 400, "presence_penalty"),
    "suffix": ("/v1/completions", {"model": NAME, "prompt": "hi", "suffix": "x"}, 400, "suffix"),
    "text longer than any prompt": ("/v1/completions", {"model": NAME, "prompt": "word " * 200_000}, 400, "prompt"),
    # fits the character bound, so it is tokenized (off the event loop) before it is found too long
    "tokenized too long": ("/v1/completions", {"model": NAME, "prompt": "a b " * 40_000}, 400, "prompt"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_request_is_refused_naming_its_field(app, case):
    path, body, status, param = CASES[case]
    before = error_count(app.url, "RESOURCE_EXHAUSTED" if status == 413 else "INVALID_ARGUMENT")
    with httpx.Client(timeout=60) as client:
        r = post(client, app.url + path, body)
    assert r.status_code == status, (case, r.status_code, r.text[:300])
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param, (case, err)
        assert err["message"].startswith(param), err
    # counted once, by this ingress (metrics are published every few seconds)
    deadline = time.monotonic() + 30
    while error_count(app.url, "RESOURCE_EXHAUSTED" if status == 413 else "INVALID_ARGUMENT") < before + 1:
        assert time.monotonic() < deadline, f"{case}: the refusal was not counted in /metrics"
        time.sleep(1)


def test_harmless_extras_and_noop_values_pass(app):
    r = httpx.post(f"{app.url}/v1/chat/completions", headers=AUTH, timeout=120, json=chat(
        "hi", logprobs=False, presence_penalty=0, response_format={"type": "text"}, user="u-1",
        metadata={"k": "v"}, x_vendor_extra=1))
    assert r.status_code == 200, r.text


def test_auth_comes_before_the_body(app):
    """Without a key: 401 for a body over the size limit (not 413: it is never read), on both APIs; /health and
    /metrics stay open, /router/stats and /v1/models do not."""
    with httpx.Client(timeout=60) as client:
        r = post(client, f"{app.url}/v1/chat/completions", MANY_MESSAGES, headers={})
    assert r.status_code == 401, r.text
    r = httpx.post(f"{app.url}/v1/chat/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 401, r.text
    assert httpx.get(f"{app.url}/router/stats", timeout=30).status_code == 401
    assert httpx.get(f"{app.url}/router/stats", headers=AUTH, timeout=30).status_code == 200
    assert httpx.get(f"{app.url}/v1/models", timeout=30).status_code == 401
    assert httpx.get(f"{app.url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{app.url}/metrics", timeout=30).status_code == 200
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(pb.TokenizeRequest(model=NAME, text="hi"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(model=NAME, text="hi"), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # an unparseable body is never looked at without a key
        raw = channel.unary_unary(f"/specserve.v1.Generation/GenerateUnary")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\xff\xff\xff", timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_hostile_requests(app):
    md = (("authorization", f"Bearer {KEY}"),)
    big = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")] * 5000)
    cases = [
        (pb.TokenizeRequest(model=NAME, chat=big), "Tokenize", "chat.messages"),
        (pb.GenerateRequest(model=NAME, chat=big), "GenerateUnary", "chat.messages"),
        (pb.GenerateRequest(model=NAME, text="hi", sampling=pb.SamplingParams(stop_token_ids=list(range(65)))),
         "GenerateUnary", "sampling.stop_token_ids"),
        (pb.GenerateRequest(model=NAME, text="hi", sampling=pb.SamplingParams(stop_token_ids=[49152])),
         "GenerateUnary", "sampling.stop_token_ids"),
        (pb.GenerateRequest(model=NAME, text="hi", sampling=pb.SamplingParams(stop=["x" * 10_000])),
         "GenerateUnary", "sampling.stop"),
        (pb.GenerateRequest(model=NAME, token_ids=pb.TokenIds(ids=[5, 10 ** 6])), "GenerateUnary", "token_ids.ids"),
    ]
    with grpc.insecure_channel(app.grpc_target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for request, method, param in cases:
            with pytest.raises(grpc.RpcError) as info:
                getattr(stub, method)(request, metadata=md, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (param, info.value)
            assert info.value.details().startswith(param), info.value.details()
        # a message over the size limit is refused by the transport
        huge = pb.TokenizeRequest(model=NAME, text="x" * (3 << 20))
        with pytest.raises(grpc.RpcError) as info:
            stub.Tokenize(huge, metadata=md, timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_stays_fast_and_output_unchanged_under_hostile_load(app):
    """Four clients send the refused requests above in a loop (the slow ones: huge bodies, huge templates and
    prompts tokenized before being found too long) while /health and gRPC health are timed."""
    before = control(app.url)
    heavy = [CASES[c] for c in ("100k messages (3.4 MB)", "5k messages", "200k stop ids", "tokenized too long",
                                "text longer than any prompt", "1M-character stop string")]
    stop = threading.Event()
    refused = []

    async def attacker(i: int):
        async with httpx.AsyncClient(timeout=120) as client:
            while not stop.is_set():
                path, body, status, _ = heavy[i % len(heavy)]
                i += 1
                r = await post(client, app.url + path, body)
                refused.append(r.status_code == status)

    async def attack():
        await asyncio.gather(*[attacker(i) for i in range(4)])

    attackers = threading.Thread(target=asyncio.run, args=(attack(),))
    attackers.start()
    http_s, grpc_s = [], []
    try:
        time.sleep(2)  # the attack is under way
        with httpx.Client(timeout=30) as client, grpc.insecure_channel(app.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(60):
                t0 = time.perf_counter()
                assert client.get(f"{app.url}/health").status_code == 200
                http_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
                grpc_s.append(time.perf_counter() - t0)
                assert status == health_pb2.HealthCheckResponse.SERVING
                time.sleep(0.1)
    finally:
        stop.set()
        attackers.join(timeout=180)
    assert not attackers.is_alive()
    assert len(refused) >= 8 and all(refused), f"{sum(refused)} of {len(refused)} refused as expected"
    p99 = {name: sorted(xs)[int(0.99 * (len(xs) - 1))] for name, xs in (("http", http_s), ("grpc", grpc_s))}
    print(f"\n{len(refused)} hostile requests refused; health p99 {p99} s")
    assert p99["http"] < HEALTH_P99_S and p99["grpc"] < HEALTH_P99_S, p99
    assert control(app.url) == before
