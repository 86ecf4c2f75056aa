"""The compiled paged decode kernel (actors/engine/paged_decode.cpp) against attention written out in float64: decodes,
draft chains and draft trees, over KV rows scattered through the cache, in the dtypes the engine runs. Greedy
output through the kernel and through the SDPA path is checked against Hugging Face generate in test_engine.py,
test_spec_engine.py and test_draft_trees.py."""

import pytest
import torch

from specserve.actors.engine import cpu_kernels
from specserve.actors.engine.speculation import tree_ancestors

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels did not build here")


def reference(q, k_cache, v_cache, seqs, scale):
    """out[row] for every query row of `seqs` ([(rows, context slots, tree parents or None)]), in float64."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    g = heads // kv_heads
    out = {}
    for rows, context, tree in seqs:
        n, length = len(rows), len(context)
        seen = torch.ones(n, length, dtype=torch.bool)
        draft = torch.zeros(n - 1, n - 1, dtype=torch.bool)
        if n > 1:
            draft = tree_ancestors(tree) if tree is not None else torch.ones(n - 1, n - 1).tril().bool()
        seen[:, length - n + 1:] = False
        seen[1:, length - n + 1:] = draft
        k = k_cache[context].double()  # [L, Hkv, D]
        v = v_cache[context].double()
        for i, row in enumerate(rows):
            for h in range(heads):
                scores = (k[:, h // g] @ q[row, h].double()) * scale
                scores[~seen[i]] = float("-inf")
                out[(row, h)] = scores.softmax(0) @ v[:, h // g]
    return out


def run_kernel(q, k_cache, v_cache, seqs, scale):
    rows, row_offsets, slots, slot_offsets, visible = [], [0], [], [0], []
    for r, context, tree in seqs:
        rows += r
        row_offsets.append(len(rows))
        slots += context
        slot_offsets.append(len(slots))
        n = len(r)
        anc = tree_ancestors(tree) if tree is not None else torch.ones(n - 1, n - 1).tril().bool()
        visible.append(0)
        visible += [sum(1 << j for j in range(n - 1) if anc[i, j]) for i in range(n - 1)]
    out = torch.full((q.shape[0], q.shape[1], q.shape[2]), float("nan"), dtype=q.dtype)
    t = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    cpu_kernels.paged_attend(q, k_cache, v_cache, t(rows), t(row_offsets), t(slots), t(slot_offsets), t(visible),
                             scale, out)
    return out


def make_case(dtype, heads, kv_heads, dim, seed):
    g = torch.Generator().manual_seed(seed)
    num_slots = 600
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=g).to(dtype)
    free = torch.randperm(num_slots, generator=g).tolist()  # every sequence's context scattered over the cache
    # (queries, context length, tree): a decode, a context of one key, a chain of 4 drafts, two trees.
    shapes = [(1, 37, None), (1, 1, None), (5, 64, None), (6, 90, [-1, 0, 0, 1, 2]), (4, 20, [-1, -1, -1])]
    seqs, next_row = [], 0
    for n, length, tree in shapes:
        context = [free.pop() for _ in range(length)]
        seqs.append((list(range(next_row, next_row + n)), context, tree))
        next_row += n
    # q as the attention function gets it: a [T, H, D] view of a [H, T, D] tensor (not contiguous).
    q = torch.randn(heads, next_row + 3, dim, generator=g).to(dtype).transpose(0, 1)
    return q, k_cache, v_cache, seqs


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 16), (8, 2, 40)])
def test_kernel_matches_attention_written_out(dtype, tolerance, heads, kv_heads, dim):
    q, k_cache, v_cache, seqs = make_case(dtype, heads, kv_heads, dim, seed=heads * 100 + dim)
    scale = dim ** -0.5
    got = run_kernel(q, k_cache, v_cache, seqs, scale)
    want = reference(q, k_cache, v_cache, seqs, scale)
    for (row, h), expected in want.items():
        assert torch.allclose(got[row, h].double(), expected, atol=tolerance, rtol=tolerance), (row, h)
    queried = {row for rows, _, _ in seqs for row in rows}
    untouched = [r for r in range(q.shape[0]) if r not in queried]
    assert untouched and torch.isnan(got[untouched].float()).all(), "rows of no query must be left alone"


@pytest.mark.parametrize("dtype,heads,kv_heads,dim", [(torch.float32, 4, 2, 16), (torch.bfloat16, 9, 3, 64)])
def test_a_draft_token_sees_only_its_ancestors(dtype, heads, kv_heads, dim):
    """Changing the value of a draft token's sibling changes nothing for it; changing its parent's does (bfloat16
    with a head dim of 64: the keys are scored 16 at a time where the CPU has AVX-512 BF16)."""
    q, k_cache, v_cache, seqs = make_case(dtype, heads, kv_heads, dim, seed=5)
    rows, context, tree = seqs[3]  # parents [-1, 0, 0, 1, 2]: node 3's ancestors are 1 and 0, not 2
    base = run_kernel(q, k_cache, v_cache, seqs, 0.25)
    length, n = len(context), len(rows)
    sibling_slot = context[length - n + 1 + 2]  # node 2's key
    parent_slot = context[length - n + 1 + 1]  # node 1's key
    for slot, changes in ((sibling_slot, False), (parent_slot, True)):
        v2 = v_cache.clone()
        v2[slot] += 10.0
        out = run_kernel(q, k_cache, v2, seqs, 0.25)
        node3 = rows[1 + 3]
        assert (not torch.equal(out[node3], base[node3])) == changes


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("SPECSERVE_CPU_KERNELS", "0")
    assert cpu_kernels._build() is None
