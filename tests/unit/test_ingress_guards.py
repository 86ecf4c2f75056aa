"""The ingress's bounds before admission, without Ray: request-body options and Unicode (routing/protocol.py),
the prompt renderer's bounds and thread pool (routing/prompts.py), the HTTP guard (routing/http_guard.py) on a
real FastAPI app, and the readiness policy (routing/readiness.py)."""

import asyncio
import json
import threading

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from specserve.actors.engine.sampling_params import MAX_STOP_TOKEN_IDS, SamplingParams
from specserve.cluster.config import AuthConfig, SpecserveConfig
from specserve.cluster.metrics import FrontendMetrics
from specserve.routing.auth import ApiKeys
from specserve.routing.errors import APIError, api_error_of
from specserve.routing.http_guard import RequestGuard, frontend_of
from specserve.routing.prompts import Prompt, PromptRenderer
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest, refuse_unserved
from specserve.routing.readiness import Readiness
from tiny_models import make_tokenizer


# ---- protocol ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, extra, param", [
    (CompletionRequest, {"suffix": "end"}, "suffix"), (CompletionRequest, {"use_beam_search": True}, "use_beam_search"),
    (CompletionRequest, {"tools": [{"type": "function"}]}, "tools"), (CompletionRequest, {"top_logprobs": 2},
                                                                       "top_logprobs"),
    (ChatCompletionRequest, {"echo": True}, "echo"), (ChatCompletionRequest, {"functions": [{"name": "f"}]},
                                                       "functions"),
    (ChatCompletionRequest, {"prompt_logprobs": 1}, "prompt_logprobs"),
    (ChatCompletionRequest, {"include_stop_str_in_output": True}, "include_stop_str_in_output"),
])
def test_options_that_change_the_output_are_refused_by_name(kind, extra, param):
    prompt = {"messages": [{"role": "user", "content": "hi"}]} if kind is ChatCompletionRequest else {"prompt": "hi"}
    body = kind.model_validate({"model": "m", **prompt, **extra})
    with pytest.raises(APIError) as info:
        refuse_unserved(body.model_extra)
    assert info.value.status == 400 and info.value.param == param and info.value.message.startswith(param)


def test_noop_values_and_vendor_extras_pass():
    body = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": False, "presence_penalty": 0.0,
        "frequency_penalty": 0, "response_format": {"type": "text"}, "tool_choice": "none", "user": "u",
        "metadata": {"a": "b"}, "x_vendor": [1, 2]})
    refuse_unserved(body.model_extra)


@pytest.mark.parametrize("body, loc", [
    ({"model": "m", "prompt": "\ud800 hi"}, "prompt"),
    ({"model": "m", "prompt": ["ok", "\udfff"]}, "prompt"),
    ({"model": "m", "prompt": "hi", "stop": ["\ud800"]}, "stop"),
    ({"model": "\ud800", "prompt": "hi"}, "model"),
])
def test_lone_surrogates_are_invalid(body, loc):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(json.loads(json.dumps(body)))  # as a client's escaped JSON arrives
    errors = info.value.errors()
    assert errors[0]["loc"][0] == loc
    assert any("surrogate" in e["msg"] or "unicode" in e["msg"] for e in errors), errors


def test_stop_bounds():
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stop": "x" * 1_000_000})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stop_token_ids": list(range(200_000))})
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "hi", "stop_token_ids": [10 ** 12]})
    params = CompletionRequest.model_validate(
        {"model": "m", "prompt": "hi", "max_tokens": 4, "stop_token_ids": [3, 3, 7]}).sampling_params()
    assert params.stop_token_ids == frozenset({3, 7}) and params.max_tokens == 4
    with pytest.raises(ValueError):
        SamplingParams(stop_token_ids=range(MAX_STOP_TOKEN_IDS + 1))


# ---- prompt renderer --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def renderer(tokenizer, **kw):
    args = dict(vocab_size=len(tokenizer), max_prompt_tokens=100, max_messages=8, threads=2, max_pending=4)
    return PromptRenderer(tokenizer, **{**args, **kw})


def test_renderer_matches_the_tokenizer_and_runs_off_the_loop(tokenizer):
    r = renderer(tokenizer)
    messages = [{"role": "user", "content": "hello there"}]
    threads = []
    original = r._render

    def spy(prompt):
        threads.append(threading.current_thread().name)
        return original(prompt)

    r._render = spy
    ids = asyncio.run(r.render(Prompt("chat", messages, "messages")))
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids
    assert asyncio.run(r.render(Prompt("text", "hello", "prompt"))) == tokenizer("hello").input_ids
    assert threads and all(name.startswith("prompts") for name in threads)
    r.close()


@pytest.mark.parametrize("prompt, param, code", [
    (Prompt("chat", [{"role": "user", "content": "hi"}] * 9, "messages"), "messages", None),
    (Prompt("chat", [{"role": "robot", "content": "hi"}], "messages"), "messages[0].role", None),
    (Prompt("chat", [{"role": "user", "content": ""}], "messages"), "messages", None),
    (Prompt("text", "x" * 6401, "prompt"), "prompt", "context_length_exceeded"),
    (Prompt("token_ids", [1] * 101, "prompt"), "prompt", "context_length_exceeded"),
    (Prompt("token_ids", [1, 10 ** 6], "prompt"), "prompt", None),
    (Prompt("token_ids", [], "prompt"), "prompt", None),
])
def test_cheap_bounds_before_any_tokenizing(tokenizer, prompt, param, code):
    r = renderer(tokenizer)
    with pytest.raises(APIError) as info:
        r.check(prompt)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)
    r.close()


def test_rendered_and_tokenized_length_are_bounded(tokenizer):
    r = renderer(tokenizer)
    long_text = "a b " * 600  # within the character bound (64 per token), far over 100 tokens
    r.check(Prompt("text", long_text, "prompt"))
    with pytest.raises(APIError) as info:
        asyncio.run(r.render(Prompt("text", long_text, "prompt")))
    assert info.value.code == "context_length_exceeded"
    r.close()


def test_waiting_prompts_are_bounded(tokenizer):
    r = renderer(tokenizer, max_pending=2, threads=1)
    gate = threading.Event()
    original = r._render
    r._render = lambda prompt: (gate.wait(30), original(prompt))[1]

    async def run():
        first = [asyncio.ensure_future(r.render(Prompt("text", "hi", "prompt"))) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(APIError) as info:
            await r.render(Prompt("text", "hi", "prompt"))
        assert info.value.status == 429 and info.value.retry_after_s
        gate.set()
        return await asyncio.gather(*first)

    assert asyncio.run(run()) == [tokenizer("hi").input_ids] * 2
    assert r.pending == 0
    r.close()


# ---- HTTP guard -------------------------------------------------------------------------------------------------
class _Frontend:
    """What the guard reads of the ingress's Frontend: real keys, config and metrics."""

    def __init__(self, keys: dict[str, str], max_request_bytes: int):
        self.keys = ApiKeys(AuthConfig(api_keys=keys))
        self.config = SpecserveConfig.load(overrides={"server.max_request_bytes": max_request_bytes})
        self.metrics = FrontendMetrics("m")
        self.refused: list[int] = []

    def record_error(self, exc, protocol):
        err = api_error_of(exc)
        self.refused.append(err.status)
        return err


def guarded_app(fe):
    app = FastAPI()
    seen = []
    app.add_middleware(RequestGuard, frontend=lambda: fe)

    @app.post("/v1/completions")
    async def completions(body: dict):
        seen.append(body)
        return {"ok": True}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/whoami")
    async def whoami(request: __import__("fastapi").Request):
        return {"frontend": frontend_of(request.scope) is fe}

    return app, seen


def test_guard_checks_the_key_before_reading_the_body_and_bounds_it():
    fe = _Frontend({"k1": "t1"}, max_request_bytes=1024)
    app, seen = guarded_app(fe)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            big = b'{"a": "' + b"x" * 5000 + b'"}'
            assert (await c.post("/v1/completions", content=big)).status_code == 401  # no key: never read
            assert (await c.post("/v1/completions", content=b"{bad", headers={"x-api-key": "nope"})).status_code == 401
            assert (await c.get("/health")).status_code == 200  # open without a key
            r = await c.post("/v1/completions", content=big, headers={"authorization": "Bearer k1"})
            assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

            async def chunks():  # no Content-Length: refused once the bytes read pass the limit
                for _ in range(10):
                    yield b"x" * 300
            r = await c.post("/v1/completions", content=chunks(), headers={"authorization": "Bearer k1"})
            assert r.status_code == 413
            r = await c.post("/v1/completions", json={"a": 1}, headers={"authorization": "Bearer k1"})
            assert r.status_code == 200 and seen == [{"a": 1}]
            r = await c.get("/whoami", headers={"authorization": "Bearer k1"})
            assert r.json() == {"frontend": True}

    asyncio.run(run())
    assert fe.refused == [401, 401, 413, 413]


# ---- readiness --------------------------------------------------------------------------------------------------
def test_readiness_needs_consecutive_failures_to_drop():
    r = Readiness(failures_to_unready=3)
    assert not r.ready
    assert r.observe(answered=True) and r.ready
    assert not r.observe(answered=False) and not r.observe(answered=False) and r.ready  # two lost probes: still ready
    assert not r.observe(answered=True) and r.failures == 0
    r.observe(answered=False), r.observe(answered=False)
    assert r.observe(answered=False) and not r.ready  # the third in a row
    assert r.observe(answered=True) and r.ready
