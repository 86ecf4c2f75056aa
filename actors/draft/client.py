"""The verifier's side of remote drafting: a Proposer that sends each step's draft requests to drafter workers.

Each sequence sticks to one worker (its attachment, with an epoch and how many committed tokens the worker
has seen). Per step there is one batched call per worker, all in flight at once, with a deadline. A worker
that fails is dropped and its sequences decode without speculation until discovery attaches a worker again
(they re-attach with a new epoch and a full resync); one that misses the deadline is rested for a while.
A reply whose epoch or base length does not match the sequence is stale and ignored. The drafter can only
cost speed: nothing here can change a committed token.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from specserve.actors.draft.model_drafter import probs_tensor
from specserve.actors.draft.protocol import DraftRelease, DraftReply, DraftRequest, DraftSampling
from specserve.actors.engine.speculation import Draft

log = logging.getLogger(__name__)


class InProcessDrafterLink:
    """A drafter worker's core (ModelDrafter, SuffixDraftWorker) in this process (tests, single-process tools)."""

    def __init__(self, drafter):
        self.drafter = drafter

    def submit(self, client: str, requests: list[DraftRequest], releases: list[DraftRelease]):
        return self.drafter.draft_batch(client, requests, releases)

    def collect(self, pending, timeout: float):
        return pending


class DrafterWorkerLink:
    """A drafter replica's DrafterWorker actor: one plain actor call per step (far cheaper than a Serve handle
    call)."""

    def __init__(self, actor):
        self.actor = actor

    def submit(self, client: str, requests: list[DraftRequest], releases: list[DraftRelease]):
        return self.actor.draft.remote(client, requests, releases)

    def collect(self, pending, timeout: float):
        import ray

        return ray.get(pending, timeout=timeout)

    def heartbeat(self, client: str) -> None:
        self.actor.heartbeat.remote(client)  # not awaited: a lost one only ages this verifier's presence


def invalid_draft(tokens, probs, k: int, vocab_size: int) -> str | None:
    """Why a drafter's reply cannot be used as a draft of at most `k` tokens, or None. A drafter is another
    process: anything it sends is checked before it reaches the model (a token id past the embedding rows
    would index out of bounds; probabilities feed rejection sampling)."""
    if not isinstance(tokens, (list, tuple)) or len(tokens) > k:
        return f"tokens must be a list of at most k={k}"
    for t in tokens:
        if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab_size:
            return f"token {t!r} outside the vocabulary [0, {vocab_size})"
    if probs is not None:
        q = np.asarray(probs)
        if q.ndim != 2 or q.shape[0] < len(tokens) or not np.issubdtype(q.dtype, np.floating):
            return f"probs of shape {q.shape} ({q.dtype}) for {len(tokens)} tokens"
        if not np.isfinite(q).all() or (q < 0).any():
            return "probs not finite and non-negative"
    return None


def invalid_tree(parents, scores, n: int) -> str | None:
    """Why a drafter's tree (parents, scores of its n tokens) cannot be used, or None."""
    if parents is not None:
        if not isinstance(parents, (list, tuple)) or len(parents) != n:
            return f"parents must be a list of {n}"
        for i, p in enumerate(parents):
            if not isinstance(p, (int, np.integer)) or isinstance(p, bool) or not -1 <= p < i:
                return f"parent {p!r} of token {i} is not an earlier token or -1"
    if scores is not None:
        if not isinstance(scores, (list, tuple)) or len(scores) != n:
            return f"scores must be a list of {n}"
        if not all(isinstance(x, (float, int)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in scores):
            return "scores must be numbers in [0, 1]"
    return None


@dataclass
class Attachment:
    worker: str
    epoch: int
    synced: int = 0  # committed tokens the worker has been sent


class DrafterClient:
    """`drafts_are_free`: the workers draft without a forward per token (suffix trees), so the engine asks them
    first and sizes each draft from what came back (see speculation.Proposer)."""

    observes_target = 0

    def __init__(self, vocab_size: int, *, sampled_drafts: bool, timeout_s: float, prior_acceptance: float = 0.6,
                 rest_s: float = 5.0, drafts_are_free: bool = False):
        self.drafts_are_free = drafts_are_free
        self.client_id = uuid.uuid4().hex
        self.vocab_size = vocab_size
        self.sampled_drafts = sampled_drafts
        self.timeout_s = timeout_s
        self.rest_s = rest_s
        self.prior_acceptance = prior_acceptance
        self._lock = threading.Lock()  # workers are attached by a discovery thread
        self._links: dict[str, object] = {}
        self._resting: dict[str, float] = {}
        self._attached: dict[str, Attachment] = {}
        self._releases: dict[str, list[DraftRelease]] = {}
        self.stats = {"calls": 0, "call_s": 0.0, "failures": 0, "timeouts": 0, "stale": 0, "resyncs": 0,
                      "invalid": 0}

    # ---- workers -------------------------------------------------------------------------------------------
    def attach_worker(self, worker_id: str, link) -> None:
        with self._lock:
            self._links[worker_id] = link

    def detach_worker(self, worker_id: str) -> None:
        with self._lock:
            self._links.pop(worker_id, None)
        self._releases.pop(worker_id, None)

    def workers(self) -> list[str]:
        with self._lock:
            return list(self._links)

    def heartbeat(self) -> None:
        """Tell every attached worker this verifier is alive (drafter autoscaling counts live verifiers)."""
        with self._lock:
            links = list(self._links.values())
        for link in links:
            if hasattr(link, "heartbeat"):
                try:
                    link.heartbeat(self.client_id)
                except Exception:  # noqa: BLE001 - a dead worker is found and dropped by the next propose
                    pass

    def _usable(self) -> dict[str, object]:
        now = time.monotonic()
        with self._lock:
            return {w: link for w, link in self._links.items() if self._resting.get(w, 0.0) <= now}

    def _attachment(self, seq_id: str, usable: dict) -> Attachment:
        att = self._attached.get(seq_id)
        if att is None or att.worker not in usable:
            load = {w: 0 for w in usable}
            for a in self._attached.values():
                if a.worker in load:
                    load[a.worker] += 1
            worker = min(sorted(load), key=load.__getitem__)
            att = Attachment(worker, (att.epoch + 1) if att else 1)
            self._attached[seq_id] = att
        return att

    # ---- Proposer ------------------------------------------------------------------------------------------
    def propose(self, seqs: list, ks: list[int]) -> list[Draft | None]:
        drafts: list[Draft | None] = [None] * len(seqs)
        usable = self._usable()
        if not usable:
            return drafts
        groups: dict[str, list[tuple[int, DraftRequest]]] = {}
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            att = self._attachment(seq.seq_id, usable)
            p = seq.params
            sampling = None if p.greedy or not self.sampled_drafts else DraftSampling(p.temperature, p.top_k, p.top_p)
            req = DraftRequest(seq.seq_id, att.epoch, att.synced, seq.token_ids[att.synced:], k, sampling,
                               seq.num_prompt_tokens, seq.hash_root)
            groups.setdefault(att.worker, []).append((i, req))
        t0 = time.perf_counter()
        pending = {}
        for worker, items in groups.items():
            try:
                pending[worker] = usable[worker].submit(self.client_id, [r for _, r in items],
                                                        self._releases.pop(worker, []))
            except Exception as exc:  # noqa: BLE001 - a dead worker costs speculation, never the request
                self._failed(worker, exc)
        deadline = time.monotonic() + self.timeout_s
        for worker, handle in pending.items():
            try:
                replies = usable[worker].collect(handle, max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001
                self._failed(worker, exc, groups[worker])
                continue
            for (i, req), reply in zip(groups[worker], replies):
                drafts[i] = self._accept(seqs[i], reply, req.k)
        self.stats["calls"] += 1
        self.stats["call_s"] += time.perf_counter() - t0
        return drafts

    def _accept(self, seq, reply: DraftReply, k: int) -> Draft | None:
        att = self._attached.get(seq.seq_id)
        if att is None:
            return None
        if not isinstance(reply, DraftReply):
            return self._invalid(seq, att, f"malformed reply ({type(reply).__name__})")
        if reply.resync:  # the worker lost this sequence's state: send everything next time
            att.synced, att.epoch = 0, att.epoch + 1
            self.stats["resyncs"] += 1
            return None
        tokens, probs = reply.tokens, reply.probs
        why = invalid_draft(tokens, probs, k, self.vocab_size) or invalid_tree(reply.parents, reply.scores,
                                                                               len(tokens))
        if why is None and reply.parents is not None and probs is not None:
            why = "a draft tree with draft distributions"
        if why:
            return self._invalid(seq, att, why)
        if reply.epoch != att.epoch or reply.base != len(seq):
            # Not the worker's state of this sequence now: count nothing as synced (the next request's delta
            # will not match, and the worker asks for a resync).
            self.stats["stale"] += int(bool(tokens))
            return None
        att.synced = len(seq)
        if not tokens:
            return None
        return Draft([int(t) for t in tokens], probs_tensor(probs, self.vocab_size), None,
                     [int(p) for p in reply.parents] if reply.parents is not None else None,
                     [float(x) for x in reply.scores] if reply.scores is not None else None)

    def _invalid(self, seq, att: Attachment, why: str) -> None:
        """A reply that is no usable draft: decode without one, and resync the worker (its state for this
        sequence cannot be trusted either)."""
        self.stats["invalid"] += 1
        if self.stats["invalid"] <= 10 or self.stats["invalid"] % 1000 == 0:
            log.warning("drafter reply for %s dropped: %s", seq.seq_id, why)
        att.synced, att.epoch = 0, att.epoch + 1
        return None

    def _failed(self, worker: str, exc: BaseException, items=()) -> None:
        if isinstance(exc, TimeoutError):  # ray.get's GetTimeoutError is one
            # Still alive, probably busy (a long first prefill): rest it, and resync what it was sent.
            self.stats["timeouts"] += 1
            with self._lock:
                self._resting[worker] = time.monotonic() + self.rest_s
            for _, req in items:
                att = self._attached.get(req.id)
                if att is not None:
                    att.synced, att.epoch = 0, att.epoch + 1
        else:
            self.stats["failures"] += 1
            log.warning("drafter worker %s failed (%s); decoding without it", worker[:8], exc)
            self.detach_worker(worker)

    def observe(self, seq, input_tokens: list[int], guesses) -> None:
        pass  # not called: observes_target is 0

    def release(self, seq) -> None:
        att = self._attached.pop(seq.seq_id, None)
        if att is not None and att.worker in self._links:
            tokens = seq.token_ids[att.synced:] if att.synced else []  # nothing synced: nothing to complete
            self._releases.setdefault(att.worker, []).append(DraftRelease(seq.seq_id, tokens, seq.finish_reason))
