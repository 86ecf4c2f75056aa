"""Fuzzing the HTTP and gRPC request parsing against a served tiny model: no input may crash a replica or get a
5xx / INTERNAL / UNKNOWN answer. Hypothesis runs derandomized (the same inputs in every run)."""

import json
import math

import grpc
import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from served_apps import start_app
from specserve.v1 import generation_pb2 as pb
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-fuzz"
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
TRIED = {"http": 0, "grpc_structured": 0, "grpc_bytes": 0}
SEEN: dict[str, int] = {}  # answers by status / code, to show the inputs reached generation as well as refusals
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.UNIMPLEMENTED}


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-fuzz"), arch="llama", seed=11)
    # Short window and output cap: every accepted request is a few steps.
    server = start_app(ray_cluster, str(path), NAME, **{"engine.block_size": 4, "engine.max_model_len": 96,
                                                       "engine.num_blocks": 200, "server.max_tokens": 8})
    replicas = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{NAME}#" in a["name"])
    yield server
    after = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if f"{NAME}#" in a["name"])
    assert after == replicas, "a replica was restarted during fuzzing"
    print(f"\nfuzz inputs tried: {TRIED}; answers: {dict(sorted(SEEN.items()))}")
    assert SEEN.get("http 200", 0) > 20 and SEEN.get("grpc OK", 0) > 20, SEEN
    server.stop()


def test_size_limits_from_config(app):
    """server.max_tokens (8 here) and the context window (96) bound every request, on both APIs."""
    with httpx.Client(base_url=app.url, timeout=60) as client:
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        r = client.post("/v1/completions", json={"model": NAME, "prompt": list(range(100)), "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "x" * 100_000, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # not tokenized
        r = client.post("/v1/completions", json={"model": NAME, "prompt": "hi"})  # no max_tokens: the cap
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 8
    channel = grpc.insecure_channel(app.grpc_target)
    code, details = grpc_code(channel, "GenerateUnary", pb.GenerateRequest(
        model=NAME, text="hi", sampling=pb.SamplingParams(max_tokens=9)).SerializeToString())
    channel.close()
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("max_tokens:")


# ---- HTTP -------------------------------------------------------------------------------------------------------
# Text with lone surrogates too: valid JSON ("\\ud800"), but no tokenizer can encode it.
any_text = st.text(max_size=40) | st.text(alphabet=st.characters(categories=["Cs", "Ll"]), min_size=1, max_size=8)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), any_text)
# Lists and strings far beyond every bound (up to about the body size limit): refused, never a 5xx.
huge_ids = st.integers(65, 300_000).map(lambda n: list(range(n)))
huge_text = st.integers(257, 1_500_000).map(lambda n: "x" * n)
huge_messages = st.integers(2049, 40_000).map(lambda n: [{"role": "user", "content": "hi"}] * n)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4) |
                          st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
number = st.one_of(st.integers(-10, 10 ** 6), st.floats(allow_nan=False, allow_infinity=False), st.just(2 ** 65))


def bodies(required: dict, optional: dict):
    """Half the bodies with every field valid (they must generate), half with any field anything."""
    valid = st.fixed_dictionaries({k: v for k, (v, _) in required.items()},
                                  optional={k: v for k, (v, _) in optional.items()})
    fuzzy = st.fixed_dictionaries({k: v | bad for k, (v, bad) in required.items()},
                                  optional={k: v | bad for k, (v, bad) in optional.items()})
    return st.one_of(valid, fuzzy)


role = (st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["robot", ""]) | json_leaf)
message = bodies({"role": role, "content": (st.text(max_size=60), json_value | huge_text)}, {})
sampling_fields = {  # field: (valid values, anything else)
    "max_tokens": (st.integers(1, 8), number | json_leaf),
    "temperature": (st.floats(0, 2), number | json_leaf),
    "top_p": (st.floats(0.01, 1), number | json_leaf),
    "top_k": (st.integers(0, 100), number | json_leaf),
    "seed": (st.integers(0, 2 ** 63), number | json_leaf),
    "n": (st.just(1), number),
    "stream": (st.booleans(), json_leaf),
    "stop": (st.lists(st.text(min_size=1, max_size=5), max_size=4), st.lists(st.text(max_size=5), max_size=6)
             | json_leaf | huge_text | st.lists(huge_text, max_size=2)),
    "stop_token_ids": (st.lists(st.integers(0, 300), max_size=3), st.lists(number, max_size=3) | huge_ids),
    "ignore_eos": (st.booleans(), json_leaf),
    "stream_options": (st.fixed_dictionaries({"include_usage": st.booleans()}), json_value),
    "speculate": (st.booleans(), json_leaf), "draft_method": (st.just("ngram"), json_leaf),
    "logprobs": (st.none(), json_leaf), "user": (st.text(max_size=8), json_leaf),
    "return_token_ids": (st.booleans(), json_leaf),
}
model = (st.just(NAME), st.text(max_size=8) | json_leaf)
chat_body = bodies({"model": model, "messages": (st.lists(message, min_size=1, max_size=3),
                                                 json_value | huge_messages)},
                   sampling_fields | {"max_completion_tokens": (st.integers(1, 8), number)})
completion_body = bodies(
    {"model": model,
     "prompt": (st.text(min_size=1, max_size=80) | st.lists(st.integers(0, 300), min_size=1, max_size=30),
                st.lists(st.integers(-5, 70000), max_size=30) | st.lists(st.text(max_size=20), max_size=3)
                | json_value | huge_ids | huge_text)},
    sampling_fields | {"echo": (st.booleans(), json_leaf)})
raw_body = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                     json_value.map(lambda v: json.dumps(v).encode()))


def check_http(client, path, content: bytes, headers=None):
    TRIED["http"] += 1
    r = client.post(path, content=content, headers={"Content-Type": "application/json", **(headers or {})})
    SEEN[f"http {r.status_code}"] = SEEN.get(f"http {r.status_code}", 0) + 1
    # 504 is the answer the issue asks for when the client's own deadline (X-Request-Timeout) runs out.
    allowed = r.status_code == 504 and headers and "X-Request-Timeout" in headers
    assert r.status_code < 500 or allowed, (path, content[:300], r.status_code, r.text[:300])
    if r.status_code == 200 and "text/event-stream" in r.headers.get("content-type", ""):
        assert '"type":"server_error"' not in r.text, (content[:300], r.text[:300])


@FUZZ
@given(body=chat_body, header=st.sampled_from([None, "-1", "abc", "nan", "0.0001", "1e300"]))
def test_fuzz_http_chat(app, body, header):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        headers = {"X-Request-Timeout": header} if header else None
        check_http(client, "/v1/chat/completions", json.dumps(body).encode(), headers)


@FUZZ
@given(body=completion_body)
def test_fuzz_http_completions(app, body):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        check_http(client, "/v1/completions", json.dumps(body).encode())


@FUZZ
@given(content=raw_body, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzz_http_raw_bodies(app, content, path):
    with httpx.Client(base_url=app.url, timeout=60) as client:
        check_http(client, path, content)


# ---- gRPC -------------------------------------------------------------------------------------------------------
def f32(x: float) -> float:
    return x if math.isnan(x) or math.isinf(x) else float(min(max(x, -3e38), 3e38))


u32 = st.integers(0, 2 ** 32 - 1)
texts = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60)
def pick(valid, bad, fuzzy: bool):
    return valid | bad if fuzzy else valid


def generate_requests(fuzzy: bool):
    """GenerateRequests with every field valid (fuzzy=False) or any field anything."""
    sampling = st.builds(
        lambda t, p, k, seed, mt, stop, ids, eos, which: pb.SamplingParams(
            **{name: v for name, v in (("temperature", t), ("top_p", p), ("top_k", k), ("seed", seed),
                                       ("max_tokens", mt)) if name in which},
            stop=stop, stop_token_ids=ids, ignore_eos=eos),
        pick(st.floats(0, 2, width=32), st.floats(width=32).map(f32), fuzzy),
        pick(st.floats(0.0625, 1, width=32), st.floats(width=32).map(f32), fuzzy),
        pick(st.integers(0, 100), u32, fuzzy), st.integers(0, 2 ** 64 - 1), pick(st.integers(1, 8), u32, fuzzy),
        pick(st.lists(texts.filter(bool), max_size=4), st.lists(texts, max_size=6), fuzzy),
        pick(st.lists(st.integers(0, 300), max_size=3), st.lists(u32, max_size=3) | huge_ids, fuzzy), st.booleans(),
        st.sets(st.sampled_from(["temperature", "top_p", "top_k", "seed", "max_tokens"])))
    role = pick(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["robot", ""]), fuzzy)
    chat = st.lists(st.builds(pb.ChatMessage, role=role, content=texts), min_size=0 if fuzzy else 1, max_size=3)
    return st.builds(
        lambda model, which, text, ids, msgs, sp, spec, rid, tenant: pb.GenerateRequest(
            model=model, sampling=sp, speculation=spec, request_id=rid, tenant=tenant,
            **({"text": text} if which == 0 else {"token_ids": pb.TokenIds(ids=ids)} if which == 1
               else {"chat": pb.ChatMessages(messages=msgs)} if which == 2 else {})),
        pick(st.just(NAME), texts, fuzzy), pick(st.integers(0, 2), st.just(3), fuzzy),
        pick(texts.filter(bool), texts, fuzzy),
        pick(st.lists(st.integers(0, 300), min_size=1, max_size=30), st.lists(u32, max_size=30), fuzzy), chat,
        sampling, st.builds(pb.SpeculationOptions, draft_method=pick(st.sampled_from(["", "ngram"]),
                                                                    st.sampled_from(["model", "x"]), fuzzy)),
        pick(st.text(alphabet="abcdef0123456789-", max_size=20), texts, fuzzy),
        pick(st.sampled_from(["", "team-1"]), st.sampled_from(["bad tenant", "x" * 80]), fuzzy))


grpc_request = st.one_of(generate_requests(False), generate_requests(True))
METHODS = ["Generate", "GenerateUnary", "ListModels", "Tokenize"]


@pytest.fixture(scope="module")
def channel(app):
    ch = grpc.insecure_channel(app.grpc_target)
    grpc.channel_ready_future(ch).result(timeout=30)
    yield ch
    ch.close()


def grpc_code(channel, method: str, payload: bytes, metadata=()):
    path = f"/specserve.v1.Generation/{method}"
    try:
        if method == "Generate":
            for _ in channel.unary_stream(path)(payload, timeout=60, metadata=metadata):
                pass
        else:
            channel.unary_unary(path)(payload, timeout=60, metadata=metadata)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
    SEEN[f"grpc {code.name}"] = SEEN.get(f"grpc {code.name}", 0) + 1
    return code, details


@FUZZ
@given(req=grpc_request, stream=st.booleans(),
       auth=st.sampled_from([(), (("authorization", "Bearer x"),), (("authorization", ""),)]))
def test_fuzz_grpc_generate(channel, req, stream, auth):
    TRIED["grpc_structured"] += 1
    code, details = grpc_code(channel, "Generate" if stream else "GenerateUnary", req.SerializeToString(), auth)
    assert code not in BAD_GRPC, (req, code, details)


@FUZZ
@given(payload=st.binary(max_size=120), method=st.sampled_from(METHODS))
def test_fuzz_grpc_raw_bytes(channel, payload, method):
    TRIED["grpc_bytes"] += 1
    code, details = grpc_code(channel, method, payload)
    assert code not in BAD_GRPC, (payload, method, code, details)
