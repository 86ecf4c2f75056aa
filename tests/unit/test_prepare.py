"""Frontend.prepare, where both front ends' requests are checked (routing/request.py), without Ray: an HTTP body
and a gRPC request that ask for the same thing prepare the same request, and each error names the field as the
client's protocol spells it."""

import asyncio
import time

import pytest

from specserve.cluster.config import SpecserveConfig
from specserve.routing.errors import APIError
from specserve.routing.frontend import Frontend
from specserve.routing.grpc_api import request_fields as grpc_fields
from specserve.routing.openai_api import request_fields as http_fields
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest
from specserve.v1 import generation_pb2 as pb
from tiny_models import make_tiny_model

SESSION = "x-session-id"
SERVER_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fe(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("model"))
    config = SpecserveConfig.model_validate({"model": {"source": str(path), "served_name": "m"},
                                             "server": {"request_timeout_s": SERVER_TIMEOUT_S}})
    frontend = Frontend(config, verifier=None)
    yield frontend
    asyncio.run(frontend.close())


def http(body: dict, headers: dict | None = None):
    kind = ChatCompletionRequest if "messages" in body else CompletionRequest
    return http_fields(kind.model_validate({"model": "m", **body}), headers or {}, session_header=SESSION)


def grpc(*, metadata: dict | None = None, timeout_s: float | None = None, **request):
    request.setdefault("model", "m")
    return grpc_fields(pb.GenerateRequest(**request), timeout_s=timeout_s, metadata=metadata or {},
                       session_header=SESSION)


CHAT = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def prepare(fe, fields):
    return fe.prepare(fields, tenant="t", arrival=1.0)


def test_both_protocols_prepare_the_same_request(fe):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    over_http = prepare(fe, http({"messages": chat, "max_tokens": 5, "temperature": 0, "stop": ["\n"],
                                  "stop_token_ids": [3], "seed": 7, "speculate": False}, {SESSION: "s1"}))
    over_grpc = prepare(fe, grpc(chat=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in chat]),
                                 sampling=pb.SamplingParams(max_tokens=5, temperature=0, stop=["\n"],
                                                            stop_token_ids=[3], seed=7),
                                 speculation=pb.SpeculationOptions(enabled=False), metadata={SESSION: "s1"}))
    assert over_http.params == over_grpc.params
    assert over_http.params.max_tokens == 5 and not over_http.params.speculate and over_http.params.greedy
    assert over_http.prompt.value == over_grpc.prompt.value == chat
    assert {over_http.session, over_grpc.session, over_http.tenant, over_grpc.tenant} == {"s1", "t"}
    assert (over_http.protocol, over_grpc.protocol) == ("http", "grpc")


def test_unset_options_take_the_defaults(fe):
    for fields in (http({"prompt": "hi"}), grpc(text="hi")):
        request = prepare(fe, fields)
        assert request.params.max_tokens is None  # bounded once the prompt is tokenized
        assert request.params.speculate and request.params.temperature == 1.0 and request.session is None
    chat = prepare(fe, http({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
                             "max_completion_tokens": 4}))
    assert chat.params.max_tokens == 4  # the newer field wins


def test_our_ids_are_unique_and_a_client_id_is_only_echoed(fe):
    one, two = (prepare(fe, grpc(text="hi", request_id="client-7")) for _ in range(2))
    assert one.reply_id == two.reply_id == "client-7" and one.request_id != two.request_id
    assert one.request_id.startswith("grpc-")
    assert prepare(fe, grpc(text="hi")).reply_id.startswith("grpc-")
    completion = prepare(fe, http({"prompt": "hi"}))
    assert completion.request_id.startswith("cmpl-") and completion.reply_id == completion.request_id
    assert prepare(fe, http({"messages": [{"role": "user", "content": "hi"}]})).request_id.startswith("chatcmpl-")


def test_the_deadline_is_the_shorter_of_the_clients_and_the_servers(fe):
    before = time.monotonic()
    client = prepare(fe, grpc(text="hi", timeout_s=2.0)).deadline
    server = prepare(fe, http({"prompt": "hi"}, {"x-request-timeout": "1000"})).deadline
    unset = prepare(fe, http({"prompt": "hi"})).deadline
    after = time.monotonic()
    assert before + 2.0 <= client <= after + 2.0
    assert before + SERVER_TIMEOUT_S <= server <= after + SERVER_TIMEOUT_S
    assert before + SERVER_TIMEOUT_S <= unset <= after + SERVER_TIMEOUT_S


OUT_OF_VOCAB = 10 ** 6


@pytest.mark.parametrize("fields, status, param", [
    (lambda: http({"prompt": "hi", "model": "nope"}), 404, "model"),
    (lambda: grpc(text="hi", model="nope"), 404, "model"),
    (lambda: http({"prompt": "hi", "stop_token_ids": [OUT_OF_VOCAB]}), 400, "stop_token_ids"),
    (lambda: grpc(text="hi", sampling=pb.SamplingParams(stop_token_ids=[OUT_OF_VOCAB])), 400,
     "sampling.stop_token_ids"),
    (lambda: http({"prompt": "hi", "draft_method": "eagle"}), 400, "draft_method"),
    (lambda: grpc(text="hi", speculation=pb.SpeculationOptions(draft_method="eagle")), 400,
     "speculation.draft_method"),
    (lambda: grpc(text="hi", request_id="x" * 129), 400, "request_id"),
    (lambda: grpc(text="hi", request_id="line\nbreak"), 400, "request_id"),
    (lambda: grpc(), 400, "input"),
    (lambda: grpc(text="hi", sampling=pb.SamplingParams(max_tokens=0)), 400, "sampling.max_tokens"),
    (lambda: http({"prompt": ["one", "two"]}), 400, "prompt"),
    (lambda: http({"prompt": "hi", "suffix": "x"}), 400, "suffix"),
    (lambda: http({"messages": CHAT, "top_logprobs": 2}), 400, "top_logprobs"),
    (lambda: http({"prompt": "hi", "logit_bias": {str(OUT_OF_VOCAB): 5}}), 400, "logit_bias"),
    (lambda: http({"prompt": "hi", "n": 2, "best_of": 3}), 400, "best_of"),
    (lambda: http({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}), 400, "min_tokens"),
    (lambda: http({"prompt": "hi", "guided_regex": "a+", "guided_choice": ["a"]}), 400, "guided_choice"),
    (lambda: http({"prompt": "hi", "guided_regex": "(a"}), 400, "guided_regex"),
    (lambda: http({"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}}), 400, "response_format"),
    (lambda: http({"messages": CHAT, "tool_choice": "required"}), 400, "tool_choice"),
    (lambda: http({"messages": CHAT, "tools": [TOOL], "tool_choice": {"type": "function", "function": {
        "name": "other"}}}), 400, "tool_choice.function.name"),
    (lambda: http({"messages": CHAT, "tools": [TOOL], "response_format": {"type": "json_object"}}), 400,
     "response_format"),
    (lambda: http({"messages": CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]}), 400,
     "tools[0].function.name"),
    (lambda: http({"prompt": "hi"}, {"x-request-timeout": "-1"}), 400, "x-request-timeout"),
])
def test_errors_name_the_field_as_the_protocol_spells_it(fe, fields, status, param):
    with pytest.raises(APIError) as info:
        prepare(fe, fields())
    err = info.value
    assert (err.status, err.param) == (status, param) and err.message.startswith(param + ":")
    assert status != 404 or err.code == "model_not_found"
