"""The router feedback path (routing/feedback.py): routers publish decisions, the front end takes them and
reports how the request turned out, which counts the outcome and teaches the policy that placed it."""

import gc

from specserve.cluster.config import RouterConfig
from specserve.routing.feedback import RouteOutcome, RouterFeedback
from specserve.routing.prefix_index import PrefixIndex
from specserve.routing.router_policy import PrefixCostPolicy, RouteDecision

BS = 16


def policy() -> PrefixCostPolicy:
    return PrefixCostPolicy(PrefixIndex(1000), BS, RouterConfig())


def test_a_decision_is_taken_once_and_its_outcome_teaches_the_policy():
    feedback, p = RouterFeedback(), policy()
    # 64 tokens predicted cached: 16 held by the replica, 48 to come from the KV store.
    feedback.publish("cmpl-1", RouteDecision("r1", "store", 64, 0.1, predicted_imported_tokens=48), p)
    placement = feedback.take("cmpl-1")
    assert placement.decision.replica_id == "r1" and placement.policy is p
    assert feedback.take("cmpl-1") is None
    # The verifier found 40 cached tokens: 16 its own, so 24 of the 48 came from the store.
    feedback.report(RouteOutcome(prompt_tokens=100, cached_tokens=40, placement=placement))
    assert p.store_trust == 0.8 * 1.0 + 0.2 * (24 / 48)
    stats = feedback.outcomes.as_dict()
    assert stats["requests"] == 1 and stats["predicted"]["predicted_cached_tokens"] == 64
    assert stats["predicted"]["actual_cached_tokens"] == 40 and stats["predicted"]["by_reason"] == {"store": 1}


def test_an_outcome_without_a_store_prediction_leaves_the_trust_alone():
    feedback, p = RouterFeedback(), policy()
    feedback.publish("a", RouteDecision("r1", "prefix", 32, 0.1), p)
    feedback.report(RouteOutcome(prompt_tokens=50, cached_tokens=0, placement=feedback.take("a")))
    feedback.report(RouteOutcome(prompt_tokens=50, cached_tokens=16, placement=None))  # another policy
    assert p.store_trust == 1.0
    stats = feedback.outcomes.as_dict()
    assert stats["requests"] == 2 and stats["cached_tokens"] == 16 and stats["predicted"]["requests"] == 1


def test_decisions_nobody_takes_are_forgotten_oldest_first():
    feedback, p = RouterFeedback(keep=2), policy()
    for rid in ("a", "b", "c"):
        feedback.publish(rid, RouteDecision("r1", "hash", 0, 0.1), p)
    assert feedback.take("a") is None and feedback.take("b") and feedback.take("c")


def test_router_stats_list_the_routers_alive_in_this_process():
    class Router:
        def stats(self) -> dict:
            return {"policy": "prefix_cost"}

    feedback, router = RouterFeedback(), Router()
    feedback.attach(router)
    assert feedback.router_stats() == [{"policy": "prefix_cost"}]
    del router
    gc.collect()
    assert feedback.router_stats() == []  # Serve owns the routers: a replaced one is not kept alive here
