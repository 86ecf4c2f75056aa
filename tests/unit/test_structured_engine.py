"""Grammar-constrained generation in the engine (a tiny random model with SmolLM2's tokenizer): the text always
matches the regex / parses as JSON of the schema, greedy output is the same with and without speculation, and a
draft that breaks the grammar is cut before it reaches verification."""

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from specserve.actors.draft.ngram import NgramDrafter
from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.sampling_params import SamplingParams, StructuredOutput
from specserve.actors.engine.speculation import Draft, SpeculationController
from specserve.actors.engine.structured import GrammarCompiler

TOKENIZER = "/root/.cache/specserve/models/smollm2-135m"
REGEX = r"[0-9]{3}-[a-z]{2,4}( [a-z]{1,3}){0,2}"
SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog", "bird"]}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["kind", "ok", "tags"], "additionalProperties": False}
SPECS = [StructuredOutput("regex", REGEX), StructuredOutput("json_schema", json.dumps(SCHEMA))]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, 49152, [tokenizer.eos_token_id])


def tiny_model():
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def engine(tokenizer, compiler, proposer=None):
    return LLMEngine(tiny_model(), block_size=4, num_blocks=400, max_num_seqs=8, max_num_batched_tokens=32,
                     eos_token_ids=[tokenizer.eos_token_id], grammar_compiler=compiler, proposer=proposer,
                     controller=SpeculationController(3, adaptive=False) if proposer else None)


def prompts(tokenizer):
    texts = ["Give me a code: ", "The answer, as JSON, is", "one two one two one two", "Animals: cat dog cat"]
    return [tokenizer.encode(t) for t in texts]


def run(eng, ps, params):
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"r{i}", p, sp)
    out = {f"r{i}": [] for i in range(len(ps))}
    reasons = {}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id].extend(o.new_token_ids)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    return [out[f"r{i}"] for i in range(len(ps))], [reasons[f"r{i}"] for i in range(len(ps))]


def check_text(tokenizer, spec, tokens, reason):
    assert reason == "stop", (reason, tokenizer.decode(tokens))
    if tokens and tokens[-1] == tokenizer.eos_token_id:
        tokens = tokens[:-1]
    text = tokenizer.decode(tokens)
    if spec.kind == "regex":
        assert re.fullmatch(REGEX, text), text
    else:
        value = json.loads(text)
        assert set(value) == {"kind", "ok", "tags"} and value["kind"] in SCHEMA["properties"]["kind"]["enum"]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_generation_always_matches_the_grammar(tokenizer, compiler, temperature):
    eng = engine(tokenizer, compiler)
    ps = prompts(tokenizer) * 2
    params = [SamplingParams(max_tokens=60, temperature=temperature, structured=SPECS[i % 2], seed=i,
                             frequency_penalty=0.5 * (i % 3 == 0)) for i in range(len(ps))]
    outs, reasons = run(eng, ps, params)
    for sp, tokens, reason in zip(params, outs, reasons):
        check_text(tokenizer, sp.structured, tokens, reason)
    eng.block_manager.check_invariants()


class CorruptingProposer:
    """Drafts the known greedy continuation with its second token replaced by one the grammar never allows (an
    uppercase letter fits neither the regex nor the schema's JSON), so every draft has a valid prefix to accept
    and a violation after it."""

    drafts_are_free = True
    prior_acceptance = 0.9
    observes_target = 0

    def __init__(self, continuations: dict[str, list[int]], bad: int):
        self.continuations, self.bad = continuations, bad

    def propose(self, seqs, ks):
        drafts = []
        for seq, k in zip(seqs, ks):
            done = seq.token_ids[seq.num_prompt_tokens:]
            rest = self.continuations[seq.request_id][len(done):len(done) + max(k, 2)]
            drafts.append(Draft(rest[:1] + [self.bad] + rest[2:]) if rest else None)
        return drafts

    def observe(self, seq, input_tokens, guesses):
        pass

    def release(self, seq):
        pass


def test_greedy_is_identical_with_speculation_and_violating_drafts_never_reach_verification(tokenizer, compiler):
    ps = prompts(tokenizer)
    params = [SamplingParams(max_tokens=40, temperature=0, structured=SPECS[i % 2]) for i in range(len(ps))]
    want, reasons = run(engine(tokenizer, compiler), ps, params)
    for sp, tokens, reason in zip(params, want, reasons):
        check_text(tokenizer, sp.structured, tokens, reason)

    bad = tokenizer.convert_tokens_to_ids("Q")
    for proposer in (NgramDrafter(1, 3, recycle=True), CorruptingProposer({f"r{i}": w for i, w in enumerate(want)}, bad)):
        eng = engine(tokenizer, compiler, proposer)
        verified = []
        execute = eng.runner.execute

        def checked_execute(batch, execute=execute, verified=verified):
            for item in batch:
                if item.num_draft:
                    draft = item.seq.draft.tokens
                    assert item.seq.grammar.valid_prefix(draft) == len(draft), "a violating draft was verified"
                    verified.extend(draft)
            return execute(batch)

        eng.runner.execute = checked_execute
        got, _ = run(eng, ps, params)
        assert got == want
        if isinstance(proposer, CorruptingProposer):
            assert verified and bad not in verified
            assert eng.spec_stats.accepted_tokens > 0


def test_min_tokens_ends_where_the_grammar_allows_nothing_but_eos(tokenizer, compiler):
    params = SamplingParams(max_tokens=40, temperature=0, structured=StructuredOutput("regex", "[0-9]{3}"),
                            min_tokens=20)
    (tokens,), (reason,) = run(engine(tokenizer, compiler), prompts(tokenizer)[:1], [params])
    assert reason == "stop" and re.fullmatch("[0-9]{3}", tokenizer.decode(tokens, skip_special_tokens=True))


def test_structured_requests_need_a_compiler_and_a_valid_grammar(tokenizer, compiler):
    plain = LLMEngine(tiny_model(), block_size=4, num_blocks=64)
    with pytest.raises(RequestRejected, match="structured output"):
        plain.add_request("a", [1, 2, 3], SamplingParams(structured=SPECS[0]))
    with pytest.raises(RequestRejected, match="regular expression"):
        engine(tokenizer, compiler).add_request("b", [1, 2], SamplingParams(structured=StructuredOutput("regex", "(")))
