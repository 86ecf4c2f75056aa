"""The Serve config YAML of a specserve deployment, generated from the one config schema.

`serve deploy`/`serve run` and KubeRay's RayService (serveConfigV2) take it. The application is built by `app`
(this module's import path) from `args`, which is the whole SpecserveConfig; the `deployments` section repeats
deploy/app.py's options so operators see (and Serve's schema checks) replicas, autoscaling and resources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from specserve.cluster.config import SpecserveConfig

IMPORT_PATH = "specserve.deploy.serve_config:app"


def app(args: dict):
    """Serve's application builder: `args` is a SpecserveConfig as plain data."""
    from specserve.deploy.app import build_app

    return build_app(SpecserveConfig.model_validate(args))


def _non_default(values: dict, defaults: dict) -> dict:
    out = {}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            nested = _non_default(value, default)
            if nested:
                out[key] = nested
        elif value != default:
            out[key] = value
    return out


def check_deployable(config: SpecserveConfig) -> None:
    """What a cluster deployment needs that `specserve serve` would otherwise provide itself."""
    server = config.server
    needs_redis = config.kv_store.enabled or config.router.policy == "prefix_cost"
    if needs_redis and not (server.redis_url or server.redis_sentinels):
        raise ValueError("server.redis_url (or server.redis_sentinels) is required in a cluster deployment: the KV "
                         "store and the prefix_cost router use Redis (no embedded Redis outside `specserve serve`); "
                         "or set kv_store.enabled=false and router.policy=pow2")
    from specserve.cluster.kv.redis_client import redact_url

    if server.redis_url and redact_url(server.redis_url) != server.redis_url:
        raise ValueError("server.redis_url carries a password, which would sit in the Serve config for anyone who "
                         "can read it: put it in a file (a mounted Secret) named by server.redis_password_file")


def render(config: SpecserveConfig) -> dict:
    """The Serve config (a dict that ray.serve.schema.ServeDeploySchema accepts)."""
    from specserve.deploy.app import deployment_options

    check_deployable(config)
    server = config.server
    deployments = [{"name": name, **opts} for name, opts in deployment_options(config).items()]
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": server.host, "port": server.http_port},
        "applications": [{
            "name": server.app_name,
            "route_prefix": server.route_prefix,
            "import_path": IMPORT_PATH,
            # Only what differs from the defaults: those (the model cache directory above all) resolve on each
            # replica's node.
            "args": _non_default(config.model_dump(mode="json"), SpecserveConfig().model_dump(mode="json")),
            "deployments": deployments,
        }],
    }


def validate(serve_config: dict) -> None:
    """Serve's own schema, plus the parts it leaves as plain dicts (autoscaling, request routers)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve_config)
    for application in serve_config["applications"]:
        SpecserveConfig.model_validate(application["args"])
        for d in application.get("deployments", []):
            if "autoscaling_config" in d:
                AutoscalingConfig.model_validate(d["autoscaling_config"])
            if "request_router_config" in d:
                RequestRouterConfig.model_validate(d["request_router_config"])


def to_yaml(serve_config: dict) -> str:
    return yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False)


def main(argv: list[str]) -> int:
    from specserve.deploy.launcher import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="specserve deploy", description="Deployment artifacts from the config.")
    sub = parser.add_subparsers(dest="action", required=True)
    r = sub.add_parser("render", help="write the Serve config YAML (for `serve deploy` or a RayService)")
    add_config_arguments(r)
    r.add_argument("-o", "--output", default="-", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    try:
        serve_config = render(config_from_args(args))
        validate(serve_config)
    except Exception as exc:  # noqa: BLE001 - one line for a bad config
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = to_yaml(serve_config)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
