"""Runs one engine step's forward: packs the scheduled tokens of all sequences into one row, describes where
their keys/values live in the paged cache, and returns the logits of the rows that produce a next token."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from specserve.actors.engine.attention import (
    ATTN_IMPLEMENTATION,
    AttentionMetadata,
    KVCache,
    PagedShortQueries,
    PrefillSpan,
    ShortQueryGroup,
    set_context,
)
from specserve.actors.engine import cpu_kernels
from specserve.actors.engine.decoder_forward import DecoderForward
from specserve.actors.engine.scheduler import ScheduledSeq
from specserve.actors.engine.speculation import tree_ancestors, tree_depths

log = logging.getLogger(__name__)


def text_config(config):
    """The decoder's part of a Hugging Face config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a Hugging Face decoder config."""
    config = text_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


def wants_prompt_logits(item: ScheduledSeq) -> bool:
    """Whether this step keeps the logits of every row of `item` (a prompt chunk of a request gathering
    prompt logprobs) rather than only the row that yields a token."""
    return item.seq.prompt_logprobs is not None and not item.num_draft and item.num_new_prompt_tokens > 0


# The kernel marks the draft tokens a query row sees in one int64 bitmask: a step with a longer draft (beyond the
# config's 64 speculative tokens) attends through the SDPA path.
MAX_KERNEL_QUERIES = 1 + 64


@dataclass
class _ShortQuery:
    rows: list[int]  # its rows in the packed batch
    context: list[int]  # cache slots of its whole context, new tokens included
    tree: list[int] | None  # a draft tree's parents (its rows after the first are the tree's nodes)


@contextlib.contextmanager
def _torch_threads(n: int):
    """The calling thread runs torch ops on `n` threads inside, on its count before afterwards. set_num_threads
    also sets the default a thread takes at its first parallel op: one starting torch work meanwhile (a KV fetch
    worker) keeps `n`."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModelRunner:
    def __init__(self, model, block_size: int, num_blocks: int | None = None, kv_cache_memory_gb: float = 1.0,
                 *, paged_kernel: bool | None = None, fused_layers: bool = True, wide_step_tokens: int = 0,
                 wide_step_threads: int = 0):
        """`paged_kernel`: attend short queries with the compiled kernel (paged_decode.cpp); None: on CPU where it
        builds. False: the SDPA path. `fused_layers`: run Llama-family models through DecoderForward (CPU, where
        the kernels build; decided at the first step, from the model's modules then); False: the model's own
        forward. `wide_step_tokens`, `wide_step_threads`: a step of at least that many tokens runs on that many
        torch threads (CPU; only if more than the calling thread's count, which the other steps keep; see
        EngineConfig.wide_step_tokens); 0: off."""
        self.model = model
        if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
            model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        layers, kv_heads, head_dim = kv_geometry(model.config)
        self.query_groups = text_config(model.config).num_attention_heads // kv_heads  # query heads per KV head
        if not num_blocks:
            bytes_per_block = 2 * layers * block_size * kv_heads * head_dim * self.dtype.itemsize
            num_blocks = max(1, int(kv_cache_memory_gb * (1 << 30)) // bytes_per_block)
        self.num_blocks = num_blocks
        self.kv_cache = KVCache(layers, num_blocks, block_size, kv_heads, head_dim, self.dtype, self.device)
        usable = paged_kernel is not False and self.device.type == "cpu" and cpu_kernels.available()
        if paged_kernel and not usable:
            raise RuntimeError("the paged decode kernel runs on CPU only, and must build here (see the log)")
        self.paged_kernel = usable
        self.fused_layers = fused_layers
        self.decoder: DecoderForward | None = None  # built at the first step where fused_layers
        wide = self.device.type == "cpu" and wide_step_tokens > 0 and wide_step_threads > torch.get_num_threads()
        self.wide_step_tokens, self.wide_step_threads = (wide_step_tokens, wide_step_threads) if wide else (0, 0)

    def fused_decoder(self) -> DecoderForward | None:
        """The DecoderForward the next step runs, built on first call; None: the model's own forward."""
        if self.fused_layers and self.decoder is None:
            self.decoder, why_not = DecoderForward.build(self.model)
            if self.decoder is None:
                log.info("decoder layers run the model's own forward: %s", why_not)
                self.fused_layers = False
        return self.decoder if self.fused_layers else None

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        return self.slots(block_table, range(start, end))

    def slots(self, block_table: list[int], positions) -> list[int]:
        """The cache slots of a sequence's `positions`."""
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in positions]

    def prepare(self, batch: list[ScheduledSeq]):
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        short: list[_ShortQuery] = []  # decodes and verifications
        prefills: list[PrefillSpan] = []
        logit_rows: list[int] = []
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            row = len(input_ids)
            input_ids.extend(seq.token_ids[start:end - item.num_draft])
            tree = None
            if item.num_draft:
                input_ids.extend(seq.draft.tokens)
                tree = seq.draft.parents
            if tree is not None:  # node j sits at the slot after its predecessor in the list, at position of its depth
                positions.append(start)
                positions.extend(start + d for d in tree_depths(tree))
            else:
                positions.extend(range(start, end))
            slot_mapping.extend(self._slots(seq.block_table, start, end))
            if n == 1 or item.num_draft:
                short.append(_ShortQuery(list(range(row, row + n)), self._slots(seq.block_table, 0, end), tree))
            else:
                mask = None
                if start > 0:  # chunk after cached context: row i sees keys 0..start+i
                    mask = torch.arange(end, device=self.device)[None, :] <= (
                        torch.arange(start, end, device=self.device)[:, None])
                slots = torch.tensor(self._slots(seq.block_table, 0, end), device=self.device)
                prefills.append(PrefillSpan(row, n, slots, mask))
            if item.num_draft or wants_prompt_logits(item):
                # Verification: logits at the last committed token and at every draft token. Prompt logprobs:
                # at every prompt row.
                logit_rows.extend(range(row, row + n))
            elif item.completes_prompt:
                logit_rows.append(row + n - 1)

        meta = AttentionMetadata(slot_mapping=torch.tensor(slot_mapping, device=self.device), short=[],
                                 prefills=prefills)
        if self.paged_kernel and short and max(len(sq.rows) for sq in short) <= MAX_KERNEL_QUERIES:
            meta.paged = self._paged_queries(short)
        elif short:
            # Sequences are grouped by size class of their query count (1, 2, 3-4, 5-8, ...): a group pads to its
            # longest, and attention cost grows with the padded count.
            classes: dict[int, list[_ShortQuery]] = {}
            for sq in short:
                classes.setdefault(1 << (len(sq.rows) - 1).bit_length(), []).append(sq)
            meta.short = [self._short_group(group) for _, group in sorted(classes.items())]
        ids = torch.tensor([input_ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        return ids, pos, meta, logit_rows

    def _paged_queries(self, short: list[_ShortQuery]) -> PagedShortQueries:
        rows, row_offsets, slots, slot_offsets, visible = [], [0], [], [0], []
        for sq in short:
            rows.extend(sq.rows)
            row_offsets.append(len(rows))
            slots.extend(sq.context)
            slot_offsets.append(len(slots))
            # Row j sees the draft tokens before it in a chain; in a tree, the node's ancestors and itself.
            if sq.tree is None:
                visible.extend((1 << j) - 1 for j in range(len(sq.rows)))
            else:
                seen: list[int] = []
                for node, parent in enumerate(sq.tree):
                    seen.append((1 << node) | (seen[parent] if parent >= 0 else 0))
                visible.append(0)
                visible.extend(seen)
        # Up to 64 draft tokens (MAX_KERNEL_QUERIES): bit 63 is int64's sign bit.
        visible = [v - (1 << 64) if v >= 1 << 63 else v for v in visible]
        tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return PagedShortQueries(rows=tensor(rows), row_offsets=tensor(row_offsets), slots=tensor(slots),
                                 slot_offsets=tensor(slot_offsets), visible=tensor(visible))

    def _short_group(self, group: list[_ShortQuery]) -> ShortQueryGroup:
        nq = max(len(sq.rows) for sq in group)
        width = max(len(sq.context) for sq in group)
        # Query i of a sequence with n queries and context length L sees keys 0 .. L - n + i (causal over its own
        # draft tokens); a tree's node rows see the committed context and their ancestors only. Padding queries
        # repeat the last one and are dropped afterwards.
        rows, last_key, slots, valid = [], [], [], []
        for i, sq in enumerate(group):
            n = len(sq.rows)
            rows.append(sq.rows + [sq.rows[-1]] * (nq - n))
            last_key.append([len(sq.context) - n + min(j, n - 1) for j in range(nq)])
            slots.append(sq.context + [0] * (width - len(sq.context)))
            valid.extend(range(i * nq, i * nq + n))
        keys = torch.arange(width)[None, None, :] <= torch.tensor(last_key)[:, :, None]
        for i, sq in enumerate(group):
            if sq.tree is not None:
                n = len(sq.rows)
                base = len(sq.context) - n  # the key of the last committed token
                keys[i, 1:n, base + 1:base + n] = tree_ancestors(sq.tree)
        return ShortQueryGroup(
            rows=torch.tensor(rows, device=self.device), slots=torch.tensor(slots, device=self.device),
            mask=keys.repeat(1, self.query_groups, 1).unsqueeze(1).to(self.device),
            valid=torch.tensor(valid, device=self.device),
            out_rows=torch.tensor([x for sq in group for x in sq.rows], device=self.device))

    @torch.inference_mode()
    def execute(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Forward the batch; returns float32 logits in batch order: one row per sequence that completes its
        prompt or decodes, 1 + k rows per sequence verifying k draft tokens, none for partial prefill chunks,
        except every row of a chunk that `wants_prompt_logits`."""
        ids, pos, meta, logit_rows = self.prepare(batch)
        # Only the rows that produce a token go through the LM head: prefill rows would cost vocab x hidden each.
        keep = torch.tensor(logit_rows if logit_rows else [ids.shape[1] - 1], device=self.device)
        decoder = self.fused_decoder()
        wide = self.wide_step_tokens and ids.shape[1] >= self.wide_step_tokens
        with _torch_threads(self.wide_step_threads) if wide else contextlib.nullcontext():
            if decoder is not None:
                logits = decoder(ids[0], pos[0], keep, self.kv_cache, meta)
            else:
                set_context(self.kv_cache, meta)
                try:
                    logits = self.model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep).logits[0]
                finally:
                    set_context(None, None)
        logits = logits.float()
        return logits if logit_rows else logits[:0]

    # ---- KV of whole blocks (export to / import from the shared store) ------------------------------------
    def _block_slots(self, blocks: list[int]) -> torch.Tensor:
        bs = self.block_size
        return (torch.tensor(blocks, device=self.device)[:, None] * bs + torch.arange(bs, device=self.device)).flatten()

    def block_shape(self) -> tuple[int, ...]:
        """[2 (K, V), layers, block_size, kv_heads, head_dim]: one block as it travels."""
        layers, _, heads, dim = self.kv_cache.k.shape
        return 2, layers, self.block_size, heads, dim

    def read_blocks(self, blocks: list[int]) -> torch.Tensor:
        """[n, 2, layers, block_size, kv_heads, head_dim] copy of the blocks' KV, on the CPU."""
        slots = self._block_slots(blocks)
        n, (_, layers, bs, heads, dim) = len(blocks), self.block_shape()
        k = self.kv_cache.k.index_select(1, slots).view(layers, n, bs, heads, dim)
        v = self.kv_cache.v.index_select(1, slots).view(layers, n, bs, heads, dim)
        return torch.stack([k, v], dim=1).transpose(0, 2).contiguous().to("cpu")

    def write_blocks(self, blocks: list[int], kv: torch.Tensor) -> None:
        if tuple(kv.shape[1:]) != self.block_shape() or kv.shape[0] != len(blocks):
            raise ValueError(f"KV blocks of shape {tuple(kv.shape)} do not match {len(blocks)} blocks of this "
                             f"engine's {self.block_shape()}")
        slots = self._block_slots(blocks)
        layers, heads, dim = self.kv_cache.k.shape[0], self.kv_cache.k.shape[2], self.kv_cache.k.shape[3]
        kv = kv.to(self.device, self.kv_cache.k.dtype).transpose(0, 2)  # [layers, 2, n, bs, heads, dim]
        self.kv_cache.k.index_copy_(1, slots, kv[:, 0].reshape(layers, -1, heads, dim))
        self.kv_cache.v.index_copy_(1, slots, kv[:, 1].reshape(layers, -1, heads, dim))

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy the KV of blocks `src` into blocks `dst`, pairwise (a forked choice's copy of a shared block)."""
        self._copy(self._block_slots(src), self._block_slots(dst))

    def copy_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the KV of slots `src` into slots `dst`, pairwise, in every layer (all read before any is written:
        the two may overlap)."""
        self._copy(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))

    def _copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.kv_cache.k.index_copy_(1, dst, self.kv_cache.k.index_select(1, src))
        self.kv_cache.v.index_copy_(1, dst, self.kv_cache.v.index_select(1, src))
