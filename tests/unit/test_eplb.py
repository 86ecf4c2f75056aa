"""Expert placement (replicate-then-pack): every expert placed, slots respected, skewed loads balanced."""

import random

import pytest

from specserve.actors.experts.eplb import balance_ratio, rebalance, static_placement


def skewed_loads(num_experts: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.paretovariate(1.2) * 100 for _ in range(num_experts)]  # a few very hot experts


def test_every_expert_placed_and_slots_respected():
    loads = skewed_loads(16)
    p = rebalance(loads, num_actors=4, slots_per_actor=6)
    assert all(p.replicas[e] for e in range(16))
    per_actor = [sum(1 for r in p.replicas if a in r) for a in range(4)]
    assert max(per_actor) <= 6
    assert sum(loads) == pytest.approx(sum(p.actor_loads(loads)))


def test_skewed_trace_is_balanced_after_rebalancing():
    loads = skewed_loads(32, seed=3)
    before = balance_ratio(static_placement(32, 4).actor_loads(loads))
    after = balance_ratio(rebalance(loads, num_actors=4, slots_per_actor=10).actor_loads(loads))
    assert before > 1.3 and after <= 1.10, (before, after)


def test_too_few_slots_is_an_error():
    with pytest.raises(ValueError, match="cannot hold"):
        rebalance([1.0] * 9, num_actors=2, slots_per_actor=4)
