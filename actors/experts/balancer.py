"""Live expert load balancing: from the tokens the actors counted since the last round, recompute each layer's
placement with redundant replicas of hot experts (eplb.rebalance) and apply it in two phases without stopping
decoding: the actors load their new slots while serving, the transport switches to the new map at a step
boundary, then the actors drop the slots the new map no longer uses.

With a scaler (scaling.py) each round first decides the number of actors. Growing starts the new actors holding
their slots of a placement planned for the new count, then applies it as above; shrinking applies a placement
on the remaining actors, and removes the others only once no step uses them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time

import ray

from specserve.actors.experts.eplb import LayerPlacement, balance_ratio, rebalance
from specserve.actors.experts.ray_transport import LOAD_TIMEOUT_S, ActorTransport, Slot, slots_of_actors
from specserve.actors.experts.scaling import ActorScaler, ScalingDecision, slots_per_actor

log = logging.getLogger(__name__)

# How long a new placement waits for a step boundary to switch at before it is withdrawn.
SWITCH_TIMEOUT_S = 60.0


class ExpertBalancer:
    def __init__(self, transport: ActorTransport, experts_per_layer: dict[int, int], *, redundant_slots: int,
                 min_gain: float = 0.05, min_tokens: int = 1000, scaler: ActorScaler | None = None,
                 call_timeout_s: float = LOAD_TIMEOUT_S):
        """Each actor gets slots_per_actor(experts, actors, `redundant_slots`) slots per layer. A new placement is
        applied only if it lowers the predicted max/mean tokens per actor by at least `min_gain` (moving weights
        costs), judged on at least `min_tokens` rows (fewer are noise). `scaler`: also resize the actors. An actor
        that does not answer a load or drop of slots within `call_timeout_s` fails the round (GetTimeoutError),
        which then ends instead of holding the balancer thread."""
        self.transport = transport
        self.experts_per_layer = experts_per_layer
        self.redundant_slots = redundant_slots
        self.min_gain = min_gain
        self.min_tokens = min_tokens
        self.scaler = scaler
        self.call_timeout_s = call_timeout_s
        self.last_scaling: ScalingDecision | None = None
        self._seen: dict[tuple, int] = {}  # (actor handle, slot) -> rows it had counted at the last read
        self._read_at = time.monotonic()
        self.rounds: collections.deque[dict] = collections.deque(maxlen=8)  # the latest, for stats

    @property
    def num_actors(self) -> int:
        return len(self.transport.actors)

    def _recent_loads(self) -> tuple[dict[int, list[float]], float]:
        """Rows per (layer, expert) since the last call, over all actors, and the seconds since. Diffed per actor:
        actors come and go with resizing; one that counts less than before has restarted and counts anew."""
        actors, counts = list(self.transport.actors), self.transport.token_counts()
        now_s = time.monotonic()
        period, self._read_at = now_s - self._read_at, now_s
        loads = {layer: [0.0] * n for layer, n in self.experts_per_layer.items()}
        seen: dict[tuple, int] = {}
        for actor, actor_counts in zip(actors, counts):
            for (layer, e), n in actor_counts.items():
                before = self._seen.get((actor, (layer, e)), 0)
                loads[layer][e] += n - before if n >= before else n
                seen[(actor, (layer, e))] = n
        self._seen = seen
        return loads, period

    def _plan(self, loads: dict[int, list[float]], num_actors: int) -> dict[int, LayerPlacement]:
        return {layer: rebalance(loads[layer], num_actors, slots_per_actor(n, num_actors, self.redundant_slots))
                for layer, n in self.experts_per_layer.items()}

    def _actor_loads(self, placements: dict[int, LayerPlacement], loads: dict[int, list[float]]) -> list[float]:
        total = [0.0] * self.num_actors
        for layer, placement in placements.items():
            for a, v in enumerate(placement.actor_loads(loads[layer])):
                total[a] += v
        return total

    def rebalance_once(self, switch_timeout_s: float = SWITCH_TIMEOUT_S) -> dict:
        """One round: measure, (with a scaler) decide the actor count and resize, else plan and (if worth it)
        apply. Returns what it saw and did."""
        loads, period_s = self._recent_loads()
        current = {layer: LayerPlacement([self.transport.replicas[(layer, e)] for e in range(n)], self.num_actors)
                   for layer, n in self.experts_per_layer.items()}
        before = balance_ratio(self._actor_loads(current, loads))
        report = {"tokens": sum(map(sum, loads.values())), "period_s": period_s, "before": before,
                  "applied": False, "loaded": 0, "dropped": 0, "actors": self.num_actors}
        if self.scaler is not None:
            self.last_scaling = self.scaler.decide(loads, period_s, self.num_actors, time.monotonic())
            report["scaling"] = self.last_scaling.as_dict()
            if self.last_scaling.target != self.num_actors:
                report.update(self.resize(self.last_scaling.target, loads, switch_timeout_s))
                self.rounds.append(report)
                log.info("expert balance: %s", report)
                return report
        planned = self._plan(loads, self.num_actors)
        after = report["predicted_after"] = balance_ratio(self._actor_loads(planned, loads))
        if report["tokens"] >= max(1, self.min_tokens) and before - after >= self.min_gain * before:
            report.update(self.apply(self._replicas(planned), switch_timeout_s))
        self.rounds.append(report)
        log.info("expert balance: %s", report)
        return report

    @staticmethod
    def _replicas(planned: dict[int, LayerPlacement]) -> dict[Slot, list[int]]:
        return {(layer, e): actors for layer, p in planned.items() for e, actors in enumerate(p.replicas)}

    def resize(self, count: int, loads: dict[int, list[float]],
               switch_timeout_s: float = SWITCH_TIMEOUT_S) -> dict:
        """Go to `count` actors with a placement planned for them from `loads`. Growing: start the new actors
        (the highest indices) holding their slots, then apply. Shrinking: apply a placement on actors [0, count),
        then remove the rest once no step uses them."""
        planned = self._plan(loads, count)
        replicas = self._replicas(planned)
        old = self.num_actors
        if count > old:
            self.transport.add_actors(slots_of_actors(replicas, count)[old:])
        result = {"applied": False}
        try:
            result = self.apply(replicas, switch_timeout_s, num_actors=count)
        finally:
            # Whatever happened, actors no map names go: the old tail after a shrink, the new actors after a
            # withdrawn or failed switch (so the count stays what the map uses).
            in_use = self.transport.actors_in_use()
            if in_use < self.num_actors:
                self.transport.remove_actors(in_use)
        log.info("expert actors: %d -> %d%s", old, self.num_actors, "" if result["applied"] else " (withdrawn)")
        return dict(result, actors=self.num_actors, predicted_after=balance_ratio(self._actor_loads(planned, loads)),
                    resized=result["applied"])

    def apply(self, replicas: dict[Slot, list[int]], switch_timeout_s: float, num_actors: int | None = None) -> dict:
        """`num_actors`: the actors `replicas` spans, the first ones (default: all; fewer when shrinking)."""
        actors = self.transport.actors[:num_actors or self.num_actors]
        new_slots = slots_of_actors(replicas, len(actors))
        # Phase 1: every actor loads the slots it lacks (it keeps serving from the ones it has).
        loaded = sum(ray.get([a.load_slots.remote(sorted(s)) for a, s in zip(actors, new_slots)],
                             timeout=self.call_timeout_s))
        # Phase 2: the transport switches maps at its next step boundary.
        if not self.transport.propose(replicas).wait(switch_timeout_s) and self.transport.withdraw(replicas):
            log.info("expert balance: no step within %.0fs; placement withdrawn", switch_timeout_s)
            self._hold_slots(actors)
            return {"applied": False, "loaded": loaded, "dropped": 0}
        # Phase 3: drop what the new map does not use.
        dropped = sum(r["dropped"] for r in self._hold_slots(actors))
        return {"applied": True, "loaded": loaded, "dropped": dropped}

    def _hold_slots(self, actors: list) -> list[dict]:
        """Each actor keeps exactly the slots the transport's map in use gives it."""
        return ray.get([a.hold_slots.remote(self.transport.slots_of(i)) for i, a in enumerate(actors)],
                       timeout=self.call_timeout_s)

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
