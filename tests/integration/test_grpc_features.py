"""Issue 21's options through the real gRPC path (Ray Serve, a verifier with n-gram speculation on, grpc over
127.0.0.1): logprobs and prompt logprobs against Hugging Face float32, n > 1 streaming and unary, penalties,
min_p and logit_bias, structured outputs, tool calls, and the refusal of unknown fields and invalid options.

The model is tiny and random but has SmolLM2's real tokenizer (49152 tokens), so JSON schemas and tool calls meet
a real vocabulary."""

import json
import os

import grpc
import jsonschema
import pytest
import torch
from google.protobuf.internal.encoder import _VarintBytes
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from served_apps import start_app
from specserve.actors.model_loader import pull_model
from specserve.cluster.config import default_cache_dir
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration
NAME = "tiny-grpc-features"
TOLERANCE = 1e-4
PROMPT = "The capital of France is Paris. The capital of Italy is"
WEATHER = pb.Tool(name="get_weather", description="The weather in a city.", parameters_json=json.dumps({
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
    "additionalProperties": False}))
WEATHER_SCHEMA = json.loads(WEATHER.parameters_json)


def make_tiny_model_with_smollm2_tokenizer(path):
    tokenizer = AutoTokenizer.from_pretrained(
        pull_model("smollm2-135m", os.environ.get("SPECSERVE_CACHE") or default_cache_dir(), progress=False))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(21)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    path = make_tiny_model_with_smollm2_tokenizer(tmp_path_factory.mktemp("tiny-smollm2-tok"))
    # Non-adaptive speculation: every round drafts what the n-gram proposer finds, whatever the timings.
    server = start_app(ray_cluster, str(path), NAME, **{"engine.block_size": 4, "engine.num_blocks": 256,
                                                       "engine.max_num_batched_tokens": 64,
                                                       "speculative.adaptive": False})
    channel = grpc.insecure_channel(server.grpc_target)
    grpc.channel_ready_future(channel).result(timeout=30)
    yield server, path, channel, pb_grpc.GenerationStub(channel)
    channel.close()
    server.stop()


@pytest.fixture(scope="module")
def hf(app):
    _, path, _, _ = app
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def request(**sampling) -> pb.GenerateRequest:
    sampling = {"temperature": 0.0, "ignore_eos": True, "max_tokens": 12, **sampling}
    return pb.GenerateRequest(model=NAME, text=PROMPT, sampling=pb.SamplingParams(**sampling))


def chat(content: str, **chat_fields) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)], **chat_fields)


def streamed_choices(gen, req) -> tuple[dict[int, list], list]:
    """choice index -> its messages, and every message, of a Generate call."""
    messages = list(gen.Generate(req, timeout=120))
    by_index: dict[int, list] = {}
    for m in messages:
        by_index.setdefault(m.index, []).append(m)
    return by_index, messages


def log_softmax_rows(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_logprob(entry, expected_id: int, row: torch.Tensor, top: int, tok):
    assert entry.token_id == expected_id and entry.token == tok.decode([expected_id])
    assert abs(entry.logprob - row[expected_id].item()) < TOLERANCE
    values, ids = torch.topk(row, top)
    assert [t.token_id for t in entry.top] == ids.tolist()
    for t, v in zip(entry.top, values.tolist()):
        assert abs(t.logprob - v) < TOLERANCE and t.token == tok.decode([t.token_id])


def assert_same_logprobs(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.token_id == y.token_id and [t.token_id for t in x.top] == [t.token_id for t in y.top]
        assert abs(x.logprob - y.logprob) < TOLERANCE
        assert all(abs(s.logprob - t.logprob) < TOLERANCE for s, t in zip(x.top, y.top))


def test_logprobs_and_prompt_logprobs_match_hf_float32(app, hf):
    _, _, _, gen = app
    tok, model = hf
    req = request(logprobs=3, prompt_logprobs=2)
    unary = gen.GenerateUnary(req, timeout=120)
    out = list(unary.token_ids)
    assert len(out) == 12 and len(unary.logprobs) == 12
    prompt = tok(PROMPT).input_ids
    rows = log_softmax_rows(model, prompt + out)
    for i, entry in enumerate(unary.logprobs):  # the greedy token is the top one
        assert_logprob(entry, out[i], rows[len(prompt) - 1 + i], 3, tok)
        assert entry.top[0].token_id == out[i]
    assert len(unary.prompt_logprobs) == len(prompt) - 1  # the first prompt token has none
    for j, entry in enumerate(unary.prompt_logprobs, start=1):
        assert_logprob(entry, prompt[j], rows[j - 1], 2, tok)

    by_index, messages = streamed_choices(gen, req)
    assert list(by_index) == [0]
    assert all(len(m.logprobs) == len(m.token_ids) for m in messages)
    assert_same_logprobs([e for m in messages for e in m.logprobs], unary.logprobs)
    assert_same_logprobs(messages[0].prompt_logprobs, unary.prompt_logprobs)
    assert not any(m.prompt_logprobs for m in messages[1:])

    # Not asked: none computed; logprobs=0: the chosen token's only.
    plain = gen.GenerateUnary(request(), timeout=120)
    assert list(plain.token_ids) == out and not plain.logprobs and not plain.prompt_logprobs
    chosen = gen.GenerateUnary(request(logprobs=0), timeout=120)
    assert [e.token_id for e in chosen.logprobs] == out and not any(e.top for e in chosen.logprobs)


def test_logprobs_with_accepted_drafts_are_the_raw_models(app, hf):
    """A logit_bias forces a repeated token, so n-gram drafts are proposed and accepted: the logprobs of those
    verified positions are still the plain model's raw ones (before the bias), and the same without drafts."""
    _, _, _, gen = app
    tok, model = hf
    forced = tok(" Rome").input_ids[0]
    req = request(max_tokens=16, logprobs=2, logit_bias={forced: 100.0})
    drafted = gen.GenerateUnary(req, timeout=120)
    assert list(drafted.token_ids) == [forced] * 16
    assert drafted.usage.accepted_tokens > 0
    prompt = tok(PROMPT).input_ids
    rows = log_softmax_rows(model, prompt + [forced] * 16)
    for i, entry in enumerate(drafted.logprobs):
        assert_logprob(entry, forced, rows[len(prompt) - 1 + i], 2, tok)
    plain = gen.GenerateUnary(pb.GenerateRequest(model=NAME, text=PROMPT, sampling=req.sampling,
                                                 speculation=pb.SpeculationOptions(enabled=False)), timeout=120)
    assert plain.usage.draft_tokens == 0
    assert_same_logprobs(plain.logprobs, drafted.logprobs)


def test_n_choices_unary_and_streaming(app):
    _, _, _, gen = app
    one = list(gen.GenerateUnary(request(max_tokens=8), timeout=120).token_ids)
    # Greedy: every choice is the single greedy completion.
    unary = gen.GenerateUnary(request(max_tokens=8, n=3), timeout=120)
    assert not unary.token_ids and not unary.text  # with n > 1 the choices are in `choices`
    assert [c.index for c in unary.choices] == [0, 1, 2]
    assert all(list(c.token_ids) == one and c.finish_reason == pb.FINISH_REASON_LENGTH for c in unary.choices)
    assert unary.usage.completion_tokens == 24

    # Seeded sampling: each choice is reproducible, streaming or not; the choices differ from each other.
    sampled = request(max_tokens=8, n=3, temperature=1.0, seed=11)
    first = gen.GenerateUnary(sampled, timeout=120)
    again = gen.GenerateUnary(sampled, timeout=120)
    assert [list(c.token_ids) for c in first.choices] == [list(c.token_ids) for c in again.choices]
    assert len({tuple(c.token_ids) for c in first.choices}) == 3
    by_index, messages = streamed_choices(gen, sampled)
    assert sorted(by_index) == [0, 1, 2]
    for c in first.choices:
        mine = by_index[c.index]
        assert [t for m in mine for t in m.token_ids] == list(c.token_ids)
        assert "".join(m.text for m in mine) == c.text
        assert mine[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in mine[:-1])
    assert messages[-1].usage.completion_tokens == 24


def greedy_reference(model, prompt: list[int], steps: int, *, repetition: float = 1.0, presence: float = 0.0,
                     frequency: float = 0.0) -> list[int]:
    """Greedy decoding of the plain model with the penalties: repetition as CTRL and Hugging Face (over prompt and
    output tokens), presence and frequency as OpenAI (over the output tokens)."""
    ids, out = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        seen = torch.tensor(sorted(set(ids)), dtype=torch.long)
        logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float() \
            if out else torch.zeros_like(logits)
        logits = logits - presence * (counts > 0).float() - frequency * counts
        nxt = int(torch.argmax(logits))
        ids.append(nxt)
        out.append(nxt)
    return out


def test_penalties_min_p_and_logit_bias_take_effect(app, hf):
    _, _, _, gen = app
    tok, model = hf
    prompt = tok(PROMPT).input_ids
    greedy = list(gen.GenerateUnary(request(max_tokens=16), timeout=120).token_ids)

    forced = tok(" Rome").input_ids[0]
    biased = gen.GenerateUnary(request(max_tokens=8, logit_bias={forced: 100.0}), timeout=120)
    assert list(biased.token_ids) == [forced] * 8
    banned = gen.GenerateUnary(request(max_tokens=8, logit_bias={greedy[0]: -100.0}), timeout=120)
    assert banned.token_ids[0] != greedy[0]

    # min_p = 1 keeps only the most likely token: sampling becomes greedy.
    top_only = gen.GenerateUnary(request(max_tokens=16, temperature=1.0, seed=5, min_p=1.0), timeout=120)
    assert list(top_only.token_ids) == greedy

    repeated = gen.GenerateUnary(request(max_tokens=16, repetition_penalty=1.3), timeout=120)
    assert list(repeated.token_ids) == greedy_reference(model, prompt, 16, repetition=1.3)

    penalized = gen.GenerateUnary(request(max_tokens=16, presence_penalty=1.5, frequency_penalty=0.5), timeout=120)
    assert list(penalized.token_ids) == greedy_reference(model, prompt, 16, presence=1.5, frequency=0.5)


SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
          "required": ["color", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("structured, check", [
    ({"json_schema": json.dumps(SCHEMA)}, lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    ({"regex": "(yes|no), (yes|no)"}, lambda text: text in ("yes, yes", "yes, no", "no, yes", "no, no")),
])
def test_structured_output_follows_the_spec(app, structured, check):
    _, _, _, gen = app
    req = pb.GenerateRequest(model=NAME, chat=chat("Answer as asked."),
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=64, **structured))
    unary = gen.GenerateUnary(req, timeout=120)
    assert unary.finish_reason == pb.FINISH_REASON_STOP, unary
    check(unary.text)
    by_index, _ = streamed_choices(gen, req)
    assert "".join(m.text for m in by_index[0]) == unary.text
    # Sampled, three choices: each valid.
    sampled = pb.GenerateRequest(model=NAME, chat=chat("Answer as asked."), sampling=pb.SamplingParams(
        temperature=1.0, seed=3, n=3, max_tokens=64, **structured))
    for c in gen.GenerateUnary(sampled, timeout=120).choices:
        assert c.finish_reason == pb.FINISH_REASON_STOP
        check(c.text)


def test_json_object_is_a_json_object(app, hf):
    """Biased towards "}" and EOS, the model would write "}" first: the grammar makes it open an object first, then
    end there."""
    _, _, _, gen = app
    tok, _ = hf
    close = {tok.convert_tokens_to_ids("}"): 30.0}
    req = pb.GenerateRequest(model=NAME, chat=chat("Reply in JSON."), sampling=pb.SamplingParams(
        temperature=0.0, max_tokens=32, json_object=True, logit_bias={**close, tok.eos_token_id: 50.0}))
    unary = gen.GenerateUnary(req, timeout=120)
    assert unary.finish_reason == pb.FINISH_REASON_STOP and json.loads(unary.text) == {}, unary
    free = gen.GenerateUnary(pb.GenerateRequest(model=NAME, chat=chat("Reply in JSON."), sampling=pb.SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True, logit_bias=close)), timeout=120)
    assert free.text == "}" * 4  # what the bias alone gives


@pytest.mark.parametrize("tool_choice", ["get_weather", "required"])
def test_forced_tool_choice_returns_tool_calls(app, hf, tool_choice):
    _, _, _, gen = app
    tok, _ = hf
    # EOS favoured wherever the grammar allows it: a random model might otherwise start call after call.
    req = pb.GenerateRequest(model=NAME, chat=chat("What is the weather in Paris?", tools=[WEATHER],
                                                   tool_choice=tool_choice),
                             sampling=pb.SamplingParams(temperature=0.0, max_tokens=128,
                                                        logit_bias={tok.eos_token_id: 50.0}))
    unary = gen.GenerateUnary(req, timeout=120)
    assert unary.finish_reason == pb.FINISH_REASON_TOOL_CALLS, unary
    assert unary.tool_calls and all(c.name == "get_weather" and c.id for c in unary.tool_calls)
    for c in unary.tool_calls:
        jsonschema.validate(json.loads(c.arguments), WEATHER_SCHEMA)
    # The tools are part of the prompt: Tokenize renders them too.
    tokens = gen.Tokenize(pb.TokenizeRequest(model=NAME, chat=req.chat), timeout=60).token_ids
    no_tools = gen.Tokenize(pb.TokenizeRequest(model=NAME, chat=chat("What is the weather in Paris?")), timeout=60)
    assert len(tokens) == unary.usage.prompt_tokens > len(no_tools.token_ids)
    _, messages = streamed_choices(gen, req)
    assert messages[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    streamed_calls = [c for m in messages for c in m.tool_calls]
    assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in unary.tool_calls]
    # The call and its result as history: the next turn renders (and answers) without tools being forced.
    history = pb.ChatMessages(messages=[
        pb.ChatMessage(role="user", content="What is the weather in Paris?"),
        pb.ChatMessage(role="assistant", tool_calls=unary.tool_calls),
        pb.ChatMessage(role="tool", content="sunny", tool_call_id=unary.tool_calls[0].id)], tools=[WEATHER],
        tool_choice="none")
    answer = gen.GenerateUnary(pb.GenerateRequest(model=NAME, chat=history, sampling=pb.SamplingParams(
        temperature=0.0, max_tokens=4, ignore_eos=True)), timeout=120)
    assert answer.finish_reason == pb.FINISH_REASON_LENGTH and not answer.tool_calls


def _tag(number: int, wire_type: int) -> bytes:
    return _VarintBytes(number << 3 | wire_type)


def test_unknown_fields_are_refused_naming_the_field_number(app):
    """A newer client's option this server does not know must not be silently ignored."""
    _, _, channel, _ = app
    known = request(max_tokens=2).SerializeToString()
    sampling = pb.SamplingParams(max_tokens=2).SerializeToString() + _tag(64, 0) + b"\x01"
    cases = {"specserve.v1.GenerateRequest: unknown field number 99": known + _tag(99, 0) + b"\x01",
             "sampling: unknown field number 64": known + _tag(5, 2) + _VarintBytes(len(sampling)) + sampling}
    unary = channel.unary_unary("/specserve.v1.Generation/GenerateUnary")
    stream = channel.unary_stream("/specserve.v1.Generation/Generate")
    assert pb.GenerateResponse.FromString(unary(known, timeout=60)).token_ids  # raw bytes work when all known
    for details, raw in cases.items():
        for call in (unary, lambda r, timeout: list(stream(r, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as err:
                call(raw, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(details), err.value.details()


@pytest.mark.parametrize("request_kwargs, field", [
    ({"text": "hi", "sampling": pb.SamplingParams(json_schema="{not json")}, "sampling.json_schema"),
    ({"text": "hi", "sampling": pb.SamplingParams(regex="(")}, "sampling.regex"),
    ({"text": "hi", "sampling": pb.SamplingParams(lark="start: undefined_rule")}, "sampling.lark"),
    ({"text": "hi", "sampling": pb.SamplingParams(logprobs=21)}, "sampling.logprobs"),
    ({"text": "hi", "sampling": pb.SamplingParams(n=17)}, "sampling.n"),
    ({"text": "hi", "sampling": pb.SamplingParams(logit_bias={10 ** 6: 1.0})}, "sampling.logit_bias"),
    ({"text": "hi", "sampling": pb.SamplingParams(repetition_penalty=0.0)}, "sampling.repetition_penalty"),
    ({"chat": chat("hi", tools=[WEATHER], tool_choice="nope")}, "chat.tool_choice"),
    ({"chat": chat("hi", tool_choice="required")}, "chat.tool_choice"),
    ({"chat": chat("hi", tools=[pb.Tool(name="bad name")])}, "chat.tools[0].name"),
    ({"chat": chat("hi", tools=[pb.Tool(name="f", parameters_json="[]")])}, "chat.tools[0].parameters_json"),
    ({"chat": chat("hi", tools=[WEATHER], tool_choice="get_weather"),
      "sampling": pb.SamplingParams(json_object=True)}, "sampling.json_object"),
    ({"chat": chat("hi", tools=[WEATHER]), "sampling": pb.SamplingParams(regex="a+")}, "sampling.regex"),
])
def test_invalid_options_are_invalid_argument_naming_the_field(app, request_kwargs, field):
    _, _, _, gen = app
    for call in (gen.GenerateUnary, lambda r, timeout: list(gen.Generate(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(pb.GenerateRequest(model=NAME, **request_kwargs), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert err.value.details().startswith(field + ":"), err.value.details()


def test_http_and_grpc_give_the_same_choices_and_logprobs(app):
    import httpx

    server, _, _, gen = app
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "model": NAME, "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
        "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 3, "n": 2, "return_token_ids": True})
    assert r.status_code == 200, r.text
    over_http = sorted(r.json()["choices"], key=lambda c: c["index"])
    over_grpc = gen.GenerateUnary(pb.GenerateRequest(model=NAME, chat=chat("Name a color."), sampling=pb.SamplingParams(
        temperature=0.0, ignore_eos=True, max_tokens=8, logprobs=3, n=2)), timeout=120).choices
    assert len(over_http) == len(over_grpc) == 2
    for h, g in zip(over_http, over_grpc):
        assert h["token_ids"] == list(g.token_ids) and h["message"]["content"] == g.text
        content = h["logprobs"]["content"]
        assert [c["token"] for c in content] == [e.token for e in g.logprobs]
        for c, e in zip(content, g.logprobs):
            assert abs(c["logprob"] - e.logprob) < TOLERANCE
            assert [t["token"] for t in c["top_logprobs"]] == [t.token for t in e.top]
