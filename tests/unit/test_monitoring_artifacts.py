"""The operator's monitoring artifacts (deploy/grafana-dashboard.json, deploy/prometheus-rules.yaml) against the
metrics the code really exposes (cluster/metrics.py).

The exposed sample names and labels are not a copy kept here: they come from rendering FrontendMetrics and
verifier_families() the way GET /metrics does and parsing the Prometheus text back, so renaming or dropping a
metric in the code fails these tests until the dashboard and the rules follow. With `promtool` on PATH (Debian
package `prometheus`), the rules and every dashboard query are also parsed by Prometheus itself and a few alert
scenarios are evaluated.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from specserve.cluster.metrics import FrontendMetrics, render, verifier_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
RULES = ROOT / "deploy" / "prometheus-rules.yaml"
SEVERITIES = {"critical", "warning", "info"}


# ---- what /metrics exposes, from the code's own definitions ----------------------------------------------------
class _AnyStats:
    """Stands for any value of Verifier.metrics_stats(): a number, a list of numbers or a nested dict, and always
    present, so verifier_families() emits every family it can (speculation, KV store and experts included)."""

    def __getitem__(self, key):
        return _AnyStats()

    def get(self, key, default=None):
        return _AnyStats()

    def __iter__(self):
        return iter([_AnyStats()])

    def __float__(self):
        return 1.0

    def __add__(self, other):
        return self

    __radd__ = __add__

    def __bool__(self):
        return True


def _dummy(param: inspect.Parameter):
    ann = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    return 1 if ann in ("int", "float") else "x"


def _frontend_families() -> list:
    """FrontendMetrics with every public recording method called once, so labelled families have a child."""
    m = FrontendMetrics("m")
    for name, fn in inspect.getmembers(m, inspect.ismethod):
        if name.startswith("_") or name == "families":
            continue
        params = list(inspect.signature(fn).parameters.values())
        fn(*[_dummy(p) for p in params])
    return m.families()


@lru_cache(maxsize=1)
def exposition() -> str:
    return render([({"deployment": "Ingress", "replica": "i1"}, _frontend_families()),
                   ({"deployment": "Verifier", "replica": "v1"}, verifier_families(_AnyStats(), "m"))]).decode()


@lru_cache(maxsize=1)
def exposed() -> tuple[dict[str, str], frozenset[str]]:
    """({sample name: family type}, {label names}) as a scrape of GET /metrics sees them."""
    types, labels = {}, set()
    for fam in text_string_to_metric_families(exposition()):
        for s in fam.samples:
            types[s.name] = fam.type
            labels |= set(s.labels)
    return types, frozenset(labels)


def test_exposed_names_are_what_a_scrape_sees():
    types, labels = exposed()
    # a few anchors, so a broken derivation (an empty set) cannot make the checks below pass vacuously
    assert "specserve:time_to_first_token_seconds_bucket" in types
    assert "specserve:request_errors_total" in types and "specserve:request_errors" not in types
    assert "specserve:spec_decode_num_accepted_tokens_per_pos_total" in types
    assert "specserve:expert_rows_total" in types
    assert {"deployment", "replica", "model_name", "le", "code", "protocol"} <= labels
    assert len(types) > 30


# ---- PromQL: the metric names, labels and functions an expression uses ------------------------------------------
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<dur>\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*\b)
  | (?P<num>(?:0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<var>\$\{?\w+\}?|\[\[\w+\]\])
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}@])
""", re.X)

FUNCTIONS = set("""
abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes clamp clamp_max clamp_min
cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta deriv
double_exponential_smoothing exp floor histogram_avg histogram_count histogram_fraction histogram_quantile
histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta increase info irate label_join
label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi
predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_by_label
sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector
year
""".split())
AGGREGATIONS = set("sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio"
                   .split())
FUNCTIONS |= AGGREGATIONS
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}


class Query:
    """What one PromQL expression references: [(metric, enclosing functions innermost first)], label names."""

    def __init__(self, expr: str):
        self.expr = expr
        self.metrics: list[tuple[str, tuple[str, ...]]] = []
        self.labels: set[str] = set()
        self.matchers: list[tuple[str, str, str]] = []  # (label, op, value)
        tokens, pos = [], 0
        while pos < len(expr):
            m = _TOKEN.match(expr, pos)
            if m is None:
                raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
            pos = m.end()
            if m.lastgroup != "ws":
                tokens.append((m.lastgroup, m.group()))
        stack: list[str | None] = []
        pending = None  # an aggregation whose `by (...)` / `without (...)` comes before its argument
        i = 0
        while i < len(tokens):
            kind, text = tokens[i]
            nxt = tokens[i + 1][1] if i + 1 < len(tokens) else None
            if kind == "ident":
                low = text.lower()
                if low in GROUPING:
                    if nxt == "(":
                        j = i + 2
                        while tokens[j][1] != ")":
                            if tokens[j][0] == "ident":
                                self.labels.add(tokens[j][1])
                            j += 1
                        i = j + 1
                        continue
                elif low in KEYWORDS:
                    pass
                elif text in AGGREGATIONS and nxt is not None and nxt.lower() in ("by", "without"):
                    pending = text
                elif nxt == "(":
                    if text not in FUNCTIONS:
                        raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
                    stack.append(text)
                    i += 2
                    continue
                else:
                    self.metrics.append((text, tuple(f for f in reversed(stack) if f)))
            elif text == "{":
                j = i + 1
                while tokens[j][1] != "}":
                    if tokens[j][0] == "ident":
                        label, op, value = tokens[j][1], tokens[j + 1][1], tokens[j + 2][1]
                        assert tokens[j + 2][0] == "str", f"matcher {label} without a string in {expr!r}"
                        value = value[1:-1]
                        if label == "__name__":
                            self.metrics.append((value, tuple(f for f in reversed(stack) if f)))
                        else:
                            self.labels.add(label)
                            self.matchers.append((label, op, value))
                        j += 3
                    else:
                        j += 1
                i = j + 1
                continue
            elif text == "(":
                stack.append(pending)
                pending = None
            elif text == ")":
                if not stack:
                    raise ValueError(f"unbalanced ')' in {expr!r}")
                stack.pop()
            i += 1
        if stack:
            raise ValueError(f"unbalanced '(' in {expr!r}")


def test_query_parser_finds_names_labels_and_functions():
    q = Query('histogram_quantile(0.99, sum by (le, model_name) (rate(specserve:a_bucket{code=~"X|Y", '
              'replica=~"$ingress"}[$__rate_interval]))) / ignoring (position) group_left '
              'sum(b_total offset 5m) > bool 3 or vector(0) and {__name__="c"}')
    assert q.metrics == [("specserve:a_bucket", ("rate", "sum", "histogram_quantile")), ("b_total", ("sum",)),
                         ("c", ())]
    assert q.labels == {"le", "model_name", "code", "replica", "position"}
    assert ("code", "=~", "X|Y") in q.matchers
    with pytest.raises(ValueError):
        Query("histogram_quantil(0.5, x)")
    with pytest.raises(ValueError):
        Query("sum(rate(x[5m])")


# ---- the two files ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@lru_cache(maxsize=1)
def rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def all_panels() -> list[dict]:
    out = []
    for p in dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def _variable_query(var: dict) -> str:
    q = var.get("query")
    return q.get("query", "") if isinstance(q, dict) else (q or "")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every label_values() variable query."""
    out = []
    for p in all_panels():
        for t in p.get("targets", []):
            out.append((f"panel {p['id']} {p.get('title')!r} target {t.get('refId')}", t["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var.get("type") != "query":
            continue
        m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", _variable_query(var))
        assert m, f"variable {var['name']}: expected label_values(<selector>, <label>)"
        out.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def rule_list() -> list[dict]:
    return [r for g in rules()["groups"] for r in g["rules"]]


def recorded() -> set[str]:
    return {r["record"] for r in rule_list() if "record" in r}


def rule_queries() -> list[tuple[str, str]]:
    return [(f"rule {r.get('record') or r.get('alert')}", r["expr"]) for r in rule_list()]


def _check_query(where: str, expr: str, allowed_extra: set[str]) -> list[str]:
    types, labels = exposed()
    q = Query(expr)
    problems = []
    if not q.metrics:
        problems.append(f"{where}: no metric referenced")
    for name, funcs in q.metrics:
        if name in allowed_extra:
            continue
        if name not in types:
            problems.append(f"{where}: {name} is not exposed by cluster/metrics.py")
            continue
        kind = types[name]
        if funcs and funcs[0] in ("rate", "irate", "increase", "resets") and kind not in ("counter", "histogram"):
            problems.append(f"{where}: {funcs[0]}() of {name}, a {kind}")
        if "histogram_quantile" in funcs and not name.endswith("_bucket"):
            problems.append(f"{where}: histogram_quantile over {name}, not a _bucket series")
        if name.endswith("_bucket") and "histogram_quantile" not in funcs:
            problems.append(f"{where}: {name} outside histogram_quantile")
    for label in q.labels - labels:
        problems.append(f"{where}: label {label!r} is not on any exposed sample")
    for label, op, value in q.matchers:
        if label == "code" and not value.startswith("$"):
            names = value.split("|") if op in ("=~", "!~") else [value]
            problems += [f"{where}: code {n!r} is not a gRPC status code name" for n in names
                         if n not in grpc.StatusCode.__members__]
        if label == "deployment" and value not in _deployments():
            problems.append(f"{where}: deployment {value!r} publishes no metrics (known: {_deployments()})")
    if "histogram_quantile" in expr and "le" not in q.labels:
        problems.append(f"{where}: histogram_quantile without `le` kept in the aggregation")
    return problems


@lru_cache(maxsize=1)
def _deployments() -> set[str]:
    """The `deployment` label values: the names the replicas publish under (start_publisher calls)."""
    names = set()
    for folder in ("actors", "routing"):
        for path in (ROOT / folder).rglob("*.py"):
            names |= set(re.findall(r'start_publisher\(\s*[\w.]+,\s*"(\w+)"', path.read_text()))
    assert names, "no start_publisher(config, \"<deployment>\", ...) call found"
    return names


def test_both_files_parse():
    d, r = dashboard(), rules()
    assert isinstance(d["panels"], list) and d["panels"]
    assert isinstance(r["groups"], list) and r["groups"]


def test_every_dashboard_query_uses_exposed_metrics_only():
    problems = [p for where, expr in dashboard_queries() for p in _check_query(where, expr, set())]
    assert not problems, "\n".join(problems)


def test_every_rule_uses_exposed_metrics_or_recorded_ones():
    rec = recorded()
    problems = [p for where, expr in rule_queries() for p in _check_query(where, expr, rec)]
    assert not problems, "\n".join(problems)


def test_dashboard_covers_the_operator_topics():
    used = {name for _, expr in dashboard_queries() for name, _ in Query(expr).metrics}
    wanted = {"request_success_total", "request_errors_total", "time_to_first_token_seconds_bucket",
              "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket", "num_requests_running",
              "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hits_total", "prefix_cache_queries_total",
              "spec_decode_num_accepted_tokens_total", "spec_decode_num_draft_tokens_total",
              "spec_decode_num_accepted_tokens_per_pos_total", "kv_store_lookup_blocks_total",
              "kv_store_hit_blocks_total", "router_decisions_total", "admission_rejected_total", "expert_rows_total"}
    assert not {"specserve:" + w for w in wanted} - used


# ---- dashboard structure ---------------------------------------------------------------------------------------
def test_dashboard_structure():
    d = dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["title"] and d["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    want_ds = {"type": "prometheus", "uid": "${datasource}"}
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == want_ds, var["name"]

    panels = all_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    builtins = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s", "__range_ms"}
    cells = {}
    for p in panels:
        assert isinstance(p.get("title"), str) and p["title"].strip(), f"panel {p['id']} has no title"
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]!r} and {p['title']!r} overlap"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":  # a row holds no queries of its own
            assert not p.get("targets"), p["title"]
            continue
        assert p.get("datasource") == want_ds, f"panel {p['title']!r}: datasource {p.get('datasource')}"
        targets = p.get("targets") or []
        assert targets, f"panel {p['title']!r} has no targets"
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), p["title"]
        for t in targets:
            assert t.get("datasource") == want_ds, f"panel {p['title']!r} target {t['refId']}"
            assert t["expr"].strip()
            for var in re.findall(r"\$\{?(\w+)\}?", t["expr"]):
                assert var in variables or var in builtins, f"panel {p['title']!r}: unknown variable ${var}"
            _, labels = exposed()
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")):
                assert label in labels, f"panel {p['title']!r}: legend label {label!r} is not exposed"


def test_files_are_self_contained():
    """The Helm chart ships them with .Files.Get: no Helm templating may be inside (Grafana legends and
    Prometheus annotations do use {{ }}, so the chart must not pass these files through `tpl`)."""
    for path in (DASHBOARD, RULES):
        text = path.read_text()
        for helmish in (".Values", ".Release", ".Chart", "{{-", "-}}", "{{ include", "{{ template"):
            assert helmish not in text, f"{path.name}: {helmish!r}"
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())
    assert set(uids) - {dashboard()["uid"], "-- Grafana --"} == {"${datasource}"}


# ---- rules structure -------------------------------------------------------------------------------------------
_DURATION = re.compile(r"^(\d+(ms|[smhdwy]))+$")


def test_rule_groups_structure():
    _, labels = exposed()
    groups = rules()["groups"]
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))
    rec, alerts = [], []
    for g in groups:
        assert g["rules"], g["name"]
        for r in g["rules"]:
            assert ("record" in r) != ("alert" in r), r
            assert isinstance(r["expr"], str) and r["expr"].strip()
            (rec if "record" in r else alerts).append(r)
    assert rec and alerts
    types, _ = exposed()
    rec_names = [r["record"] for r in rec]
    assert len(rec_names) == len(set(rec_names))
    for name in rec_names:
        assert re.fullmatch(r"[a-zA-Z_]\w*:[a-zA-Z_]\w*:[a-zA-Z_]\w*", name), f"{name}: not level:metric:operation"
        assert name not in types, f"{name} clashes with an exposed metric"
    alert_names = [r["alert"] for r in alerts]
    assert len(alert_names) == len(set(alert_names))
    for r in alerts:
        assert r.get("labels", {}).get("severity") in SEVERITIES, f"{r['alert']}: severity label"
        ann = r.get("annotations", {})
        assert ann.get("summary", "").strip() and ann.get("description", "").strip(), f"{r['alert']}: annotations"
        if "for" in r:
            assert _DURATION.match(str(r["for"])), f"{r['alert']}: for {r['for']!r}"
        for text in ann.values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in labels, f"{r['alert']}: annotation uses $labels.{label}, not exposed"
    wanted = {"SpecserveHighServerErrorRate", "SpecserveTTFTHigh", "SpecserveKVCacheNearlyFull",
              "SpecserveQueueFullRefusals", "SpecserveNoVerifierReporting"}
    assert wanted <= set(alert_names)


# ---- promtool, where installed ---------------------------------------------------------------------------------
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package `prometheus`)")


def _promtool(*args, cwd) -> None:
    out = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _grafana_to_promql(expr: str) -> str:
    expr = re.sub(r"\$\{?__\w+\}?", "1m", expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


@needs_promtool
def test_promtool_parses_rules_and_dashboard_queries(tmp_path):
    _promtool("check", "rules", str(RULES), cwd=tmp_path)
    as_rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query:n{i}", "expr": _grafana_to_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries())]}]}
    (tmp_path / "dashboard-rules.yaml").write_text(yaml.safe_dump(as_rules))
    _promtool("check", "rules", "dashboard-rules.yaml", cwd=tmp_path)


def _series(name: str, values: str, **labels) -> dict:
    return {"series": name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}",
            "values": values}


@needs_promtool
def test_promtool_alert_scenarios(tmp_path):
    """Evaluated by Prometheus's rule engine on made-up series named as the code names them."""
    types, _ = exposed()
    ing = {"model_name": "m", "deployment": "Ingress", "replica": "i1"}
    ver = {"model_name": "m", "deployment": "Verifier", "replica": "v1"}
    P = "specserve:"
    failing = [  # 10 ok/s, 2 UNAVAILABLE/s, no verifier reporting
        _series(P + "request_success_total", "0+600x40", finished_reason="stop", **ing),
        _series(P + "request_errors_total", "0+120x40", code="UNAVAILABLE", protocol="grpc", **ing),
        _series(P + "ingress_requests_in_flight", "1x40", **ing),
    ]
    healthy = [  # 10 ok/s, 0.02 INVALID_ARGUMENT/s, a verifier with a full KV cache and slow TTFT
        _series(P + "request_success_total", "0+600x40", finished_reason="stop", **ing),
        _series(P + "request_errors_total", "0+1x40", code="INVALID_ARGUMENT", protocol="http", **ing),
        _series(P + "ingress_requests_in_flight", "1x40", **ing),
        _series(P + "num_requests_running", "4x40", **ver),
        _series(P + "kv_cache_usage_perc", "0.99x40", **ver),
        _series(P + "time_to_first_token_seconds_bucket", "0+60x40", le="5.0", **ing),
        _series(P + "time_to_first_token_seconds_bucket", "0+600x40", le="10.0", **ing),
        _series(P + "time_to_first_token_seconds_bucket", "0+600x40", le="+Inf", **ing),
    ]
    for s in failing + healthy:
        assert s["series"].split("{")[0] in types, s["series"]

    def firing(names_and_labels):
        return [{"labels": "ALERTS{" + ",".join(f'{k}="{v}"' for k, v in sorted(lbls.items())) + "}",
                 "value": 1} for lbls in names_and_labels]

    tests = {"rule_files": [str(RULES)], "evaluation_interval": "30s", "tests": [
        {"interval": "1m", "input_series": failing, "promql_expr_test": [
            {"expr": "model_name:specserve_server_errors:ratio_rate5m", "eval_time": "20m",
             "exp_samples": [{"labels": 'model_name:specserve_server_errors:ratio_rate5m{model_name="m"}',
                              "value": 2 / 12}]},
            {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "20m", "exp_samples": firing([
                {"alertname": "SpecserveHighServerErrorRate", "alertstate": "firing", "model_name": "m",
                 "severity": "critical"},
                {"alertname": "SpecserveNoVerifierReporting", "alertstate": "firing", "model_name": "m",
                 "severity": "critical"}])},
        ]},
        {"interval": "1m", "input_series": healthy, "promql_expr_test": [
            {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "30m", "exp_samples": firing([
                {"alertname": "SpecserveKVCacheNearlyFull", "alertstate": "firing", "model_name": "m",
                 "replica": "v1", "severity": "warning"},
                {"alertname": "SpecserveTTFTHigh", "alertstate": "firing", "model_name": "m",
                 "severity": "warning"}])},
        ]},
        {"interval": "1m", "input_series": [], "promql_expr_test": [  # nothing scraped at all
            {"expr": 'ALERTS{alertstate="firing"}', "eval_time": "10m", "exp_samples": firing([
                {"alertname": "SpecserveNoVerifierReporting", "alertstate": "firing", "deployment": "Verifier",
                 "severity": "critical"}])},
        ]},
    ]}
    (tmp_path / "scenarios.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _promtool("test", "rules", "scenarios.yaml", cwd=tmp_path)
