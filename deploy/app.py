"""Builds the Serve application from the one config: ingress (HTTP + gRPC) -> verifier(s) -> drafter(s).

`deployment_options` is the one place deployment options come from: `build_app` applies them in code, and
deploy/serve_config.py writes the same options into the Serve config YAML.
"""

from __future__ import annotations

from ray import serve

from specserve.actors.drafter import Drafter
from specserve.actors.verifier import Verifier
from specserve.cluster.config import DeploymentConfig, SpecserveConfig
from specserve.routing.openai_api import OpenAIIngress


def _options(d: DeploymentConfig) -> dict:
    opts = {
        "max_ongoing_requests": d.max_ongoing_requests,
        "max_queued_requests": d.max_queued_requests,
        "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus, "resources": dict(d.resources)},
    }
    if d.autoscaling is not None:
        opts["autoscaling_config"] = d.autoscaling.serve_options()
    else:
        opts["num_replicas"] = d.num_replicas
    return opts


def _request_router(config: SpecserveConfig) -> dict:
    """Serve request-router options of the Verifier deployment (routing/serve_router.py), as plain data."""
    rc = config.router
    if rc.policy == "pow2":
        return {}
    if rc.policy == "round_robin":
        return {"request_router_config": {
            "request_router_class": "specserve.routing.serve_router.RoundRobinRouter"}}
    from specserve.cluster.kv.redis_client import redis_config
    from specserve.cluster.kv.events import stream_key

    redis = redis_config(config.server, config.kv_store.timeout_s)
    return {"request_router_config": {
        "request_router_class": "specserve.routing.serve_router.PrefixCostRouter",
        "request_router_kwargs": {"block_size": config.engine.block_size, "router": rc.model_dump(mode="json"),
                                  "redis": redis, "stream": stream_key(config.server.app_name)},
        "request_routing_stats_period_s": rc.stats_period_s}}


def deployment_options(config: SpecserveConfig) -> dict[str, dict]:
    """Serve options of every deployment of the app, by deployment name (plain data: they go into YAML too)."""
    out = {"Ingress": _options(config.ingress),
           "Verifier": {**_options(config.verifier), **_request_router(config),
                        "health_check_period_s": 10, "health_check_timeout_s": 60}}
    if config.server.grpc_port or config.server.direct_ingress:  # each ingress replica binds the gRPC port (and,
        out["Ingress"]["max_replicas_per_node"] = 1             # with direct ingress, the HTTP port): one per node
    if config.speculative.remote:
        # The replica is a thin shell; the draft worker it starts gets the configured CPUs/GPUs.
        out["Drafter"] = {**_options(config.drafter), "ray_actor_options": {"num_cpus": 0.01},
                          "health_check_period_s": 2, "health_check_timeout_s": 30}
        if "autoscaling_config" in out["Drafter"]:  # drafters get no Serve requests: they follow the verifiers
            from specserve.cluster.autoscaling import POLICY_PATH

            out["Drafter"]["autoscaling_config"]["policy"] = {
                "policy_function": POLICY_PATH,
                "policy_kwargs": {"drafters_per_verifier": config.speculative.drafters_per_verifier}}
    return out


def build_app(config: SpecserveConfig):
    """The Serve application. The model source must already be resolvable (pulled) on every node."""
    cfg = config.model_dump(mode="json")
    opts = deployment_options(config)
    verifier = serve.deployment(Verifier).options(name="Verifier", **opts["Verifier"])
    ingress = serve.deployment(OpenAIIngress).options(name="Ingress", **opts["Ingress"])
    drafter = None
    if "Drafter" in opts:
        drafter = serve.deployment(Drafter).options(name="Drafter", **opts["Drafter"]).bind(cfg)
    return ingress.bind(cfg, verifier.bind(cfg, drafter))
