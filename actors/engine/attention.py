"""Attention over the paged KV cache, plugged into Hugging Face models through transformers' AttentionInterface.

The model runner packs all scheduled tokens of a step into one row (batch 1, positions per token) and sets an
AttentionMetadata before the forward. For each layer this function writes the new keys/values into the cache
slots, then attends: the short queries of sequences (decode tokens, and a verifying sequence's last token plus its
draft tokens, a chain or a tree) in padded, masked SDPA calls, one per size class; prefill chunks one sequence at
a time (causal within the chunk, full over the cached context before it).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from specserve.actors.engine import cpu_kernels

ATTN_IMPLEMENTATION = "specserve_paged"


@dataclass
class PrefillSpan:
    start: int  # first query row in the packed batch
    length: int  # query rows
    slots: torch.Tensor  # cache slots of the whole context (cached + this chunk), in position order
    mask: torch.Tensor | None  # [length, context] bool, None when the chunk is the whole context (plain causal)


@dataclass
class ShortQueryGroup:
    """Sequences with a few query rows each (decodes: 1; verifications: 1 + draft tokens, a chain or a tree),
    attended in one padded, masked SDPA call. The runner groups sequences by query count, so one long draft
    does not pad every decode of the step to its length."""
    rows: torch.Tensor  # [B, Q] query rows of each sequence in the packed batch (padding repeats its last row)
    slots: torch.Tensor  # [B, L] cache slots of each sequence's context (padded)
    mask: torch.Tensor  # [B, 1, G * Q, L] bool, True where a key is attended; row g * Q + i is query i of the
    # sequence, seen by the g-th query head of each KV head's group of G (see paged_attention)
    valid: torch.Tensor  # [V] positions in the flattened [B * Q] that are real rows
    out_rows: torch.Tensor  # [V] the packed-batch row of each of those


@dataclass
class PagedShortQueries:
    """All short queries of a step for the paged kernel (layout in paged_decode.cpp): no padding, no mask."""
    rows: torch.Tensor  # [V] int64: packed-batch rows, grouped by sequence
    row_offsets: torch.Tensor  # [N + 1] int64: sequence i's rows are rows[row_offsets[i]:row_offsets[i + 1]]
    slots: torch.Tensor  # [sum of context lengths] int64: each sequence's context slots in position order
    slot_offsets: torch.Tensor  # [N + 1] int64
    visible: torch.Tensor  # [V] int64: bit d - 1 set where the row sees the sequence's draft token d


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    short: list[ShortQueryGroup]  # the SDPA path's groups (empty when `paged` is set)
    prefills: list[PrefillSpan]
    paged: PagedShortQueries | None = None


class KVCache:
    """K and V tensors per layer, flattened over (block, offset) so a slot is block * block_size + offset."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


_local = threading.local()


def set_context(kv_cache: KVCache | None, meta: AttentionMetadata | None) -> None:
    _local.kv_cache, _local.meta = kv_cache, meta


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention interface: query [1, H, T, D], key/value [1, Hkv, T, D] of the step's tokens."""
    kv_cache: KVCache = _local.kv_cache
    meta: AttentionMetadata = _local.meta
    layer = module.layer_idx
    k_cache, v_cache = kv_cache.k[layer], kv_cache.v[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
    return attend(kv_cache, meta, layer, query[0].transpose(0, 1), scaling).unsqueeze(0), None


def attend(kv_cache: KVCache, meta: AttentionMetadata, layer: int, q: torch.Tensor,
           scaling: float | None) -> torch.Tensor:
    """Attention of the step's queries q [T, H, D] over layer `layer` of the cache, which already holds the step's
    keys and values; returns [T, H, D]."""
    k_cache, v_cache = kv_cache.k[layer], kv_cache.v[layer]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, H, D]
    if meta.paged is not None:
        p = meta.paged
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        cpu_kernels.paged_attend(q, k_cache, v_cache, p.rows, p.row_offsets, p.slots, p.slot_offsets, p.visible,
                                 scale, out)
    if meta.short or meta.prefills:
        qh = q.transpose(0, 1)  # [H, T, D]
        gqa = qh.shape[0] != k_cache.shape[1]
        for group in meta.short:
            _short_queries(group, qh, k_cache, v_cache, out, scaling)
        for span in meta.prefills:
            qp = qh[:, span.start:span.start + span.length].unsqueeze(0)  # [1, H, n, D]
            kp = k_cache.index_select(0, span.slots).transpose(0, 1).unsqueeze(0)  # [1, Hkv, L, D]
            vp = v_cache.index_select(0, span.slots).transpose(0, 1).unsqueeze(0)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None,
                                                scale=scaling, enable_gqa=gqa)
            out[span.start:span.start + span.length] = op[0].transpose(0, 1)
    return out


def _short_queries(group: ShortQueryGroup, q, k_cache, v_cache, out, scaling) -> None:
    # The G query heads that share a KV head become G * Q query rows of that head: one SDPA task per (sequence,
    # KV head) instead of per query head, and no expanded K/V (enable_gqa). On CPU this is ~5x faster than
    # enable_gqa for short queries, and the mask (repeated per group) stays the same.
    b, nq = group.rows.shape
    heads, dim = q.shape[0], q.shape[2]
    kv_heads = k_cache.shape[1]
    g = heads // kv_heads
    qd = q.index_select(1, group.rows.flatten()).view(kv_heads, g, b, nq, dim)
    qd = qd.permute(2, 0, 1, 3, 4).reshape(b, kv_heads, g * nq, dim)
    width = group.slots.shape[1]
    kd = k_cache.index_select(0, group.slots.flatten()).view(b, width, kv_heads, dim).transpose(1, 2)
    vd = v_cache.index_select(0, group.slots.flatten()).view(b, width, kv_heads, dim).transpose(1, 2)
    od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=group.mask, scale=scaling)
    od = od.view(b, kv_heads, g, nq, dim).permute(0, 3, 1, 2, 4).reshape(b * nq, heads, dim)  # [B * Q, H, D]
    out[group.out_rows] = od[group.valid]


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
