"""n > 1 choices per request: one prefill of the prompt, its KV blocks shared by every choice (LLMEngine._fork,
BlockManager.fork), each choice an ordinary sequence afterwards (preemption, speculation, abort)."""

from collections import defaultdict

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.draft.ngram import NgramDrafter
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.block_manager import BlockManager, NoFreeBlocksError
from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.sequence import Sequence
from tiny_models import make_tiny_model

BLOCK = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="llama", seed=1)


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=ATTN_IMPLEMENTATION).eval()


@pytest.fixture(scope="module")
def model(model_path):
    return load(model_path)


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]
    return [p + p[: len(p) // 2] for p in ps]  # repeated spans: the n-gram drafter has something to find


def run(engine, requests: dict[str, tuple[list[int], SamplingParams]], *, added: bool = False,
        outputs=()) -> dict[tuple[str, int], list[int]]:
    """Run the requests to the end (`added`: already added, with `outputs` the steps' so far): each choice's
    tokens by (request id, choice index). Checks that each choice finishes exactly once, in its last output,
    that the outputs' counters are the choice's own, and that everything is freed at the end."""
    if not added:
        for rid, (prompt, params) in requests.items():
            engine.add_request(rid, prompt, params)
    tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
    finished: set[tuple[str, int]] = set()
    steps = [list(outputs)]
    while engine.has_unfinished():
        steps.append(engine.step())
    for step in steps:
        for out in step:
            key = (out.request_id, out.index)
            assert key not in finished, f"output after the end of choice {key}"
            tokens[key].extend(out.new_token_ids)
            assert out.num_output_tokens == len(tokens[key])
            assert out.num_prompt_tokens == len(requests[out.request_id][0])
            if out.finished:
                finished.add(key)
    expected = {(rid, i) for rid, (_, params) in requests.items() for i in range(params.n)}
    assert finished == expected
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.seqs
    return dict(tokens)


def greedy(max_tokens, n=1):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, n=n)


def test_greedy_choices_all_equal_the_single_choice_output(model):
    ps = prompts([5, 8, 13, 1])  # the last prompt token alone in its block (9: 8 + 1), at a block's end (12)...
    ps.append([7])  # ... and a one-token prompt
    single = run(LLMEngine(model, block_size=BLOCK, num_blocks=256), {f"r{i}": (p, greedy(10)) for i, p in enumerate(ps)})
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=256, max_num_batched_tokens=16)
    many = run(engine, {f"r{i}": (p, greedy(10, n=4)) for i, p in enumerate(ps)})
    for i in range(len(ps)):
        for choice in range(4):
            assert many[(f"r{i}", choice)] == single[(f"r{i}", 0)], f"prompt {i} choice {choice} diverged"
    # One prefill per prompt: each other choice recomputes only the last prompt token.
    assert engine.stats.prompt_tokens == sum(len(p) for p in ps) + 3 * len(ps)


def test_seeded_choices_repeat_across_runs_and_differ_from_each_other(model):
    prompt = prompts([11])[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True, n=3)
    first = run(LLMEngine(model, block_size=BLOCK, num_blocks=128), {"s": (prompt, params)})
    # Other traffic in the batch changes nothing: each choice has its own generator.
    second = run(LLMEngine(model, block_size=BLOCK, num_blocks=128),
                 {"x": (prompts([20], seed=5)[0], SamplingParams(max_tokens=6, temperature=1.0)),
                  "s": (prompt, params)})
    assert all(first[("s", i)] == second[("s", i)] for i in range(3))
    assert len({tuple(first[("s", i)]) for i in range(3)}) == 3
    # Choice 0 samples as the request with n = 1 and the same seed does.
    alone = run(LLMEngine(model, block_size=BLOCK, num_blocks=128),
                {"s": (prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True))})
    assert first[("s", 0)] == alone[("s", 0)]


def test_choices_hold_one_copy_of_the_prompt(model):
    prompt = prompts([7])[0]  # 10 tokens: blocks 0 and 1 full, block 2 holds the last two
    n = 3
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=64)
    bm = engine.block_manager
    request = {"p": (prompt, greedy(2, n=n))}
    engine.add_request("p", *request["p"])
    first = engine.step()  # prefills the prompt and forks
    seqs = engine.seqs["p"]
    assert [s.index for s in seqs] == list(range(n))
    shared = (len(prompt) - 1) // BLOCK
    # The full blocks before the last prompt token's are shared; each choice has its own block after them
    # (the parent's, holding its first token next; a copy for the others, where they recompute the last token).
    held = bm.num_blocks - bm.num_free_blocks
    assert held == shared + n * 1
    assert all(s.block_table[:shared] == seqs[0].block_table[:shared] for s in seqs)
    assert all(bm.ref_counts[b] == n for b in seqs[0].block_table[:shared])
    assert len({s.block_table[shared] for s in seqs}) == n
    assert all(s.num_computed_tokens == len(prompt) - 1 for s in seqs[1:])
    bm.check_invariants()
    out = run(engine, request, added=True, outputs=first)
    assert len({tuple(t) for t in out.values()}) == 1 and len(out) == n


@pytest.mark.parametrize("prompt_len", [1, 4, 9, 10])
def test_block_manager_fork_shares_the_blocks_before_the_last_prompt_token(prompt_len):
    bm = BlockManager(8, BLOCK)
    params = greedy(4, n=2)
    parent = Sequence("r", list(range(3, 3 + prompt_len)), params)
    bm.allocate(parent)
    parent.num_computed_tokens = prompt_len
    child = Sequence("r", parent.token_ids, params, index=1)
    copy = bm.fork(parent, child)
    last_block = (prompt_len - 1) // BLOCK
    assert child.block_table[:last_block] == parent.block_table[:last_block]
    assert child.block_table[last_block] not in parent.block_table and len(child.block_table) == last_block + 1
    assert child.num_computed_tokens == prompt_len - 1
    # A copy only when the child's block must hold earlier prompt tokens besides the one it recomputes.
    assert copy == ((parent.block_table[last_block], child.block_table[last_block])
                    if (prompt_len - 1) % BLOCK else None)
    bm.check_invariants()
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8


def test_block_manager_fork_without_a_free_block_leaves_the_child_without_blocks():
    bm = BlockManager(3, BLOCK)
    parent = Sequence("r", list(range(3, 13)), greedy(2, n=2))  # 10 tokens: all 3 blocks
    bm.allocate(parent)
    child = Sequence("r", parent.token_ids, parent.params, index=1)
    with pytest.raises(NoFreeBlocksError):
        bm.fork(parent, child)
    assert child.block_table == [] and all(bm.ref_counts[b] == 1 for b in parent.block_table)
    bm.check_invariants()


def test_abort_mid_way_frees_every_choice(model):
    # Before the fork (the prompt is still being prefilled: 2 chunks of 8): no choice is started later.
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=64, max_num_batched_tokens=8)
    bm = engine.block_manager
    engine.add_request("early", prompts([11])[0], greedy(20, n=3))
    engine.step()
    assert engine.abort_request("early")
    assert not engine.has_unfinished() and not engine.seqs
    for _ in range(3):
        assert engine.step() == []
    # After the fork, mid-way through decoding.
    engine.add_request("late", prompts([11])[0], greedy(20, n=4))
    for _ in range(5):
        engine.step()
    assert len(engine.seqs["late"]) == 4 and bm.num_free_blocks < bm.num_blocks
    assert engine.abort_request("late")
    assert not engine.abort_request("late")
    assert not engine.has_unfinished() and not engine.seqs
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks


def test_choices_survive_preemption_token_identical(model):
    ps = prompts([16, 14, 18], seed=3)
    single = run(LLMEngine(model, block_size=BLOCK, num_blocks=256),
                 {f"r{i}": (p, greedy(16)) for i, p in enumerate(ps)})
    # 3 requests x 3 choices of ~40 tokens each in 40 blocks of 4: choices are preempted and recompute their
    # prompt and output (hitting the prefix cache).
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=40, max_num_batched_tokens=32)
    many = run(engine, {f"r{i}": (p, greedy(16, n=3)) for i, p in enumerate(ps)})
    assert engine.stats.preemptions > 0
    for i in range(len(ps)):
        for choice in range(3):
            assert many[(f"r{i}", choice)] == single[(f"r{i}", 0)], f"prompt {i} choice {choice} diverged"


def test_choices_without_a_sequence_slot_wait_and_hit_the_prefix_cache(model):
    ps = prompts([13, 10], seed=4)
    single = run(LLMEngine(model, block_size=BLOCK, num_blocks=256),
                 {f"r{i}": (p, greedy(8)) for i, p in enumerate(ps)})
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=256, max_num_seqs=2)
    many = run(engine, {f"r{i}": (p, greedy(8, n=4)) for i, p in enumerate(ps)})
    assert engine.block_manager.prefix_hits > 0
    for i in range(len(ps)):
        for choice in range(4):
            assert many[(f"r{i}", choice)] == single[(f"r{i}", 0)], f"prompt {i} choice {choice} diverged"


def test_choices_with_speculation_stay_token_identical(model):
    ps = prompts([9, 14, 6], seed=7)
    single = run(LLMEngine(model, block_size=BLOCK, num_blocks=256),
                 {f"r{i}": (p, greedy(24)) for i, p in enumerate(ps)})
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=256, proposer=NgramDrafter(1, 3, recycle=True))
    many = run(engine, {f"r{i}": (p, greedy(24, n=3)) for i, p in enumerate(ps)})
    assert engine.controller.method_stats.draft_tokens > 0
    for i in range(len(ps)):
        for choice in range(3):
            assert many[(f"r{i}", choice)] == single[(f"r{i}", 0)], f"prompt {i} choice {choice} diverged"
    assert not engine.proposer.indexes  # each choice's n-gram index was its own, and released


def test_admission_counts_every_choice(model):
    engine = LLMEngine(model, block_size=BLOCK, num_blocks=16, max_model_len=100)  # 64 tokens of KV
    with pytest.raises(RequestRejected, match=r"n \(4\) \* max_tokens \(14\) = 66 tokens exceeds the KV cache"):
        engine.add_request("big", list(range(3, 13)), greedy(14, n=4))
    engine.add_request("fits", list(range(3, 13)), greedy(14, n=3))  # 10 + 3 * 14 = 52
    # An open max_tokens gives each choice its share of the pool: (64 - 10) // 4 = 13.
    engine.add_request("open", list(range(3, 13)), SamplingParams(max_tokens=None, n=4, temperature=0))
    assert engine.seqs["open"][0].params.max_tokens == 13


def test_every_choice_keeps_to_the_grammar(tmp_path):
    """Each choice gets a fork of the parent's grammar state taken at the end of the prompt."""
    import re

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from specserve.actors.engine.sampling_params import StructuredOutput
    from specserve.actors.engine.structured import GrammarCompiler

    tokenizer = AutoTokenizer.from_pretrained("/root/.cache/specserve/models/smollm2-135m")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tiny = LlamaForCausalLM(config).eval()
    regex = r"[0-9]{3}-[a-z]{2,4}"
    engine = LLMEngine(tiny, block_size=BLOCK, num_blocks=200, eos_token_ids=[tokenizer.eos_token_id],
                       grammar_compiler=GrammarCompiler(tokenizer, 49152, [tokenizer.eos_token_id]))
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=3, n=4,
                            structured=StructuredOutput("regex", regex))
    out = run(engine, {"g": (tokenizer.encode("Give me a code: "), params)})
    texts = [tokenizer.decode([t for t in out[("g", i)] if t != tokenizer.eos_token_id]) for i in range(4)]
    assert all(re.fullmatch(regex, text) for text in texts), texts
    assert len(set(texts)) > 1
