"""Drafters follow their verifiers (cluster/autoscaling.py), judged on Serve's own AutoscalingContext and with
Serve's wrapper that applies the deployment's bounds and delays."""

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from specserve.deploy.app import deployment_options
from specserve.cluster.autoscaling import ACTIVE_VERIFIERS, POLICY_PATH, DrafterPolicy, drafters_needed
from specserve.cluster.config import SpecserveConfig

DEP = DeploymentID(name="Drafter", app_name="specserve")


def context(reported: dict[str, float] | None, current: int, *, now: float = 1000.0, state=None, **config):
    replicas = [ReplicaID(unique_id=u, deployment_id=DEP) for u in (reported or {})]
    return AutoscalingContext(
        deployment_id=DEP, deployment_name="Drafter", app_name="specserve", current_num_replicas=current,
        target_num_replicas=current, running_replicas=replicas, total_num_requests=0.0, total_queued_requests=0.0,
        aggregated_metrics={} if reported is None else
        {ACTIVE_VERIFIERS: {r: v for r, v in zip(replicas, reported.values())}},
        raw_metrics={}, capacity_adjusted_min_replicas=config.get("min_replicas", 1),
        capacity_adjusted_max_replicas=config.get("max_replicas", 4), policy_state=dict(state or {}),
        last_scale_up_time=None, last_scale_down_time=None, current_time=now,
        config=AutoscalingConfig(**{"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0,
                                    "downscale_delay_s": 0, **config}))


def test_drafters_needed_takes_the_largest_count_times_the_ratio():
    assert drafters_needed([1, 3, 2], 1.0) == 3
    assert drafters_needed([3], 0.5) == 2
    assert drafters_needed([4], 0.25) == 1
    assert drafters_needed([0.3 * 10], 1 / 3) == 1  # float noise does not round 1.0000001 up to 2
    assert drafters_needed([], 1.0) == 0


def test_policy_follows_the_reported_verifiers_and_holds_before_any_report():
    policy = DrafterPolicy(drafters_per_verifier=1.0)
    assert policy(context({"a": 2.0, "b": 1.0}, current=1))[0] == 2
    assert policy(context({"a": 0.0}, current=2))[0] == 0  # Serve's bounds lift this to min_replicas
    assert policy(context(None, current=3))[0] == 3
    # A running replica without a report: up on partial news, never down.
    partial = context({"a": 1.0}, current=2)
    partial.running_replicas.append(ReplicaID(unique_id="silent", deployment_id=DEP))
    assert policy(partial)[0] == 2
    partial = context({"a": 3.0}, current=2)
    partial.running_replicas.append(ReplicaID(unique_id="silent", deployment_id=DEP))
    assert policy(partial)[0] == 3
    with pytest.raises(ValueError):
        DrafterPolicy(drafters_per_verifier=0)


def test_serve_applies_the_delays_around_it():
    # Serve's wrapper (the one its controller puts around a custom policy) holds a change for the delay; the
    # min/max bounds are applied after it by the controller.
    wrapped = _apply_autoscaling_config(DrafterPolicy(drafters_per_verifier=2.0))
    assert wrapped(context({"a": 3.0}, current=1))[0] == 6
    assert wrapped(context({"a": 0.0}, current=2))[0] == 1  # never below min_replicas
    assert wrapped(context({"a": 0.0}, current=2, downscale_delay_s=60))[0] == 2
    assert wrapped(context({"a": 3.0}, current=1, upscale_delay_s=60))[0] == 1


def test_autoscaled_drafters_get_the_policy_in_their_options():
    cfg = SpecserveConfig.load(overrides={"speculative.method": "int8", "speculative.drafters_per_verifier": 0.5,
                                          "drafter.autoscaling": {"min_replicas": 1, "max_replicas": 3}})
    scaling = deployment_options(cfg)["Drafter"]["autoscaling_config"]
    assert scaling["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"drafters_per_verifier": 0.5}}
    assert AutoscalingConfig.model_validate(scaling).policy.get_policy() is DrafterPolicy
    fixed = SpecserveConfig.load(overrides={"speculative.method": "int8"})
    assert "autoscaling_config" not in deployment_options(fixed)["Drafter"]


def test_autoscaled_drafters_keep_at_least_one_replica():
    with pytest.raises(ValueError, match="drafter.autoscaling.min_replicas"):
        SpecserveConfig.load(overrides={"speculative.method": "int8", "drafter.autoscaling": {"min_replicas": 0}})
