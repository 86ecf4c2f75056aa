"""The messages between a verifier's DrafterClient (client.py) and a drafter worker (model_drafter.py,
suffix_worker.py): one batched call per verifier step, `draft(client id, [DraftRequest], [DraftRelease])` ->
[DraftReply], one reply per request in order. The worker keeps per-sequence state keyed by (client id, sequence
id) and learns committed tokens incrementally; a request it cannot apply is answered with `resync`, and the
client sends the whole sequence next time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class DraftSampling:
    """Sample the draft from the draft model's distribution with the request's own settings (for rejection
    sampling against the target's); no sampling: draft the argmax."""
    temperature: float
    top_k: int
    top_p: float


@dataclass
class DraftRequest:
    id: str  # the sequence (Sequence.seq_id)
    epoch: int  # the attachment's epoch: a reply of another epoch is stale
    synced: int  # committed tokens the worker was sent before (0: everything follows, start afresh)
    tokens: list[int]  # the committed tokens since
    k: int  # most draft tokens (a tree's nodes)
    sampling: DraftSampling | None = None
    num_prompt_tokens: int = 0  # where the sequence's output starts (suffix workers keep outputs)
    tenant: bytes | None = None  # the sequence's tenant namespace (suffix workers keep tenants apart)


@dataclass
class DraftRelease:
    """The sequence ended: drop its state (a suffix worker first keeps the output of a finished one, with
    `tokens`, the committed tokens the worker was not sent yet)."""
    id: str
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort (the engine's)


@dataclass
class DraftReply:
    id: str
    epoch: int
    base: int | None = None  # committed tokens the draft follows (None: no draft)
    tokens: list[int] = field(default_factory=list)
    probs: np.ndarray | None = None  # float16 [len(tokens), V] draft distributions of sampled drafts
    parents: list[int] | None = None  # a draft tree (speculation.Draft.parents); None: a chain
    scores: list[float] | None = None  # the worker's acceptance estimate per token (speculation.Draft.scores)
    resync: bool = False  # the worker has no usable state for the sequence: send everything next time
