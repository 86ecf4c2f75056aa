"""The Serve config YAML rendered from the config schema (deploy/serve_config.py)."""

import pytest
import yaml
from ray.serve.config import AutoscalingConfig as ServeAutoscaling

from specserve.cluster.config import SpecserveConfig
from specserve.deploy.serve_config import IMPORT_PATH, main, render, validate

REDIS = {"server.redis_url": "redis://redis:6379/0"}


def config(**overrides):
    return SpecserveConfig.load(overrides={**REDIS, **overrides})


def deployments(serve_config):
    return {d["name"]: d for d in serve_config["applications"][0]["deployments"]}


def test_default_render_passes_serves_schema_and_round_trips():
    cfg = config(**{"server.host": "0.0.0.0"})
    sc = render(cfg)
    validate(sc)
    app = sc["applications"][0]
    assert app["import_path"] == IMPORT_PATH and app["name"] == "specserve"
    assert sc["http_options"] == {"host": "0.0.0.0", "port": 8000}
    # args hold only what differs from the defaults; the replicas' schema fills the rest on their own nodes.
    assert app["args"] == {"server": {"host": "0.0.0.0", "redis_url": "redis://redis:6379/0"}}
    assert SpecserveConfig.model_validate(app["args"]).model_dump() == cfg.model_dump()
    # Fields assigned after loading count as well.
    cfg2 = SpecserveConfig()
    cfg2.server.redis_url, cfg2.engine.block_size = "redis://r:1", 32
    assert render(cfg2)["applications"][0]["args"] == {"engine": {"block_size": 32},
                                                       "server": {"redis_url": "redis://r:1"}}
    d = deployments(sc)
    assert set(d) == {"Ingress", "Verifier"}
    assert d["Ingress"]["max_replicas_per_node"] == 1  # it binds the gRPC port
    assert d["Verifier"]["request_router_config"]["request_router_class"].endswith("PrefixCostRouter")
    assert d["Verifier"]["max_queued_requests"] == 128
    yaml.safe_load(yaml.safe_dump(sc))  # plain data all the way down


def test_autoscaling_replaces_the_fixed_count():
    sc = render(config(**{"verifier.autoscaling": {"min_replicas": 1, "max_replicas": 3,
                                                   "target_ongoing_requests": 4}}))
    validate(sc)
    v = deployments(sc)["Verifier"]
    assert "num_replicas" not in v
    serve_side = ServeAutoscaling.model_validate(v["autoscaling_config"])
    assert (serve_side.min_replicas, serve_side.max_replicas, serve_side.target_ongoing_requests) == (1, 3, 4)


def test_bad_autoscaling_and_missing_redis_are_config_errors():
    with pytest.raises(ValueError, match="min_replicas"):
        config(**{"verifier.autoscaling": {"min_replicas": 3, "max_replicas": 2}})
    with pytest.raises(ValueError, match="redis_url"):
        render(SpecserveConfig())
    render(SpecserveConfig.load(overrides={"kv_store.enabled": False, "router.policy": "pow2"}))  # no Redis needed


def test_drafter_deployment_appears_with_model_drafts():
    d = deployments(render(config(**{"speculative.method": "int8"})))
    assert d["Drafter"]["ray_actor_options"] == {"num_cpus": 0.01}  # the worker it starts holds the model


def test_cli_writes_yaml(tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    assert main(["render", "--redis-url", "redis://r:6379", "--verifier-replicas", "2", "-o", str(out)]) == 0
    sc = yaml.safe_load(out.read_text())
    validate(sc)
    assert deployments(sc)["Verifier"]["num_replicas"] == 2
    assert main(["render"]) == 2 and "redis_url" in capsys.readouterr().err
