"""The logits processors (sampler.apply_processors, processed_logits' min_p) against plain per-token reference
computations, their use in verification (a row per draft prefix), and SamplingParams' bounds."""

import pytest
import torch

from specserve.actors.engine.sampler import apply_processors, processed_logits, sample, token_logprobs
from specserve.actors.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from specserve.actors.engine.speculation import Draft, _grammar_cut, accept_draft

V = 12
EOS = 2


def reference(row, params, history, num_prompt, eos_ids):
    """One row of logits after the processors, token by token in plain Python."""
    row = row.tolist()
    out = history[num_prompt:]
    for t, b in params.logit_bias.items():
        row[t] += b
    if len(out) < params.min_tokens:
        for t in set(params.stop_token_ids) | ({} if params.ignore_eos else set(eos_ids)):
            row[t] = float("-inf")
    for t in range(V):
        if params.repetition_penalty != 1.0 and t in history:
            row[t] = row[t] / params.repetition_penalty if row[t] > 0 else row[t] * params.repetition_penalty
        c = out.count(t)
        row[t] -= params.frequency_penalty * c + params.presence_penalty * (c > 0)
    return torch.tensor(row)


CASES = [
    SamplingParams(logit_bias={3: 5.0, 7: -100.0}),
    SamplingParams(min_tokens=3, stop_token_ids=frozenset({5})),
    SamplingParams(min_tokens=3, ignore_eos=True),
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6),
    SamplingParams(presence_penalty=1.5, frequency_penalty=-0.5),
    SamplingParams(logit_bias={1: 2.0}, min_tokens=4, repetition_penalty=1.3, presence_penalty=0.4,
                   frequency_penalty=0.8),
]


@pytest.mark.parametrize("params", CASES)
def test_processors_match_the_reference_at_every_draft_prefix(params):
    g = torch.Generator().manual_seed(0)
    prompt, output, draft = [4, 9, 4, 1], [6, 3, 6], [3, 8, 3]
    logits = torch.randn(len(draft) + 1, V, generator=g) * 3
    got = apply_processors(logits, params, prompt + output, len(prompt), draft, {EOS})
    for i in range(len(draft) + 1):
        want = reference(logits[i], params, prompt + output + draft[:i], len(prompt), {EOS})
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), i
        finite = torch.isfinite(want)
        assert torch.allclose(got[i][finite], want[finite], atol=1e-5), i
    assert torch.equal(logits, logits.clone())  # the raw logits are left alone


def test_min_tokens_masks_only_the_rows_before_the_minimum():
    params = SamplingParams(min_tokens=2, stop_token_ids=frozenset({5}))
    # One output token so far: the row for the second is masked, the rows after it are not.
    got = apply_processors(torch.zeros(3, V), params, [1, 1, 7], 2, [8, 9], {EOS})
    assert torch.isinf(got[0, [EOS, 5]]).all() and torch.isfinite(got[1:]).all()


def test_min_p_keeps_tokens_with_probability_at_least_min_p_times_the_top():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    out = processed_logits(probs.log(), SamplingParams(min_p=0.2))  # floor 0.1
    assert torch.isfinite(out[:3]).all() and torch.isinf(out[3])
    # After temperature: the floor applies to the tempered distribution.
    tempered = (probs.log() / 0.5).softmax(-1)
    out = processed_logits(probs.log(), SamplingParams(min_p=0.2, temperature=0.5))
    assert torch.equal(torch.isfinite(out), tempered >= 0.2 * tempered.max())


def test_greedy_with_processors_takes_the_argmax_of_the_processed_logits():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])
    params = SamplingParams(temperature=0, logit_bias={1: -3.0})
    processed = apply_processors(logits, params, [0], 1, [], set())
    assert sample(processed, [params], [torch.Generator()]) == [2]


def test_greedy_verification_accepts_while_the_draft_is_the_processed_argmax():
    # Raw argmax is 1 everywhere; the frequency penalty makes a repeated 1 lose to 2 from the second row on.
    raw = torch.tensor([[0.0, 3.0, 2.5, 0.0]] * 3)
    params = SamplingParams(temperature=0, frequency_penalty=1.0)
    processed = apply_processors(raw, params, [0], 1, [1, 2], set())
    assert accept_draft(processed, [1, 2], None, params, torch.Generator()) == [1, 2, 1]
    assert accept_draft(processed, [1, 1], None, params, torch.Generator()) == [1, 2]


class PrefixGrammar:
    """Allows any token but 0 (a stand-in for a GrammarMatcher in draft cutting)."""

    def valid_prefix(self, tokens):
        return next((i for i, t in enumerate(tokens) if t == 0), len(tokens))


class Seq:
    def __init__(self, grammar):
        self.grammar = grammar


def test_a_draft_is_cut_before_the_first_token_the_grammar_forbids():
    probs = torch.full((4, V), 1 / V)
    cut = _grammar_cut(Seq(PrefixGrammar()), Draft([5, 6, 0, 7], probs), 4)
    assert cut.tokens == [5, 6] and cut.probs.shape[0] == 2 and torch.equal(cut.cut_probs, probs[2])
    assert _grammar_cut(Seq(PrefixGrammar()), Draft([0, 7], None), 2) is None  # nothing left, deterministic
    assert _grammar_cut(Seq(None), Draft([0, 7, 8], None), 2).tokens == [0, 7]


def test_a_cut_sampled_draft_draws_the_correction_from_the_residual():
    """The token after a cut draft was drawn from q and rejected: the target's token is drawn from
    normalize(max(0, p - q)), as a rejection at that position would; with q, the committed token is p-distributed."""
    p = torch.tensor([0.9, 0.1, 0.0])
    q = torch.tensor([0.1, 0.5, 0.4])
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 4000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        if d == 2:  # forbidden by the grammar (p = 0): cut, nothing left to verify
            t = accept_draft(p.log()[None], [], None, params, g, cut_probs=q)[0]
        else:
            t = accept_draft(p.log()[None].repeat(2, 1), [d], q[None], params, g)[0]
        counts[t] += 1
    assert torch.allclose(counts / n, p, atol=0.03)


def test_token_logprobs_are_log_softmax_of_the_raw_row_with_the_top_alternatives():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, V, generator=g)
    lps = token_logprobs(logits, [4, 0], 3)
    ref = logits.log_softmax(-1)
    assert len(lps) == 2 and lps[0].token_id == 4 and abs(lps[0].logprob - float(ref[0, 4])) < 1e-6
    top = ref[1].topk(3)
    assert [t for t, _ in lps[1].top] == top.indices.tolist()
    assert all(abs(a - b) < 1e-6 for (_, a), b in zip(lps[1].top, top.values.tolist()))
    assert token_logprobs(logits, [1], 0)[0].top == []


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=17), dict(logprobs=21), dict(logprobs=-1),
                                 dict(prompt_logprobs=21), dict(presence_penalty=2.5),
                                 dict(frequency_penalty=-2.1), dict(repetition_penalty=0),
                                 dict(repetition_penalty=2.1), dict(min_p=1.5), dict(min_p=-0.1),
                                 dict(logit_bias={1: 101.0}), dict(logit_bias={-1: 1.0}),
                                 dict(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)}),
                                 dict(min_tokens=-1), dict(min_tokens=20, max_tokens=10)])
def test_invalid_params_name_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field if field != "max_tokens" else "min_tokens"):
        SamplingParams(**bad)


def test_params_without_processors_take_the_plain_path():
    assert not SamplingParams(min_p=0.3, top_k=4, logprobs=5).has_processors
    assert all(p.has_processors for p in CASES)


def test_min_tokens_yields_to_a_grammar_that_allows_only_stopping():
    from specserve.actors.engine.structured import mask_row

    params = SamplingParams(min_tokens=5)
    bitmask = torch.stack([mask_row([EOS], V), mask_row([EOS, 3], V)])
    got = apply_processors(torch.zeros(2, V), params, [1, 1], 1, [3], {EOS}, bitmask)
    assert torch.isfinite(got[0, EOS]) and torch.isinf(got[0]).sum() == V - 1  # only EOS: the grammar wins
    assert torch.isinf(got[1, EOS]) and torch.isfinite(got[1, 3])  # another token allowed: EOS masked
