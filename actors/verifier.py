"""Verifier deployment: one engine per replica, running the target model.

Plain class; the app builder (deploy/app.py) turns it into a Serve deployment with options from config.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING

import ray
from ray import serve

from specserve.actors.draft.client import DrafterClient, DrafterWorkerLink
from specserve.actors.draft.ngram import NgramDrafter
from specserve.actors.draft.suffix import SuffixDrafter
from specserve.actors.engine.async_engine import AsyncEngine, StepHealth
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.block_hash import root_hash
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.messages import GenerateRequest, LoadReport, Progress, RequestOutput, ServedModel
from specserve.actors.engine.model_runner import kv_geometry
from specserve.actors.engine.structured import GrammarCompiler
from specserve.actors.engine.speculation import SpeculationController
from specserve.actors.engine.speculation_gate import SpeculationGate
from specserve.actors.model_loader import LoadedModel, load_model, wide_step_threads
from specserve.actors.packed_linear import pack_linear_weights
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.events import STORE, KVEventPublisher, stream_key
from specserve.cluster.kv.holder import HolderPayloads, holder_actor, holder_name
from specserve.cluster.kv.index import KVIndex
from specserve.cluster.kv.namespace import KVNamespace, kv_namespace, tenant_namespace
from specserve.cluster.kv.payload import BlockLayout
from specserve.cluster.kv.redis_client import connect, redis_config
from specserve.cluster.kv.store import KVStoreClient, RedisPayloads
from specserve.cluster.metrics import start_publisher, verifier_families
from specserve.cluster.priority import use_default_priority

if TYPE_CHECKING:  # imported where experts are used: most replicas run none
    from specserve.actors.experts.balancer import ExpertBalancer
    from specserve.actors.experts.ray_transport import ActorTransport

log = logging.getLogger(__name__)

# A stats call waits at most this long for the engine thread (between steps); longer means a stuck step, which
# check_health reports (engine.max_step_s): the call fails instead of holding the replica's shutdown.
ENGINE_CALL_TIMEOUT_S = 30.0


def eos_ids(tokenizer, hf_config) -> list[int]:
    ids = set()
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    gen = getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, int):
        ids.add(gen)
    return sorted(ids)


def build_kv_store(config: SpecserveConfig, namespace: KVNamespace, layout: BlockLayout) -> KVStoreClient | None:
    """The KV store client of this replica, or None when the store is off or no Redis is configured."""
    kc, server = config.kv_store, config.server
    if not kc.enabled:
        return None
    if not server.redis_url and not server.redis_sentinels:
        log.warning("KV store enabled but no Redis configured (server.redis_url): running without it")
        return None
    redis_cfg = redis_config(server, kc.timeout_s)
    index = KVIndex(connect(**redis_cfg), namespace.id, entry_ttl_s=kc.entry_ttl_s, claim_ttl_s=kc.claim_ttl_s,
                    max_entries=kc.max_index_entries)
    if kc.payload == "redis":
        transport = RedisPayloads()
    else:
        node_id = ray.get_runtime_context().get_node_id()
        capacity = int(kc.holder_capacity_gb * (1 << 30))
        events = stream_key(server.app_name) if config.router.policy == "prefix_cost" else ""

        def local_holder():
            return holder_name(server.app_name, node_id), holder_actor(server.app_name, node_id, redis_cfg, capacity,
                                                                       events)

        transport = HolderPayloads(local_holder)
    log.info("KV store: namespace %s, payloads in %s", namespace.id, transport.holder)
    return KVStoreClient.from_config(index, transport, layout, kc)


def build_kv_event_publisher(config: SpecserveConfig) -> KVEventPublisher | None:
    """Publishes this replica's prefix-cache events for prefix-aware routers (router.policy prefix_cost)."""
    server = config.server
    if config.router.policy != "prefix_cost" or not (server.redis_url or server.redis_sentinels):
        return None
    try:
        replica_id = serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a Serve replica (tests): nobody routes by it
        return None
    client = connect(**redis_config(server, config.kv_store.timeout_s))
    return KVEventPublisher(client, stream_key(server.app_name), replica_id)


def build_proposer(config: SpecserveConfig, vocab_size: int):
    """The engine's source of drafts: n-gram in this process, a client of drafter replicas, or none."""
    sp = config.speculative
    if sp.remote:
        # Suffix-tree workers draft without a model: ask first, size each tree from its scores, like in-process.
        suffix = {"prior_acceptance": SuffixDrafter.prior_acceptance, "drafts_are_free": True} \
            if sp.method == "suffix" else {}
        return DrafterClient(vocab_size, sampled_drafts=sp.draft_sampling == "sampled", timeout_s=sp.timeout_s,
                             **suffix)
    if sp.method == "ngram":
        return NgramDrafter(sp.ngram_min, sp.ngram_max, recycle=sp.recycle, recycle_width=sp.recycle_width)
    if sp.method == "suffix":
        return SuffixDrafter.from_config(sp)
    return None


def build_controller(config: SpecserveConfig, proposer) -> SpeculationController | None:
    """How much the engine speculates with `proposer` (None: no speculation)."""
    if proposer is None:
        return None
    sp = config.speculative
    # A probe of a sequence at k=0 is nearly free for n-gram drafts; a drafter replica must first catch up on
    # every token since its last round, so probe those rarely.
    return SpeculationController(sp.max_draft_tokens, adaptive=sp.adaptive,
                                 prior_acceptance=proposer.prior_acceptance,
                                 probe_every=16 if proposer.drafts_are_free else 64,
                                 gate=SpeculationGate() if sp.adaptive and sp.gate else None)


def build_experts(config: SpecserveConfig, loaded: LoadedModel) -> tuple[ActorTransport | None, ExpertBalancer | None]:
    """Expert actors serving the model's MoE layers (experts.num_actors), and their balancer (not started)."""
    ex = config.experts
    if not ex.num_actors:
        return None, None
    from specserve.actors.experts.ray_transport import attach_expert_actors

    experts = attach_expert_actors(loaded.model, str(loaded.path), ex.num_actors, num_cpus=ex.num_cpus,
                                   link=ex.transport, timeout_s=ex.timeout_s, restart_wait_s=ex.restart_wait_s,
                                   # the most tokens a step can carry: the channel's frame cap
                                   max_tokens_per_step=config.engine.max_num_batched_tokens
                                   + config.engine.max_num_seqs,
                                   shard_dense_ffn=ex.shard_dense_ffn, resources=ex.resources)
    if experts is None:
        log.warning("experts.num_actors=%d ignored: %s has no MoE layers (experts.shard_dense_ffn is off)",
                    ex.num_actors, config.model.name)
        return None, None
    if experts.ffn_shards or not ex.rebalance_period_s:
        return experts, None
    from specserve.actors.experts.balancer import ExpertBalancer
    from specserve.actors.experts.scaling import ActorScaler

    # experts.autoscaling: each balancer round also decides the number of actors.
    scaler = ActorScaler(**ex.autoscaling.model_dump(), redundant_slots=ex.redundant_slots) \
        if ex.autoscaling else None
    return experts, ExpertBalancer(experts, experts.experts_per_layer, redundant_slots=ex.redundant_slots,
                                   scaler=scaler)


@dataclass(frozen=True, kw_only=True)
class VerifierParts:
    """What a verifier replica builds on its engine thread: the engine and what is wired into it."""
    engine: LLMEngine
    namespace: KVNamespace  # whose blocks this engine's KV is compatible with
    kv_store: KVStoreClient | None  # the shared KV block store (kv_store.enabled)
    kv_events: KVEventPublisher | None  # prefix-cache events for prefix-aware routers
    experts: ActorTransport | None  # expert actors serving the MoE layers (experts.num_actors)
    expert_balancer: ExpertBalancer | None  # moves experts between those actors; the caller starts it


def build_verifier(config: SpecserveConfig) -> VerifierParts:
    """Load the model and build the engine with its KV store, KV event publisher, expert actors and drafts.
    Runs on the engine thread: all torch work does (see AsyncEngine)."""
    loaded = load_model(config.model, attn_implementation=ATTN_IMPLEMENTATION)
    experts, balancer = build_experts(config, loaded)
    if config.model.pack_weights:  # after the experts took their weights; CPU weights only
        log.info("packed %d linear layers for oneDNN", pack_linear_weights(loaded.model))
    ns = kv_namespace(config, loaded.path, kv_geometry(loaded.config))
    # The dtype the model runs in ("auto" resolved on this replica), which is what its KV blocks hold.
    layout = BlockLayout(str(loaded.dtype).removeprefix("torch."),
                         (2, ns.num_layers, ns.block_size, ns.num_kv_heads, ns.head_dim))
    kv_store = build_kv_store(config, ns, layout)
    kv_events = build_kv_event_publisher(config)
    try:
        if kv_store is not None and kv_events is not None:
            kv_store.on_committed = lambda hashes: kv_events.publish([(True, h) for h in hashes], holder=STORE)
        vocab_size = loaded.config.get_text_config().vocab_size
        proposer = build_proposer(config, vocab_size)
        eos = eos_ids(loaded.tokenizer, loaded.config)
        engine = LLMEngine.from_config(loaded.model, config.engine, eos_token_ids=eos, namespace=ns.id,
                                       proposer=proposer, controller=build_controller(config, proposer),
                                       wide_step_threads=wide_step_threads(config.model),
                                       kv_sink=kv_store.export if kv_store else None,
                                       kv_event_sink=kv_events.publish if kv_events else None,
                                       # None (structured requests refused) for a tokenizer wider than the model
                                       grammar_compiler=GrammarCompiler(loaded.tokenizer, vocab_size, eos)
                                       if vocab_size >= len(loaded.tokenizer) else None)
    except BaseException:  # e.g. no memory for the KV cache: nobody else will close the clients
        for client in (kv_store, kv_events):
            if client is not None:
                client.close()
        raise
    return VerifierParts(engine=engine, namespace=ns, kv_store=kv_store, kv_events=kv_events, experts=experts,
                         expert_balancer=balancer)


class Verifier:
    def __init__(self, config: dict, drafter=None):
        """`drafter`: handle of the Drafter deployment when speculative.method runs in drafter replicas."""
        self.config = SpecserveConfig.model_validate(config)
        t0 = time.perf_counter()
        use_default_priority()  # before the engine thread starts, which inherits it
        self._drafter = drafter
        self._stop = threading.Event()
        ec = self.config.engine
        # A few progress reports within the ingress's stall timeout: a request that waits behind others is busy,
        # not stalled.
        stall_s = self.config.server.stall_timeout_s
        self.async_engine = AsyncEngine(partial(build_verifier, self.config), engine_of=attrgetter("engine"),
                                        health=StepHealth(ec.max_consecutive_step_failures, ec.max_step_s),
                                        progress_every_s=stall_s / 4 if stall_s else None)
        parts: VerifierParts = self.async_engine.built
        self.namespace = parts.namespace
        self.kv_store = parts.kv_store
        self.kv_events = parts.kv_events
        self.experts = parts.experts
        self.expert_balancer = parts.expert_balancer
        if self.expert_balancer is not None:
            self.expert_balancer.run_every(self.config.experts.rebalance_period_s, self._stop)
        if self.kv_store is not None:
            self.async_engine.prefetch = self._prefetch
        if drafter is not None and isinstance(parts.engine.proposer, DrafterClient):
            threading.Thread(target=self._discover_drafters, name="specserve-drafter-discovery", daemon=True).start()
        self.metrics = start_publisher(self.config, "Verifier", self._metric_families)
        runner = parts.engine.runner
        self.served_model = ServedModel(dtype=str(runner.dtype).removeprefix("torch."), device=str(runner.device))
        bm = parts.engine.block_manager
        log.info("verifier ready: %s in %s on %s, %d KV blocks of %d tokens, loaded in %.1fs", self.config.model.name,
                 self.served_model.dtype, self.served_model.device, bm.num_blocks, bm.block_size,
                 time.perf_counter() - t0)

    def _prefetch(self, prompt_token_ids: list[int], hash_root: bytes | None):
        """The prompt's blocks this replica lacks, from the KV store (on an I/O thread, see AsyncEngine)."""
        _, missing = self.async_engine.engine.block_manager.missing_prefix(prompt_token_ids, hash_root)
        if not missing:
            return None
        fetched = self.kv_store.fetch(missing)
        return fetched if fetched.hashes else None

    def _discover_drafters(self) -> None:
        """Attach drafter workers: quickly while none is attached (startup, after a drafter died), then now and
        then to find new replicas. Runs on its own thread: a Serve handle call must not stall engine steps."""
        client: DrafterClient = self.async_engine.engine.proposer
        scaling = self.config.drafter.autoscaling
        # Autoscaled drafters come and go: look for up to their maximum, a few calls a round (each call reaches
        # one replica Serve picks), at a slower pace once some worker is attached.
        wanted = scaling.max_replicas if scaling else self.config.drafter.num_replicas
        while not self._stop.is_set():
            try:
                seen = set(client.workers())
                for _ in range(2 * wanted if len(seen) < wanted else 1):
                    worker_id, actor = self._drafter.get_worker.remote().result(timeout_s=30)
                    if worker_id not in seen:
                        client.attach_worker(worker_id, DrafterWorkerLink(actor))
                        seen.add(worker_id)
                        log.info("attached drafter worker %s", worker_id[:8])
            except Exception as exc:  # noqa: BLE001 - drafters may be restarting; retry
                log.info("no drafter worker yet: %s", exc)
            client.heartbeat()
            attached = len(client.workers())
            self._stop.wait(1.0 if not attached or (attached < wanted and not scaling) else 5.0 if scaling else 15.0)

    def _hash_root(self, tenant: str | None) -> bytes | None:
        """Root of a tenant's block hashes (None: the default tenant, the engine's own root)."""
        ns = tenant_namespace(self.namespace.id, tenant, self.config.kv_store.tenant)
        return None if ns == self.namespace.id else root_hash(ns)

    async def ping(self) -> ServedModel:
        """Readiness: answered once the engine is loaded (Serve routes nothing to a replica before), with what
        this replica runs the model with."""
        return self.served_model

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput | Progress]:
        """Stream the engine's outputs for one request, as they are (merged when the caller falls behind), and
        a Progress now and then while the engine steps for others."""
        async for out in self.async_engine.generate(request, hash_root=self._hash_root(request.tenant)):
            yield out

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread died, whose steps keep failing
        (engine.max_consecutive_step_failures) or whose step is stuck (engine.max_step_s) is replaced."""
        problem = self.async_engine.health_problem()
        if problem:
            raise RuntimeError(problem)

    def engine_stats(self, engine: LLMEngine) -> dict:
        """The engine's counters and gauges (read on the engine thread by stats(); the metrics thread reads them
        directly: plain ints and list copies, at worst a step apart)."""
        gate = engine.controller.gate if engine.controller is not None else None
        bm, s = engine.block_manager, engine.stats
        return {
            "num_running": len(engine.scheduler.running),
            "num_waiting": len(engine.scheduler.waiting),
            "kv_blocks_total": bm.num_blocks,
            "kv_blocks_free": bm.num_free_blocks,
            "kv_usage": bm.usage(),
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "prompt_tokens_computed": s.prompt_tokens,
            "steps": s.steps,
            "step_time_s": s.step_time_s,
            "torch_threads": __import__("torch").get_num_threads(),
            "wide_step": {"tokens": engine.runner.wide_step_tokens, "threads": engine.runner.wide_step_threads},
            "generated_tokens": s.generated_tokens,
            "preemptions": s.preemptions,
            "failed_steps": self.async_engine.health.failed_steps,
            "max_model_len": engine.max_model_len,
            "speculative_method": self.config.speculative.method,
            "speculation": engine.spec_stats.as_dict() if engine.spec_stats else None,
            "speculation_gate": gate.as_dict() if gate is not None else None,
            "drafter_client": dict(engine.proposer.stats, workers=len(engine.proposer.workers()))
            if isinstance(engine.proposer, DrafterClient) else None,
        }

    def experts_stats(self) -> dict | None:
        ex, balancer = self.experts, self.expert_balancer
        scaling = balancer.last_scaling if balancer is not None else None
        return None if ex is None else {
            "actors": len(ex.actors), "calls": ex.calls, "resent_to_replica": ex.resent_to_replica,
            "waited_for_restart": ex.waited_for_restart, "placements": ex.placements,
            "rows_per_actor": list(ex.rows_per_actor),
            "balance_rounds": list(balancer.rounds) if balancer else [],
            # experts.autoscaling: the latest round's decision (current, desired, target, reason), else None
            "scaling": scaling.as_dict() if scaling is not None else None}

    async def stats(self) -> dict:
        out = await self.async_engine.call(self.engine_stats, timeout_s=ENGINE_CALL_TIMEOUT_S)
        out["kv_namespace"] = self.namespace.id
        out["experts"] = self.experts_stats()
        out["kv_store"] = await asyncio.get_running_loop().run_in_executor(None, self._kv_store_stats)
        return out

    async def record_routing_stats(self) -> dict:
        """Load report for the request router (Serve polls it every router.stats_period_s, and carries it as a
        dict: LoadReport.from_dict reads it back in the router)."""
        def read(engine: LLMEngine) -> LoadReport:
            sched, bm = engine.scheduler, engine.block_manager
            queued = sum(s.num_uncomputed_tokens for s in sched.running if s.num_uncomputed_tokens > 1)
            for i, s in enumerate(sched.waiting):
                # A waiting prompt's cached prefix costs no prefill (checked for the first 64; hashing is not free).
                hit = i < 64 and not s.num_computed_tokens
                cached = len(bm.match_prefix(s.token_ids, s.hash_root)) * bm.block_size if hit else 0
                queued += max(1, s.num_uncomputed_tokens - cached)
            st = engine.stats
            return LoadReport(num_running=len(sched.running), num_waiting=len(sched.waiting),
                              queued_prefill_tokens=queued, prefill_tokens_per_s=st.prefill_tokens_per_s,
                              step_s=st.step_time_s / st.steps if st.steps else 0.0)

        report = await self.async_engine.call(read, timeout_s=ENGINE_CALL_TIMEOUT_S)
        if self.kv_store is not None:
            lat = self.kv_store.import_latency
            blocks = self.kv_store.counters.get("hit_blocks", 0)
            if lat.total > 0 and blocks:
                report.import_tokens_per_s = blocks * self.config.engine.block_size / lat.total
        return report.as_dict()

    def _metric_families(self) -> list:
        """This replica's metrics (on the metrics thread; see engine_stats)."""
        stats = self.engine_stats(self.async_engine.engine)
        stats["kv_store"] = self.kv_store.stats(with_index_size=False) if self.kv_store is not None else None
        stats["experts"] = self.experts_stats()
        return verifier_families(stats, self.config.model.name)

    def _kv_store_stats(self) -> dict | None:
        """Store client counters, the index size and this node's holder (Redis and Ray calls: off the loop)."""
        if self.kv_store is None:
            return None
        out = self.kv_store.stats()
        transport = self.kv_store.transport
        if isinstance(transport, HolderPayloads):
            try:
                out["local_holder"] = ray.get(transport.local.stats.remote(), timeout=5)
            except Exception as exc:  # noqa: BLE001
                out["local_holder"] = {"error": repr(exc)}
        return out

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        if getattr(self, "kv_store", None) is not None:
            self.kv_store.close()
        if getattr(self, "kv_events", None) is not None:
            self.kv_events.close()
        if hasattr(self, "async_engine"):
            self.async_engine.shutdown()
