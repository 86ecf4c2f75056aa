"""The routing policies as Ray Serve request routers (Serve's alpha `RequestRouter` API) for the Verifier deployment.

Serve runs a router in every process that holds a Verifier handle (the ingress replicas) and asks it to rank the
replicas for each request; it then checks the first rank's queue and sends the request, falling back to the next
rank. PrefixCostRouter keeps its PrefixIndex in that process, fed by the verifiers' KV events (a Redis stream, read
by a background thread) and by its own decisions, so a decision calls no other actor. Replica load comes from the
verifiers' `record_routing_stats` (a LoadReport, polled by Serve) and the router's own in-flight counts. Each
decision is published to this process's router feedback (routing/feedback.py), where the front end takes it.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import asdict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from specserve.actors.engine.messages import GenerateRequest, LoadReport
from specserve.cluster.config import RouterConfig
from specserve.cluster.latency import LatencyStat
from specserve.cluster.kv.events import STORE
from specserve.routing.prefix_index import PrefixIndex
from specserve.routing.router_policy import PrefixCostPolicy, ReplicaState

log = logging.getLogger(__name__)


def _request_of(pending: PendingRequest | None) -> GenerateRequest | None:
    """The generation request a Verifier.generate call carries (None for its other methods)."""
    if pending is None or not pending.args or not isinstance(pending.args[0], GenerateRequest):
        return None
    return pending.args[0]


class PrefixCostRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, *, block_size: int, router: dict, redis: dict | None = None, stream: str = "", **_):
        """`router`: the config's router section as plain data; `redis` and `stream`: where the verifiers' KV
        events are read from (none: the index learns only from this router's own decisions)."""
        config = RouterConfig.model_validate(router)
        self.index = PrefixIndex(config.max_index_blocks)
        self.policy = PrefixCostPolicy(self.index, block_size, config)
        self.in_flight: Counter = Counter()
        self._routed: dict[str, str] = {}  # internal request id -> replica id
        self.decisions: Counter = Counter()
        self.decision_latency = LatencyStat(keep=4096)
        self.replica_view: dict[str, ReplicaState] = {}  # as of the last decision
        self.subscriber = None
        if redis and stream:
            from specserve.cluster.kv.redis_client import connect
            from specserve.cluster.kv.events import KVEventSubscriber

            # Its own connection: XREAD blocks it for up to half a second at a time.
            self.subscriber = KVEventSubscriber(connect(**dict(redis, timeout_s=5.0)), stream, self.index).start()
        # Imported here, not at module level: Serve ships this module to the ingress cloudpickled by value, so
        # objects among its globals would be private copies, not the ones the ingress's front end reads.
        from specserve.routing.feedback import router_feedback

        self.feedback = router_feedback()
        self.feedback.attach(self)

    def _state(self, replica: RunningReplica) -> ReplicaState:
        rid = replica.replica_id.unique_id
        load = LoadReport.from_dict(replica.routing_stats)  # Serve carries the verifier's report as a dict
        return ReplicaState(rid, num_running=load.num_running, num_waiting=load.num_waiting,
                            queued_prefill_tokens=load.queued_prefill_tokens,
                            prefill_tokens_per_s=load.prefill_tokens_per_s,
                            import_tokens_per_s=load.import_tokens_per_s, step_s=load.step_s,
                            in_flight=self.in_flight[rid])

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        request = _request_of(pending_request)
        if request is None or not candidate_replicas:
            return [candidate_replicas]
        t0 = time.perf_counter()
        hints = request.routing
        hashes = hints.block_hashes if hints else []
        states = [self._state(r) for r in candidate_replicas]
        decision = self.policy.choose(states, hashes, len(request.prompt_token_ids),
                                      route_key=hints.route_key if hints else None,
                                      session_key=hints.session_key if hints else None)
        self.index.add(decision.replica_id, hashes)  # optimistic: it will hold them once it has prefilled
        self.decision_latency.add(time.perf_counter() - t0)
        self.decisions[decision.reason] += 1
        self.replica_view = {s.replica_id: s for s in states}
        self.feedback.publish(request.request_id, decision, self.policy)
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == decision.replica_id]
        rest = [r for r in candidate_replicas if r.replica_id.unique_id != decision.replica_id]
        return [chosen, rest] if rest else [chosen]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        rid = replica_id.unique_id
        self.in_flight[rid] += 1
        self._routed[pending_request.metadata.internal_request_id] = rid

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        rid = self._routed.pop(internal_request_id, replica_id.unique_id)
        if self.in_flight[rid] > 0:
            self.in_flight[rid] -= 1

    def update_replicas(self, replicas: list[RunningReplica]):
        out = super().update_replicas(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for rid in self.index.replicas():
            if rid not in live:  # a replica that left: purge it at once
                self.index.purge(rid)
                self.in_flight.pop(rid, None)
                self.replica_view.pop(rid, None)
        return out

    def stats(self) -> dict:
        sub = self.subscriber
        return {
            "policy": "prefix_cost",
            "decisions": dict(self.decisions),
            "decision_latency": self.decision_latency.as_dict(),
            "index_blocks": len(self.index),
            "store_blocks": self.index.num_blocks(STORE),
            "store_trust": self.policy.store_trust,
            "events_applied": sub.applied_events if sub else None,
            "event_errors": sub.errors if sub else None,
            "replicas": {rid: dict(asdict(s), in_flight=self.in_flight[rid], indexed_blocks=self.index.num_blocks(rid))
                         for rid, s in self.replica_view.items()},
        }


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """For comparison: each request to the next replica in turn."""

    def initialize_state(self, **_):
        self._counter = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return [candidate_replicas]
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        i = next(self._counter) % len(ordered)
        return [[ordered[i]], ordered[i + 1:] + ordered[:i]] if len(ordered) > 1 else [ordered]
