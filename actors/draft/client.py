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

from specserve.actors.draft.model_drafter import ModelDrafter, probs_tensor
from specserve.actors.engine.speculation import Draft

log = logging.getLogger(__name__)


class InProcessDrafterLink:
    """A ModelDrafter in this process (tests, single-process tools)."""

    def __init__(self, drafter: ModelDrafter):
        self.drafter = drafter

    def submit(self, client: str, requests: list[dict], releases: list[str]):
        return self.drafter.draft_batch(client, requests, releases)

    def collect(self, pending, timeout: float):
        return pending


class DrafterWorkerLink:
    """A drafter replica's DrafterWorker actor: one plain actor call per step (far cheaper than a Serve handle
    call)."""

    def __init__(self, actor):
        self.actor = actor

    def submit(self, client: str, requests: list[dict], releases: list[str]):
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


@dataclass
class Attachment:
    worker: str
    epoch: int
    synced: int = 0  # committed tokens the worker has been sent


class DrafterClient:
    drafts_are_free = False
    observes_target = False

    def __init__(self, vocab_size: int, *, sampled_drafts: bool, timeout_s: float, prior_acceptance: float = 0.6,
                 rest_s: float = 5.0):
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
        self._releases: dict[str, list[str]] = {}
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
        groups: dict[str, list[tuple[int, dict]]] = {}
        for i, (seq, k) in enumerate(zip(seqs, ks)):
            if k <= 0:
                continue
            att = self._attachment(seq.seq_id, usable)
            p = seq.params
            req = {"id": seq.seq_id, "epoch": att.epoch, "synced": att.synced,
                   "tokens": seq.token_ids[att.synced:], "k": k,
                   "sampling": None if p.greedy or not self.sampled_drafts else
                   {"temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p}}
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
                drafts[i] = self._accept(seqs[i], reply, req["k"])
        self.stats["calls"] += 1
        self.stats["call_s"] += time.perf_counter() - t0
        return drafts

    def _accept(self, seq, reply: dict, k: int) -> Draft | None:
        att = self._attached.get(seq.seq_id)
        if att is None:
            return None
        try:
            resync, epoch, base = bool(reply["resync"]), reply["epoch"], reply["base"]
            tokens, probs = reply["tokens"], reply["probs"]
        except (KeyError, TypeError) as exc:
            return self._invalid(seq, att, f"malformed reply ({type(exc).__name__}: {exc})")
        if resync:  # the worker lost this sequence's state: send everything next time
            att.synced, att.epoch = 0, att.epoch + 1
            self.stats["resyncs"] += 1
            return None
        why = invalid_draft(tokens, probs, k, self.vocab_size)
        if why:
            return self._invalid(seq, att, why)
        att.synced = len(seq)
        if epoch != att.epoch or base != len(seq) or not tokens:
            self.stats["stale"] += int(bool(tokens))
            return None
        return Draft([int(t) for t in tokens], probs_tensor(probs, self.vocab_size))

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
                att = self._attached.get(req["id"])
                if att is not None:
                    att.synced, att.epoch = 0, att.epoch + 1
        else:
            self.stats["failures"] += 1
            log.warning("drafter worker %s failed (%s); decoding without it", worker[:8], exc)
            self.detach_worker(worker)

    def observe(self, seq, input_tokens: list[int], target_argmax: list[int]) -> None:
        pass  # not called: observes_target is False

    def release(self, seq) -> None:
        att = self._attached.pop(seq.seq_id, None)
        if att is not None and att.worker in self._links:
            self._releases.setdefault(att.worker, []).append(seq.seq_id)
