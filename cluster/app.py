"""Builds the Serve application from the one config: ingress -> verifier(s) -> drafter(s)."""

from __future__ import annotations

from ray import serve

from specserve.actors.drafter import Drafter
from specserve.actors.verifier import Verifier
from specserve.cluster.config import DeploymentConfig, SpecserveConfig
from specserve.routing.openai_api import OpenAIIngress


def _options(d: DeploymentConfig, name: str) -> dict:
    return {
        "name": name,
        "num_replicas": d.num_replicas,
        "max_ongoing_requests": d.max_ongoing_requests,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": dict(d.resources)},
    }


def build_app(config: SpecserveConfig):
    """The Serve application. The model source must already be resolvable (pulled) on every node."""
    cfg = config.model_dump(mode="json")
    verifier = serve.deployment(Verifier).options(**_options(config.verifier, "Verifier"),
                                                  health_check_period_s=10, health_check_timeout_s=60)
    ingress = serve.deployment(OpenAIIngress).options(**_options(config.ingress, "Ingress"))
    drafter = None
    if config.speculative.remote:
        # The replica is a thin shell; the draft worker it starts gets the configured CPUs/GPUs.
        opts = _options(config.drafter, "Drafter")
        opts["ray_actor_options"] = {"num_cpus": 0.01}
        drafter = serve.deployment(Drafter).options(**opts, health_check_period_s=2,
                                                     health_check_timeout_s=30).bind(cfg)
    return ingress.bind(cfg, verifier.bind(cfg, drafter))
