"""PNG plots of a bench run, from its JSON document: latency against throughput over the loads of a sweep, TTFT
CDFs, and speculative acceptance by draft position. Written next to the JSON (`<stem>-<plot>.png`)."""

from __future__ import annotations

import os
from typing import Any

from specserve.tools.bench.load import Load


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def style(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)


def _order(doc: dict[str, Any]) -> tuple[list[str], list[str]]:
    targets, workloads = [], []
    for p in doc["passes"]:
        if p["target"] not in targets:
            targets.append(p["target"])
        if p["workload"] not in workloads:
            workloads.append(p["workload"])
    return targets, workloads


def _load_sorted(passes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(passes, key=lambda p: Load(p["load"]["kind"], p["load"]["value"]).sort_key())


def latency_throughput(doc: dict[str, Any], path: str) -> str | None:
    """Per workload: TTFT p50, TPOT p50 and e2e p99 against output tokens/s, one line per target through
    its loads (the knee of each curve is where the server saturates)."""
    targets, workloads = _order(doc)
    if not workloads:
        return None
    plt = pyplot()
    panels = (("ttft_ms_p50", "TTFT p50 (ms)"), ("tpot_ms_p50", "TPOT p50 (ms)"), ("e2e_ms_p99", "e2e p99 (ms)"))
    fig, axes = plt.subplots(len(workloads), 3, figsize=(14, 3.6 * len(workloads)), squeeze=False)
    for i, w in enumerate(workloads):
        for j, (key, title) in enumerate(panels):
            ax = axes[i][j]
            for c, t in enumerate(targets):
                for kind, marker in (("concurrency", "o"), ("rate", "s")):  # one curve per sweep
                    ps = [p for p in _load_sorted(doc["passes"]) if p["workload"] == w and p["target"] == t
                          and p["load"]["kind"] == kind and p["summary"].get(key) is not None
                          and p["summary"].get("output_tok_s")]
                    if not ps:
                        continue
                    xs = [p["summary"]["output_tok_s"] for p in ps]
                    ys = [p["summary"][key] for p in ps]
                    sweep = "clients" if kind == "concurrency" else "Poisson"
                    ax.plot(xs, ys, marker=marker, color=f"C{c}", label=f"{t} ({sweep})")
                    for x, y, p in zip(xs, ys, ps):
                        ax.annotate(p["load"]["label"], (x, y), textcoords="offset points", xytext=(4, 4),
                                    fontsize=7)
            style(ax, f"{w}: {title}", "output tokens/s")
    return save(plt, fig, path)


def ttft_cdf(doc: dict[str, Any], path: str) -> str | None:
    """Per workload: the distribution of TTFT, one line per (target, load)."""
    targets, workloads = _order(doc)
    if not workloads:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 4), squeeze=False)
    for ax, w in zip(axes[0], workloads):
        for t in targets:
            for p in _load_sorted([p for p in doc["passes"] if p["workload"] == w and p["target"] == t]):
                xs = sorted(r["ttft_s"] * 1000 for r in p["requests"] if r["ok"] and r["ttft_s"] is not None)
                if xs:
                    ax.step(xs, [(k + 1) / len(xs) for k in range(len(xs))], where="post",
                            label=f"{t} {p['load']['label']}")
        ax.set_ylabel("fraction of requests")
        lo, hi = ax.dataLim.x0, ax.dataLim.x1
        if ax.lines and lo > 0 and hi / lo > 20:  # log only for a wide spread; plain numbers read better
            ax.set_xscale("log")
        style(ax, f"{w}: TTFT CDF", "TTFT (ms)")
    return save(plt, fig, path)


def acceptance_by_position(doc: dict[str, Any], path: str) -> str | None:
    """Per target and workload with speculation: accepted / verification rounds at each draft position, over
    all loads of that pair (weighted by their rounds)."""
    targets, workloads = _order(doc)
    rates: dict[str, list[float]] = {}
    for t in targets:
        for w in workloads:
            acc: list[float] = []
            drafts = 0.0
            for p in doc["passes"]:
                server = p["summary"].get("server") or {}
                by_pos, n = server.get("acceptance_by_position"), server.get("spec_drafts") or 0
                if p["target"] != t or p["workload"] != w or not by_pos or not n:
                    continue
                acc += [0.0] * (len(by_pos) - len(acc))
                for i, a in enumerate(by_pos):
                    acc[i] += a * n
                drafts += n
            if drafts:
                rates[f"{t} {w}"] = [a / drafts for a in acc]
    if not rates:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rates)
    positions = max(len(r) for r in rates.values())
    for k, (label, r) in enumerate(rates.items()):
        ax.bar([i - 0.4 + (k + 0.5) * width for i in range(len(r))], r, width=width, label=label)
    ax.set_xticks(range(positions))
    ax.set_ylabel("accepted / verification rounds")
    ax.set_ylim(0, 1)
    style(ax, "Speculative decoding: acceptance by draft position", "draft position (0 = first drafted token)")
    ax.legend(fontsize=8)
    return save(plt, fig, path)


def write_plots(doc: dict[str, Any], json_path: str) -> list[str]:
    """Every plot that has data, next to `json_path`; returns the files written."""
    stem = os.path.splitext(json_path)[0]
    out = []
    for name, fn in (("latency-throughput", latency_throughput), ("ttft-cdf", ttft_cdf),
                     ("acceptance", acceptance_by_position)):
        written = fn(doc, f"{stem}-{name}.png")
        if written:
            out.append(written)
    return out
