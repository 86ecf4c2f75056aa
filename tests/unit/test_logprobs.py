"""Logprobs and logits processors in the engine, against a float32 Hugging Face forward: output and prompt
logprobs with chunked prefill and with speculation (n-gram and draft model), greedy with processors identical
with and without speculation, and sampling with processors keeping the target distribution under speculation."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.engine.sampler import apply_processors, processed_logits
from specserve.actors.engine.sampling_params import SamplingParams
import test_spec_engine
from chi_square import chi_square_p_value
from test_spec_engine import make_engine, make_proposer, prompt_set

# The speculation tests' models: a tiny target, and a noisy copy of it as the draft model.
target_dir = test_spec_engine.target_dir
draft_dir = test_spec_engine.draft_dir

TOL = 1e-4


@pytest.fixture(scope="module")
def ref(target_dir):
    return AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()


def run(engine, prompts, params):
    """Each request's (tokens, logprobs, prompt_logprobs) from its RequestOutputs."""
    ids = [f"r{i}" for i in range(len(prompts))]
    params = params if isinstance(params, list) else [params] * len(prompts)
    for rid, p, sp in zip(ids, prompts, params):
        engine.add_request(rid, p, sp)
    res = {rid: ([], [], None) for rid in ids}
    firsts = set()
    while engine.has_unfinished():
        for out in engine.step():
            tokens, lps, _ = res[out.request_id]
            if out.logprobs is not None:
                assert len(out.logprobs) == len(out.new_token_ids)
                assert [lp.token_id for lp in out.logprobs] == out.new_token_ids
                lps.extend(out.logprobs)
            tokens.extend(out.new_token_ids)
            if out.request_id not in firsts:
                firsts.add(out.request_id)
                res[out.request_id] = (tokens, lps, out.prompt_logprobs)
            else:
                assert out.prompt_logprobs is None  # only the first output carries them
    return [res[rid] for rid in ids]


def hf_log_softmax(ref, tokens):
    with torch.no_grad():
        return ref(torch.tensor([tokens])).logits[0].float().log_softmax(-1)


def check_logprobs(lsm, positions, entries, num_top):
    """entries[j]: the TokenLogprobs of the token at positions[j], predicted by row positions[j] - 1."""
    for pos, e in zip(positions, entries):
        row = lsm[pos - 1]
        assert abs(e.logprob - float(row[e.token_id])) < TOL, pos
        assert len(e.top) == num_top
        want = row.topk(num_top)
        assert all(abs(lp - float(row[t])) < TOL for t, lp in e.top), pos
        assert all(abs(a - b) < TOL for (_, a), b in zip(e.top, want.values.tolist())), pos


@pytest.mark.parametrize("method", [None, "ngram", "suffix", "model"])
def test_output_logprobs_match_the_hf_forward(target_dir, draft_dir, ref, method):
    proposer = make_proposer(method, target_dir, draft_dir) if method else None
    engine = make_engine(target_dir, proposer, k=3, adaptive=False, max_num_batched_tokens=16)  # chunked prefill
    prompts = prompt_set()[:4]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=4),
              SamplingParams(max_tokens=20, temperature=0.8, ignore_eos=True, logprobs=0),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=20, frequency_penalty=0.5),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]
    results = run(engine, prompts, params)
    for p, sp, (tokens, lps, _) in zip(prompts, params, results):
        if sp.logprobs is None:
            assert lps == []
            continue
        assert len(lps) == len(tokens) == 20
        check_logprobs(hf_log_softmax(ref, p + tokens), range(len(p), len(p) + len(tokens)), lps, sp.logprobs)
    if method:
        assert engine.spec_stats.accepted_tokens > 0, "no draft token was accepted: logprobs of verified rows untested"


@pytest.mark.parametrize("method", [None, "ngram"])
def test_prompt_logprobs_match_the_hf_forward_across_chunks_and_a_warm_prefix_cache(target_dir, draft_dir, ref,
                                                                                     method):
    proposer = make_proposer(method, target_dir, draft_dir) if method else None
    engine = make_engine(target_dir, proposer, k=3, max_num_batched_tokens=16)
    prompt = prompt_set()[4]  # 61 tokens: four chunks
    plain = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    asking = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=3, logprobs=1)
    # The first request fills the prefix cache; the second must compute its prompt anyway.
    (t0, _, none), (t1, lps, prompt_lps) = run(engine, [prompt], plain) + run(engine, [prompt], asking)
    assert none is None and t0 == t1
    assert len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    assert [e.token_id for e in prompt_lps[1:]] == prompt[1:]
    lsm = hf_log_softmax(ref, prompt + t1)
    check_logprobs(lsm, range(1, len(prompt)), prompt_lps[1:], 3)
    check_logprobs(lsm, range(len(prompt), len(prompt) + 5), lps, 1)
    engine.block_manager.check_invariants()


def reference_greedy(ref, prompt, params, n, eos_ids=()):
    """Greedy decoding of the HF model, the processors applied to each step's logits."""
    tokens = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            row = ref(torch.tensor([tokens])).logits[0, -1:].float()
        tokens.append(int(apply_processors(row, params, tokens, len(prompt), [], set(eos_ids)).argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("method", ["ngram", "suffix", "model"])
def test_greedy_with_processors_is_identical_with_and_without_speculation(target_dir, draft_dir, ref, method):
    prompts = prompt_set()
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, presence_penalty=0.7,
                             frequency_penalty=0.4),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logit_bias={5: 3.0, 9: 2.0}),
              SamplingParams(max_tokens=24, temperature=0, min_tokens=10, logit_bias={2: 4.0}),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, repetition_penalty=0.8,
                             frequency_penalty=-0.3)]
    plain = make_engine(target_dir, None, eos_token_ids=[2])
    spec = make_engine(target_dir, make_proposer(method, target_dir, draft_dir), k=3, adaptive=False,
                       eos_token_ids=[2])
    want = plain.generate(prompts, params)
    assert spec.generate(prompts, params) == want
    assert spec.spec_stats.accepted_tokens > 0
    for p, sp, w in list(zip(prompts, params, want))[:2]:
        assert w == reference_greedy(ref, p, sp, 24)
    assert len(want[3]) >= 10  # EOS (biased up) masked until min_tokens


@pytest.mark.parametrize("method", ["model", "ngram"])
def test_sampled_speculation_with_processors_keeps_the_processed_distribution(target_dir, draft_dir, ref, method):
    """Joint distribution of the first two sampled tokens (the second from a speculative round) with penalties,
    logit_bias and min_p, against the target's processed distribution: chi-square."""
    n = 2400
    random.seed(4321)
    sp = SamplingParams(max_tokens=4, temperature=1.0, top_k=8, min_p=0.05, ignore_eos=True,
                        repetition_penalty=1.4, presence_penalty=0.5, frequency_penalty=0.3,
                        logit_bias={7: 2.0, 11: -1.0, 40: 3.0})
    prompt = prompt_set()[0]
    engine = make_engine(target_dir, make_proposer(method, target_dir, draft_dir, sampled=True), k=2,
                         adaptive=False, max_num_seqs=64, max_num_batched_tokens=256)
    out = engine.generate([prompt] * n, [sp] * n)
    assert engine.spec_stats.rounds > n // 2

    def dist(tokens):
        with torch.no_grad():
            row = ref(torch.tensor([tokens])).logits[0, -1:].float()
        return processed_logits(apply_processors(row, sp, tokens, len(prompt), [], set())[0], sp).softmax(-1)

    p1 = dist(prompt)
    cells, expected = [], []
    for t1 in torch.nonzero(p1).flatten().tolist():
        p2 = dist(prompt + [t1])
        for t2 in torch.nonzero(p2).flatten().tolist():
            cells.append((t1, t2))
            expected.append(float(p1[t1] * p2[t2]) * n)
    counts = {c: 0 for c in cells}
    for o in out:
        counts[(o[0], o[1])] += 1  # a KeyError here would be a token outside the processed support
    assert chi_square_p_value([counts[c] for c in cells], expected) > 0.01


def test_with_n_choices_only_choice_0_carries_prompt_logprobs_and_each_choice_its_logprobs(target_dir, ref):
    engine = make_engine(target_dir, None, max_num_batched_tokens=16)
    prompt = prompt_set()[2]
    engine.add_request("x", prompt, SamplingParams(n=3, max_tokens=6, temperature=1.0, prompt_logprobs=2,
                                                   logprobs=2, ignore_eos=True))
    tokens, lps, prompt_lps = {}, {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.index, []).extend(out.new_token_ids)
            lps.setdefault(out.index, []).extend(out.logprobs)
            if out.prompt_logprobs is not None:
                assert out.index not in prompt_lps
                prompt_lps[out.index] = out.prompt_logprobs
    assert set(tokens) == {0, 1, 2} and set(prompt_lps) == {0}
    check_logprobs(hf_log_softmax(ref, prompt), range(1, len(prompt)), prompt_lps[0][1:], 2)
    for i in range(3):
        check_logprobs(hf_log_softmax(ref, prompt + tokens[i]), range(len(prompt), len(prompt) + 6), lps[i], 2)
