"""Live expert load balancing: from the tokens the actors counted since the last round, recompute each layer's
placement with redundant replicas of hot experts (eplb.rebalance) and apply it in two phases without stopping
decoding: the actors load their new slots while serving, the transport switches to the new map at a step
boundary, then the actors drop the slots the new map no longer uses.
"""

from __future__ import annotations

import collections
import logging
import math
import threading

import ray

from specserve.actors.experts.eplb import LayerPlacement, balance_ratio, rebalance
from specserve.actors.experts.ray_transport import ActorTransport, Slot, slots_of_actors

log = logging.getLogger(__name__)


class ExpertBalancer:
    def __init__(self, transport: ActorTransport, experts_per_layer: dict[int, int], *, redundant_slots: int = 1,
                 min_gain: float = 0.05, min_tokens: int = 1000):
        """Each actor gets ceil(experts / actors) + `redundant_slots` slots per layer. A new placement is applied
        only if it lowers the predicted max/mean tokens per actor by at least `min_gain` (moving weights costs),
        judged on at least `min_tokens` rows (fewer are noise)."""
        self.transport = transport
        self.experts_per_layer = experts_per_layer
        self.num_actors = len(transport.actors)
        self.redundant_slots = redundant_slots
        self.min_gain = min_gain
        self.min_tokens = min_tokens
        self._seen: dict[Slot, int] = {}
        self.rounds: collections.deque[dict] = collections.deque(maxlen=8)  # the latest, for stats

    def _recent_loads(self) -> dict[int, list[float]]:
        """Rows per (layer, expert) since the last call, over all actors (an actor restarted since counts anew)."""
        now: dict[Slot, int] = {}
        for counts in self.transport.token_counts():
            for slot, n in counts.items():
                now[slot] = now.get(slot, 0) + n
        loads = {layer: [0.0] * n for layer, n in self.experts_per_layer.items()}
        for (layer, e), n in now.items():
            loads[layer][e] += max(0, n - self._seen.get((layer, e), 0))
        self._seen = now
        return loads

    def _actor_loads(self, placements: dict[int, LayerPlacement], loads: dict[int, list[float]]) -> list[float]:
        total = [0.0] * self.num_actors
        for layer, placement in placements.items():
            for a, v in enumerate(placement.actor_loads(loads[layer])):
                total[a] += v
        return total

    def rebalance_once(self, switch_timeout_s: float = 60.0) -> dict:
        """One round: measure, plan, and (if worth it) apply. Returns what it saw and did."""
        loads = self._recent_loads()
        current = {layer: LayerPlacement([self.transport.replicas[(layer, e)] for e in range(n)], self.num_actors)
                   for layer, n in self.experts_per_layer.items()}
        before = balance_ratio(self._actor_loads(current, loads))
        planned = {layer: rebalance(loads[layer], self.num_actors,
                                    math.ceil(n / self.num_actors) + self.redundant_slots)
                   for layer, n in self.experts_per_layer.items()}
        after = balance_ratio(self._actor_loads(planned, loads))
        report = {"tokens": sum(map(sum, loads.values())), "before": before, "predicted_after": after,
                  "applied": False, "loaded": 0, "dropped": 0}
        if report["tokens"] >= max(1, self.min_tokens) and before - after >= self.min_gain * before:
            replicas = {(layer, e): actors for layer, p in planned.items() for e, actors in enumerate(p.replicas)}
            report.update(self.apply(replicas, switch_timeout_s))
        self.rounds.append(report)
        log.info("expert balance: %s", report)
        return report

    def apply(self, replicas: dict[Slot, list[int]], switch_timeout_s: float) -> dict:
        actors = self.transport.actors
        new_slots = slots_of_actors(replicas, self.num_actors)
        # Phase 1: every actor loads the slots it lacks (it keeps serving from the ones it has).
        loaded = sum(ray.get([a.load_slots.remote(sorted(s)) for a, s in zip(actors, new_slots)]))
        # Phase 2: the transport switches maps at its next step boundary.
        if not self.transport.propose(replicas).wait(switch_timeout_s) and self.transport.withdraw(replicas):
            log.info("expert balance: no step within %.0fs; placement withdrawn", switch_timeout_s)
            ray.get([a.hold_slots.remote(self.transport.slots_of(i)) for i, a in enumerate(actors)])
            return {"applied": False, "loaded": loaded, "dropped": 0}
        # Phase 3: drop what the new map does not use.
        dropped = sum(r["dropped"] for r in ray.get([a.hold_slots.remote(self.transport.slots_of(i))
                                                     for i, a in enumerate(actors)]))
        return {"applied": True, "loaded": loaded, "dropped": dropped}

    def run_every(self, period_s: float, stop: threading.Event) -> threading.Thread:
        def loop():
            while not stop.wait(period_s):
                try:
                    self.rebalance_once()
                except Exception:  # an actor restarting mid-round: the next round starts from fresh counts
                    log.exception("expert balance round failed")

        t = threading.Thread(target=loop, name="expert-balancer", daemon=True)
        t.start()
        return t
