"""Tenants sharing the KV store's bounds: one tenant's flood must not evict the others' entries. The policy
(largest share first, LRU within a tenant) on its own, in the holders' byte bound, in the Redis index's entry
bound (a real redis-server) and through the store client."""

import random
import time

import pytest
import torch

from specserve.cluster.kv.fairness import FairShareLRU
from specserve.cluster.kv.holder import SegmentLRU
from specserve.cluster.config import KVStoreConfig
from specserve.cluster.kv.index import DEFAULT_TENANT, KVIndex, register_holder
from specserve.cluster.kv.payload import BlockLayout
from specserve.cluster.kv.store import KVStoreClient, RedisPayloads, tenant_label
from specserve.actors.engine.block_hash import block_hashes, root_hash

LAYOUT = BlockLayout("float32", (2, 1, 4, 1, 4))


# ---- the policy --------------------------------------------------------------------------------------------------
def test_victim_is_the_coldest_key_of_the_tenant_holding_the_most():
    lru = FairShareLRU()
    for key in ("a1", "a2"):
        lru.add("a", key)
    for key in ("b1", "b2", "b3"):
        lru.add("b", key)
    lru.charge("a", 2)
    lru.charge("b", 3)
    assert lru.victim() == "b1"
    lru.touch("b1")
    assert lru.victim() == "b2"
    assert lru.victim(exclude={"b2", "b3", "b1"}) == "a1"  # b has nothing evictable: the next largest
    lru.charge("b", -2)
    assert lru.victim() == "a1"
    assert lru.tenant_of("a2") == "a" and "a2" in lru and len(lru) == 5


def test_a_tenant_is_forgotten_once_it_holds_nothing():
    lru = FairShareLRU()
    lru.add("a", "k")
    lru.charge("a", 10)
    lru.discard("k")
    assert lru.held == {"a": 10}  # still charged (e.g. a segment not freed yet)
    lru.charge("a", -10)
    assert lru.held == {} and lru.victim() is None


def _evicting_fairly(capacity: int, seed: int):
    """Random puts of random tenants into a SegmentLRU; each eviction is checked against the fair share."""
    rng = random.Random(seed)
    lru = SegmentLRU(capacity)
    for step in range(400):
        tenant = rng.choice("aabbbbbbcd")
        n = rng.randint(1, 4)
        ids = [f"{tenant}-{step}-{i}" for i in range(n)]
        before = lru.tenant_bytes()
        evicted = lru.add(ids, [10] * n, f"seg-{step}", tenant)
        held = dict(before)
        held[tenant] = held.get(tenant, 0) + 10 * n
        share = capacity / len(held)
        for victim in evicted:
            owner = victim.split("-")[0]
            # only a tenant above its fair share is ever evicted from
            assert held[owner] > share, (step, owner, held, share)
        yield lru


def test_holder_evicts_only_from_tenants_above_their_fair_share():
    for lru in _evicting_fairly(capacity=300, seed=7):
        assert lru.held_bytes <= 300 + 40  # over only by a batch that is kept until the next add


def test_holder_flood_by_one_tenant_leaves_the_others_blocks():
    lru = SegmentLRU(capacity_bytes=1000)
    assert lru.add(["a1", "a2", "a3"], [100] * 3, "seg-a", "a") == []  # 300 bytes, under its half
    flood = []
    for i in range(50):
        flood += lru.add([f"b{i}"], [100], f"seg-b{i}", "b")
    assert all(lru.get(k) is not None for k in ("a1", "a2", "a3"))
    assert set(flood) == {f"b{i}" for i in range(43)}  # b evicted only its own, oldest first
    assert lru.tenant_bytes() == {"a": 300, "b": 700} and lru.held_bytes == 1000


def test_holder_tenant_over_its_share_gives_way_to_a_newcomer():
    lru = SegmentLRU(capacity_bytes=1000)
    for i in range(10):
        lru.add([f"a{i}"], [100], f"seg-a{i}", "a")  # a fills the store alone
    for i in range(5):
        assert lru.add([f"b{i}"], [100], f"seg-b{i}", "b") == [f"a{i}"]
    assert lru.tenant_bytes() == {"a": 500, "b": 500}
    # at equal shares b's next block makes b the largest: it evicts its own, a keeps its fair share
    assert lru.add(["b5"], [100], "seg-b5", "b") == ["b0"]
    assert lru.tenant_bytes() == {"a": 500, "b": 500}


# ---- the Redis index ---------------------------------------------------------------------------------------------
def hashes(n: int, seed: int) -> list[bytes]:
    return block_hashes(list(range(seed, seed + 4 * n)), 4, namespace="t")


def next_ms() -> None:
    """Wait for the millisecond clock to tick: LRU scores are milliseconds, and ties have no order."""
    start = int(time.time() * 1000)
    while int(time.time() * 1000) == start:
        time.sleep(0.0005)


def commit(index: KVIndex, hs: list[bytes], tenant: str, writer: str = "w") -> None:
    assert all(index.claim(hs, writer))
    assert all(index.commit(hs, writer, "h", "e1", [LAYOUT.nbytes] * len(hs), [0] * len(hs), LAYOUT, tenant))


def test_index_flood_by_one_tenant_leaves_the_others_entries(r):
    index = KVIndex.from_config(r, "fair1", KVStoreConfig(max_index_entries=10))
    register_holder(r, "h", "e1")
    mine = hashes(3, seed=0)
    commit(index, mine, "a")
    for batch in range(10):  # b commits 40 entries
        commit(index, hashes(4, seed=1000 + 100 * batch), "b")
    assert index.size() == 10 and index.tenant_sizes() == {"a": 3, "b": 7}
    entries, reason = index.lookup(mine, LAYOUT)
    assert len(entries) == 3 and reason is None
    flood = [h for batch in range(10) for h in hashes(4, seed=1000 + 100 * batch)]
    assert sum(r.exists(index.entry_key(h)) for h in flood) == 7  # b evicted only its own


def test_index_evicts_the_largest_tenant_down_to_the_others(r):
    index = KVIndex.from_config(r, "fair2", KVStoreConfig(max_index_entries=6))
    register_holder(r, "h", "e1")
    a = hashes(6, seed=0)
    commit(index, a, "a")  # a alone fills the bound
    commit(index, hashes(3, seed=500), "b")
    assert index.tenant_sizes() == {"a": 3, "b": 3}
    assert sum(r.exists(index.entry_key(h)) for h in a) == 3


def test_index_counts_follow_hits_releases_and_takeovers(r):
    index = KVIndex.from_config(r, "fair3", KVStoreConfig(max_index_entries=4))
    register_holder(r, "h", "e1")
    a, b = hashes(3, seed=0), hashes(2, seed=500)
    for h in a:
        commit(index, [h], "a")
        next_ms()
    commit(index, b, "b")  # 5 entries, bound 4: a (the largest) loses its coldest
    assert index.tenant_sizes() == {"a": 2, "b": 2} and not r.exists(index.entry_key(a[0]))
    next_ms()
    index.lookup(a[1:2], LAYOUT)  # a hit: a[2] is now a's coldest
    next_ms()
    commit(index, hashes(1, seed=900), "a")
    assert index.tenant_sizes() == {"a": 2, "b": 2}
    assert r.exists(index.entry_key(a[1])) and not r.exists(index.entry_key(a[2]))
    assert index.release(b[:1], "h", "e1") == 1
    assert index.tenant_sizes() == {"a": 2, "b": 1} and index.size() == 3
    register_holder(r, "h", "e2")  # the holder restarted: its entries are dead weight a writer may take over
    assert index.claim(b[1:], "w2") == [True]
    assert index.tenant_sizes() == {"a": 2} and index.size() == 2


# ---- through the store client ------------------------------------------------------------------------------------
def test_store_client_exports_count_for_the_blocks_tenant(r):
    index = KVIndex.from_config(r, "fair4", KVStoreConfig(max_index_entries=8))
    client = KVStoreClient.from_config(index, RedisPayloads(), LAYOUT, KVStoreConfig(timeout_s=0.5))
    try:
        root_a, root_b = root_hash("fair4/tenant/a"), root_hash("fair4/tenant/b")
        a = block_hashes(list(range(12)), 4, parent=root_a)
        assert client.export(a, torch.zeros(3, *LAYOUT.shape), root_a) and client.flush()
        for i in range(6):
            b = block_hashes(list(range(100 * i, 100 * i + 12)), 4, parent=root_b)
            assert client.export(b, torch.ones(3, *LAYOUT.shape), root_b) and client.flush()
        default = block_hashes(list(range(4)), 4)
        assert client.export(default, torch.ones(1, *LAYOUT.shape)) and client.flush()
        sizes = index.tenant_sizes()
        assert sizes[tenant_label(root_a)] == 3 and sizes[DEFAULT_TENANT] == 1 and index.size() == 8
        assert len(client.fetch(a).hashes) == 3
        assert tenant_label(None) == DEFAULT_TENANT and tenant_label(root_a) != tenant_label(root_b)
    finally:
        client.close()
