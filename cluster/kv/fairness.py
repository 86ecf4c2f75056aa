"""Fair eviction between tenants sharing one bound: the least recently used entry of the tenant that holds the
most goes first (largest share first, LRU within a tenant).

One LRU over every tenant lets a tenant that floods the store push out everybody else's entries. Evicting from
the largest holder instead means a tenant holding no more than its fair share (capacity / tenants holding
anything) is never evicted for another: whenever the total is over capacity, the largest holder holds more than
that share. A flooding tenant ends up evicting its own oldest entries.

The holders (holder.py) evict with this class; the Redis index (index.py) applies the same rule in its Lua
scripts, with entry counts as the shares.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Container


class FairShareLRU:
    """Which tenant owns each key, the keys of each tenant in least-recently-used order, and what each tenant
    holds (`charge`: bytes, entries, whatever the bound counts). Pure bookkeeping; the caller moves the data."""

    def __init__(self):
        self._keys: dict[str, OrderedDict[str, None]] = {}  # tenant -> its keys, least recently used first
        self._owner: dict[str, str] = {}  # key -> tenant
        self.held: dict[str, int] = {}  # tenant -> what it is charged for

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, key: str) -> bool:
        return key in self._owner

    def tenant_of(self, key: str) -> str | None:
        return self._owner.get(key)

    def add(self, tenant: str, key: str) -> None:
        """`key` (new, or moving to `tenant`) becomes its tenant's most recently used."""
        self.discard(key)
        self._keys.setdefault(tenant, OrderedDict())[key] = None
        self._owner[key] = tenant
        self.held.setdefault(tenant, 0)

    def touch(self, key: str) -> None:
        tenant = self._owner.get(key)
        if tenant is not None:
            self._keys[tenant].move_to_end(key)

    def discard(self, key: str) -> None:
        tenant = self._owner.pop(key, None)
        if tenant is not None:
            del self._keys[tenant][key]
            self._forget_if_empty(tenant)

    def charge(self, tenant: str, amount: int) -> None:
        """Add `amount` (negative: credit) to what `tenant` holds."""
        self.held[tenant] = self.held.get(tenant, 0) + amount
        self._forget_if_empty(tenant)

    def _forget_if_empty(self, tenant: str) -> None:
        if not self._keys.get(tenant) and not self.held.get(tenant):
            self._keys.pop(tenant, None)
            self.held.pop(tenant, None)

    def victim(self, exclude: Container[str] = ()) -> str | None:
        """The key to evict next: the least recently used key, not in `exclude`, of the tenant holding the most
        (of those with such a key). None when every key is excluded."""
        for tenant in sorted(self._keys, key=lambda t: self.held.get(t, 0), reverse=True):
            for key in self._keys[tenant]:
                if key not in exclude:
                    return key
        return None
