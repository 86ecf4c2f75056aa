"""How routing turned out, as the ingress sees it: per request, the cached prompt tokens the router predicted
against those the verifier actually found (local prefix cache plus KV store imports); and the routers Serve runs
in this process (one per Verifier handle), whose decisions and stats the ingress reports."""

from __future__ import annotations

import weakref
from collections import Counter

_ROUTERS: weakref.WeakSet = weakref.WeakSet()


def register_router(router) -> None:
    """`router` has `recent_decisions` (request id -> RouteDecision) and `stats()`."""
    _ROUTERS.add(router)


def router_stats() -> list[dict]:
    return [r.stats() for r in list(_ROUTERS)]


def take_decision(request_id: str):
    """(router, RouteDecision) for a request a router of this process placed (forgotten once taken), or None."""
    for r in list(_ROUTERS):
        d = r.recent_decisions.pop(request_id, None)
        if d is not None:
            return r, d
    return None


class RoutingOutcomes:
    def __init__(self):
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.predicted_requests = 0  # requests with a router prediction (prefix_cost)
        self.predicted_cached_tokens = 0
        self.cached_tokens_of_predicted = 0
        self.abs_error_tokens = 0
        self.over_predicted = 0  # requests that found fewer cached tokens than predicted
        self.reasons: Counter = Counter()

    def record(self, prompt_tokens: int, cached_tokens: int, predicted: int | None = None,
               reason: str | None = None) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        if predicted is None:
            return
        self.predicted_requests += 1
        self.predicted_cached_tokens += predicted
        self.cached_tokens_of_predicted += cached_tokens
        self.abs_error_tokens += abs(predicted - cached_tokens)
        self.over_predicted += predicted > cached_tokens
        if reason:
            self.reasons[reason] += 1

    def as_dict(self) -> dict:
        n = self.predicted_requests
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            # the prefix hit rate: prompt tokens served from a cache (the replica's or the store's)
            "hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None,
            "predicted": {
                "requests": n,
                "predicted_cached_tokens": self.predicted_cached_tokens,
                "actual_cached_tokens": self.cached_tokens_of_predicted,
                "mean_abs_error_tokens": self.abs_error_tokens / n if n else None,
                "over_predicted_requests": self.over_predicted,
                "by_reason": dict(self.reasons),
            },
        }
