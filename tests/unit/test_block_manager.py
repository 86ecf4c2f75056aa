import pytest
import torch

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


def _chain(tokens, bm, root=None):
    from specserve.actors.engine.block_hash import block_hashes
    return block_hashes(tokens, bm.block_size, parent=root or bm.root)


def test_import_block_registers_under_hash():
    bm = BlockManager(4, 4)
    h = _chain(list(range(4)), bm)[0]
    assert bm.end_import(bm.begin_import([h]), written=True) == 1
    block = bm.cached_block(h)
    assert block is not None and bm.ref_counts[block] == 0
    imp = bm.begin_import([h])  # already cached: pinned, nothing new
    assert imp.new == [] and bm.ref_counts[block] == 1
    assert bm.end_import(imp, written=True) == 0 and bm.ref_counts[block] == 0
    s = seq(list(range(6)))
    bm.allocate(s)
    assert s.block_table[0] == block and s.num_cached_tokens == 4
    bm.check_invariants()


def _pool_nearly_full_of_cached_blocks():
    """6 blocks: 4 held by a running sequence, 1 cached and evictable, 1 free."""
    bm = BlockManager(6, 4)
    cached = seq(list(range(500, 505)), "cached")  # 1 full block, cached once freed
    bm.allocate(cached)
    computed(bm, cached)
    running = seq(list(range(100, 116)), "running")
    bm.allocate(running)
    bm.free(cached)
    assert len(bm.free_blocks) == 1 and len(bm.evictable) == 1
    return bm, running


def _write_import(bm, kv, hashes, markers):
    """What the engine does: pin blocks, write each new block's KV, register."""
    imp = bm.begin_import(hashes)
    ids = [b for _, b, _ in imp.new]
    kv[ids] = torch.tensor([markers[i] for i, _, _ in imp.new], dtype=kv.dtype)
    return ids, bm.end_import(imp, written=True)


def test_import_larger_than_the_free_pool_never_evicts_its_own_blocks():
    """Importing more blocks than are free: taking a block for a later hash must not evict (LRU) the block just
    installed for an earlier one. Before the fix the 3rd block reused the 1st: duplicate ids in the write, and
    a hash registered on a block holding another hash's KV. Now the import is cut to what fits (a shorter
    prefix), every id is distinct and every hash maps to the block holding its KV."""
    bm, running = _pool_nearly_full_of_cached_blocks()
    kv = torch.zeros(bm.num_blocks)
    hashes = _chain(list(range(1000, 1016)), bm)  # 4 blocks of another prompt
    markers = [11.0, 22.0, 33.0, 44.0]
    ids, installed = _write_import(bm, kv, hashes, markers)
    assert len(ids) == len(set(ids)) == installed == 2  # the free block and the one evictable block
    assert not set(ids) & set(running.block_table)
    for h, marker in zip(hashes[:installed], markers):
        assert kv[bm.cached_block(h)] == marker
    assert all(bm.cached_block(h) is None for h in hashes[installed:])
    bm.check_invariants()
    # The next admission of that prompt hits exactly the imported prefix.
    bm.free(running)
    s = seq(list(range(1000, 1016)) + [7], "s")
    bm.allocate(s)
    assert s.num_cached_tokens == 8 and [kv[b].item() for b in s.block_table[:2]] == markers[:2]
    bm.check_invariants()


def test_import_keeps_cached_blocks_of_its_run_and_skips_them():
    """A run whose head is cached here already: the head is pinned (not evicted for the tail) and not rewritten."""
    bm = BlockManager(3, 4)
    tokens = list(range(200, 212))
    a = seq(tokens[:5], "a")
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)  # block of hash 0 cached and evictable, 2 free
    hashes = _chain(tokens, bm)
    head = bm.cached_block(hashes[0])
    kv = torch.zeros(bm.num_blocks)
    kv[head] = 99.0
    ids, installed = _write_import(bm, kv, hashes, [1.0, 2.0, 3.0])
    assert installed == 2 and head not in ids
    assert [kv[bm.cached_block(h)].item() for h in hashes] == [99.0, 2.0, 3.0]
    bm.check_invariants()


def test_import_stops_at_a_repeated_hash_and_a_failed_write_frees_its_blocks():
    bm = BlockManager(8, 4)
    h = _chain(list(range(8)), bm)
    imp = bm.begin_import([h[0], h[1], h[0], h[1]])
    assert [x[2] for x in imp.new] == [h[0], h[1]] and len(imp.pinned) == 2
    assert bm.end_import(imp, written=False) == 0  # the KV write failed
    assert bm.cached_block(h[0]) is None and len(bm.free_blocks) == 8
    bm.check_invariants()


def test_import_into_a_full_pool_installs_nothing():
    bm = BlockManager(2, 4)
    s = seq(list(range(8)))
    bm.allocate(s)
    imp = bm.begin_import(_chain(list(range(50, 58)), bm))
    assert imp.new == [] and bm.end_import(imp, written=True) == 0
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
    from specserve.actors.engine.block_hash import block_hashes

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


def test_engine_import_larger_than_its_pool_installs_each_hash_with_its_own_kv(tmp_path):
    """Through the engine: 8 imported blocks into a pool of 6 (all free or cached). Each installed hash's block
    reads back the KV imported for that hash; the import is cut to what fits."""
    from transformers import AutoModelForCausalLM

    from specserve.actors.engine.engine import LLMEngine
    from tiny_models import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, seed=1), dtype=torch.float32).eval()
    engine = LLMEngine(model, block_size=4, num_blocks=6)
    bm = engine.block_manager
    engine.generate([list(range(3, 12))], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    assert len(bm.evictable) == 2  # cached blocks of a finished request, evictable
    hashes = _chain(list(range(20, 52)), bm)
    shape = engine.runner.block_shape()
    blocks = [torch.full(shape, float(i + 1)) for i in range(len(hashes))]
    installed = engine.import_blocks(hashes, blocks)
    assert installed == bm.num_blocks
    held = [bm.cached_block(h) for h in hashes[:installed]]
    assert None not in held and len(set(held)) == installed
    for i, block in enumerate(held):
        assert torch.equal(engine.runner.read_blocks([block])[0], blocks[i])
    assert all(bm.cached_block(h) is None for h in hashes[installed:])
    bm.check_invariants()


def test_engine_hands_each_tenants_new_blocks_to_the_kv_sink_with_its_hash_root(tmp_path):
    """The store bounds each tenant's share: the engine's export says whose blocks they are (one call per root)."""
    from transformers import AutoModelForCausalLM

    from specserve.actors.engine.engine import LLMEngine
    from specserve.actors.engine.block_hash import root_hash
    from tiny_models import make_tiny_model

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, seed=1), dtype=torch.float32).eval()
    calls = []
    engine = LLMEngine(model, block_size=4, num_blocks=32, kv_sink=lambda hs, kv, root: calls.append((hs, root)))
    tenant_root = root_hash("ns/tenant/acme")
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    prompt = list(range(3, 12))
    engine.add_request("default", prompt, params)
    engine.add_request("acme", prompt, params, hash_root=tenant_root)
    while engine.has_unfinished():
        engine.step()
    exported = {root: hs for hs, root in calls}
    assert len(calls) == 2 and set(exported) == {None, tenant_root}
    assert exported[None] == _chain(prompt[:8], engine.block_manager)
    assert exported[tenant_root] == _chain(prompt[:8], engine.block_manager, tenant_root)
