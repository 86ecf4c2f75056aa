"""How many expert actors the load needs ("replicas of hot experts"), and when to change the count.

A step sends all of an expert's rows to ONE of its replicas (the replicas take turns, step by step), which keeps
outputs bit-identical; so a hot expert's load spreads only over more replicas of it, each on its own actor, and
the replicas live in the balancer's slots: with N actors each holds slots_per_actor(E, N) slots of a layer of E
experts. The count is the fewest actors whose slots hold every replica the load asks for. Plain Python, no Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


def slots_per_actor(num_experts: int, num_actors: int, redundant_slots: int) -> int:
    """The balancer's rule: room for every expert once, plus `redundant_slots` per actor for replicas."""
    return math.ceil(num_experts / num_actors) + redundant_slots


def replicas_needed(loads: list[float], period_s: float, target_rows_per_slot_s: float) -> list[int]:
    """Per expert: replicas so that none serves more than the target rate (at least one: every expert is held)."""
    return [max(1, math.ceil(load / period_s / target_rows_per_slot_s)) for load in loads]


def actors_needed(loads: dict[int, list[float]], period_s: float, target_rows_per_slot_s: float,
                  redundant_slots: int, min_actors: int, max_actors: int) -> int:
    """Fewest actors in [min_actors, max_actors] that fit every layer's wanted replicas: at least as many actors
    as the hottest expert wants replicas (two replicas on one actor are one), and N * slots_per_actor(E, N) >=
    the replicas the layer wants in all. That rule is not monotonic in N (ceil(E / N) drops), hence the search.
    max_actors when no count in range fits (the best it can do)."""
    need = [replicas_needed(layer_loads, period_s, target_rows_per_slot_s) for layer_loads in loads.values()]
    for n in range(min_actors, max_actors + 1):
        if all(n >= max(r) and n * slots_per_actor(len(r), n, redundant_slots) >= sum(r) for r in need if r):
            return n
    return max_actors


@dataclass
class ScalingDecision:
    current: int
    desired: int  # what this round's load asks for
    target: int  # what to resize to now: current, unless a change has been wanted for its delay
    reason: str
    at: float  # the caller's clock

    def as_dict(self) -> dict:
        return asdict(self)


class ActorScaler:
    """actors_needed each round, applied only after the change has been wanted for the delay (scale-up and
    scale-down have their own). Time is passed in, so the delays are testable without sleeping."""

    def __init__(self, min_actors: int, max_actors: int, target_rows_per_slot_s: float, upscale_delay_s: float,
                 downscale_delay_s: float, redundant_slots: int):
        if not 1 <= min_actors <= max_actors:
            raise ValueError(f"need 1 <= min_actors ({min_actors}) <= max_actors ({max_actors})")
        self.min_actors, self.max_actors = min_actors, max_actors
        self.target_rows_per_slot_s = target_rows_per_slot_s
        self.upscale_delay_s, self.downscale_delay_s = upscale_delay_s, downscale_delay_s
        self.redundant_slots = redundant_slots
        self._direction = 0  # +1 more actors wanted, -1 fewer, 0 none since the last change
        self._since = 0.0
        self._held = 0  # the count wanted throughout: the least wanted while growing, the most while shrinking

    def decide(self, loads: dict[int, list[float]], period_s: float, current: int, now: float) -> ScalingDecision:
        """`loads`: rows per (layer -> expert) over the last `period_s` seconds."""
        desired = actors_needed(loads, period_s, self.target_rows_per_slot_s, self.redundant_slots,
                                self.min_actors, self.max_actors) if period_s > 0 else current
        return self.hold(current, desired, now)

    def hold(self, current: int, desired: int, now: float) -> ScalingDecision:
        direction = (desired > current) - (desired < current)
        if direction == 0:
            self._direction = 0
            return ScalingDecision(current, desired, current, "steady", now)
        if direction != self._direction:
            self._direction, self._since, self._held = direction, now, desired
        else:
            self._held = min(self._held, desired) if direction > 0 else max(self._held, desired)
        delay = self.upscale_delay_s if direction > 0 else self.downscale_delay_s
        word = "up" if direction > 0 else "down"
        waited = now - self._since
        if waited < delay:
            return ScalingDecision(current, desired, current,
                                   f"{word} to {self._held} wanted for {waited:.0f}s of {delay:.0f}s", now)
        target, self._direction = self._held, 0  # the next change waits its own delay
        return ScalingDecision(current, desired, target, f"{word} to {target}: wanted for {waited:.0f}s", now)
