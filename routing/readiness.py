"""Whether an ingress replica should take traffic, from periodic probes of its verifiers (pure policy; the probing
is Frontend's readiness task)."""

from __future__ import annotations


class Readiness:
    """Ready on the first probe a verifier answers; unready again only after `failures_to_unready` probes in a row
    found none (one lost probe is not an outage, but a replica whose verifiers are gone must leave the Service)."""

    def __init__(self, failures_to_unready: int = 3):
        self.failures_to_unready = failures_to_unready
        self.ready = False
        self.failures = 0  # probes in a row that found no verifier

    def observe(self, *, answered: bool) -> bool:
        """Record one probe; True when readiness changed."""
        self.failures = 0 if answered else self.failures + 1
        ready = answered or (self.ready and self.failures < self.failures_to_unready)
        changed, self.ready = ready != self.ready, ready
        return changed
