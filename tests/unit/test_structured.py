"""The grammar engine (actors/engine/structured.py) with the bundled model's real tokenizer: spec checks, masks that
allow exactly the tokens keeping the constraint satisfiable, draft cutting, draft masks, forks and the mask worker."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from specserve.actors.engine.sampling_params import StructuredOutput
from specserve.actors.engine.structured import (
    GrammarCompiler,
    MaskWorker,
    allocate_masks,
    apply_masks,
    check_structured,
    mask_row,
)
from transformers import AutoTokenizer

MODEL = "/root/.cache/specserve/models/smollm2-135m"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_SPEC = StructuredOutput("json_schema", json.dumps(PERSON))
DATE_REGEX = r"[0-9]{4}-[0-9]{2}-[0-9]{2}( [a-z]{1,8})?"
LARK = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]+/'


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer))


@pytest.fixture(scope="module")
def eos(tokenizer):
    return tokenizer.eos_token_id


def _allowed(row: torch.Tensor, vocab_size: int) -> set[int]:
    bits = ((row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(-1)[:vocab_size]
    return set(bits.nonzero().flatten().tolist())


def _mask_now(matcher, vocab_size: int) -> torch.Tensor:
    masks = allocate_masks(1, vocab_size)
    matcher.fill_masks(masks, 0, [])
    return masks[0]


def _walk(compiler, spec, eos, seed, max_steps=300) -> list[int]:
    """Greedy over random logits under the mask until EOS or the grammar is done: a model that knows nothing."""
    matcher = compiler.matcher(spec)
    generator = torch.Generator().manual_seed(seed)
    tokens = []
    for _ in range(max_steps):
        if matcher.done:
            return tokens
        logits = torch.randn(1, compiler.vocab_size, generator=generator)
        masks = allocate_masks(1, compiler.vocab_size)
        matcher.fill_masks(masks, 0, [])
        apply_masks(logits, masks)
        token = int(logits.argmax())
        matcher.accept([token])
        if token == eos:
            assert matcher.done
            return tokens
        tokens.append(token)
    raise AssertionError(f"no end after {max_steps} tokens: {tokens}")


@pytest.mark.parametrize("spec", [
    PERSON_SPEC,
    StructuredOutput("json_schema", '{"type": "object"}'),
    StructuredOutput("json_schema", "true"),
    StructuredOutput("regex", DATE_REGEX),
    StructuredOutput("lark", LARK),
])
def test_valid_specs_pass(spec, compiler):
    check_structured(spec)
    matcher = compiler.matcher(spec)
    # A fresh matcher of a valid spec can start: not done, and some first token allowed.
    assert not matcher.done
    assert _allowed(_mask_now(matcher, compiler.vocab_size), compiler.vocab_size)


@pytest.mark.parametrize(("spec", "message"), [
    (StructuredOutput("json_schema", "{not json"), "invalid JSON schema: not JSON"),
    (StructuredOutput("json_schema", "[1, 2]"), "invalid JSON schema: must be an object"),
    (StructuredOutput("json_schema", '{"type": "objectx"}'), "invalid JSON schema"),
    (StructuredOutput("json_schema", '{"type": "string", "not": {"type": "integer"}}'), "Unimplemented"),
    (StructuredOutput("json_schema", '{"properties": {"a": {"$ref": "#/nope"}}}'), "nope"),
    (StructuredOutput("regex", "[a-z"), "invalid regular expression"),
    (StructuredOutput("lark", "start: undefined_rule"), "invalid Lark grammar"),
])
def test_invalid_specs_raise_a_clear_error(spec, message, compiler):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_structured(spec)
    with pytest.raises(ValueError, match=re.escape(message)):
        compiler.matcher(spec)


@pytest.mark.parametrize("seed", range(6))
def test_random_walk_under_the_mask_matches_the_regex(seed, compiler, tokenizer, eos):
    text = tokenizer.decode(_walk(compiler, StructuredOutput("regex", DATE_REGEX), eos, seed))
    assert re.fullmatch(DATE_REGEX, text), text


@pytest.mark.parametrize("seed", range(6))
def test_random_walk_under_the_mask_validates_against_the_schema(seed, compiler, tokenizer, eos):
    text = tokenizer.decode(_walk(compiler, PERSON_SPEC, eos, seed))
    jsonschema.validate(json.loads(text), PERSON)
    # JSON_OPTIONS: fixed separators, no free whitespace.
    assert text == json.dumps(json.loads(text), ensure_ascii=False) or "\\" in text, text


@pytest.mark.parametrize("seed", range(3))
def test_random_walk_under_the_mask_parses_with_the_lark_grammar(seed, compiler, tokenizer, eos):
    text = tokenizer.decode(_walk(compiler, StructuredOutput("lark", LARK), eos, seed))
    assert re.fullmatch(r"yes|no|maybe [0-9]+", text), text


def test_the_mask_allows_only_tokens_that_keep_the_schema_satisfiable(compiler, tokenizer, eos):
    matcher = compiler.matcher(PERSON_SPEC)
    every_token = range(compiler.vocab_size)
    for prefix, forced in [("", True), ('{"name": "Al', False), ('{"name": "Al", "age": 4', False)]:
        state = matcher.fork()
        state.accept(tokenizer.encode(prefix))
        allowed = _allowed(_mask_now(state, compiler.vocab_size), compiler.vocab_size)
        valid = {token for token in every_token if state.valid_prefix([token]) == 1}
        # Where the grammar forces text ('{"name": "'), llguidance allows its canonical tokens only.
        assert allowed < valid if forced else allowed == valid, prefix
        assert eos not in allowed
    state = matcher.fork()
    state.accept(tokenizer.encode('{"name": "Al", "age": 4}'))
    assert _allowed(_mask_now(state, compiler.vocab_size), compiler.vocab_size) == {eos}  # accepting: EOS only
    state.accept([eos])
    assert state.done


def test_valid_prefix_cuts_a_violating_draft_where_it_violates(compiler, tokenizer):
    matcher = compiler.matcher(PERSON_SPEC)
    good = tokenizer.encode('{"name": "Al", "age": ')
    bad = tokenizer.encode('{"name": "Al", "agx": ')
    assert matcher.valid_prefix(good) == len(good)
    # The tokens that lie wholly in the longest valid text, '... "ag'; the one with the 'x' is cut.
    cut = max(k for k in range(len(bad) + 1) if '{"name": "Al", "ag'.startswith(tokenizer.decode(bad[:k])))
    assert 0 < cut < len(bad)
    assert matcher.valid_prefix(bad) == cut
    assert matcher.valid_prefix(bad) == cut  # the state did not move
    assert matcher.valid_prefix(good) == len(good)
    digits = compiler.matcher(StructuredOutput("regex", "[0-9]{1,3}"))
    assert digits.valid_prefix(tokenizer.encode("12x4")) == 2


def test_eos_is_allowed_once_the_grammar_accepts_and_ends_it(compiler, tokenizer, eos):
    digits = compiler.matcher(StructuredOutput("regex", "[0-9]{1,3}"))
    assert digits.valid_prefix([eos]) == 0  # nothing matched yet
    digits.accept(tokenizer.encode("12"))
    assert not digits.done
    assert digits.valid_prefix([eos, tokenizer.encode("3")[0]]) == 1  # nothing after EOS
    full = digits.fork()
    full.accept(tokenizer.encode("3"))
    assert full.done  # three digits: nothing may follow but EOS
    assert _allowed(_mask_now(full, compiler.vocab_size), compiler.vocab_size) == {eos}
    assert full.valid_prefix([eos]) == 1
    full.accept([eos])
    assert full.done
    digits.accept([eos])
    assert digits.done


def test_accept_refuses_a_disallowed_token_and_keeps_the_state(compiler, tokenizer):
    digits = compiler.matcher(StructuredOutput("regex", "[0-9]{1,3}"))
    before = _mask_now(digits, compiler.vocab_size)
    with pytest.raises(ValueError, match="violates the grammar"):
        digits.accept(tokenizer.encode("1x"))
    assert torch.equal(_mask_now(digits, compiler.vocab_size), before)
    digits.accept(tokenizer.encode("1"))


@pytest.mark.parametrize(("prefix", "draft_text", "end_with_eos"), [
    ("", '{"name": "Bo", "age"', False),
    ('{"name": "Bo", "age": 3', "1}", True),
    ("12", "3", True),  # the regex is done before the EOS
    ("", "", False),
])
def test_draft_masks_equal_stepwise_masks(prefix, draft_text, end_with_eos, compiler, tokenizer, eos):
    spec = StructuredOutput("regex", "[0-9]{1,3}") if prefix == "12" else PERSON_SPEC
    matcher = compiler.matcher(spec)
    matcher.accept(tokenizer.encode(prefix))
    draft = tokenizer.encode(draft_text) + ([eos] if end_with_eos else [])
    masks = allocate_masks(2 + len(draft), compiler.vocab_size)
    matcher.fill_masks(masks, 1, draft)
    assert torch.equal(masks[0], allocate_masks(1, compiler.vocab_size)[0])  # rows outside are untouched
    stepwise = matcher.fork()
    for i in range(len(draft) + 1):
        if stepwise.done:
            expected = mask_row([eos], compiler.vocab_size)
        else:
            expected = _mask_now(stepwise, compiler.vocab_size)
        assert torch.equal(masks[1 + i], expected), i
        if i < len(draft):
            stepwise.accept(draft[i:i + 1])
    assert torch.equal(_mask_now(matcher, compiler.vocab_size), masks[1])  # the state is unchanged


def test_fill_masks_refuses_an_invalid_draft(compiler, tokenizer):
    matcher = compiler.matcher(StructuredOutput("regex", "[0-9]{1,3}"))
    with pytest.raises(ValueError, match="valid draft"):
        matcher.fill_masks(allocate_masks(4, compiler.vocab_size), 0, tokenizer.encode("1x2"))


def test_forks_are_independent(compiler, tokenizer):
    original = compiler.matcher(PERSON_SPEC)
    original.accept(tokenizer.encode('{"name": "'))
    before = _mask_now(original, compiler.vocab_size)
    fork = original.fork()
    fork.accept(tokenizer.encode('Al", "age": 4'))
    assert torch.equal(_mask_now(original, compiler.vocab_size), before)
    assert not torch.equal(_mask_now(fork, compiler.vocab_size), before)
    original.accept(tokenizer.encode('Zed"'))
    assert fork.valid_prefix(tokenizer.encode("}")) == 1
    assert original.valid_prefix(tokenizer.encode("}")) == 0  # "age" is required


def test_mask_worker_equals_fill_masks(compiler, tokenizer, eos):
    person = compiler.matcher(PERSON_SPEC)
    person.accept(tokenizer.encode('{"name": "Bo", "age": 3'))
    digits_done = compiler.matcher(StructuredOutput("regex", "[0-9]{1,3}"))
    digits_done.accept(tokenizer.encode("12"))
    items = [
        (compiler.matcher(PERSON_SPEC), tokenizer.encode('{"name": "Al')),
        (person, tokenizer.encode("1}") + [eos]),
        (compiler.matcher(StructuredOutput("regex", DATE_REGEX)), []),
        (digits_done, tokenizer.encode("3") + [eos]),
        (compiler.matcher(StructuredOutput("lark", LARK)), tokenizer.encode("maybe 4")),
    ]
    expected = allocate_masks(sum(1 + len(draft) for _, draft in items), compiler.vocab_size)
    row = 0
    for matcher, draft in items:
        matcher.fill_masks(expected, row, draft)
        row += 1 + len(draft)
    worker = MaskWorker(compiler, threads=2)
    try:
        assert torch.equal(worker.start(items).result(), expected)
        assert torch.equal(worker.start(items).result(), expected)  # the states did not move
        with pytest.raises(ValueError, match="valid drafts"):
            worker.start([(digits_done, tokenizer.encode("3x"))]).result()
    finally:
        worker.close()


def test_ids_past_the_tokenizer_are_never_allowed(tokenizer):
    wide = GrammarCompiler(tokenizer, len(tokenizer) + 40)
    anything = wide.matcher(StructuredOutput("regex", r"(.|\n)*"))
    allowed = _allowed(_mask_now(anything, wide.vocab_size), wide.vocab_size)
    assert max(allowed) < len(tokenizer)
    assert len(allowed) > len(tokenizer) // 2
    masks = allocate_masks(2, wide.vocab_size)
    anything.fill_masks(masks, 0, [])
    mask_width = masks.shape[1] * 32
    logits = torch.zeros(2, mask_width + 7)  # wider still than the mask's words
    apply_masks(logits, masks)
    finite = set(torch.isfinite(logits[0]).nonzero().flatten().tolist())
    assert finite == allowed
    assert torch.isfinite(logits[1, :mask_width]).all()  # an unfilled row constrains nothing
    assert torch.isinf(logits[1, mask_width:]).all()
    with pytest.raises(ValueError, match="below the tokenizer"):
        GrammarCompiler(tokenizer, len(tokenizer) - 1)
