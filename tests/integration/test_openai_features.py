"""OpenAI API features through real Ray Serve and real HTTP, with the official `openai` client: logprobs (checked
against a float32 Hugging Face forward), echo, n choices, penalties, min_p, logit_bias, structured outputs and tool
calls, streaming and not, with n-gram speculation on (the served default)."""

import json
import re

import jsonschema
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from served_apps import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-features"
TOL = 1e-4  # logprobs vs the float32 reference
# Bounded everywhere (enum, integer range, string length): a random model completes it within max_tokens.
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "note": {"type": "string", "maxLength": 6}},
          "required": ["city", "days", "note"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": SCHEMA}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "Time in a zone.",
                                          "parameters": {"type": "object", "properties": {
                                              "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                                              "additionalProperties": False}}}


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="qwen2", seed=11)
    # A longer window than the tiny models' 512: the tools' description alone is ~800 byte-level tokens.
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    # Non-adaptive speculation: every round drafts what the n-gram proposer finds, whatever the timings.
    server = start_app(ray_cluster, str(path), NAME, **{"engine.block_size": 4, "engine.num_blocks": 800,
                                                       "speculative.adaptive": False})
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    yield client, path
    server.stop()


@pytest.fixture(scope="module")
def hf(app):
    _, path = app
    return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(path))


def chat_prompt_ids(tok, content: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    return tok(text, add_special_tokens=False).input_ids


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V]: row i is the float32 log_softmax of the logits after ids[:i + 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def greedy_tokens(client, prompt: str, max_tokens: int, **extra) -> list[int]:
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True, **extra})
    return r.choices[0].token_ids


def streamed(chunks):
    """A streamed response's chunks by choice index, and its usage (the last chunk's)."""
    by_index, usage = {}, None
    for c in chunks:
        if c.usage is not None:
            usage = c.usage
        for ch in c.choices:
            by_index.setdefault(ch.index, []).append(ch)
    return by_index, usage


# ---- logprobs ----------------------------------------------------------------------------------------------------
def test_chat_logprobs_match_a_float32_forward(app, hf):
    client, _ = app
    model, tok = hf
    content = "Tell me a story about a fox."
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], max_tokens=10,
                                       temperature=0, logprobs=True, top_logprobs=3,
                                       extra_body={"return_token_ids": True})
    choice = r.choices[0]
    out_ids = choice.token_ids
    prompt_ids = chat_prompt_ids(tok, content)
    ref = reference_logprobs(model, prompt_ids + out_ids)
    entries = choice.logprobs.content
    assert len(entries) == len(out_ids) > 0
    for pos, (token_id, entry) in enumerate(zip(out_ids, entries)):
        row = ref[len(prompt_ids) + pos - 1]
        assert entry.token == tok.decode([token_id]) and entry.bytes == list(entry.token.encode())
        assert abs(entry.logprob - row[token_id].item()) < TOL
        top = torch.topk(row, 3)
        assert [t.token for t in entry.top_logprobs] == [tok.decode([i]) for i in top.indices.tolist()]
        assert all(abs(t.logprob - v) < TOL for t, v in zip(entry.top_logprobs, top.values.tolist()))
    assert entries[0].top_logprobs[0].logprob == max(t.logprob for t in entries[0].top_logprobs)

    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                            max_tokens=10, temperature=0, logprobs=True, top_logprobs=3,
                                            stream=True)
    chunks, _ = streamed(stream)
    streamed_entries = [e for ch in chunks[0] if ch.logprobs for e in ch.logprobs.content or []]
    assert [(e.token, round(e.logprob, 4)) for e in streamed_entries] == \
        [(e.token, round(e.logprob, 4)) for e in entries]
    assert "".join(ch.delta.content or "" for ch in chunks[0]) == choice.message.content


def test_completion_echo_with_logprobs_scores_the_prompt(app, hf):
    client, _ = app
    model, tok = hf
    prompt = "one two three, one two three, one two three, one two"
    # A logit_bias repeats one token, so n-gram drafts are proposed and verified; logprobs stay the raw model's.
    bias = {str(tok(" three").input_ids[-1]): 100}
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, echo=True, logprobs=2,
                                  logit_bias=bias, extra_body={"return_token_ids": True, "ignore_eos": True})
    choice = r.choices[0]
    prompt_ids = tok(prompt).input_ids
    ids = prompt_ids + choice.token_ids
    assert choice.text.startswith(prompt) and choice.text == prompt + tok.decode(choice.token_ids)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(model, ids)
    for pos in range(1, len(ids)):
        assert abs(lp.token_logprobs[pos] - ref[pos - 1, ids[pos]].item()) < TOL, pos
        top = torch.topk(ref[pos - 1], 2)
        # A dict keyed by token text (OpenAI's format): two byte tokens that decode alike share one key.
        assert list(lp.top_logprobs[pos]) == list(dict.fromkeys(tok.decode([i]) for i in top.indices.tolist()))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == 16
    assert r.usage.model_extra["speculation"]["draft_tokens"] > 0  # the values come from verified drafts too

    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, echo=True,
                                       logprobs=2, logit_bias=bias, stream=True, extra_body={"ignore_eos": True})
    chunks, _ = streamed(stream)
    assert "".join(ch.text for ch in chunks[0]) == choice.text
    assert [t for ch in chunks[0] if ch.logprobs for t in ch.logprobs.tokens] == lp.tokens
    assert [o for ch in chunks[0] if ch.logprobs for o in ch.logprobs.text_offset] == lp.text_offset
    streamed_lps = [v for ch in chunks[0] if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert streamed_lps[0] is None and all(abs(a - b) < TOL for a, b in zip(streamed_lps[1:], lp.token_logprobs[1:]))


# ---- n choices ---------------------------------------------------------------------------------------------------
def test_n_choices_with_indices_usage_and_per_choice_seeds(app):
    client, _ = app
    body = dict(model=NAME, prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=42, n=3,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(**body)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 24  # OpenAI counts every choice
    assert len({tuple(c.token_ids) for c in r.choices}) > 1  # each choice samples on its own
    again = client.completions.create(**body)
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in r.choices]  # seeded per choice

    stream = client.completions.create(**{**body, "extra_body": {"ignore_eos": True}}, stream=True,
                                       stream_options={"include_usage": True})
    chunks, usage = streamed(stream)
    assert sorted(chunks) == [0, 1, 2]
    for i, pieces in chunks.items():
        assert [p.finish_reason for p in pieces if p.finish_reason] == ["length"]
        assert "".join(p.text for p in pieces) == r.choices[i].text
    assert usage.completion_tokens == 24

    greedy = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], n=2,
                                            max_tokens=6, temperature=0, logprobs=True)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    chunks, usage = streamed(client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=6, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True}))
    for i in (0, 1):
        assert chunks[i][0].delta.role == "assistant"
        assert "".join(ch.delta.content or "" for ch in chunks[i]) == greedy.choices[i].message.content
        assert [e.token for ch in chunks[i] if ch.logprobs for e in ch.logprobs.content] == \
            [e.token for e in greedy.choices[i].logprobs.content]
    assert usage.completion_tokens == greedy.usage.completion_tokens


# ---- sampling controls -------------------------------------------------------------------------------------------
def test_logit_bias_forces_a_token_streaming_or_not(app, hf):
    client, _ = app
    _, tok = hf
    forced = tok(" fox", add_special_tokens=False).input_ids[-1]
    body = dict(model=NAME, prompt="The quick brown", max_tokens=6, temperature=1.0,
                logit_bias={str(forced): 100}, extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.completions.create(**body)
    assert r.choices[0].token_ids == [forced] * 6
    chunks, _ = streamed(client.completions.create(**body, stream=True))
    assert [t for ch in chunks[0] for t in (ch.token_ids or [])] == [forced] * 6
    banned = greedy_tokens(client, "The quick brown", 4)[0]
    unbanned = greedy_tokens(client, "The quick brown", 4, logit_bias={str(banned): -100})
    assert banned not in unbanned


def test_min_p_one_keeps_only_the_top_token(app):
    client, _ = app
    greedy = greedy_tokens(client, "Count: one, two, three,", 10)
    r = client.completions.create(model=NAME, prompt="Count: one, two, three,", max_tokens=10, temperature=1.0,
                                  seed=3, extra_body={"min_p": 1.0, "ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].token_ids == greedy


def test_penalties_match_a_reference_greedy_loop(app, hf):
    client, _ = app
    model, tok = hf
    prompt = "def add(a, b):"
    prompt_ids = tok(prompt).input_ids

    def reference(steps, *, presence=0.0, frequency=0.0, repetition=1.0):
        ids = list(prompt_ids)
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].float()
            if repetition != 1.0:  # CTRL: over the prompt and the output
                seen = torch.tensor(sorted(set(ids)))
                vals = logits[seen]
                logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
            counts = torch.bincount(torch.tensor(ids[len(prompt_ids):], dtype=torch.long),
                                    minlength=logits.shape[0]).float()
            logits -= frequency * counts + presence * (counts > 0).float()
            ids.append(int(logits.argmax()))
        return ids[len(prompt_ids):]

    steps = 12
    for options in ({"frequency_penalty": 1.5}, {"presence_penalty": 2.0}, {"repetition_penalty": 1.8},
                    {"frequency_penalty": 0.5, "presence_penalty": 0.5}):
        got = greedy_tokens(client, prompt, steps, **options)
        expected = reference(steps, presence=options.get("presence_penalty", 0.0),
                             frequency=options.get("frequency_penalty", 0.0),
                             repetition=options.get("repetition_penalty", 1.0))
        assert got == expected, options


def test_min_tokens_masks_the_stop_tokens_until_reached(app):
    client, _ = app
    first = greedy_tokens(client, "Hello there!", 1)[0]
    r = client.completions.create(model=NAME, prompt="Hello there!", max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": [first], "min_tokens": 3, "return_token_ids": True})
    ids = r.choices[0].token_ids
    assert len(ids) >= 3 and first not in ids[:3]


# ---- structured outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_outputs_validate(app, stream):
    client, _ = app
    response_format = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Plan a trip."}], max_tokens=120,
                      temperature=1.0, seed=seed, response_format=response_format)
        if stream:
            chunks, _ = streamed(client.chat.completions.create(**kwargs, stream=True))
            text = "".join(ch.delta.content or "" for ch in chunks[0])
            reason = [ch.finish_reason for ch in chunks[0] if ch.finish_reason][0]
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_regex_choice_and_grammar(app):
    client, _ = app

    def complete(**extra):
        r = client.completions.create(model=NAME, prompt="Answer:", max_tokens=60, temperature=1.0, seed=1,
                                      extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r.choices[0].text
        return r.choices[0].text

    assert isinstance(json.loads(complete(response_format={"type": "json_object"})), dict)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", complete(guided_regex=r"[0-9]{3}-[a-z]{2}"))
    assert complete(guided_choice=["yes", "no", "maybe so"]) in ("yes", "no", "maybe so")
    assert re.fullmatch(r"(ab)+!", complete(guided_grammar='start: item+ "!"\nitem: "ab"'))


# ---- tools -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_choice_gives_calls_the_client_parses(app, tool_choice):
    client, _ = app
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, CLOCK],
                                       tool_choice=tool_choice, max_tokens=200, temperature=1.0, seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        if isinstance(tool_choice, dict):
            assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])

    # A conversation that carries the calls and their results back is accepted.
    history = messages + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": c.id, "content": "sunny"} for c in choice.message.tool_calls]
    follow = client.chat.completions.create(model=NAME, messages=history, tools=[WEATHER, CLOCK], tool_choice="none",
                                            max_tokens=5, temperature=0)
    assert follow.choices[0].finish_reason in ("stop", "length") and not follow.choices[0].message.tool_calls

    stream = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, CLOCK],
                                            tool_choice=tool_choice, max_tokens=200, temperature=1.0, seed=5,
                                            stream=True)
    chunks, _ = streamed(stream)
    deltas = [d for ch in chunks[0] for d in ch.delta.tool_calls or []]
    # Seeded: the same calls as the non-streamed request (their ids are new).
    assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == \
        [(i, c.function.name, json.loads(c.function.arguments)) for i, c in enumerate(choice.message.tool_calls)]
    assert all(d.id.startswith("call_") and d.type == "function" for d in deltas)
    assert [ch.finish_reason for ch in chunks[0] if ch.finish_reason] == ["tool_calls"]


def test_no_parallel_tool_calls_gives_one_call(app):
    client, _ = app
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Time?"}],
                                       tools=[WEATHER, CLOCK], tool_choice="required", parallel_tool_calls=False,
                                       max_tokens=200, temperature=1.0, seed=7)
    assert len(r.choices[0].message.tool_calls) == 1 and r.choices[0].finish_reason == "tool_calls"


# ---- errors ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_choice"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"n": 2, "extra_body": {"best_of": 3}}, "best_of"),
    ({"extra_body": {"echo": True}}, "echo"),
])
def test_unsupported_combinations_are_refused_by_name(app, kwargs, param):
    client, _ = app
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       **kwargs)
    error = info.value.body
    assert error["param"] == param and error["message"].startswith(param), error


def test_completion_logprobs_above_five_are_refused(app):
    client, _ = app
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, logprobs=6)
    assert info.value.body["param"] == "logprobs"
