"""Autoscaling policies that Serve's controller runs for specserve deployments (Serve's custom-policy API).

Drafter replicas get no Serve requests (verifiers call their draft workers directly, actors/drafter.py), so
Serve's default policy, which counts ongoing requests, would never move them. They follow their verifiers
instead: each drafter replica reports how many verifiers it heard from lately (every verifier heartbeats each
worker it attached), and the drafter target is that count times `drafters_per_verifier`. Serve applies the
deployment's bounds and up/downscale delays.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger("ray.serve")

# The custom autoscaling metric each Drafter replica reports (Drafter.record_autoscaling_stats).
ACTIVE_VERIFIERS = "active_verifiers"
POLICY_PATH = "specserve.cluster.autoscaling:DrafterPolicy"


def drafters_needed(active_verifiers: list[float], drafters_per_verifier: float) -> int:
    """Each verifier attaches every drafter it finds, so every replica hears from (nearly) all verifiers: the
    largest count is the best estimate, the others lag discovery."""
    verifiers = max(active_verifiers, default=0.0)
    return math.ceil(round(verifiers * drafters_per_verifier, 6))


class DrafterPolicy:
    """Serve instantiates it once per deployment with `policy_kwargs` and calls it every control-loop tick."""

    def __init__(self, drafters_per_verifier: float):
        if drafters_per_verifier <= 0:
            raise ValueError("drafters_per_verifier must be > 0")
        self.drafters_per_verifier = drafters_per_verifier
        self._last: dict[str, int] = {}

    def __call__(self, ctx) -> tuple[int, dict]:
        reported = (ctx.aggregated_metrics or {}).get(ACTIVE_VERIFIERS)
        if not reported:  # no replica has reported yet (starting up): keep the current target
            return ctx.target_num_replicas, {}
        wanted = drafters_needed(list(reported.values()), self.drafters_per_verifier)
        if set(ctx.running_replicas) - set(reported):  # a replica's report is missing (slow, restarting):
            wanted = max(wanted, ctx.target_num_replicas)  # scale up on partial news, never down
        if self._last.get(ctx.app_name) != wanted:  # the controller's log says why the drafters move
            log.info("drafters of %s: %d wanted, active verifiers per drafter replica %s", ctx.app_name, wanted,
                     {r.unique_id: round(v, 2) for r, v in reported.items()})
            self._last[ctx.app_name] = wanted
        return wanted, {}
