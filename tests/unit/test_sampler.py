import pytest
import torch

from specserve.actors.engine.sampler import greedy_tokens, processed_logits, sample
from specserve.actors.engine.sampling_params import SamplingParams


def gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    assert sample(logits, [SamplingParams(temperature=0)] * 2, [gen(0), gen(0)]) == [1, 0]


def test_greedy_tokens_pick_what_argmax_picks():
    # Vocabulary-wide rows, ties (the first index wins), rows cut to few values (many ties), NaN and -inf.
    torch.manual_seed(0)
    rows = torch.randn(40, 49152)
    rows[3, [7, 900, 40000]] = 100.0
    rows[4] = torch.randint(0, 3, (49152,)).float()
    rows[5] = float("-inf")
    rows[6, [10, 20]] = float("nan")
    rows[7, 5:] = float("-inf")
    for logits in (rows, rows.bfloat16(), rows[9], rows[:1]):
        assert torch.equal(greedy_tokens(logits), logits.argmax(dim=-1))
    first_two = (rows[4] == 2).nonzero()[0].item()
    assert greedy_tokens(rows)[[3, 4, 5, 6]].tolist() == [7, first_two, 0, 10]


def test_top_k_and_top_p_masks():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    k = processed_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(k[2:]).all() and torch.isfinite(k[:2]).all()
    p = processed_logits(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.isfinite(p[:2]).all() and torch.isinf(p[2:]).all()  # 0.5 < 0.7, 0.5+0.3 reaches it
    p1 = processed_logits(logits, SamplingParams(temperature=1.0, top_p=0.4))
    assert torch.isfinite(p1[0]) and torch.isinf(p1[1:]).all()


def test_seeded_sampling_is_reproducible_and_matches_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = SamplingParams(temperature=1.0, seed=7)
    g1, g2 = gen(123), gen(123)
    seq1 = [sample(logits, [p], [g1])[0] for _ in range(50)]
    seq2 = [sample(logits, [p], [g2])[0] for _ in range(50)]
    assert seq1 == seq2 and len(set(seq1)) > 1
    g = gen(0)
    counts = torch.bincount(torch.tensor([sample(logits, [p], [g])[0] for _ in range(3000)]), minlength=3) / 3000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


def test_low_temperature_concentrates():
    logits = torch.tensor([[1.0, 1.5, 0.5]])
    g = gen(1)
    picks = [sample(logits, [SamplingParams(temperature=0.05)], [g])[0] for _ in range(200)]
    assert picks.count(1) >= 198


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=2.5), dict(top_p=0), dict(top_p=1.1),
                                 dict(max_tokens=0), dict(top_k=-1)])
def test_invalid_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
