"""The Helm chart's values as a pydantic schema: helm/specserve/values.schema.json is generated from it, so
`helm lint`/`helm install` reject a misspelt or mistyped value, and its `specserve` section is the very schema
of cluster/config.py (one definition of the config for the CLI, the Serve config and the chart).

    python -m specserve.deploy.chart_values            # rewrite values.schema.json (make chart-schema)
    python -m specserve.deploy.chart_values --check    # exit 1 if it is stale
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from specserve.cluster.config import AuthConfig, SpecserveConfig

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "helm" / "specserve" / "values.schema.json"


class _Values(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Kubernetes objects passed through as they are (the API server validates them).
K8sObject = dict[str, Any]


class Image(_Values):
    repository: str
    tag: str = ""
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class Head(_Values):
    rayStartParams: dict[str, str | int | float] = Field(default_factory=dict)
    resources: K8sObject = Field(default_factory=dict)
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sObject] = Field(default_factory=list)
    affinity: K8sObject = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Group(Head):
    """A Ray worker group (KubeRay workerGroupSpecs): its pods' resources, placement and replica bounds."""

    replicas: int = Field(1, ge=0)
    minReplicas: int = Field(0, ge=0)
    maxReplicas: int = Field(1, ge=1)
    # Custom Ray resources each pod offers (deployments ask for them in their `resources`).
    rayResources: dict[str, float] = Field(default_factory=dict)


class WorkerGroup(Group):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    enabled: bool = True
    # GPUs per pod: nvidia.com/gpu in the container limits, num-gpus for Ray.
    gpus: int = Field(0, ge=0)


class Autoscaler(_Values):
    enabled: bool = True
    idleTimeoutSeconds: int = Field(60, ge=0)
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = "Default"
    resources: K8sObject = Field(default_factory=dict)


class RedisImage(_Values):
    repository: str = "redis"
    tag: str = "7.4"
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class RedisPersistence(_Values):
    enabled: bool = False
    size: str = "1Gi"
    storageClassName: str = ""


class RedisAuth(_Values):
    enabled: bool = True
    existingSecret: str = ""
    existingSecretKey: str = Field("password", min_length=1)


class Redis(_Values):
    enabled: bool = True
    # No password in the URL (it would land in the RayService): a user name at most; the password comes from
    # auth.existingSecret.
    externalUrl: str = Field("", pattern=r"^(|rediss?://([^:@/]+@)?[^@]+)$",
                             description="rediss?://[user@]host:port/db; no password (redis.auth.existingSecret)")
    auth: RedisAuth = Field(default_factory=RedisAuth)
    image: RedisImage = Field(default_factory=RedisImage)
    persistence: RedisPersistence = Field(default_factory=RedisPersistence)
    maxMemory: str = "512mb"
    resources: K8sObject = Field(default_factory=dict)
    nodeSelector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sObject] = Field(default_factory=list)
    podSecurityContext: K8sObject = Field(default_factory=dict)


class RayAuth(_Values):
    enabled: bool = True
    existingSecret: str = ""


class NetworkPolicy(_Values):
    enabled: bool = True
    # NetworkPolicyPeers allowed to the API ports / the metrics port; empty = anyone.
    apiFrom: list[K8sObject] = Field(default_factory=list)
    metricsFrom: list[K8sObject] = Field(default_factory=list)
    kuberayOperator: K8sObject = Field(default_factory=dict)


class Service(_Values):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    annotations: dict[str, str] = Field(default_factory=dict)


class CachePersistence(_Values):
    enabled: bool = False
    existingClaim: str = ""
    size: str = "20Gi"
    accessModes: list[Literal["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"]] = \
        Field(default_factory=lambda: ["ReadWriteMany"])
    storageClassName: str = ""


class ModelCache(_Values):
    mountPath: str = Field("/var/cache/specserve", pattern=r"^/")
    pullOnStart: bool = True
    persistence: CachePersistence = Field(default_factory=CachePersistence)


class ApiKeys(_Values):
    enabled: bool = False
    existingSecret: str = ""
    keys: dict[str, str] = Field(default_factory=dict)


class Pdb(_Values):
    enabled: bool = True
    maxUnavailable: int | str = 1


class Toggle(_Values):
    enabled: bool = False
    labels: dict[str, str] = Field(default_factory=dict)


class ServiceMonitor(Toggle):
    interval: str = "30s"


class Metrics(_Values):
    serviceMonitor: ServiceMonitor = Field(default_factory=ServiceMonitor)
    prometheusRule: Toggle = Field(default_factory=Toggle)
    grafanaDashboard: Toggle = Field(default_factory=Toggle)


class Tests(_Values):
    prompt: str = "Say hello."
    maxTokens: int = Field(8, ge=1)
    tenant: str = Field("helm-test", min_length=1)


class ChartAuth(AuthConfig):
    """The chart takes API keys only through a Secret (apiKeys): inline keys would sit in the RayService's
    serveConfigV2 for anyone who can read it."""

    api_keys: dict[str, str] = Field(
        default_factory=dict, max_length=0,
        description="refused in the chart: put keys in a Secret (apiKeys.keys or apiKeys.existingSecret)")


class ChartSpecserveConfig(SpecserveConfig):
    auth: ChartAuth = Field(default_factory=ChartAuth)


class ChartValues(_Values):
    nameOverride: str = ""
    fullnameOverride: str = ""
    image: Image
    imagePullSecrets: list[K8sObject] = Field(default_factory=list)
    rayVersion: str
    specserve: ChartSpecserveConfig = Field(default_factory=ChartSpecserveConfig)
    head: Head = Field(default_factory=Head)
    ingress: Group = Field(default_factory=Group)
    workerGroups: list[WorkerGroup] = Field(default_factory=list)
    autoscaler: Autoscaler = Field(default_factory=Autoscaler)
    redis: Redis = Field(default_factory=Redis)
    service: Service = Field(default_factory=Service)
    modelCache: ModelCache = Field(default_factory=ModelCache)
    apiKeys: ApiKeys = Field(default_factory=ApiKeys)
    rayAuth: RayAuth = Field(default_factory=RayAuth)
    networkPolicy: NetworkPolicy = Field(default_factory=NetworkPolicy)
    podSecurityContext: K8sObject = Field(default_factory=dict)
    containerSecurityContext: K8sObject = Field(default_factory=dict)
    podDisruptionBudget: Pdb = Field(default_factory=Pdb)
    metrics: Metrics = Field(default_factory=Metrics)
    tests: Tests = Field(default_factory=Tests)


def _drop_machine_defaults(node):
    """The config's default model cache is this machine's path: not a default to publish in the chart."""
    if isinstance(node, dict):
        if node.get("format") == "path":
            node.pop("default", None)
        for value in node.values():
            _drop_machine_defaults(value)
    elif isinstance(node, list):
        for value in node:
            _drop_machine_defaults(value)
    return node


def json_schema() -> dict:
    schema = _drop_machine_defaults(ChartValues.model_json_schema())
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "specserve Helm chart values"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = schema_text()
    if "--check" in argv:
        if not SCHEMA_PATH.is_file() or SCHEMA_PATH.read_text() != text:
            print(f"{SCHEMA_PATH} is stale: run `make chart-schema`", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
