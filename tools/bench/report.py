"""What a bench run reports: the summary table, target-by-target ratios within the run, and the JSON file."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from typing import Any

from specserve.tools.bench.load import Load
from specserve.tools.bench.results import fmt as _fmt
from specserve.tools.bench.runner import BenchConfig

# Ratios of each target to the baseline (the first target) for the same workload and load. For throughput a
# ratio above 1 is better; for latency, below 1.
RATIO_METRICS = ("output_tok_s", "req_s", "goodput_req_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
                 "e2e_ms_p50", "e2e_ms_p99")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def pass_key(p: dict[str, Any]) -> tuple[str, str]:
    return p["workload"], p["load"]["label"]


def comparisons(passes: list[dict[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Each target against the baseline, pass by pass (same workload, same load, same prompts)."""
    base = {pass_key(p): p["summary"] for p in passes if p["target"] == baseline}
    out = []
    for p in passes:
        b = base.get(pass_key(p))
        if p["target"] == baseline or b is None:
            continue
        s = p["summary"]
        ratios = {m: s[m] / b[m] for m in RATIO_METRICS if s.get(m) is not None and b.get(m)}
        out.append({"baseline": baseline, "target": p["target"], "workload": p["workload"],
                    "load": p["load"]["label"], "ratios": ratios})
    return out


def format_table(passes: list[dict[str, Any]], cfg: BenchConfig) -> str:
    return table([t.label for t in cfg.targets], cfg.workloads, [ld.label for ld in cfg.loads], cfg.slo, passes)


def table_of(doc: dict[str, Any], *, markdown: bool = False) -> str:
    """The table of a results file (--json), as printed at the end of its run, or as Markdown."""
    c = doc["config"]
    labels = [t["label"] for t in c["targets"]]
    loads = [Load(ld["kind"], ld["value"]).label for ld in c["loads"]]
    return table(labels, c["workloads"], loads, c.get("slo") or {}, doc["passes"], markdown=markdown)


def table(labels: list[str], workloads: list[str], loads: list[str], slo: dict[str, float],
          passes: list[dict[str, Any]], *, markdown: bool = False) -> str:
    rows = sorted(passes, key=lambda p: (workloads.index(p["workload"]), loads.index(p["load"]["label"]),
                                         labels.index(p["target"])))
    ratio = {(c["target"],) + (c["workload"], c["load"]): c["ratios"].get("output_tok_s")
             for c in comparisons(passes, labels[0])}
    any_s = lambda key: any(p["summary"].get(key) for p in passes)  # noqa: E731
    show_single = any_s("single_stream_tok_s")
    show_good, show_spec, show_hits = any_s("goodput_req_s") or bool(slo), any_s("spec_rounds"), any_s(
        "prefix_hit_rate")
    show_route = any_s("router")
    headers = ["workload", "load", "target", "ok", "err", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99",
               "TPOT p50", "e2e p50", "e2e p99"]
    headers += ["1-stream tok/s"] if show_single else []
    headers += ["out tok/s", "req/s"]
    headers += ["goodput/s"] if show_good else []
    headers += ["acc len", "accept"] if show_spec else []
    headers += ["prefix hit", "local", "store"] if show_hits else []
    headers += ["route p99 us"] if show_route else []
    headers += [f"vs {labels[0]}"] if len(labels) > 1 else []
    rows_out = [headers]
    for p in rows:
        s = p["summary"]
        row = [p["workload"], p["load"]["label"], p["target"], str(s["ok"]), str(s["errors"])]
        row += [_fmt(s[k], 1) for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99", "tpot_ms_p50",
                                        "e2e_ms_p50", "e2e_ms_p99")]
        row += [_fmt(s["single_stream_tok_s"], 1)] if show_single else []
        row += [_fmt(s["output_tok_s"], 1), _fmt(s["req_s"], 2)]
        row += [_fmt(s.get("goodput_req_s"), 2)] if show_good else []
        row += [_fmt(s.get("mean_accepted_length"), 2), _pct(s.get("acceptance_rate"))] if show_spec else []
        if show_hits:
            row += [_pct(s.get(k)) for k in ("prefix_hit_rate", "prefix_hit_rate_local", "prefix_hit_rate_store")]
        row += [_fmt((s.get("router") or {}).get("decision_us_p99"), 0)] if show_route else []
        if len(labels) > 1:
            r = ratio.get((p["target"], p["workload"], p["load"]["label"]))
            row.append("" if p["target"] == labels[0] else "-" if r is None else f"{r:.2f}x")
        rows_out.append(row)
    if markdown:
        lines = ["| " + " | ".join(r) + " |" for r in rows_out]
        lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows_out) for i in range(len(headers))]
    text_cols = {0, 1, 2}
    lines = []
    for j, r in enumerate(rows_out):
        cells = [r[i].ljust(widths[i]) if i in text_cols else r[i].rjust(widths[i]) for i in range(len(r))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("(latencies in ms; TTFT = time to first token, ITL = gap between streamed chunks, "
                 "TPOT = (e2e - TTFT) / (tokens - 1); load c=N: N clients back to back, r=X/s: Poisson arrivals)")
    if len(labels) > 1:
        lines.append(f"(vs {labels[0]} = output tok/s / {labels[0]}'s in the same pass; more ratios in the JSON)")
    if show_good:
        bounds = ", ".join(f"{k} <= {v:g}" for k, v in slo.items())
        lines.append(f"(goodput = requests completed within the SLO ({bounds}) per second)")
    if show_spec:
        lines.append("(acc len = tokens committed per speculative round; accept = accepted / drafted tokens)")
    if show_hits:
        lines.append("(prefix hit = prompt tokens served from a KV cache / prompt tokens; local = the replica's "
                     "own cache, store = imported from the cluster KV store)")
        seen = set()
        for p in rows:
            ideal = p["summary"].get("ideal_prefix_hit_rate")
            if ideal is not None and pass_key(p) not in seen:
                seen.add(pass_key(p))
                lines.append(f"(ideal prefix hit for {p['workload']} {p['load']['label']}: {100 * ideal:.1f}%, "
                             "computed, not measured: one cache that starts empty and never evicts, on this "
                             "pass's prompts alone)")
    if show_route:
        lines.append("(route p99 us = prefix_cost routing decision time in the ingress, 99th percentile so far)")
    for p in rows:
        server = p["summary"].get("server") or {}
        by_pos = server.get("acceptance_by_position")
        extra = []
        if by_pos:
            extra.append("acceptance by position " + " ".join(f"{100 * a:.0f}%" for a in by_pos))
        if server.get("expert_imbalance"):
            extra.append(f"expert rows max/mean {server['expert_imbalance']:.2f}")
        if extra:
            lines.append(f"{p['target']} {p['workload']} {p['load']['label']}: " + "; ".join(extra))
    for p in rows:
        s = p["summary"]
        where = f"{p['target']} {p['workload']} {p['load']['label']}"
        if s["errors"]:
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(s["error_kinds"].items()))
            detail = next((r["detail"] for r in p["requests"] if not r["ok"] and r["detail"]), None)
            lines.append(f"errors in {where}: {kinds}" + (f" (first: {detail[:120]})" if detail else ""))
        if s["ok"] and not s["usage_reported"]:
            lines.append(f"note: {where}: no usage in stream, output tokens counted as content chunks")
    return "\n".join(lines)


def _config_json(cfg: BenchConfig, argv: list[str]) -> dict[str, Any]:
    d = asdict(cfg)
    d.pop("api_key")  # never write secrets to the results file
    d["argv"] = ["***" if prev == "--api-key" else "--api-key=***" if x.startswith("--api-key=") else x
                 for prev, x in zip([""] + argv, argv)]
    d["requests_per_pass"] = {ld.label: cfg.requests_for(ld) for ld in cfg.loads}
    return d


def write_json(path: str, cfg: BenchConfig, argv: list[str], passes: list[dict[str, Any]], started: float, *,
               complete: bool) -> None:
    doc = {
        "tool": "specserve bench",
        "version": 2,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "complete": complete,
        "host": {"python": platform.python_version(), "platform": platform.platform()},
        "config": _config_json(cfg, argv),
        "passes": passes,
        "comparisons": comparisons(passes, cfg.targets[0].label) if cfg.targets else [],
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
