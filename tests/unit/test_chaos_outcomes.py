"""The chaos run's judgement (tools/chaos.py): what counts as completed, retriable, wrong, failed or lost, and
when a fault's result is acceptable."""

from specserve.tools.chaos import FAULTS, FaultResult, classify, format_table


def test_classify_each_answer():
    assert classify(200, [1, 2], [1, 2]) == "completed"
    assert classify(200, [1, 3], [1, 2]) == "wrong"  # the one outcome that must never happen
    assert classify(200, None, [1, 2]) == "wrong"
    for status in (429, 503, 504):
        assert classify(status, None, [1]) == "retriable"
    for status in (400, 500, None):
        assert classify(status, None, [1]) == "failed"
    assert classify(None, None, [1], timed_out=True) == "lost"


def test_a_fault_passes_only_if_it_healed_and_lost_or_broke_nothing():
    assert FaultResult("verifier", "", requests=9, completed=6, retriable=3, recovery_s=12.0).ok
    assert not FaultResult("verifier", "", requests=9, completed=9).ok  # never recovered
    assert not FaultResult("redis", "", requests=9, completed=8, wrong=1, recovery_s=1.0).ok
    assert not FaultResult("redis", "", requests=9, completed=8, lost=1, recovery_s=1.0).ok
    assert not FaultResult("redis", "", requests=9, completed=8, failed=1, recovery_s=1.0).ok
    assert FaultResult("experts", "", skipped="experts.num_actors is 0").ok


def test_table_lists_every_fault():
    rows = [FaultResult("verifier", "", requests=9, completed=6, retriable=3, recovery_s=12.04),
            FaultResult("experts", "", skipped="experts.num_actors is 0")]
    table = format_table(rows)
    assert "verifier" in table and "12.0" in table and "skipped: experts.num_actors is 0" in table
    assert list(FAULTS) == ["verifier", "drafter", "experts", "redis", "holder"]
