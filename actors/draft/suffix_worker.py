"""Suffix decoding in drafter replicas (speculative.suffix_in: drafter): one SuffixDrafter behind the drafter
protocol (protocol.py), shared by every verifier that attaches, so each tenant's global tree learns from the
outputs of all the verifiers instead of one replica's. Sequences are mirrored from the committed tokens the
verifiers send; a sequence that ends (DraftRelease) joins its tenant's tree.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from specserve.actors.draft.protocol import DraftRelease, DraftReply, DraftRequest
from specserve.actors.draft.suffix import SuffixDrafter


@dataclass
class MirroredSequence:
    """A verifier's sequence as far as the worker was told: what SuffixDrafter reads of a sequence."""
    seq_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    hash_root: bytes | None
    epoch: int
    finish_reason: str | None = None


class SuffixDraftWorker:
    """`max_mirrored_tokens`: tokens of live sequences mirrored here (each also has its request tree), least
    recently drafted sequences dropped first beyond it (their verifier resyncs)."""

    def __init__(self, drafter: SuffixDrafter, *, max_mirrored_tokens: int = 1_000_000):
        self.drafter = drafter
        self.max_mirrored_tokens = max_mirrored_tokens
        self.mirrored_tokens = 0
        self.states: OrderedDict[tuple[str, str], MirroredSequence] = OrderedDict()
        self.stats = {"calls": 0, "sequences": 0, "draft_tokens": 0, "resyncs": 0, "evictions": 0, "busy_s": 0.0}

    def release(self, client: str, release: DraftRelease) -> None:
        seq = self.states.pop((client, release.id), None)
        if seq is not None:
            self.mirrored_tokens -= len(seq.token_ids)
            seq.token_ids.extend(release.tokens)
            seq.finish_reason = release.finish_reason  # a finished one's output joins the tenant's tree
            self.drafter.release(seq)

    def _drop(self, key: tuple[str, str]) -> None:
        seq = self.states.pop(key)
        self.mirrored_tokens -= len(seq.token_ids)
        self.drafter.release(seq)  # no finish_reason: the request tree goes, nothing joins the global tree

    def _sync(self, client: str, req: DraftRequest) -> MirroredSequence | None:
        key = (client, req.id)
        seq = self.states.get(key)
        if req.synced == 0:
            if seq is not None:
                self._drop(key)
            seq = self.states[key] = MirroredSequence(f"{client}/{req.id}", [], req.num_prompt_tokens, req.tenant,
                                                      req.epoch)
        elif seq is None or seq.epoch != req.epoch or len(seq.token_ids) != req.synced:
            return None
        seq.token_ids.extend(req.tokens)
        self.mirrored_tokens += len(req.tokens)
        self.states.move_to_end(key)
        return seq

    def draft_batch(self, client: str, requests: list[DraftRequest], releases: list[DraftRelease] = ()
                    ) -> list[DraftReply]:
        """One reply per request: a draft tree of at most k tokens with scores, or resync."""
        t0 = time.perf_counter()
        for release in releases:
            self.release(client, release)
        replies = [DraftReply(req.id, req.epoch) for req in requests]
        live: list[tuple[DraftReply, MirroredSequence, int]] = []
        for req, reply in zip(requests, replies):
            seq = self._sync(client, req)
            if seq is None:
                reply.resync = True
                self.stats["resyncs"] += 1
                continue
            reply.base = len(seq.token_ids)
            live.append((reply, seq, req.k))
        drafts = self.drafter.propose([s for _, s, _ in live], [k for _, _, k in live]) if live else []
        for (reply, _, _), draft in zip(live, drafts):
            if draft is not None:
                reply.tokens, reply.parents, reply.scores = draft.tokens, draft.parents, draft.scores
                self.stats["draft_tokens"] += len(draft.tokens)
        while self.mirrored_tokens > self.max_mirrored_tokens and len(self.states) > 1:
            self._drop(next(iter(self.states)))
            self.stats["evictions"] += 1
        self.stats["calls"] += 1
        self.stats["sequences"] += len(requests)
        self.stats["busy_s"] += time.perf_counter() - t0
        return replies
