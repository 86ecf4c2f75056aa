"""Drafts from a model: a small model with the target's tokenizer, or a cheap copy of the target (layer-skip,
int8). Runs in a drafter replica and keeps each sequence's draft KV in a paged cache of its own.

The protocol (protocol.py: one batched call per verifier step) carries, per sequence: the attachment epoch,
`synced` (how many committed tokens the drafter was last told about), the committed tokens since then, and k.
The drafter keeps the KV of its own earlier drafts where they match what was committed (accepted tokens) and
rolls the rest back. A request it cannot apply (state evicted, replica restarted, epoch changed) is answered
with `resync`, and the verifier sends the whole sequence next time.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from specserve.actors.draft.protocol import DraftReply, DraftRequest
from specserve.actors.engine.block_manager import BlockManager, NoFreeBlocksError
from specserve.actors.engine.engine import context_window
from specserve.actors.engine.model_runner import ModelRunner
from specserve.actors.engine.sampler import greedy_tokens, processed_logits
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.scheduler import ScheduledSeq
from specserve.actors.engine.sequence import Sequence


@dataclass
class DraftState:
    seq: Sequence  # committed tokens, then this drafter's latest draft tokens
    epoch: int
    committed: int  # committed tokens known (the rest of seq.token_ids is draft)
    params: SamplingParams | None  # None: deterministic (greedy) drafts


class ModelDrafter:
    """`max_model_len`: 0 = the model's context window. The draft KV pool: `kv_cache_memory_gb` of memory, or
    exactly `num_blocks` blocks (tests)."""

    def __init__(self, model, *, block_size: int, max_model_len: int, kv_cache_memory_gb: float | None = None,
                 num_blocks: int | None = None):
        if (kv_cache_memory_gb is None) == (num_blocks is None):
            raise ValueError("size the draft KV pool by kv_cache_memory_gb or by num_blocks, not both")
        self.runner = ModelRunner(model, block_size, num_blocks, kv_cache_memory_gb or 0.0)
        self.bm = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching=False)
        self.max_model_len = context_window(model.config, max_model_len)
        self.states: OrderedDict[tuple[str, str], DraftState] = OrderedDict()  # LRU first
        self.stats = {"calls": 0, "sequences": 0, "draft_tokens": 0, "resyncs": 0, "evictions": 0, "busy_s": 0.0}

    # ---- state -------------------------------------------------------------------------------------------------
    def release(self, client: str, seq_id: str) -> None:
        state = self.states.pop((client, seq_id), None)
        if state is not None:
            self.bm.free(state.seq)

    def _sync(self, client: str, req: DraftRequest) -> DraftState | None:
        key = (client, req.id)
        state = self.states.get(key)
        sampling = req.sampling
        params = SamplingParams(max_tokens=None, temperature=sampling.temperature, top_k=sampling.top_k,
                                top_p=sampling.top_p) if sampling else None
        if req.synced == 0:
            if state is not None:
                self.bm.free(state.seq)
            state = DraftState(Sequence(req.id, [], SamplingParams(max_tokens=None)), req.epoch, 0, params)
            self.states[key] = state
        elif state is None or state.epoch != req.epoch or state.committed < req.synced:
            return None
        state.params = params
        seq, base, new = state.seq, req.synced, req.tokens
        # Keep the KV of draft tokens that were accepted (they equal the committed ones); roll back the rest.
        keep = 0
        drafted = seq.token_ids[base:]
        while keep < min(len(drafted), len(new)) and drafted[keep] == new[keep]:
            keep += 1
        del seq.token_ids[base + keep:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, base + keep)
        seq.token_ids.extend(new[keep:])
        # At least the last token is computed by the next forward (it yields the first draft's logits).
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq.token_ids) - 1)
        state.committed = len(seq.token_ids)
        self.states.move_to_end(key)
        return state

    def _reserve(self, state: DraftState, num_tokens: int, busy: set) -> bool:
        """Blocks for `num_tokens`, evicting the least recently used other sequences if the pool is short."""
        while not self.bm.can_append(state.seq, num_tokens):
            victim = next((k for k in self.states if k not in busy), None)
            if victim is None:
                return False
            self.bm.free(self.states.pop(victim).seq)
            self.stats["evictions"] += 1
        try:
            self.bm.ensure_slots(state.seq, num_tokens)
        except NoFreeBlocksError:
            return False
        return True

    # ---- drafting ----------------------------------------------------------------------------------------------
    def draft_batch(self, client: str, requests: list[DraftRequest], releases: list = ()) -> list[DraftReply]:
        """One reply per request: a chain of at most k tokens (with their distributions if sampled), or resync.
        `releases`: protocol.DraftRelease of sequences that ended."""
        t0 = time.perf_counter()
        for release in releases:
            self.release(client, release.id)
        replies: dict[str, DraftReply] = {}
        active: list[tuple[DraftState, int]] = []
        busy = {(client, r.id) for r in requests}
        for req in requests:
            reply = replies[req.id] = DraftReply(req.id, req.epoch)
            state = self._sync(client, req)
            if state is None:
                reply.resync = True
                self.stats["resyncs"] += 1
                continue
            reply.base = state.committed
            k = min(req.k, self.max_model_len - state.committed)
            if k > 0 and self._reserve(state, state.committed + k - 1, busy):
                active.append((state, k))
        probs: dict[str, list[torch.Tensor]] = {s.seq.request_id: [] for s, _ in active}
        # Step j drafts token j of every sequence that wants more than j tokens. The first step also computes
        # the committed tokens the draft KV lacks (the whole prompt on the first round).
        for j in range(max((k for _, k in active), default=0)):
            batch = [(s, k) for s, k in active if k > j]
            logits = self.runner.execute([ScheduledSeq(s.seq, s.seq.num_uncomputed_tokens) for s, _ in batch])
            for (state, _), row in zip(batch, logits):
                seq = state.seq
                seq.num_computed_tokens = len(seq.token_ids)
                if state.params is None or state.params.greedy:
                    token = int(greedy_tokens(row))
                else:
                    q = processed_logits(row, state.params).softmax(-1)
                    token = int(torch.multinomial(q, 1, generator=seq.generator))
                    probs[seq.request_id].append(q)
                seq.token_ids.append(token)
        for state, _ in active:
            reply = replies[state.seq.request_id]
            reply.tokens = state.seq.token_ids[state.committed:]
            if probs[state.seq.request_id]:
                reply.probs = torch.stack(probs[state.seq.request_id]).to(torch.float16).numpy()
            self.stats["draft_tokens"] += len(reply.tokens)
        self.stats["calls"] += 1
        self.stats["sequences"] += len(requests)
        self.stats["busy_s"] += time.perf_counter() - t0
        return [replies[r.id] for r in requests]


def probs_tensor(probs: np.ndarray | None, vocab_size: int) -> torch.Tensor | None:
    """Draft probabilities as float32 over the target vocabulary (a draft vocabulary may be padded differently)."""
    if probs is None:
        return None
    q = torch.from_numpy(np.asarray(probs, dtype=np.float32))
    if q.shape[-1] < vocab_size:
        q = torch.nn.functional.pad(q, (0, vocab_size - q.shape[-1]))
    return q[..., :vocab_size]
