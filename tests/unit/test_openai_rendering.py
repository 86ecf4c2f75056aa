"""The OpenAI features' pure parts, without Ray: request bodies to SamplingParams and StructuredOutput
(routing/protocol.py), the rendering of logprobs and tool calls (routing/openai_api.py), token texts
(routing/detokenizer.py), and the per-choice request path (routing/frontend.py `Frontend._generate`) fed with
engine outputs as a verifier streams them."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from specserve.actors.engine.messages import Progress, RequestOutput, TokenLogprobs
from specserve.actors.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.actors.engine.structured import check_structured
from specserve.cluster.config import SpecserveConfig
from specserve.routing.detokenizer import TokenTexts
from specserve.routing.errors import APIError
from specserve.routing.frontend import Frontend
from specserve.routing.openai_api import CompletionLogprobs, chat_logprobs, tool_calls_json
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest
from specserve.routing.request import ToolChoice
from specserve.routing.tools import ToolCall, ToolFunction
from tiny_models import make_tiny_model, make_tokenizer

TOK = make_tokenizer()
CHAT = [{"role": "user", "content": "hi"}]


def chat(**body) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": CHAT, **body})


def completion(**body) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **body})


# ---- protocol -----------------------------------------------------------------------------------------------------
def test_sampling_options_reach_the_params():
    params = completion(n=3, presence_penalty=0.5, frequency_penalty=-1, repetition_penalty=1.2, min_p=0.1,
                        min_tokens=2, logit_bias={"7": 100, "9": -100}, logprobs=2, echo=True, seed=5,
                        best_of=3).sampling_params()
    assert (params.n, params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (3, 0.5, -1, 1.2)
    assert (params.min_p, params.min_tokens, params.seed) == (0.1, 2, 5)
    assert params.logit_bias == {7: 100.0, 9: -100.0}
    assert (params.logprobs, params.prompt_logprobs) == (2, 2)  # echo: the prompt's too
    assert completion(logprobs=0).sampling_params().logprobs == 0 and completion().sampling_params().logprobs is None
    plain = completion().sampling_params()
    assert plain == SamplingParams(max_tokens=None)  # unset options change nothing


def test_chat_logprobs_count_the_alternatives():
    assert chat(logprobs=True, top_logprobs=4).sampling_params().logprobs == 4
    assert chat(logprobs=True).sampling_params().logprobs == 0
    assert chat(logprobs=False).sampling_params().logprobs is None
    assert chat().sampling_params().prompt_logprobs is None


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutput("json_schema", '{"type": "object"}')),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"},
                                                                 "strict": True}}},
     StructuredOutput("json_schema", '{"type": "integer"}')),
    ({"guided_json": {"type": "string"}}, StructuredOutput("json_schema", '{"type": "string"}')),
    ({"guided_regex": "[ab]+"}, StructuredOutput("regex", "[ab]+")),
    ({"guided_grammar": 'start: "x"'}, StructuredOutput("lark", 'start: "x"')),
])
def test_structured_outputs_map_to_one_constraint(body, expected):
    assert completion(**body).sampling_params().structured == expected


def test_guided_choice_is_a_grammar_of_the_literal_choices():
    choices = ['say "yes"', "no\\way", "naïve\n"]
    spec = completion(guided_choice=choices).sampling_params().structured
    assert spec.kind == "lark"
    check_structured(spec)  # quotes, backslashes, newlines and non-ASCII stay literal
    import llguidance
    import llguidance.hf

    tokenizer = llguidance.hf.from_tokenizer(TOK)
    for text in choices:
        matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("lark", spec.value))
        assert matcher.consume_tokens(TOK(text, add_special_tokens=False).input_ids), text
        assert matcher.is_accepting(), text


@pytest.mark.parametrize("make, loc", [
    (lambda: completion(logprobs=6), "logprobs"),
    (lambda: chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (lambda: completion(logit_bias={"1": 101}), "logit_bias"),
    (lambda: completion(logit_bias={"x": 1}), "logit_bias"),
    (lambda: completion(n=17), "n"),
    (lambda: completion(presence_penalty=2.5), "presence_penalty"),
    (lambda: completion(response_format={"type": "xml"}), "response_format"),
])
def test_out_of_range_options_are_invalid_by_name(make, loc):
    with pytest.raises(ValidationError) as info:
        make()
    assert info.value.errors()[0]["loc"][0] == loc


def test_tools_become_the_prompts_and_the_choice():
    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    body = chat(tools=[tool], messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}])
    prompt = body.as_prompt()
    assert prompt.tools == (ToolFunction("f", "d", {"type": "object", "properties": {}}),)
    assert prompt.value[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}
    assert prompt.value[2]["tool_call_id"] == "call_1"
    assert body.tool_selection()[1] == ToolChoice("auto")  # OpenAI's default with tools
    assert chat().tool_selection()[1] == ToolChoice("none")
    named = chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "f"}})
    assert named.tool_selection()[1] == ToolChoice("function", "f") and named.tool_selection()[1].forced


# ---- rendering ----------------------------------------------------------------------------------------------------
def ids_of(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False).input_ids


def test_token_texts_decode_each_token_alone_special_tokens_included():
    texts = TokenTexts(TOK)
    ids = ids_of("Hello world")
    assert "".join(texts(t) for t in ids) == "Hello world"
    assert texts(TOK.eos_token_id) == "<|im_end|>"
    partial = ids_of("日")[0]  # a byte of a multi-byte character
    assert texts(partial) == TOK.decode([partial])


def test_chat_logprobs_entries():
    hello, world = ids_of("Hello world")[:2]
    texts = TokenTexts(TOK)
    entries = chat_logprobs([TokenLogprobs(hello, -0.5, [(hello, -0.5), (world, -1.5)])], texts)
    assert entries == [{"token": texts(hello), "logprob": -0.5, "bytes": list(texts(hello).encode()),
                        "top_logprobs": [
                            {"token": texts(hello), "logprob": -0.5, "bytes": list(texts(hello).encode())},
                            {"token": texts(world), "logprob": -1.5, "bytes": list(texts(world).encode())}]}]


def test_completion_logprobs_with_echo_and_streamed_offsets():
    texts = TokenTexts(TOK)
    prompt, output = ids_of("The quick"), ids_of(" brown fox")
    lp = CompletionLogprobs(texts)
    lp.add_all(prompt, [None] + [TokenLogprobs(t, -1.0, [(t, -1.0)]) for t in prompt[1:]])
    first = lp.take()
    assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
    assert first["tokens"] == [texts(t) for t in prompt] and first["text_offset"][0] == 0
    lp.add_all(output[:1], [TokenLogprobs(output[0], -2.0, [])])
    lp.add_all(output[1:], [TokenLogprobs(t, -3.0, [(t, -3.0)]) for t in output[1:]])
    second = lp.take()
    offsets = first["text_offset"] + second["text_offset"]
    full = "".join(first["tokens"] + second["tokens"])
    assert full == "The quick brown fox"
    assert [full[o:o + len(t)] for o, t in zip(offsets, first["tokens"] + second["tokens"])] == \
        first["tokens"] + second["tokens"]
    assert second["token_logprobs"][0] == -2.0 and second["top_logprobs"][0] == {}
    assert lp.take()["tokens"] == []  # taken once


def test_tool_calls_of_a_message_and_of_a_delta():
    calls = [ToolCall("call_a", "f", '{"x": 1}'), ToolCall("call_b", "g", "{}")]
    assert tool_calls_json(calls)[1] == {"id": "call_b", "type": "function",
                                         "function": {"name": "g", "arguments": "{}"}}
    assert [c["index"] for c in tool_calls_json(calls, streamed=True)] == [0, 1]


# ---- the per-choice request path ------------------------------------------------------------------------------------
class _Stream:
    """What a verifier's streamed generate call gives the front end: its outputs, then the end."""

    def __init__(self, outputs):
        self._outputs = iter(outputs)
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        self.cancelled = True


class _Verifier:
    def __init__(self, outputs):
        self.stream = _Stream(outputs)
        self.request = None

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request):
        self.request = request
        return self.stream


@pytest.fixture(scope="module")
def fe(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("model"))
    frontend = Frontend(SpecserveConfig.model_validate({"model": {"source": str(path), "served_name": "m"}}),
                        verifier=None)
    yield frontend
    asyncio.run(frontend.close())


def run(fe, outputs, params, tool_choice=ToolChoice(), tools=()):
    fe.verifier = _Verifier(outputs)

    async def collect():
        return [ev async for ev in fe._generate("r", [1, 5, 6], params, "t", None, None, 0.0, tool_choice, tools)]

    return asyncio.run(collect()), fe.verifier.stream


def out(index, ids, n_out, *, finished=False, reason=None, logprobs=True, prompt_logprobs=None, **counters):
    lps = [TokenLogprobs(t, -float(t), [(t, -float(t))]) for t in ids] if logprobs else None
    return RequestOutput("r", ids, finished, reason, num_prompt_tokens=3, num_output_tokens=n_out, index=index,
                         logprobs=lps, prompt_logprobs=prompt_logprobs, **counters)


def test_choices_are_detokenized_and_stopped_on_their_own_and_usage_sums_them(fe):
    a, b = ids_of("one two"), ids_of("three STOP four")
    prompt_lps = [None, TokenLogprobs(5, -1.0, []), TokenLogprobs(6, -2.0, [])]
    outputs = [out(0, a[:1], 1, prompt_logprobs=prompt_lps, num_spec_rounds=1, num_draft_tokens=2,
                   num_accepted_tokens=1),
               out(1, b, len(b), num_spec_rounds=2, num_draft_tokens=4, num_accepted_tokens=3),
               out(1, ids_of(" more"), len(b) + 1),  # the engine runs on past the stop string: dropped
               out(0, a[1:], len(a), finished=True, reason="length", num_spec_rounds=1, num_draft_tokens=2,
                   num_accepted_tokens=1)]
    events, stream = run(fe, outputs, SamplingParams(max_tokens=len(a), n=2, logprobs=1, stop=[" STOP"]))
    assert stream.cancelled
    by_choice = {i: [e for e in events if e.index == i] for i in (0, 1)}
    assert "".join(e.text for e in by_choice[0]) == "one two" and by_choice[0][-1].finish_reason == "length"
    assert "".join(e.text for e in by_choice[1]) == "three" and by_choice[1][-1].finish_reason == "stop"
    kept = [t for e in by_choice[1] for t in e.token_ids]
    assert kept == b[:len(kept)] and len(kept) < len(b)
    assert [lp.token_id for e in by_choice[1] for lp in e.logprobs] == kept  # cut with the tokens
    assert events[0].prompt_logprobs == prompt_lps and events[0].prompt_token_ids == [1, 5, 6]
    assert all(e.prompt_logprobs is None for e in events[1:])
    usage = events[-1].usage
    assert usage.completion_tokens == len(a) + len(kept)
    assert (usage.spec_rounds, usage.draft_tokens, usage.accepted_tokens) == (3, 6, 4)


class _PacedStream(_Stream):
    """A stream whose items come after delays: (seconds, item) pairs."""

    async def __anext__(self):
        try:
            delay, item = next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None
        await asyncio.sleep(delay)
        return item


def run_paced(fe, paced, params, stall_s: float):
    fe.verifier = _Verifier([])
    fe.verifier.stream = _PacedStream(paced)
    before, fe.config.server.stall_timeout_s = fe.config.server.stall_timeout_s, stall_s

    async def collect():
        return [ev async for ev in fe._generate("r", [1, 5, 6], params, "t", None, None, 0.0, ToolChoice(), ())]
    try:
        return asyncio.run(collect())
    finally:
        fe.config.server.stall_timeout_s = before


def test_progress_reports_keep_a_waiting_request_alive_and_add_no_events(fe):
    a = ids_of("one two")
    outputs = [out(0, a[:1], 1), out(0, a[1:], len(a), finished=True, reason="length")]
    # Waiting 0.8 s in all, longer than the stall timeout, told of the engine's steps every 0.1 s.
    paced = [(0.1, Progress(3))] * 8 + [(0.0, outputs[0]), (0.1, Progress(1)), (0.0, outputs[1])]
    events = run_paced(fe, paced, SamplingParams(max_tokens=len(a)), stall_s=0.3)
    plain, _ = run(fe, outputs, SamplingParams(max_tokens=len(a)))
    assert [(e.text, e.token_ids, e.finish_reason) for e in events] == \
        [(e.text, e.token_ids, e.finish_reason) for e in plain]
    assert events[-1].usage.completion_tokens == len(a)


@pytest.mark.parametrize("paced, where", [([], "in the queue for a replica"),
                                          ([(0.0, Progress(2)), (0.0, out(0, ids_of("one"), 1))], "0.3 s after 1")])
def test_a_request_that_hears_nothing_for_the_stall_timeout_ends_as_stalled(fe, paced, where):
    paced = paced + [(5.0, Progress(1))]  # the replica goes silent
    with pytest.raises(APIError) as err:
        run_paced(fe, paced, SamplingParams(max_tokens=4), stall_s=0.3)
    assert err.value.status == 504 and err.value.code == "stalled" and where in str(err.value)


def test_the_request_ends_when_every_choice_ended(fe):
    outputs = [out(0, ids_of("a"), 1, finished=True, reason="stop"), out(1, ids_of("b"), 1),
               out(1, ids_of("c"), 2, finished=True, reason="length")]
    events, _ = run(fe, outputs, SamplingParams(max_tokens=2, n=2))
    assert [(e.index, e.finish_reason) for e in events] == [(0, "stop"), (1, None), (1, "length")]
    assert events[-1].usage.completion_tokens == 3


def test_tool_calls_are_parsed_out_of_each_choice(fe):
    tools = (ToolFunction("get_weather", "", {"type": "object"}),)
    text = 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    ids = ids_of(text)
    outputs = [out(0, ids[:7], 7, logprobs=False), out(0, ids[7:], len(ids), finished=True, reason="stop",
                                                       logprobs=False)]
    events, _ = run(fe, outputs, SamplingParams(max_tokens=100), ToolChoice("auto"), tools)
    assert "".join(e.text for e in events) == "Sure."
    assert events[-1].finish_reason == "tool_calls"
    [call] = events[-1].tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    plain, _ = run(fe, [out(0, ids, len(ids), finished=True, reason="stop", logprobs=False)],
                   SamplingParams(max_tokens=100), ToolChoice("none"), tools)
    assert plain[-1].text == text and plain[-1].tool_calls is None and plain[-1].finish_reason == "stop"


def test_without_parallel_tool_calls_only_the_first_call_is_kept(fe):
    tools = (ToolFunction("f", "", {"type": "object"}),)
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    ids = ids_of(call + "\n" + call)
    outputs = [out(0, ids, len(ids), finished=True, reason="stop", logprobs=False)]
    events, _ = run(fe, outputs, SamplingParams(max_tokens=100), ToolChoice("auto", parallel=False), tools)
    assert len(events[-1].tool_calls) == 1 and events[-1].finish_reason == "tool_calls"
    events, _ = run(fe, outputs, SamplingParams(max_tokens=100), ToolChoice("auto"), tools)
    assert len(events[-1].tool_calls) == 2
