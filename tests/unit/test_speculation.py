"""Speculation core without a model: verification, rejection sampling statistics, choice of k, n-gram drafts."""

import pytest
import torch

from chi_square import chi_square_p_value
from specserve.actors.draft.ngram import NgramIndex, NgramDrafter
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.sequence import Sequence
from specserve.actors.engine.speculation import (
    AcceptanceEstimate,
    LinearCost,
    ProportionalCost,
    SpeculationController,
    SpeculationStats,
    TargetGuesses,
    accept_draft,
)


def onehot_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    logits = torch.zeros(len(tokens), vocab)
    for i, t in enumerate(tokens):
        logits[i, t] = 10.0
    return logits


def test_greedy_verification_accepts_the_matching_prefix_and_adds_the_target_token():
    greedy, g = SamplingParams(temperature=0), torch.Generator()
    target = onehot_logits([5, 6, 7, 8], 10)  # target argmax after the last token and after each draft token
    assert accept_draft(target, [5, 6, 7], None, greedy, g) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_draft(target, [5, 9, 7], None, greedy, g) == [5, 6]  # first mismatch corrected
    assert accept_draft(target, [1, 6, 7], None, greedy, g) == [5]
    assert accept_draft(target[:1], [], None, greedy, g) == [5]


def test_rejection_sampling_keeps_the_target_distribution():
    """First committed token ~ p_0; given the first draft token was accepted, the second ~ p_1. For a sampled
    draft (q from another distribution) and a deterministic one (one-hot q)."""
    vocab, n = 6, 30000
    g = torch.Generator().manual_seed(0)
    target_logits = torch.randn(3, vocab, generator=g) * 1.5
    draft_logits = torch.randn(2, vocab, generator=g) * 1.5
    params = SamplingParams(temperature=0.8, top_k=5)
    from specserve.actors.engine.sampler import processed_logits

    p = processed_logits(target_logits, params).softmax(-1)
    q = processed_logits(draft_logits, params).softmax(-1)
    for deterministic in (False, True):
        first = [0] * vocab
        second = [0] * vocab
        gen = torch.Generator().manual_seed(1)
        for _ in range(n):
            if deterministic:
                draft, probs = [2, 4], None
            else:
                draft = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(2)]
                probs = q
            out = accept_draft(target_logits, draft, probs, params, gen)
            first[out[0]] += 1
            if len(out) > 1 and draft[0] == 2:  # context "2" for the second position: its target is p_1
                second[out[1]] += 1
        assert chi_square_p_value(first, (p[0] * n).tolist()) > 0.01, (deterministic, first)
        m = sum(second)
        assert m > 1000
        assert chi_square_p_value(second, (p[1] * m).tolist()) > 0.01, (deterministic, second)
        # Power check: the counts clearly differ from the draft distribution.
        assert chi_square_p_value(first, (q[0] * n).tolist()) < 1e-6


def test_acceptance_estimate_and_cost_model():
    est = AcceptanceEstimate(prior=0.5)
    assert est.value == 0.5
    for _ in range(30):
        est.update(4, 4)
    assert est.value > 0.9
    for _ in range(30):
        est.update(4, 0)
    assert est.value < 0.15
    cost = LinearCost(0.02, 0.001)
    for tokens in (1, 2, 5, 9, 17, 33) * 10:
        cost.add(tokens, 0.030 + 0.002 * tokens)
    assert abs(cost.b - 0.002) < 3e-4 and abs(cost.a - 0.030) < 3e-3
    drafts = ProportionalCost(0.0)
    for _ in range(5):
        drafts.add(4, 0.100)  # every round drafts 4: still a per-token cost of 25 ms
    assert abs(drafts(1) - 0.025) < 1e-9


def test_controller_speculates_only_where_it_pays():
    ctl = SpeculationController(max_k=8, verify_cost=(0.025, 0.002))
    high, low = 0.9, 0.05
    # One sequence with good drafts: draft deep. Poor drafts: do not draft.
    assert ctl.choose([high], [8], [0]) == [8]
    assert ctl.choose([low], [8], [0]) == [0]
    # A cap from the remaining tokens or the available draft.
    assert ctl.choose([high], [3], [0]) == [3]
    # Mixed batch: the good sequence drafts, the poor one does not.
    ks = ctl.choose([high, low], [8, 8], [0, 0])
    assert ks[0] > 0 and ks[1] == 0
    # A large batch makes every extra verified token expensive relative to the step: k shrinks.
    steep = SpeculationController(max_k=8, verify_cost=(0.025, 0.004))
    small = steep.choose([0.6], [8], [0])[0]
    big = max(steep.choose([0.6] * 32, [8] * 32, [0] * 32))
    assert big < small
    # A sequence stuck at k=0 is probed now and then.
    assert ctl.choose([low], [8], [ctl.probe_every]) == [1]
    # Fixed mode uses the cap.
    assert SpeculationController(max_k=4, adaptive=False).choose([low, high], [8, 2], [0, 0]) == [4, 2]
    # Draft cost (model drafters): an expensive drafter lowers k.
    slow = SpeculationController(max_k=8, verify_cost=(0.025, 0.002), draft_cost=0.02)
    assert slow.choose([0.7], [8], [0])[0] < ctl.choose([0.7], [8], [0])[0]


def test_stats_per_position():
    st = SpeculationStats()
    st.record(4, 2)
    st.record(2, 2)
    st.record(0, 0)
    d = st.as_dict()
    assert d["draft_tokens"] == 6 and d["accepted_tokens"] == 4 and d["rounds"] == 2
    assert d["acceptance_by_position"] == [1.0, 1.0, 0.0, 0.0]
    assert d["mean_accepted_length"] == 3.0
    assert d["k_chosen"] == {"0": 1, "2": 1, "4": 1}


def test_ngram_lookup_and_recycled_candidates():
    idx = NgramIndex(1, 3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3]
    idx.update(tokens)
    assert idx.lookup(tokens, 3) == [4, 5, 9]  # "2 3" seen before, followed by 4 5 9
    tokens += [4, 7]
    idx.update(tokens)
    assert idx.lookup(tokens, 2) == []  # "7" never seen before
    prop = NgramDrafter(1, 3, recycle=True)
    seq = Sequence("a", [10, 11, 12, 10, 11], SamplingParams())
    assert prop.propose([seq], [3])[0].tokens == [12, 10, 11]
    other = Sequence("b", [20, 21], SamplingParams())
    assert prop.propose([other], [3]) == [None]
    prop.observe(other, [21, 22], TargetGuesses([[22], [23]], None))  # target guessed 22 after 21, 23 after 22
    assert prop.propose([other], [3])[0].tokens == [22, 23]
    prop.release(seq)
    assert "a" not in prop.indexes


def test_recycled_guesses_make_a_best_first_tree_where_lookup_finds_nothing():
    prop = NgramDrafter(1, 3, recycle=True, recycle_width=2, min_token_prob=0.1)
    assert prop.observes_target == 2
    seq = Sequence("a", [20, 21], SamplingParams())
    # After 21 the target guessed 30 (0.6) or 31 (0.3); after 30: 40 (0.5) or 41 (0.05, below min_token_prob).
    prop.observe(seq, [21, 30], TargetGuesses([[30, 31], [40, 41]], [[0.6, 0.3], [0.5, 0.05]]))
    draft = prop.propose([seq], [8])[0]
    assert draft.tokens == [30, 31, 40] and draft.parents == [-1, -1, 0]
    assert draft.scores == pytest.approx([0.6, 0.3, 0.3])
    assert prop.propose([seq], [2])[0].tokens == [30, 31]  # the budget keeps the likeliest nodes
    # A lookup match still drafts the lookup chain.
    looping = Sequence("b", [5, 6, 7, 5, 6], SamplingParams())
    assert prop.propose([looping], [2])[0].parents is None


def test_target_guesses_from_logits():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    assert TargetGuesses.from_logits(logits, 1) == TargetGuesses([[1], [0]], None)
    top2 = TargetGuesses.from_logits(logits, 2)
    assert top2.tokens == [[1, 2], [0, 1]]
    assert top2.probs[0] == pytest.approx(logits[0].softmax(-1)[[1, 2]].tolist())
    assert top2.rows(slice(1, 2)).tokens == [[0, 1]]
