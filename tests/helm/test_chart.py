"""The Helm chart, checked offline (no cluster is reachable here): `helm lint --strict` and `helm template` with
the default values and the example values; the core objects against Kubernetes' schemas (kubernetes-validate,
strict), the RayService against KubeRay's CRD (unknown fields refused), its serveConfigV2 against Serve's
schema and specserve's, and the wiring between them (ports, selectors, probes, resources)."""

from __future__ import annotations

import base64
import copy
import functools
import json
import os
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from helm_binary import ensure_helm
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.redis_client import redact_url
from specserve.deploy import chart_values
from specserve.deploy.serve_config import render, validate

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "specserve"
EXAMPLES = sorted((ROOT / "helm" / "examples").glob("*.yaml"))
# KubeRay's RayService CRD, vendored with its source noted (fixtures/README.md).
CRD = Path(__file__).resolve().parent / "fixtures" / "ray.io_rayservices.yaml"
K8S_VERSION = "1.31.0"
CORE_KINDS = {"Service", "StatefulSet", "Secret", "PersistentVolumeClaim", "PodDisruptionBudget", "ConfigMap", "Pod",
              "NetworkPolicy"}
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
    secret = api_keys_secret("everything")
    assert yaml.safe_load(secret["stringData"]["api-keys.yaml"])["sk-test"] == "team-a"
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


# Deployment security (issue 19): every object below is rendered offline and checked for what it must and must
# not allow.

EXTERNAL_REDIS = ["--set", "redis.enabled=false", "--set", "redis.externalUrl=rediss://app@redis.example:6380/2",
                  "--set", "redis.auth.existingSecret=redis-creds", "--set", "redis.auth.existingSecretKey=pw",
                  "--set", "rayAuth.existingSecret=ray-token"]
RAY_PORTS = {6379, 8265, 10001, 8080, 52365}  # GCS, dashboard, Ray client, Ray metrics, dashboard agent
OPERATOR = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}


def render_chart(*args: str) -> tuple[dict, ...]:
    out = helm("template", "rel", str(CHART), "--namespace", "llm", *args).stdout
    return tuple(d for d in yaml.safe_load_all(out) if d)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def api_keys_secret(case: str) -> dict:
    (secret,) = [s for s in objects(case, "Secret") if s["metadata"]["name"].endswith("-api-keys")]
    return secret


def secret_value(docs, name: str, key: str) -> str:
    (secret,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"] == name]
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def pods(docs) -> dict[str, dict]:
    """Every pod template the chart makes, by role: the Ray head and groups, Redis, the helm test pod."""
    out = {}
    for rs in of_kind(docs, "RayService"):
        cluster = rs["spec"]["rayClusterConfig"]
        out["head"] = cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            out[group["groupName"]] = group["template"]
    for sts in of_kind(docs, "StatefulSet"):
        out["redis"] = sts["spec"]["template"]
    for pod in of_kind(docs, "Pod"):
        out["test"] = {"metadata": pod["metadata"], "spec": pod["spec"]}
    return out


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses label equality only
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(docs, labels: dict, port: int) -> list[list[dict] | None]:
    """For a pod with `labels`, the `from` of each NetworkPolicy rule admitting TCP `port` (None = anyone);
    [] when some policy selects the pod and none admits the port, [None] when no policy isolates the pod."""
    policies = [p for p in of_kind(docs, "NetworkPolicy") if selects(p["spec"]["podSelector"], labels)]
    if not any("Ingress" in p["spec"]["policyTypes"] for p in policies):
        return [None]
    sources = []
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is None or any(p["port"] == port and p.get("protocol", "TCP") == "TCP" for p in ports):
                sources.append(rule.get("from"))
    return sources


def ray_pod_peer_only(sources) -> bool:
    return all(src is not None and all(set(peer) == {"podSelector"} and peer["podSelector"]["matchLabels"].get(
        "specserve.io/ray-node") == "true" and peer["podSelector"]["matchLabels"].get("app.kubernetes.io/instance")
        == "rel" for peer in src) for src in sources)


@pytest.mark.parametrize("case", CASES)
def test_network_policies_deny_by_default_and_admit_only_what_each_pod_needs(case):
    docs = rendered(case)
    serve_config = yaml.safe_load(rayservice(case)["spec"]["serveConfigV2"])
    cfg = SpecserveConfig.model_validate(serve_config["applications"][0]["args"])
    (deny,) = [p for p in of_kind(docs, "NetworkPolicy") if p["metadata"]["name"] == "rel-specserve-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny["spec"]
    roles = pods(docs)
    assert {"head", "ingress", "redis", "test"} <= set(roles)
    for role, template in roles.items():
        labels = template["metadata"]["labels"]
        assert selects(deny["spec"]["podSelector"], labels), role  # every pod starts from deny-all
        ray = role not in ("redis", "test")
        assert (labels.get("specserve.io/ray-node") == "true") == ray, role
        for port in RAY_PORTS:  # Ray's control plane: the release's Ray pods only (the operator: the dashboard)
            sources = admitted(docs, labels, port)
            if not ray:
                assert sources == [] or role == "redis" and port == 6379, (role, port)
                continue
            assert any(ray_pod_peer_only([s]) for s in sources), (role, port)  # Ray reaches Ray
            others = [s for s in sources if not ray_pod_peer_only([s])]  # None: anyone
            assert not others or port == 8265 and others == [[OPERATOR]], (role, port, others)
    # The API from anywhere, on the ingress pods only; the test pod admits nothing.
    ingress = roles["ingress"]["metadata"]["labels"]
    api_ports = [cfg.server.http_port, *([cfg.server.grpc_port] if cfg.server.grpc_port else []),
                 cfg.server.metrics_port]
    for port in api_ports:
        assert None in admitted(docs, ingress, port), port
    for role in set(roles) - {"ingress"}:
        for port in api_ports[1:]:
            assert None not in admitted(docs, roles[role]["metadata"]["labels"], port), (role, port)
    assert admitted(docs, roles["test"]["metadata"]["labels"], cfg.server.http_port) == []
    # Redis: its port, from the Ray pods only.
    redis_sources = admitted(docs, roles["redis"]["metadata"]["labels"], 6379)
    assert redis_sources and ray_pod_peer_only(redis_sources)


def test_network_policy_sources_are_configurable_and_can_be_turned_off():
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    docs = render_chart("--set-json", f"networkPolicy.apiFrom=[{json.dumps(peer)}]",
                  "--set-json", 'networkPolicy.metricsFrom=[{"ipBlock": {"cidr": "10.0.0.0/8"}}]')
    for obj in of_kind(docs, "NetworkPolicy"):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    ingress = pods(docs)["ingress"]["metadata"]["labels"]
    # Besides the release's Ray pods (and the operator, on the HTTP port): the gateway and the helm test pod.
    (sources,) = [s for s in admitted(docs, ingress, 8000) if not ray_pod_peer_only([s]) and s[0] != OPERATOR]
    assert sources[0] == peer
    assert sources[1]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "test"
    metrics_sources = [s for s in admitted(docs, ingress, 9100) if not ray_pod_peer_only([s])]
    assert metrics_sources == [[{"ipBlock": {"cidr": "10.0.0.0/8"}}]]
    assert not of_kind(render_chart("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@pytest.mark.parametrize("args", [[], EVERYTHING, EXTERNAL_REDIS], ids=["defaults", "everything", "external-redis"])
def test_no_secret_reaches_the_rayservice(args):
    docs = render_chart(*args)
    (rs,) = of_kind(docs, "RayService")
    text = yaml.safe_dump(rs)
    generated = [secret_value(docs, s["metadata"]["name"], k) for s in of_kind(docs, "Secret")
                 for k in list(s.get("data", {})) + list(s.get("stringData", {})) if k != "api-keys.yaml"]
    if args != EXTERNAL_REDIS:
        assert len(generated) >= 2  # the Redis password and the Ray token, at least
    for value in generated:
        assert value not in text
    args_ = yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["args"]
    assert redact_url(args_["server"]["redis_url"]) == args_["server"]["redis_url"]  # no password in the URL
    assert args_["server"]["redis_password_file"] == "/etc/specserve/redis/password"
    assert "api_keys" not in args_.get("auth", {})


@pytest.mark.parametrize("args, secret, key", [([], "rel-specserve-redis", "password"),
                                               (EXTERNAL_REDIS, "redis-creds", "pw")],
                         ids=["in-chart", "external"])
def test_redis_password_comes_from_the_secret(args, secret, key):
    docs = render_chart(*args)
    roles = pods(docs)
    password_file = "/etc/specserve/redis/password"
    for role, template in roles.items():  # every Ray pod mounts the Secret where the config points
        if role in ("redis", "test"):
            continue
        spec = template["spec"]
        (volume,) = [v for v in spec["volumes"] if v["name"] == "redis-password"]
        assert volume["secret"]["secretName"] == secret
        assert volume["secret"]["items"] == [{"key": key, "path": "password"}]
        (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "redis-password"]
        assert mount["mountPath"] == os.path.dirname(password_file) and mount["readOnly"] is True
    if args == EXTERNAL_REDIS:
        assert not of_kind(docs, "StatefulSet") and "redis" not in roles
        assert all(s["metadata"]["name"] != "rel-specserve-redis" for s in of_kind(docs, "Secret"))
        return
    (redis_container,) = roles["redis"]["spec"]["containers"]
    (env,) = redis_container["env"]
    assert env == {"name": "REDISCLI_AUTH", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
    password = secret_value(docs, secret, key)
    assert len(password) >= 32
    assert password not in yaml.safe_dump(redis_container)


def test_redis_container_command_requires_the_password(tmp_path):
    """The rendered Redis command, run with a real redis-server and redis-cli: it asks for the password given in
    REDISCLI_AUTH (quotes and backslashes included), the probe's `redis-cli ping` passes with it, and nothing
    answers without it."""
    import redis as redis_py

    from specserve.cluster.redis_server import free_port, redis_server_binary

    (sts,) = of_kind(render_chart(), "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    server_binary = Path(redis_server_binary())
    for name in ("redis-server", "redis-cli"):
        (bin_dir / name).symlink_to(server_binary.parent / name)
    port = free_port()
    password = 'pa"ss\\wo rd$x'
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REDISCLI_AUTH": password}
    # The chart's command and args, on a free local port and a scratch directory for the test.
    argv = [*container["command"], *container["args"], "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis_py.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=2)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis_py.ConnectionError:
                time.sleep(0.05)
        assert client.ping()
        with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=2).ping()
        probe = container["readinessProbe"]["exec"]["command"]
        probe = probe[:1] + ["-p", str(port)] + probe[1:]
        done = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() == "PONG", done.stdout + done.stderr
        done = subprocess.run(probe, env={**env, "REDISCLI_AUTH": "wrong"}, capture_output=True, text=True, timeout=10)
        assert done.stdout.strip() != "PONG"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("case", CASES)
def test_every_pod_runs_unprivileged_without_a_service_account_token(case):
    docs = rendered(case)
    roles = pods(docs)
    dockerfile_user = [line.split()[1] for line in (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
                       if line.startswith("USER ")][-1]
    for role, template in roles.items():
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False, role
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] > 0, role
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, role
        if role not in ("redis",):  # the specserve image: the Dockerfile's user
            assert dockerfile_user == f"{pod_ctx['runAsUser']}:{pod_ctx['runAsGroup']}", role
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"] == {"drop": ["ALL"]}, role
            assert ctx["readOnlyRootFilesystem"] is True, role
            writable = {m["mountPath"] for m in container.get("volumeMounts", [])
                        if "emptyDir" in volumes.get(m["name"], {}) or m["name"] == "data"}
            assert ("/data" if role == "redis" else "/tmp") in writable, (role, container["name"])
    # The head mounts no token; only the autoscaler container (KubeRay's, in the head pod) gets one.
    cluster = rayservice(case)["spec"]["rayClusterConfig"]
    options = cluster["autoscalerOptions"]
    assert options["securityContext"]["readOnlyRootFilesystem"] is True
    assert options["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    head_volumes = {v["name"]: v for v in roles["head"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in options["volumeMounts"]}
    token = head_volumes[mounts["/var/run/secrets/kubernetes.io/serviceaccount"]]["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in token)
    assert "emptyDir" in head_volumes[mounts["/tmp"]]
    for container in roles["head"]["spec"]["containers"]:
        assert all(m["name"] != "kube-api-access" for m in container["volumeMounts"])


@pytest.mark.parametrize("case", CASES)
def test_services_do_not_expose_ray_ports(case):
    docs = rendered(case)
    for svc in of_kind(docs, "Service"):
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        ports = {p["port"] for p in svc["spec"]["ports"]} | {p.get("targetPort") for p in svc["spec"]["ports"]}
        if component == "redis":  # Redis's own port, on the Redis pod only (and behind AUTH)
            assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "redis"
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
            continue
        assert component == "api" and not ports & RAY_PORTS, (svc["metadata"]["name"], ports)
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "ingress"
    # KubeRay's own head Service stays ClusterIP (reachable from pods only, and those the NetworkPolicy allows).
    head = rayservice(case)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    assert "serveService" not in rayservice(case)["spec"]


def test_ray_token_auth_uses_a_secret_of_the_chart_or_yours():
    docs = render_chart()
    (rs,) = of_kind(docs, "RayService")
    auth = rs["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "rel-specserve-ray-auth"}
    assert len(secret_value(docs, "rel-specserve-ray-auth", "auth_token")) >= 32  # KubeRay's key
    docs = render_chart("--set", "rayAuth.existingSecret=ray-token")
    (rs,) = of_kind(docs, "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"]["secretName"] == "ray-token"
    assert all(s["metadata"]["name"] != "rel-specserve-ray-auth" for s in of_kind(docs, "Secret"))
    (rs,) = of_kind(render_chart("--set", "rayAuth.enabled=false"), "RayService")
    assert "authOptions" not in rs["spec"]["rayClusterConfig"]


def test_helm_test_sends_a_key_of_its_own():
    secret = api_keys_secret("everything")
    keys = yaml.safe_load(secret["stringData"]["api-keys.yaml"])
    test_key = secret["stringData"]["test-key"]
    assert test_key != "sk-test" and test_key.startswith("sk-helm-test-") and len(test_key) >= 40
    assert keys == {"sk-test": "team-a", test_key: "helm-test"}  # the users' keys, and the test's own tenant
    (test_pod,) = [p for p in objects("everything", "Pod") if p["metadata"]["annotations"]["helm.sh/hook"] == "test"]
    env = {e["name"]: e for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["SPECSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"], "key": "test-key", "optional": True}
    docs = render_chart("--set", "apiKeys.enabled=true", "--set", "apiKeys.keys.sk-a=a", "--set", "tests.tenant=smoke")
    (secret,) = [s for s in of_kind(docs, "Secret") if s["metadata"]["name"].endswith("-api-keys")]
    assert yaml.safe_load(secret["stringData"]["api-keys.yaml"])[secret["stringData"]["test-key"]] == "smoke"


@pytest.mark.parametrize("args, message", [
    (["--set", "specserve.auth.api_keys.sk-inline=team-a"], "/specserve/auth/api_keys"),
    (["--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://:hunter2@redis:6379/0"],
     "/redis/externalUrl"),
    (["--set", "redis.enabled=false", "--set", "redis.externalUrl=redis://redis:6379/0"],
     "redis.auth.existingSecret is required"),
])
def test_secrets_in_values_are_refused(args, message):
    # `helm lint` checks the schema; a template's `fail` stops `helm template` and `helm install`.
    for verb in (["template", "rel"], ["lint", "--strict"])[:1 if message.startswith("redis.auth") else 2]:
        done = helm(*verb, str(CHART), *args, check=False)
        assert done.returncode != 0 and message in done.stdout + done.stderr, (done.stdout + done.stderr)[-1000:]
    values = merged(yaml.safe_load((CHART / "values.yaml").read_text()),
                    {"specserve": {"auth": {"api_keys": {"sk-inline": "team-a"}}}})
    with pytest.raises(ValueError, match="api_keys"):
        chart_values.ChartValues.model_validate(values)
