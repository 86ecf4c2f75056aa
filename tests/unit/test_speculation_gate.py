"""SpeculationGate: drafting on or off per batch size, by the measured tokens a second of each arm."""

import pytest

from specserve.actors.engine.speculation_gate import SpeculationGate


def run_steps(gate: SpeculationGate, n: int, steps: int, tok_s: dict[bool, float]) -> list[bool]:
    """`steps` steps at batch size n, each arm committing tok_s[arm] tokens a second; the arms chosen."""
    arms = []
    for _ in range(steps):
        drafting = gate.drafting(n)
        arms.append(drafting)
        gate.observe(n, drafting, tokens=round(tok_s[drafting] * 0.1), seconds=0.1)
    return arms


def test_learns_both_arms_in_alternating_windows_drafting_first():
    gate = SpeculationGate(window=4, explore_every=8, min_steps=8)
    arms = run_steps(gate, 16, 16, {True: 100, False: 300})
    assert arms == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4


def test_keeps_the_faster_arm_and_explores_the_other_one_window_in_explore_every():
    gate = SpeculationGate(window=4, explore_every=8, min_steps=8)
    run_steps(gate, 16, 24, {True: 100, False: 300})  # learning: 3 counted steps a window, 8 each arm
    arms = run_steps(gate, 16, 4 * 16, {True: 100, False: 300})
    windows = [arms[i:i + 4] for i in range(0, len(arms), 4)]
    assert all(len(set(w)) == 1 for w in windows), "an arm holds for a whole window"
    drafting_windows = sum(w[0] for w in windows)
    assert drafting_windows == 2, windows  # 16 windows, one in 8 explores
    stats = gate.as_dict()["16"]
    assert stats["plain_tok_s"] == pytest.approx(300) and stats["drafting_tok_s"] == pytest.approx(100)

    gate = SpeculationGate(window=4, explore_every=8, min_steps=8)
    run_steps(gate, 1, 24, {True: 40, False: 30})
    arms = run_steps(gate, 1, 4 * 16, {True: 40, False: 30})
    assert sum(arms) == 4 * 14  # drafting kept but for two exploring windows


def test_batch_sizes_are_judged_apart():
    gate = SpeculationGate(window=4, explore_every=100, min_steps=8)
    for _ in range(5):  # interleaved, as a batch grows and shrinks
        run_steps(gate, 1, 8, {True: 40, False: 30})
        run_steps(gate, 20, 8, {True: 200, False: 260})
    assert all(run_steps(gate, 1, 8, {True: 40, False: 30}))
    assert not any(run_steps(gate, 20, 8, {True: 200, False: 260}))
    assert not any(run_steps(gate, 17, 8, {True: 200, False: 260})), "16-31 sequences share a bucket"
    assert set(gate.as_dict()) == {"1", "16"}


def test_follows_a_change_in_traffic():
    gate = SpeculationGate(window=4, explore_every=4, min_steps=8, decay=0.9)
    run_steps(gate, 8, 64, {True: 100, False: 200})
    assert sum(run_steps(gate, 8, 16, {True: 100, False: 200})) <= 4  # at most one exploring window of 4
    # Drafts start to be accepted (e.g. the requests copy their input): the exploring windows see it.
    run_steps(gate, 8, 64, {True: 400, False: 200})
    assert sum(run_steps(gate, 8, 16, {True: 400, False: 200})) >= 12


def test_the_first_step_of_a_window_is_not_counted():
    """It pays for the switch (a drafter replica catching up on the tokens it missed), not for the arm."""
    gate = SpeculationGate(window=4)
    counted = []
    for _ in range(6):
        drafting = gate.drafting(2)
        gate.observe(2, drafting, tokens=2, seconds=0.1)
        state = gate.as_dict()["2"]
        counted.append((drafting, state["drafting_steps"], state["plain_steps"]))
    assert counted == [(True, 0, 0), (True, 1, 0), (True, 2, 0), (True, 3, 0), (False, 3, 0), (False, 3, 1)]
    assert gate.as_dict()["2"]["plain_tok_s"] == pytest.approx(20)


@pytest.mark.parametrize("kwargs", [{"window": 1}, {"explore_every": 1}, {"min_steps": 0}, {"decay": 0.0}])
def test_rejects_settings_that_would_freeze_or_invert_it(kwargs):
    with pytest.raises(ValueError):
        SpeculationGate(**kwargs)


def test_unobserved_steps_do_not_count():
    gate = SpeculationGate(window=2, explore_every=8, min_steps=2)
    for _ in range(6):  # steps with prefill chunks: the engine does not report them
        gate.drafting(4)
    assert gate.as_dict()["4"]["drafting_steps"] == 0 and gate.as_dict()["4"]["plain_steps"] == 0
    gate.observe(4, True, tokens=4, seconds=0.0)  # no time: nothing to learn
    assert gate.as_dict()["4"]["drafting_steps"] == 0
