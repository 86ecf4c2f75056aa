"""Where to send a request: the replica with the lowest estimated time to first token.

For each replica: wait for the prefill work already queued there, then prefill the prompt tokens it lacks, minus
the blocks the cluster's KV store can supply (imported instead, at the replica's measured import rate). Rates are
the engines' own measurements, refreshed with their load reports; defaults stand in until a replica reports.
A replica far above the mean load is skipped (hot-spot guard). When no replica and not the store hold any of the
prompt, the request goes where bounded-load consistent hashing of its first block puts it, so requests sharing a
prefix meet on one replica and adding a replica moves only a fraction of the prefix groups. A session key, when
given, is hashed the same way instead.

Plain Python: the Serve adapter feeds it replica states and the prefix index, and calls choose().
"""

from __future__ import annotations

import bisect
import hashlib
import math
from dataclasses import dataclass

from specserve.cluster.config import RouterConfig
from specserve.cluster.kv.events import STORE
from specserve.routing.prefix_index import PrefixIndex


@dataclass
class ReplicaState:
    replica_id: str
    num_running: int = 0  # reported by the replica
    num_waiting: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting, not yet computed
    prefill_tokens_per_s: float = 0.0  # measured by the engine; 0 = not reported yet
    import_tokens_per_s: float = 0.0
    step_s: float = 0.0  # mean engine step time
    in_flight: int = 0  # requests the router sent there that have not finished

    @property
    def load(self) -> int:
        return max(self.in_flight, self.num_running + self.num_waiting)


@dataclass
class RouteDecision:
    replica_id: str
    reason: str  # "prefix" | "store" | "hash" | "session" | "only"
    predicted_cached_tokens: int  # local hits plus store imports the estimate counted on
    estimated_ttft_s: float
    predicted_imported_tokens: int = 0  # of those, the ones the store was to supply


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ConsistentHashRing:
    """Consistent hashing with bounded loads: a key goes to the first replica clockwise from it whose load stays
    within (1 + epsilon) times the mean, so no replica is swamped by one hot prefix group."""

    def __init__(self, vnodes: int = 64, epsilon: float = 0.25):
        self.vnodes = vnodes
        self.epsilon = epsilon
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: tuple[str, ...] = ()

    def _rebuild(self, replicas: list[str]) -> None:
        ring = sorted((_point(f"{r}#{v}".encode()), r) for r in replicas for v in range(self.vnodes))
        self._points = [p for p, _ in ring]
        self._owners = [r for _, r in ring]
        self._members = tuple(sorted(replicas))

    def order(self, key: bytes, replicas: list[str]) -> list[str]:
        """Replicas in the order the ring visits them from `key` (each once)."""
        if tuple(sorted(replicas)) != self._members:
            self._rebuild(replicas)
        if not self._points:
            return []
        start = bisect.bisect(self._points, _point(key)) % len(self._points)
        seen: dict[str, None] = {}
        for i in range(len(self._points)):
            seen.setdefault(self._owners[(start + i) % len(self._points)])
            if len(seen) == len(self._members):
                break
        return list(seen)

    def choose(self, key: bytes, loads: dict[str, int]) -> str:
        total = sum(loads.values()) + 1  # counting the request being placed
        bound = math.ceil((1 + self.epsilon) * total / len(loads))
        order = self.order(key, list(loads))
        for r in order:
            if loads[r] + 1 <= bound:
                return r
        return order[0]


class PrefixCostPolicy:
    """`config`: the router section of the config (hot-spot guard, switch margin). The rates below stand in for a
    replica until it reports its own."""

    def __init__(self, index: PrefixIndex, block_size: int, config: RouterConfig, *,
                 default_prefill_tokens_per_s: float = 1000.0, default_import_tokens_per_s: float = 20000.0,
                 vnodes: int = 64, epsilon: float = 0.25):
        self.index = index
        self.block_size = block_size
        self.hot_factor = config.hot_factor
        self.hot_slack = config.hot_slack
        self.default_prefill = default_prefill_tokens_per_s
        self.default_import = default_import_tokens_per_s
        self.ring = ConsistentHashRing(vnodes, epsilon)
        self.switch_margin = config.switch_margin
        # The share of the store blocks counted on that replicas did import (EWMA over routed requests): blocks
        # still being written, or evicted, are recomputed, and the estimate should expect that.
        self.store_trust = 1.0

    def observe_import(self, predicted_tokens: int, imported_tokens: int, *, alpha: float = 0.2) -> None:
        """A request this policy placed counted on `predicted_tokens` from the store, and `imported_tokens` came
        (reported by the front end through routing/feedback.py)."""
        if predicted_tokens > 0:
            delivered = min(1.0, imported_tokens / predicted_tokens)
            self.store_trust = (1 - alpha) * self.store_trust + alpha * delivered

    def _split(self, prompt_tokens: int, local_blocks: int, store_blocks: int) -> tuple[int, int]:
        """(tokens cached locally, tokens the store can add after them) for a prompt."""
        local = min(local_blocks * self.block_size, prompt_tokens - 1)
        return local, max(0, min(store_blocks * self.block_size, prompt_tokens - 1) - local)

    def estimate_ttft(self, r: ReplicaState, prompt_tokens: int, local_blocks: int, store_blocks: int) -> float:
        """Seconds to this replica's first token: queued prefill, the prompt tokens it lacks (imported where the
        store has them, as far as the store has kept its promises), and one engine step."""
        prefill = r.prefill_tokens_per_s or self.default_prefill
        imp = r.import_tokens_per_s or self.default_import
        local, imported = self._split(prompt_tokens, local_blocks, store_blocks)
        compute = prompt_tokens - local - imported * self.store_trust
        return (r.queued_prefill_tokens + compute) / prefill + imported * self.store_trust / imp + r.step_s

    def _not_hot(self, replicas: list[ReplicaState]) -> list[ReplicaState]:
        mean = sum(r.load for r in replicas) / len(replicas)
        cool = [r for r in replicas if r.load <= self.hot_factor * mean + self.hot_slack]
        return cool or replicas

    def choose(self, replicas: list[ReplicaState], hashes: list[bytes], prompt_tokens: int,
               route_key: bytes | None = None, session_key: str | None = None) -> RouteDecision:
        """`hashes`: the prompt's full-block hashes; `route_key`: what to hash when nothing matches (defaults to
        the first block's hash, or should be a digest of a prompt shorter than a block)."""
        if not replicas:
            raise ValueError("no replicas to route to")
        held = self.index.match(hashes)
        store = held.get(STORE, 0)
        if len(replicas) == 1:
            r = replicas[0]
            return self._decision(r, "only", prompt_tokens, held.get(r.replica_id, 0), store)
        candidates = self._not_hot(replicas)
        by_id = {r.replica_id: r for r in candidates}
        if session_key is not None:
            rid = self.ring.choose(session_key.encode(), {r.replica_id: r.load for r in candidates})
            return self._decision(by_id[rid], "session", prompt_tokens, held.get(rid, 0), store)
        if not any(held.get(r.replica_id, 0) for r in candidates) and not store:
            key = route_key if route_key is not None else (hashes[0] if hashes else b"")
            rid = self.ring.choose(key, {r.replica_id: r.load for r in candidates})
            return self._decision(by_id[rid], "hash", prompt_tokens, 0, 0)
        est = {r.replica_id: self.estimate_ttft(r, prompt_tokens, held.get(r.replica_id, 0), store) for r in candidates}
        best = min(candidates, key=lambda r: (est[r.replica_id], r.load))
        holder = max(candidates, key=lambda r: (held.get(r.replica_id, 0), -est[r.replica_id]))
        # Load reports are up to a period old: leave the longest prefix only for a clearly faster replica, and
        # never an idle holder: it starts at once and computes the fewest tokens. (Rates and step times measured on
        # a few small steps are noisy; the router test saw an idle holder left for an empty replica.)
        idle = holder.load == 0 and holder.queued_prefill_tokens == 0
        if idle or est[holder.replica_id] <= est[best.replica_id] * (1 + self.switch_margin):
            best = holder
        local = held.get(best.replica_id, 0)
        return self._decision(best, "prefix" if local >= store else "store", prompt_tokens, local, store)

    def _decision(self, r: ReplicaState, reason: str, prompt_tokens: int, local: int, store: int) -> RouteDecision:
        local_tokens, imported = self._split(prompt_tokens, local, store)
        return RouteDecision(r.replica_id, reason, local_tokens + imported,
                             self.estimate_ttft(r, prompt_tokens, local, store), imported)
