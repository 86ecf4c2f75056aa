"""The router's pure core: the prefix index, the TTFT cost model, the hot-spot guard and bounded-load consistent
hashing; routing outcomes (predicted vs actual cached tokens)."""

from collections import Counter

import pytest

from specserve.actors.engine.block_hash import block_hashes
from specserve.cluster.config import RouterConfig
from specserve.cluster.kv.events import STORE
from specserve.routing.prefix_index import PrefixIndex
from specserve.routing.router_policy import ConsistentHashRing, PrefixCostPolicy, ReplicaState, RouteDecision
from specserve.routing.feedback import Placement, RouteOutcome, RoutingOutcomes

BS = 16


def chain(n: int, seed: int = 0) -> list[bytes]:
    return block_hashes(list(range(seed * 10_000, seed * 10_000 + n * BS)), BS, namespace="t")


# ---- index ---------------------------------------------------------------------------------------------------
def test_match_gives_each_holder_its_leading_run():
    idx = PrefixIndex()
    hs = chain(6)
    idx.add("a", hs[:4])
    idx.add("b", hs[:2])
    idx.add("b", hs[3:6])  # b lacks block 2: its run stops at 2
    idx.add(STORE, hs[:6])
    assert idx.match(hs) == {"a": 4, "b": 2, STORE: 6}
    assert idx.match(chain(3, seed=1)) == {}
    assert idx.match(hs[1:]) == {"a": 3, "b": 1, STORE: 5}


def test_remove_purge_and_bound():
    idx = PrefixIndex(max_blocks=5)
    hs = chain(4)
    idx.add("a", hs)
    idx.add("b", hs[:2])
    idx.remove("a", hs[2:])
    assert idx.match(hs) == {"a": 2, "b": 2}
    assert idx.purge("b") == 2
    assert idx.match(hs) == {"a": 2} and idx.replicas() == ["a"]
    assert len(idx) == 2  # hashes nobody holds are dropped
    idx.add("a", chain(4, seed=1))  # 6 hashes > bound 5: the least recently touched goes
    assert len(idx) == 5 and idx.match(hs) == {}  # hs[0] was the oldest
    assert idx.num_blocks("a") == 5


# ---- cost model ----------------------------------------------------------------------------------------------
def replicas(*ids, **kw) -> list[ReplicaState]:
    return [ReplicaState(i, prefill_tokens_per_s=1000, import_tokens_per_s=20000, **kw) for i in ids]


def test_requests_go_to_the_replica_holding_their_prefix():
    idx = PrefixIndex()
    hs = chain(40)
    idx.add("b", hs[:32])
    d = PrefixCostPolicy(idx, BS, RouterConfig()).choose(replicas("a", "b", "c"), hs, 40 * BS + 5)
    assert d.replica_id == "b" and d.reason == "prefix" and d.predicted_cached_tokens == 32 * BS


def test_queued_work_outweighs_a_small_prefix_hit():
    idx = PrefixIndex()
    hs = chain(10)
    idx.add("b", hs[:2])
    rs = replicas("a", "b")
    rs[1].queued_prefill_tokens = 4000  # 4 s of prefill queued on b; the hit saves 32 tokens
    assert PrefixCostPolicy(idx, BS, RouterConfig()).choose(rs, hs, 10 * BS + 1).replica_id == "a"


def test_a_stale_small_queue_does_not_move_a_request_off_its_prefix():
    idx = PrefixIndex()
    hs = chain(10)
    idx.add("a", hs)
    rs = replicas("a", "b")
    rs[0].queued_prefill_tokens = 10 * BS + 8  # a reported one such prompt queued (it may be done by now)
    d = PrefixCostPolicy(idx, BS, RouterConfig()).choose(rs, hs, 10 * BS + 12)
    assert (d.replica_id, d.reason) == ("a", "prefix")
    d = PrefixCostPolicy(idx, BS, RouterConfig(switch_margin=0)).choose(rs, hs, 10 * BS + 12)
    assert d.replica_id == "b"  # without the margin, b's estimate is (just) lower


def test_an_idle_holder_keeps_its_prefix_whatever_the_measured_rates():
    idx = PrefixIndex()
    hs = chain(10)
    idx.add("a", hs)
    rs = replicas("a", "b")
    rs[0].prefill_tokens_per_s, rs[1].prefill_tokens_per_s = 200, 50000  # a's rate from a few tiny prefills
    rs[0].step_s = 0.05
    d = PrefixCostPolicy(idx, BS, RouterConfig(switch_margin=0)).choose(rs, hs, 10 * BS + 12)
    assert (d.replica_id, d.reason, d.predicted_cached_tokens) == ("a", "prefix", 10 * BS)
    rs[0].num_running = 1  # busy: now the estimate decides
    assert PrefixCostPolicy(idx, BS, RouterConfig(switch_margin=0)).choose(rs, hs, 10 * BS + 12).replica_id == "b"


def test_measured_rates_are_used():
    policy = PrefixCostPolicy(PrefixIndex(), BS, RouterConfig())
    slow = ReplicaState("slow", prefill_tokens_per_s=100)
    fast = ReplicaState("fast", prefill_tokens_per_s=1000)
    assert policy.estimate_ttft(slow, 1000, 0, 0) == pytest.approx(10 * policy.estimate_ttft(fast, 1000, 0, 0))
    unknown = ReplicaState("new")
    assert policy.estimate_ttft(unknown, 1000, 0, 0) == pytest.approx(1000 / policy.default_prefill)


def test_store_import_beats_recompute_and_counts_as_cached():
    idx = PrefixIndex()
    hs = chain(30)
    idx.add(STORE, hs)
    idx.add("a", hs[:5])
    policy = PrefixCostPolicy(idx, BS, RouterConfig())
    rs = replicas("a", "b")
    d = policy.choose(rs, hs, 30 * BS + 1)
    assert d.predicted_cached_tokens == 30 * BS
    # both can import the 30 blocks; a also has 5 locally, so it is (slightly) cheaper
    assert d.replica_id == "a"
    est_import = policy.estimate_ttft(rs[1], 30 * BS + 1, 0, 30)
    est_recompute = policy.estimate_ttft(rs[1], 30 * BS + 1, 0, 0)
    assert est_import < est_recompute / 5


def test_a_store_that_fails_to_deliver_is_trusted_less():
    idx = PrefixIndex()
    hs = chain(40)
    idx.add(STORE, hs)
    idx.add("a", hs)
    policy = PrefixCostPolicy(idx, BS, RouterConfig())
    rs = replicas("a", "b")
    rs[0].queued_prefill_tokens = 200  # a holds the prompt but has work queued; b could import it all
    d = policy.choose(rs, hs, 40 * BS + 1)
    assert (d.replica_id, d.reason, d.predicted_imported_tokens) == ("b", "store", 40 * BS)
    for _ in range(10):  # replicas sent to the store found a quarter of what it promised
        policy.observe_import(40 * BS, 10 * BS)
    assert policy.store_trust == pytest.approx(0.25, abs=0.1)
    d = policy.choose(rs, hs, 40 * BS + 1)
    assert (d.replica_id, d.reason, d.predicted_imported_tokens) == ("a", "prefix", 0)


def test_hot_spot_guard_skips_an_overloaded_holder():
    idx = PrefixIndex()
    hs = chain(20)
    idx.add("a", hs)
    rs = replicas("a", "b", "c")
    rs[0].in_flight = 30  # far above the mean of the others
    d = PrefixCostPolicy(idx, BS, RouterConfig(hot_factor=2.0, hot_slack=4)).choose(rs, hs, 20 * BS + 1)
    assert d.replica_id != "a"
    rs[0].in_flight = 5  # busy but not a hot spot: the prefix wins
    assert PrefixCostPolicy(idx, BS, RouterConfig()).choose(rs, hs, 20 * BS + 1).replica_id == "a"


# ---- no match: consistent hashing -------------------------------------------------------------------------
def test_unmatched_prefixes_spread_and_meet_again():
    policy = PrefixCostPolicy(PrefixIndex(), BS, RouterConfig())
    rs = replicas("a", "b", "c", "d")
    groups = [chain(3, seed=s) for s in range(200)]
    first = [policy.choose(rs, g, 3 * BS + 1).replica_id for g in groups]
    assert all(policy.choose(rs, g, 3 * BS + 1).reason == "hash" for g in groups[:3])
    assert first == [policy.choose(rs, g, 3 * BS + 1).replica_id for g in groups]  # same prefix, same replica
    counts = Counter(first)
    assert len(counts) == 4 and min(counts.values()) > 20  # spread over all replicas


def test_scale_out_moves_only_a_fraction_of_prefix_groups():
    ring = ConsistentHashRing(vnodes=64)
    keys = [h[0] for h in (chain(1, seed=s) for s in range(2000))]
    four = [ring.order(k, ["a", "b", "c", "d"])[0] for k in keys]
    five = [ring.order(k, ["a", "b", "c", "d", "e"])[0] for k in keys]
    moved = sum(x != y for x, y in zip(four, five)) / len(keys)
    assert 0.1 < moved < 0.35  # about 1/5, not most of them
    assert all(y == "e" for x, y in zip(four, five) if x != y)  # keys only move to the new replica


def test_bounded_load_overflows_to_the_next_replica():
    ring = ConsistentHashRing(vnodes=16, epsilon=0.25)
    key = chain(1)[0]
    home = ring.order(key, ["a", "b"])[0]
    other = "b" if home == "a" else "a"
    assert ring.choose(key, {home: 0, other: 0}) == home
    assert ring.choose(key, {home: 6, other: 2}) == other  # home would exceed ceil(1.25 * 9 / 2) = 6


def test_session_key_pins_a_conversation():
    policy = PrefixCostPolicy(PrefixIndex(), BS, RouterConfig())
    rs = replicas("a", "b", "c")
    picks = {policy.choose(rs, chain(2, seed=s), 40, session_key="user-42").replica_id for s in range(10)}
    assert len(picks) == 1 and policy.choose(rs, chain(2), 40, session_key="user-42").reason == "session"


def test_bench_router_smoke():
    from specserve.tools.bench_router import run

    r = run(total_blocks=640, replicas=2, prompt_blocks=8, decisions=50)
    assert r["indexed_blocks"] == 640 and r["decisions"] == 50 and 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]


def test_routing_outcomes_compare_predicted_with_actual_cached_tokens():
    def placed(predicted: int) -> Placement:
        return Placement(RouteDecision("r1", "prefix", predicted, 0.1), policy=None)

    out = RoutingOutcomes()
    out.record(RouteOutcome(prompt_tokens=100, cached_tokens=0, placement=None))  # a policy without predictions
    out.record(RouteOutcome(prompt_tokens=200, cached_tokens=160, placement=placed(160)))
    # the replica had evicted part of it
    out.record(RouteOutcome(prompt_tokens=200, cached_tokens=96, placement=placed(160)))
    d = out.as_dict()
    assert d["requests"] == 3 and d["hit_rate"] == pytest.approx(256 / 500)
    p = d["predicted"]
    assert p["requests"] == 2 and p["mean_abs_error_tokens"] == 32 and p["over_predicted_requests"] == 1
    assert p["by_reason"] == {"prefix": 2} and p["actual_cached_tokens"] == 256
