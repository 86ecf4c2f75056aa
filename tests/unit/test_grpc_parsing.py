"""routing/grpc_api.py's parsing of requests (SamplingParams, tools, chat messages) and its refusal of fields the
server's proto does not define; the RPCs themselves are tests/integration/test_grpc_*.py."""

import pytest
from google.protobuf.internal.encoder import _VarintBytes

from specserve.actors.engine.sampling_params import StructuredOutput
from specserve.routing.errors import APIError
from specserve.routing.grpc_api import (JSON_OBJECT_SCHEMA, chat_message, request_fields, sampling_params,
                                        tool_choice_of, tools_of, unknown_field)
from specserve.routing.request import ToolChoice
from specserve.v1 import generation_pb2 as pb


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _VarintBytes(number << 3 | wire_type) + payload


def _length_delimited(number: int, data: bytes) -> bytes:
    return _field(number, 2, _VarintBytes(len(data)) + data)


def test_defaults_are_the_plain_request():
    p = sampling_params(pb.SamplingParams())
    assert (p.n, p.logprobs, p.prompt_logprobs, p.logit_bias, p.structured) == (1, None, None, {}, None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (0, 0, 1, 0, 0)


def test_every_new_option_reaches_sampling_params():
    p = sampling_params(pb.SamplingParams(
        n=3, logprobs=0, prompt_logprobs=5, presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.25,
        min_p=0.25, min_tokens=4, max_tokens=8, logit_bias={7: -100.0, 9: 2.5}, regex="[a-z]+"))
    assert (p.n, p.logprobs, p.prompt_logprobs, p.min_tokens) == (3, 0, 5, 4)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p) == (0.5, -0.5, 1.25, 0.25)
    assert p.logit_bias == {7: -100.0, 9: 2.5}
    assert p.structured == StructuredOutput("regex", "[a-z]+")


@pytest.mark.parametrize("oneof, expected", [
    ({"json_schema": '{"type": "string"}'}, StructuredOutput("json_schema", '{"type": "string"}')),
    ({"json_object": True}, StructuredOutput("json_schema", JSON_OBJECT_SCHEMA)),
    ({"json_object": False}, None),
    ({"lark": 'start: "yes" | "no"'}, StructuredOutput("lark", 'start: "yes" | "no"')),
])
def test_structured_output_oneof(oneof, expected):
    assert sampling_params(pb.SamplingParams(**oneof)).structured == expected


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "sampling.n"),
    ({"n": 17}, "sampling.n"),
    ({"logprobs": 21}, "sampling.logprobs"),
    ({"prompt_logprobs": 21}, "sampling.prompt_logprobs"),
    ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
    ({"frequency_penalty": float("nan")}, "sampling.frequency_penalty"),
    ({"repetition_penalty": 0.0}, "sampling.repetition_penalty"),
    ({"min_p": 1.5}, "sampling.min_p"),
    ({"min_tokens": 9, "max_tokens": 8}, "sampling.min_tokens"),
    ({"logit_bias": {3: 101.0}}, "sampling.logit_bias"),
    ({"logit_bias": {i: 1.0 for i in range(301)}}, "sampling.logit_bias"),
    ({"json_schema": ""}, "sampling.json_schema"),
    ({"regex": ""}, "sampling.regex"),
])
def test_bad_values_name_the_proto_field(kwargs, field):
    with pytest.raises(APIError) as err:
        sampling_params(pb.SamplingParams(**kwargs))
    assert err.value.status == 400 and err.value.message.startswith(field + ":"), err.value.message


def test_chat_messages_keep_the_openai_shape():
    plain = pb.ChatMessage(role="user", content="hi")
    assert chat_message(plain) == {"role": "user", "content": "hi"}  # as before tools existed
    call = pb.ToolCall(id="call_1", name="f", arguments='{"x": 1}')
    assert chat_message(pb.ChatMessage(role="assistant", tool_calls=[call])) == {
        "role": "assistant", "content": "",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert chat_message(pb.ChatMessage(role="tool", content="3", tool_call_id="call_1")) == {
        "role": "tool", "content": "3", "tool_call_id": "call_1"}


def test_tools_parse_their_schemas():
    chat = pb.ChatMessages(tools=[pb.Tool(name="f", description="d", parameters_json='{"type": "object"}'),
                                  pb.Tool(name="g")])
    f, g = tools_of(chat)
    assert (f.name, f.description, f.parameters) == ("f", "d", {"type": "object"})
    assert g.name == "g" and g.parameters["type"] == "object"


@pytest.mark.parametrize("tool, field", [
    (pb.Tool(name=""), "chat.tools[0].name"),
    (pb.Tool(name="f", parameters_json="{not json"), "chat.tools[0].parameters_json"),
    (pb.Tool(name="f", parameters_json="[1]"), "chat.tools[0].parameters_json"),
])
def test_bad_tools_name_the_field(tool, field):
    with pytest.raises(APIError) as err:
        tools_of(pb.ChatMessages(tools=[tool]))
    assert err.value.message.startswith(field + ":"), err.value.message


def test_known_fields_pass():
    request = pb.GenerateRequest(model="m", chat=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="x")], tools=[pb.Tool(name="f")]),
        sampling=pb.SamplingParams(n=2, logit_bias={1: 1.0}, json_object=True))
    assert unknown_field(pb.GenerateRequest.FromString(request.SerializeToString())) is None


def test_unknown_fields_are_found_at_any_depth():
    base = pb.GenerateRequest(model="m", text="hi").SerializeToString()
    top = pb.GenerateRequest.FromString(base + _field(99, 0, b"\x01"))
    assert unknown_field(top).startswith("specserve.v1.GenerateRequest: unknown field number 99")

    sampling = pb.SamplingParams(temperature=0.5).SerializeToString() + _field(40, 0, b"\x01")
    nested = pb.GenerateRequest.FromString(base + _length_delimited(5, sampling))
    assert nested.sampling.temperature == 0.5
    assert unknown_field(nested).startswith("sampling: unknown field number 40")

    message = pb.ChatMessage(role="user", content="x").SerializeToString() + _length_delimited(9, b"abc")
    chat = _length_delimited(1, pb.ChatMessage(role="user").SerializeToString()) + _length_delimited(1, message)
    in_list = pb.GenerateRequest.FromString(pb.GenerateRequest(model="m").SerializeToString()
                                            + _length_delimited(4, chat))
    assert unknown_field(in_list).startswith("chat.messages[1]: unknown field number 9")


def test_tool_names_are_checked_as_openai_checks_them():
    for tools, field in [([pb.Tool(name="no spaces")], "chat.tools[0].name"),
                         ([pb.Tool(name="f"), pb.Tool(name="f")], "chat.tools[1].name")]:
        with pytest.raises(APIError) as err:
            tools_of(pb.ChatMessages(tools=tools))
        assert err.value.message.startswith(field + ":"), err.value.message


@pytest.mark.parametrize("tools, choice, expected", [
    ([], "", ToolChoice("none")),
    ([pb.Tool(name="f")], "", ToolChoice("auto")),
    ([pb.Tool(name="f")], "none", ToolChoice("none")),
    ([pb.Tool(name="f")], "required", ToolChoice("required")),
    ([pb.Tool(name="f")], "f", ToolChoice("function", "f")),
])
def test_tool_choice(tools, choice, expected):
    assert tool_choice_of(pb.ChatMessages(tools=tools, tool_choice=choice)) == expected


def test_request_fields_name_the_structured_field_that_was_set():
    def fields(request):
        return request_fields(request, timeout_s=None, metadata={}, session_header="x-session-id")

    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")],
                           tools=[pb.Tool(name="f", parameters_json='{"type": "object"}')], tool_choice="f")
    f = fields(pb.GenerateRequest(model="m", chat=chat))
    assert f.tool_choice == ToolChoice("function", "f") and [t.name for t in f.prompt.tools] == ["f"]
    f = fields(pb.GenerateRequest(model="m", text="hi", sampling=pb.SamplingParams(regex="a+")))
    assert f.names.structured == "sampling.regex" and f.names.logit_bias == "sampling.logit_bias"
    assert f.tool_choice == ToolChoice("none")


def test_structured_output_and_tools_exclude_each_other_unless_tool_choice_is_none():
    def fields(tool_choice):
        chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")], tools=[pb.Tool(name="f")],
                               tool_choice=tool_choice)
        return request_fields(pb.GenerateRequest(model="m", chat=chat, sampling=pb.SamplingParams(regex="a+")),
                              timeout_s=None, metadata={}, session_header="x-session-id")

    for choice in ("", "auto", "required", "f"):
        with pytest.raises(APIError) as err:
            fields(choice)
        assert err.value.message.startswith("sampling.regex:"), err.value.message
    assert fields("none").sampling.structured == StructuredOutput("regex", "a+")
