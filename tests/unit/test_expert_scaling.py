"""Autoscaling of expert actors (actors/experts/scaling.py), without Ray: a hot expert asks for replicas and so
for more actors, a quiet period scales down to the minimum, the count is clamped, a change waits for its delay;
the config validates its fields; the transport switches maps at once between steps, else at the next step."""

import pytest
from pydantic import ValidationError

from specserve.actors.experts.ray_transport import ActorTransport
from specserve.actors.experts.scaling import ActorScaler, actors_needed, replicas_needed, slots_per_actor
from specserve.cluster.config import ExpertsConfig, SpecserveConfig


def needed(loads, **kw):
    args = dict(period_s=10.0, target_rows_per_slot_s=10.0, redundant_slots=1, min_actors=1, max_actors=8)
    return actors_needed(loads, **{**args, **kw})


def test_slots_per_actor_is_the_balancers_rule():
    assert [slots_per_actor(8, n, 1) for n in (1, 2, 3, 4, 8)] == [9, 5, 4, 3, 2]


def test_a_hot_expert_asks_for_replicas_and_more_actors():
    loads = {0: [300.0] + [50.0] * 7}  # over 10 s at 10 rows/s per replica: expert 0 wants 3, the others 1
    assert replicas_needed(loads[0], 10.0, 10.0) == [3] + [1] * 7
    # 3 replicas of one expert need 3 actors; 3 x slots_per_actor(8, 3, 1) = 12 slots hold the 10 wanted.
    assert needed(loads, min_actors=2) == 3
    cool = {0: [50.0] * 8}
    assert needed(cool, min_actors=2) == 2


def test_the_slot_capacity_can_bind_and_is_not_monotonic():
    # Every expert wants 2 replicas: 16 slots. N * (ceil(8 / N) + 1) = 10, 12, 12, 15, 18 for N = 2..6.
    assert needed({0: [200.0] * 8}) == 6
    # 4 experts want 3 replicas, 4 want 2: 20 slots. N = 7 holds 7 x (2 + 1) = 21, N = 8 only 8 x (1 + 1) = 16:
    # 7 fits although 8 (more actors) would not.
    loads = {0: [250.0] * 4 + [200.0] * 4}
    assert needed(loads) == 7 and 8 * slots_per_actor(8, 8, 1) < 20


def test_the_busiest_layer_decides():
    assert needed({0: [50.0] * 8, 1: [300.0] + [50.0] * 7}) == 3


def test_a_quiet_period_scales_down_to_min_and_counts_are_clamped():
    assert needed({0: [0.0] * 8, 1: [0.0] * 8}, min_actors=2) == 2
    assert needed({0: [0.0] * 8}) == 1
    assert needed({0: [10_000.0] * 8}, max_actors=4) == 4  # nothing in range fits: the most it may use
    assert needed({0: [300.0] + [50.0] * 7}, min_actors=5) == 5


def scaler(**kw):
    args = dict(min_actors=1, max_actors=8, target_rows_per_slot_s=10.0, upscale_delay_s=30.0,
                downscale_delay_s=600.0, redundant_slots=1)
    return ActorScaler(**{**args, **kw})


def test_scale_up_waits_for_its_delay_and_takes_the_count_wanted_throughout():
    s = scaler()
    assert s.hold(2, 4, now=0.0).target == 2
    assert s.hold(2, 3, now=20.0).target == 2
    d = s.hold(2, 5, now=30.0)
    assert d.target == 3 and d.desired == 5 and "up to 3" in d.reason  # 3 was wanted all along, 5 only now
    assert s.hold(3, 5, now=31.0).target == 3  # after a change, the next waits its own delay


def test_a_break_in_the_wish_restarts_the_delay():
    s = scaler()
    s.hold(2, 3, now=0.0)
    assert s.hold(2, 2, now=20.0).reason == "steady"
    assert s.hold(2, 3, now=40.0).target == 2
    assert s.hold(2, 3, now=70.0).target == 3


def test_scale_down_has_its_own_delay_and_zero_delay_acts_at_once():
    s = scaler()
    quiet = {0: [0.0] * 8}
    assert s.decide(quiet, 10.0, current=3, now=0.0).target == 3
    assert s.decide(quiet, 10.0, current=3, now=599.0).target == 3
    assert s.decide(quiet, 10.0, current=3, now=600.0).target == 1
    eager = scaler(upscale_delay_s=0, downscale_delay_s=0, min_actors=2)
    assert eager.decide({0: [300.0] + [50.0] * 7}, 10.0, current=2, now=0.0).target == 3
    assert eager.decide(quiet, 10.0, current=3, now=1.0).target == 2


def config(**experts):
    return SpecserveConfig.model_validate({"experts": experts})


def test_config_validates_with_messages_naming_the_field():
    c = config(num_actors=2, autoscaling={"min_actors": 2, "max_actors": 3, "target_rows_per_slot_s": 5})
    assert c.experts.autoscaling.max_actors == 3 and config(num_actors=2).experts.autoscaling is None
    cases = [({"num_actors": 2, "autoscaling": {"min_actors": 3, "max_actors": 2}},
              "experts.autoscaling.min_actors (3) must be <= experts.autoscaling.max_actors (2)"),
             ({"num_actors": 5, "autoscaling": {"max_actors": 4}}, "experts.num_actors (5)"),
             ({"num_actors": 0, "autoscaling": {}}, "experts.num_actors (0)"),
             ({"num_actors": 2, "redundant_slots": 0, "autoscaling": {}}, "experts.redundant_slots >= 1"),
             ({"num_actors": 2, "rebalance_period_s": 0, "autoscaling": {}}, "experts.rebalance_period_s > 0"),
             ({"num_actors": 2, "autoscaling": {"target_rows_per_slot_s": 0}}, "target_rows_per_slot_s"),
             ({"num_actors": 2, "autoscaling": {"max_actor": 3}}, "max_actor")]
    for experts, message in cases:
        with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
            config(**experts)


def test_proposed_map_switches_at_once_between_steps_else_at_the_next_step():
    replicas = {(0, e): [e % 2] for e in range(4)}
    experts = ExpertsConfig()
    transport = ActorTransport([object(), object()], replicas, link="ray", timeout_s=experts.timeout_s,
                               restart_wait_s=experts.restart_wait_s)  # "ray" links connect lazily
    moved = {(0, e): [0] for e in range(4)}
    assert transport.propose(moved).is_set() and transport.replicas is moved  # idle: nothing uses the old map
    transport._step_boundary()  # a step is running (it ends after the last MoE layer's finish)
    back = {(0, e): [e % 2] for e in range(4)}
    switched = transport.propose(back)
    assert not switched.is_set() and transport.replicas is moved
    with pytest.raises(RuntimeError, match="switch it first"):
        transport.remove_actors(1)  # the proposed map still names actor 1
    transport._step_boundary()
    assert switched.is_set() and transport.replicas is back and transport.actors_in_use() == 2
