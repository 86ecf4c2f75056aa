"""A short smoke of the benchmark suite against a served SmolLM2 (real Ray Serve, real embedded Redis): multi-turn
and input-copying workloads at a fixed concurrency and at a Poisson rate, goodput under an SLO, specserve's own
figures read from /metrics per pass, the plots; then a short soak. Seconds of load, not minutes: the full runs
behind docs/performance.md's figures are the commands it names."""

import json
import os

import pytest

from served_apps import start_app
from specserve.actors.model_loader import pull_model
from specserve.tools.bench import main as bench
from specserve.tools.bench import soak
from specserve.cluster.config import default_cache_dir

pytestmark = [pytest.mark.integration, pytest.mark.smollm2]
NAME = "bench-suite"


@pytest.fixture(scope="module")
def server(ray_cluster):
    path = pull_model("smollm2-135m", os.environ.get("SPECSERVE_CACHE") or default_cache_dir(), progress=False)
    server = start_app(ray_cluster, "smollm2-135m", NAME, **{"model.cache_dir": str(path.parent.parent),
                                                               "server.metrics_period_s": 0.5})
    yield server
    server.stop()


@pytest.mark.timeout(600)
def test_suite_smoke_workloads_loads_figures_plots(server, tmp_path):
    out = tmp_path / "suite.json"
    assert bench(["--url", server.url, "--workload", "multiturn,copy", "--concurrency", "2", "--rate", "2",
                  "--num-requests", "4", "--max-tokens", "8", "--slo", "ttft_ms=120000", "--stats-wait", "1",
                  "--warmup", "1", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] and [(p["workload"], p["load"]["label"]) for p in doc["passes"]] == [
        ("multiturn", "c=2"), ("multiturn", "r=2/s"), ("copy", "c=2"), ("copy", "r=2/s")]
    for p in doc["passes"]:
        s, reqs = p["summary"], p["requests"]
        assert s["ok"] == s["requests"] == 4, s["error_kinds"]
        assert s["slo_attainment"] == 1.0 and s["goodput_req_s"] == pytest.approx(s["req_s"])
        server_figures = s["server"]
        assert server_figures is not None, "specserve's /metrics were not read"
        # The pass's /metrics difference agrees with the usage its own requests reported.
        assert server_figures["spec_drafts"] == sum(r["spec_rounds"] or 0 for r in reqs)
        if p["workload"] == "multiturn":
            turns = sorted(reqs, key=lambda r: r["turn"])
            assert [r["turn"] for r in turns] == [0, 1, 2, 3]
            # Each turn's prompt extends the last one and its reply: longer, and mostly a prefix-cache hit.
            assert all(a["prompt_tokens"] < b["prompt_tokens"] for a, b in zip(turns, turns[1:]))
            assert all(r["cached_tokens"] >= turns[0]["prompt_tokens"] // 2 for r in turns[1:])
            assert server_figures["local_prefix_hit_rate"] > 0.5
    pngs = {p.name for p in tmp_path.glob("suite-*.png")}
    assert {"suite-latency-throughput.png", "suite-ttft-cdf.png"} <= pngs
    drafted = any(p["summary"]["server"]["spec_drafts"] for p in doc["passes"])
    assert ("suite-acceptance.png" in pngs) == drafted


@pytest.mark.timeout(300)
def test_soak_smoke_no_leaked_blocks(server, tmp_path, capsys):
    out = tmp_path / "soak.json"
    rc = soak.main(["--url", server.url, "--duration", "12", "--warmup", "3", "--sample-every", "1",
                    "--concurrency", "2", "--max-tokens", "8", "--workload", "chat,copy",
                    "--max-growth-mb", "256", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert res["verdict"]["passed"] and res["summary"]["errors"] == 0 and res["summary"]["ok"] > 0
    assert {rep.split("/")[0] for rep in res["memory_mb"]} == {"Ingress", "Verifier"}
    assert {rep.split("/")[0] for rep in res["kv_usage"]} == {"Verifier"}
    assert res["idle_kv_usage"] and all(u == 0 for u in res["idle_kv_usage"].values())
    assert len(res["samples"]) >= 8 and (tmp_path / "soak.png").stat().st_size > 10_000
    assert "soak passed" in printed
