"""Drafter deployment: drafts tokens for the verifiers with a draft model (method model, layer_skip, int8), or
from suffix trees shared by all the verifiers (method suffix, suffix_in: drafter).

A Serve deployment gives the drafters replicas, health checks, restarts and scaling of their own. The per-step
path must not pay a Serve handle call (several times the cost of a plain actor call), so each replica starts one
DrafterWorker, a plain Ray actor that holds the model and the per-sequence draft KV, and hands its handle to the
verifiers, which then call it directly. The worker is owned by the replica and dies with it; a replica whose
worker died fails its health check and Serve replaces it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import ray

from specserve.cluster.config import SpecserveConfig

log = logging.getLogger(__name__)

# Verifiers heartbeat every attached worker every few seconds (and call it every step they draft); one silent
# this long is gone. Counting live verifiers, not busy ones, keeps the drafters following the verifier replicas
# even when the router leaves one of them idle for a while.
ACTIVE_WINDOW_S = 30.0
# Every call a Drafter replica makes to its worker is bounded: a stuck worker fails the call (and the health
# check), never holds the replica's shutdown.
WORKER_CALL_TIMEOUT_S = 10.0
# Each replica's worker is a named actor, so that operators' tools and `specserve chaos` can find it.
WORKER_NAME_PREFIX = "specserve-draft-worker-"


class DrafterWorker:
    """Plain Ray actor (see deploy/app.py for its resources). A sync actor: every call, and so every torch op,
    runs on one thread."""

    def __init__(self, config: dict):
        from specserve.actors.draft.draft_models import build_draft_model
        from specserve.actors.draft.model_drafter import ModelDrafter
        from specserve.cluster.priority import use_default_priority

        use_default_priority()
        cfg = SpecserveConfig.model_validate(config)
        sp = cfg.speculative
        self.method = sp.method
        self._last_call: dict[str, float] = {}
        if sp.method == "suffix":
            from specserve.actors.draft.suffix import SuffixDrafter
            from specserve.actors.draft.suffix_worker import SuffixDraftWorker

            self.drafter = SuffixDraftWorker(SuffixDrafter.from_config(sp),
                                             max_mirrored_tokens=sp.suffix_drafter_max_tokens)
            log.info("draft worker ready: suffix trees for %s", cfg.model.name)
            return
        loaded = build_draft_model(sp.method, cfg.model, sp)
        self.drafter = ModelDrafter(loaded.model, block_size=cfg.engine.block_size,
                                    kv_cache_memory_gb=sp.draft_kv_cache_memory_gb,
                                    max_model_len=cfg.engine.max_model_len)
        log.info("draft worker ready: %s (%s), %d KV blocks", cfg.model.name, sp.method, self.drafter.bm.num_blocks)

    def draft(self, client: str, requests: list, releases: list) -> list:
        """protocol.DraftRequest / DraftRelease in, one protocol.DraftReply per request out."""
        self._last_call[client] = time.monotonic()
        return self.drafter.draft_batch(client, requests, releases)

    def heartbeat(self, client: str) -> None:
        self._last_call[client] = time.monotonic()

    def active_verifiers(self) -> int:
        """Verifiers (drafter clients) heard from within the last ACTIVE_WINDOW_S."""
        cutoff = time.monotonic() - ACTIVE_WINDOW_S
        for client in [c for c, t in self._last_call.items() if t < cutoff]:
            del self._last_call[client]
        return len(self._last_call)

    def stats(self) -> dict:
        return {"method": self.method, "sequences_held": len(self.drafter.states),
                "active_verifiers": self.active_verifiers(), **self.drafter.stats}


class Drafter:
    def __init__(self, config: dict):
        cfg = SpecserveConfig.model_validate(config)
        d = cfg.drafter
        self.worker_id = uuid.uuid4().hex
        self.worker = ray.remote(DrafterWorker).options(
            num_cpus=d.num_cpus, num_gpus=d.num_gpus, max_restarts=0,
            name=WORKER_NAME_PREFIX + self.worker_id[:12]).remote(config)
        ray.get(self.worker.stats.remote())  # the model is loaded before the replica reports ready

    async def get_worker(self) -> tuple[str, object]:
        """(worker id, actor handle) for a verifier to call directly."""
        return self.worker_id, self.worker

    async def stats(self) -> dict:
        return await asyncio.wait_for(self.worker.stats.remote(), timeout=WORKER_CALL_TIMEOUT_S)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (cluster/autoscaling.py's DrafterPolicy reads it)."""
        from specserve.cluster.autoscaling import ACTIVE_VERIFIERS

        active = await asyncio.wait_for(self.worker.active_verifiers.remote(), timeout=WORKER_CALL_TIMEOUT_S)
        return {ACTIVE_VERIFIERS: active}

    async def check_health(self) -> None:
        await asyncio.wait_for(self.worker.stats.remote(), timeout=WORKER_CALL_TIMEOUT_S)
