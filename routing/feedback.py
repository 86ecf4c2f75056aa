"""The router feedback path: how the request routers' predictions meet what the verifiers found.

Serve runs the request routers (routing/serve_router.py) inside the ingress process, next to the front end
(routing/frontend.py) that streams the request; they meet in this process's RouterFeedback:

    router     --publish(request id, decision, policy)-->  RouterFeedback
    front end  --take(request id)-->  Placement (the decision, reported with the request's usage)
    front end  --report(RouteOutcome)-->  RouterFeedback: the outcome stats (GET /router/stats), and the policy
               learns how far to trust the KV store's blocks (PrefixCostPolicy.observe_import)
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter, OrderedDict
from dataclasses import dataclass

from specserve.routing.router_policy import PrefixCostPolicy, RouteDecision

# Decisions the front end never takes (requests that failed before their first output, callers other than the
# front end) are forgotten, oldest first, beyond this many.
KEEP_DECISIONS = 4096


@dataclass(slots=True)
class Placement:
    """A router's decision for one request, and the policy that made it (which the outcome teaches)."""
    decision: RouteDecision
    policy: PrefixCostPolicy


@dataclass(slots=True, kw_only=True)
class RouteOutcome:
    """How one finished request turned out, as the front end saw it."""
    prompt_tokens: int
    cached_tokens: int  # found by the verifier: its prefix cache plus KV store imports
    placement: Placement | None  # None: no prefix_cost router placed it (another policy)


class RoutingOutcomes:
    """Per request, the cached prompt tokens the router predicted against those the verifier found."""

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

    def record(self, outcome: RouteOutcome) -> None:
        self.requests += 1
        self.prompt_tokens += outcome.prompt_tokens
        self.cached_tokens += outcome.cached_tokens
        if outcome.placement is None:
            return
        decision, cached = outcome.placement.decision, outcome.cached_tokens
        predicted = decision.predicted_cached_tokens
        self.predicted_requests += 1
        self.predicted_cached_tokens += predicted
        self.cached_tokens_of_predicted += cached
        self.abs_error_tokens += abs(predicted - cached)
        self.over_predicted += predicted > cached
        if decision.reason:
            self.reasons[decision.reason] += 1

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


class RouterFeedback:
    """One per process (`router_feedback()`). Routers decide on Serve's router loop, which may be another thread
    than the front end's: the decisions are guarded by a lock."""

    def __init__(self, keep: int = KEEP_DECISIONS):
        self.keep = keep
        self.outcomes = RoutingOutcomes()
        self._routers: weakref.WeakSet = weakref.WeakSet()  # for their stats; Serve owns them
        self._placements: OrderedDict[str, Placement] = OrderedDict()  # by the front end's request id
        self._lock = threading.Lock()

    # ---- the routers' side
    def attach(self, router) -> None:
        """A router of this process (anything with `stats() -> dict`), listed in router_stats."""
        self._routers.add(router)

    def publish(self, request_id: str, decision: RouteDecision, policy: PrefixCostPolicy) -> None:
        with self._lock:
            self._placements[request_id] = Placement(decision, policy)
            while len(self._placements) > self.keep:
                self._placements.popitem(last=False)

    # ---- the front end's side
    def take(self, request_id: str) -> Placement | None:
        """The placement of a request a router of this process decided (forgotten once taken), or None."""
        with self._lock:
            return self._placements.pop(request_id, None)

    def report(self, outcome: RouteOutcome) -> None:
        """A request finished: count it, and teach the policy that placed it how much of the store's share of
        its prediction the verifier did import."""
        self.outcomes.record(outcome)
        if outcome.placement is None:
            return
        decision = outcome.placement.decision
        if decision.predicted_imported_tokens:
            local = decision.predicted_cached_tokens - decision.predicted_imported_tokens
            outcome.placement.policy.observe_import(decision.predicted_imported_tokens,
                                                    max(0, outcome.cached_tokens - local))

    def router_stats(self) -> list[dict]:
        return [r.stats() for r in list(self._routers)]


_PROCESS_FEEDBACK = RouterFeedback()


def router_feedback() -> RouterFeedback:
    """This process's feedback path: its routers and its front end meet here."""
    return _PROCESS_FEEDBACK
