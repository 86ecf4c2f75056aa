import pytest

from specserve.actors.engine.block_manager import BlockManager, NoFreeBlocksError
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.sequence import Sequence


def seq(tokens, rid="r"):
    return Sequence(rid, tokens, SamplingParams(max_tokens=4))


def computed(bm, s):
    s.num_computed_tokens = len(s)
    bm.register_computed_blocks(s)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(8, 4)
    s = seq(list(range(10)))
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(s)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_refcounts():
    bm = BlockManager(16, 4)
    a = seq(list(range(13)), "a")
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(12)) + [77, 78], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert all(bm.ref_counts[x] == 2 for x in a.block_table[:3])
    bm.free(a)
    assert all(bm.ref_counts[x] == 1 for x in b.block_table[:3])
    bm.check_invariants()


def test_whole_prompt_hit_still_leaves_last_token_to_compute():
    bm = BlockManager(16, 4)
    a = seq(list(range(8)), "a")
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    b = seq(list(range(8)), "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # block 2 would cover the last token, which must run for logits


def test_lru_eviction_of_unreferenced_cached_blocks():
    bm = BlockManager(4, 4)
    a = seq(list(range(9)), "a")  # 3 blocks, 2 full
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    assert len(bm.evictable) == 2 and len(bm.hash_to_block) == 2
    b = seq(list(range(100, 116)), "b")  # needs all 4 blocks: evicts both cached ones
    bm.allocate(b)
    assert len(bm.hash_to_block) == 0 and bm.num_free_blocks == 0
    with pytest.raises(NoFreeBlocksError):
        bm.ensure_slots(b, 17)
    bm.check_invariants()


def test_can_allocate_counts_evictable_hits_correctly():
    bm = BlockManager(3, 4)
    a = seq(list(range(9)), "a")
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)  # 2 cached blocks evictable, 1 free
    assert bm.can_allocate(seq(list(range(9)), "b"))  # reuses 2 hits + 1 new
    assert not bm.can_allocate(seq(list(range(50, 63)), "c"))  # needs 4 blocks


def test_import_block_registers_under_hash():
    bm = BlockManager(4, 4)
    from specserve.routing.block_hash import block_hashes
    h = block_hashes(list(range(4)), 4)[0]
    block = bm.take_block_for_import(h)
    assert block is not None and bm.cached_block(h) == block and bm.ref_counts[block] == 0
    assert bm.take_block_for_import(h) is None  # already cached
    s = seq(list(range(6)))
    bm.allocate(s)
    assert s.block_table[0] == block and s.num_cached_tokens == 4
    bm.check_invariants()


def test_readmission_after_preemption_does_not_inflate_cache_figures():
    bm = BlockManager(16, 4)
    s = seq(list(range(4)))
    bm.allocate(s)
    computed(bm, s)
    s.token_ids += [50, 51, 52, 53, 54]  # generated tokens
    bm.ensure_slots(s, len(s))
    s.num_computed_tokens = len(s) - 1
    bm.register_computed_blocks(s)
    bm.free(s)
    s.num_preemptions = 1
    bm.allocate(s)
    assert s.num_computed_tokens == 8  # recompute reuses the cached blocks, generated ones included
    assert s.num_cached_tokens == 0 and bm.prefix_queries == 4 and bm.prefix_hits == 0


def test_kv_events_follow_the_prefix_cache_in_order():
    from specserve.routing.block_hash import block_hashes

    bm = BlockManager(num_blocks=3, block_size=4, record_events=True)
    a = Sequence("a", list(range(9)), SamplingParams())
    bm.allocate(a)
    a.num_computed_tokens = 9
    bm.register_computed_blocks(a)
    ha = block_hashes(a.token_ids, 4, parent=bm.root)
    assert bm.drain_events() == [(True, ha[0]), (True, ha[1])]
    assert bm.drain_events() == []
    bm.free(a)
    b = Sequence("b", list(range(100, 109)), SamplingParams())
    bm.allocate(b)  # 3 blocks: the free one, then a's two cached blocks, its later block first
    assert bm.drain_events() == [(False, ha[1]), (False, ha[0])]
    assert BlockManager(num_blocks=2, block_size=4).drain_events() == []  # off by default
