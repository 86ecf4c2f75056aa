"""Continuous batching with chunked prefill (Sarathi-Serve's stall-free batching).

Each step has a token budget. Running sequences that decode get one token each first, so new prompts never
stall them; the rest of the budget goes to prefill chunks, first of sequences already admitted, then of new
ones. When the KV pool runs out, the most recently admitted sequence is preempted (its blocks freed, to be
recomputed later; the prefix cache usually keeps most of them).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from specserve.actors.engine.block_manager import BlockManager
from specserve.actors.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on (draft tokens included)
    num_draft: int = 0  # of which draft tokens, appended after the sequence's last token

    @property
    def num_new_prompt_tokens(self) -> int:
        """Of this step's new tokens, those of the prompt (read before the step advances the sequence)."""
        return max(0, min(self.num_new_tokens, self.seq.num_prompt_tokens - self.seq.num_computed_tokens))

    @property
    def completes_prompt(self) -> bool:
        """After this step the sequence's KV covers all its tokens, so its last logits yield a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens - self.num_draft == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def decodes_only(self) -> bool:
        """Every sequence computes one token plus its draft: no prefill chunk in the step."""
        return all(it.num_new_tokens == 1 + it.num_draft for it in self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order

    def add(self, seq: Sequence, *, first: bool = False) -> None:
        """Queue `seq` for admission: last, or `first` (a forked choice without blocks of its own, admitted
        next while its prompt's blocks are fresh in the prefix cache)."""
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Run `seq`, which holds its blocks already (a choice forked from a running sequence)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    @property
    def free_seq_slots(self) -> int:
        return max(0, self.max_num_seqs - len(self.running))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished or aborted sequence and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.draft = None
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. Decodes: one token each plus the sequence's draft tokens, if any. A draft is cut to the budget (one
        #    token kept for each decode still to come; a draft's first tokens are a draft too), and dropped when
        #    the pool cannot take it; when even the one token needs a block and none is free, the newest
        #    sequences are preempted.
        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        for i, seq in enumerate(decodes):
            if seq not in self.running:
                continue
            room = budget - (len(decodes) - i)
            if seq.draft is not None and seq.num_draft_tokens > room:
                seq.draft = seq.draft.truncated(room) if room > 0 and seq.draft.cut_probs is None else None
            if seq.draft is not None and not self.bm.can_append(seq, len(seq) + seq.num_draft_tokens):
                seq.draft = None
            while not self.bm.can_append(seq, len(seq)):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            k = seq.num_draft_tokens
            self.bm.ensure_slots(seq, len(seq) + k)
            scheduled.append(ScheduledSeq(seq, 1 + k, k))
            budget -= 1 + k

        # 2. Prefill chunks of admitted sequences (their blocks are already allocated). Sequences with one
        #    uncomputed token were handled as decodes above.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_uncomputed_tokens > 1:
                n = min(seq.num_uncomputed_tokens, budget)
                scheduled.append(ScheduledSeq(seq, n))
                budget -= n

        # 3. Admit waiting sequences while budget, sequence slots and blocks last. A small reserve of blocks
        #    keeps room for the running sequences' next decode blocks. No admission in a step that had to
        #    preempt: the pool is short, and the victim would come straight back.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            reserve = len(self.running) if self.running else 0
            if not self.bm.can_allocate(seq, reserve=min(reserve, self.bm.num_blocks // 10)):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n

        return SchedulerOutput(scheduled, preempted)
