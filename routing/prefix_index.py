"""Which replica holds which KV block, as the router sees it: block hash -> replicas.

Kept in the router's own process and fed by the engines' KV events (blocks stored / evicted) plus an optimistic
insert at each routing decision, so routing never calls another actor. The cluster's KV store appears as one more
holder (STORE): a replica that lacks a block the store has can import it instead of recomputing it.
Bounded: beyond `max_blocks` the least recently touched hashes are forgotten (a forgotten block only costs a
worse guess, never a wrong answer). Thread-safe: the KV event subscriber's thread writes while the router reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from specserve.cluster.kv.events import STORE


class PrefixIndex:
    def __init__(self, max_blocks: int = 1_000_000):
        self.max_blocks = max_blocks
        self._holders: OrderedDict[bytes, set[str]] = OrderedDict()  # least recently touched first
        self._by_replica: dict[str, set[bytes]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._holders)

    def replicas(self) -> list[str]:
        with self._lock:
            return [r for r in self._by_replica if r != STORE]

    def add(self, replica: str, hashes: Iterable[bytes]) -> None:
        with self._lock:
            owned = self._by_replica.setdefault(replica, set())
            for h in hashes:
                holders = self._holders.get(h)
                if holders is None:
                    self._holders[h] = {replica}
                else:
                    holders.add(replica)
                    self._holders.move_to_end(h)
                owned.add(h)
            while len(self._holders) > self.max_blocks:
                h, holders = self._holders.popitem(last=False)
                for r in holders:
                    self._by_replica[r].discard(h)

    def _drop_holder(self, replica: str, hashes: Iterable[bytes]) -> None:
        for h in hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(replica)
                if not holders:
                    del self._holders[h]

    def remove(self, replica: str, hashes: Iterable[bytes]) -> None:
        with self._lock:
            owned = self._by_replica.get(replica)
            if owned is None:
                return
            hashes = list(hashes)
            owned.difference_update(hashes)
            self._drop_holder(replica, hashes)

    def purge(self, replica: str) -> int:
        """Forget everything a replica held (it left, or restarted with an empty cache)."""
        with self._lock:
            owned = self._by_replica.pop(replica, set())
            self._drop_holder(replica, owned)
            return len(owned)

    def match(self, hashes: Sequence[bytes]) -> dict[str, int]:
        """For each holder, how many leading blocks of `hashes` it holds (holders with none are left out)."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        with self._lock:
            for i, h in enumerate(hashes):
                holders = self._holders.get(h)
                if not holders:
                    break
                alive = set(holders) if alive is None else alive & holders
                if not alive:
                    break
                self._holders.move_to_end(h)
                for r in alive:
                    out[r] = i + 1
        return out

    def num_blocks(self, replica: str) -> int:
        return len(self._by_replica.get(replica, ()))
