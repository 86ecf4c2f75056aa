"""Expert placement with redundant replicas of hot experts (DeepSeek EPLB's replicate-then-pack, one layer at a
time): give extra physical slots to the experts with the highest load per replica, then pack all replicas onto
the actors heaviest first, each to the least loaded actor that still has a free slot.

A step sends all of one expert's rows to one of its replicas (chosen per step, rotating), never splits them:
the rows an expert computes together are then the same as without replicas, so outputs stay bit-identical.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class LayerPlacement:
    """Where one layer's experts live: replicas[e] = actors holding expert e (at least one each)."""

    replicas: list[list[int]]
    num_actors: int

    def actor_loads(self, loads: list[float]) -> list[float]:
        """Expected load per actor when each expert's load is spread evenly over its replicas."""
        out = [0.0] * self.num_actors
        for e, actors in enumerate(self.replicas):
            for a in actors:
                out[a] += loads[e] / len(actors)
        return out

    def slots(self) -> set[tuple[int, int]]:
        """(actor, expert) pairs: what each actor must hold."""
        return {(a, e) for e, actors in enumerate(self.replicas) for a in actors}


def balance_ratio(actor_loads: list[float]) -> float:
    """max / mean tokens per actor (1.0 is perfect)."""
    mean = sum(actor_loads) / len(actor_loads)
    return max(actor_loads) / mean if mean else 1.0


def static_placement(num_experts: int, num_actors: int) -> LayerPlacement:
    """Before any load is known: expert e on actor e % num_actors."""
    return LayerPlacement([[e % num_actors] for e in range(num_experts)], num_actors)


def static_owners(experts_per_layer: dict[int, int], num_actors: int) -> dict[tuple[int, int], list[int]]:
    """(layer, expert) -> [actor] for every MoE layer, with static_placement."""
    return {(layer, e): actors for layer, n in experts_per_layer.items()
            for e, actors in enumerate(static_placement(n, num_actors).replicas)}


def rebalance(loads: list[float], num_actors: int, slots_per_actor: int) -> LayerPlacement:
    """Placement of one layer's experts given their observed loads (tokens routed to each)."""
    num_experts = len(loads)
    total_slots = num_actors * slots_per_actor
    if total_slots < num_experts:
        raise ValueError(f"{num_actors} actors x {slots_per_actor} slots cannot hold {num_experts} experts")
    # Replicate: each extra slot goes to the expert with the highest load per replica.
    counts = [1] * num_experts
    heap = [(-loads[e], e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(total_slots - num_experts):
        _, e = heapq.heappop(heap)
        counts[e] += 1
        heapq.heappush(heap, (-loads[e] / counts[e], e))
    # Pack: replicas heaviest first, each onto the least loaded actor with room that does not hold that expert.
    items = sorted(((loads[e] / counts[e], e) for e in range(num_experts) for _ in range(counts[e])), reverse=True)
    actor_load = [0.0] * num_actors
    free = [slots_per_actor] * num_actors
    replicas: list[list[int]] = [[] for _ in range(num_experts)]
    for load, e in items:
        choices = [a for a in range(num_actors) if free[a] and a not in replicas[e]]
        if not choices:  # more replicas than actors for this expert: allow a duplicate on one actor
            choices = [a for a in range(num_actors) if free[a]]
        a = min(choices, key=lambda a: (actor_load[a], a))
        replicas[e].append(a)
        actor_load[a] += load
        free[a] -= 1
    for r in replicas:  # a duplicate on one actor adds nothing: keep each actor once
        r[:] = sorted(set(r))
    return LayerPlacement(replicas, num_actors)
