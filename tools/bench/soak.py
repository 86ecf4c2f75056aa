"""`specserve soak`: a long steady run at fixed concurrency over a mix of workloads, sampling every replica's
resident memory and KV pool usage from `/metrics`. It passes when, past the warm-up, no replica's own memory
(anonymous: its heap) grew by more than --max-growth-mb, the KV pool is empty once the load stops (no leaked
blocks), and no request failed. Pages of Ray's shared object store a replica touched (exported KV blocks) are
reported, not judged: the store bounds them, not the process.

    specserve soak --duration 600 --concurrency 4 --json soak.json     # starts the default server
    specserve soak --url http://127.0.0.1:8000 --duration 600          # a running one
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from specserve.tools.bench import server_stats
from specserve.tools.bench.cli import normalize_url, parse_overrides, sigterm_as_ctrl_c, start_ray_if_needed, stop_ray
from specserve.tools.bench.http_client import BenchError, RequestSettings, make_client, resolve_model
from specserve.tools.bench.load import InFlight, run_session
from specserve.tools.bench.results import RequestResult, summarize
from specserve.tools.bench.runner import ServedTarget, Target, log
from specserve.tools.bench.workloads import WORKLOADS, build_workload

RSS = server_stats.P + "process_resident_memory_bytes"
MEMORY_KINDS = ("anon", "shmem", "file")
KV = server_stats.P + "kv_cache_usage_perc"


def _sessions(workloads: list[str], seed: int):
    """An endless interleaving of the workloads' seeded sessions (a new seed when one runs out)."""
    for k in itertools.count():
        batches = [build_workload(w, 200, seed * 1000 + k) for w in workloads]
        for group in itertools.zip_longest(*batches):
            yield from (s for s in group if s is not None)


def growth(samples: list[dict[str, Any]], warmup_s: float, key: str = "anon",
           scale: float = 2 ** 20) -> dict[str, dict[str, float]]:
    """Per replica, of one sampled series (`key`, divided by `scale`): the median of the first quarter of the
    samples after warm-up, of the last quarter, and the difference. Medians of windows, so one sample taken
    mid-step does not decide."""
    out = {}
    for rep in sorted({r for s in samples for r in s[key]}):
        series = [s[key][rep] / scale for s in samples if rep in s[key] and s["t"] >= warmup_s]
        if len(series) < 4:
            continue
        q = max(1, len(series) // 4)
        first, last = statistics.median(series[:q]), statistics.median(series[-q:])
        out[rep] = {"after_warmup": first, "end": last, "growth": last - first, "peak": max(series)}
    return out


@dataclass
class SoakProgress:
    """What a soak has seen so far, filled in as it runs: an interrupted soak reports it."""
    url: str
    workloads: list[str]
    concurrency: int
    duration_s: float
    warmup_s: float
    model: str | None = None
    results: list[RequestResult] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    started: float | None = None  # time.perf_counter() when the load started

    def report(self, wall_s: float, idle: str | None) -> dict[str, Any]:
        """The soak's results; `idle`: the /metrics text once the load stopped (None: not read)."""
        return {"url": self.url, "model": self.model, "workloads": self.workloads, "concurrency": self.concurrency,
                "duration_s": self.duration_s, "warmup_s": self.warmup_s, "wall_s": wall_s,
                "samples": self.samples, "idle_kv_usage": server_stats.per_replica(idle or "", KV),
                "memory_mb": growth(self.samples, self.warmup_s),
                "object_store_mb": growth(self.samples, self.warmup_s, "shmem"),
                "kv_usage": growth(self.samples, self.warmup_s, "kv_usage", 1.0),
                "summary": {k: v for k, v in summarize(self.results, wall_s).items()
                            if k in ("requests", "ok", "errors", "error_kinds", "output_tok_s", "req_s",
                                     "ttft_ms_p50", "ttft_ms_p99", "e2e_ms_p99")}}


async def soak(run: SoakProgress, model: str | None, sample_s: float, settings: RequestSettings,
               seed: int) -> dict[str, Any]:
    url, duration_s, results, samples = run.url, run.duration_s, run.results, run.samples
    client = make_client(url, None, settings.timeout, run.concurrency + 2)
    try:
        run.model = model = await resolve_model(client, url, url, model)
        if await server_stats.scrape(client) is None:
            raise BenchError(f"{url} has no specserve /metrics: the soak reads replica memory and KV usage there")
        sessions = _sessions(run.workloads, seed)
        in_flight = InFlight()
        run.started = t0 = time.perf_counter()
        stop = t0 + duration_s

        async def worker() -> None:
            while time.perf_counter() < stop:
                results.extend(await run_session(client, model, next(sessions), settings, t0, in_flight))

        async def sampler() -> None:
            while True:
                text = await server_stats.scrape(client)
                if text is not None:
                    t = time.perf_counter() - t0
                    s = {"t": t, "kv_usage": server_stats.per_replica(text, KV), "in_flight": in_flight.now,
                         "done": len(results), "errors": sum(not r.ok for r in results)}
                    for kind in MEMORY_KINDS:
                        s[kind] = server_stats.per_replica(text, RSS, kind=kind)
                    samples.append(s)
                    mb = {kind: sum(s[kind].values()) / 2 ** 20 for kind in MEMORY_KINDS}
                    log(f"soak {t:6.0f}/{duration_s:.0f} s: {s['done']} requests, {s['errors']} errors, replicas' "
                        f"memory {mb['anon']:.0f} MB own + {mb['shmem']:.0f} MB object store, KV in use "
                        f"{max(s['kv_usage'].values(), default=0):.1%}")
                if time.perf_counter() >= stop:
                    return
                await asyncio.sleep(sample_s)

        await asyncio.gather(sampler(), *(worker() for _ in range(run.concurrency)))
        wall = time.perf_counter() - t0
        await asyncio.sleep(2.5)  # replicas publish every 2 s: the idle state after the load
        idle = await server_stats.scrape(client)
    finally:
        await client.aclose()
    return run.report(wall, idle)


def verdict(res: dict[str, Any], max_growth_mb: float) -> list[str]:
    """What failed (empty: passed)."""
    bad = [] if res.get("complete", True) else [
        f"interrupted after {res['wall_s']:.0f} s of {res['duration_s']:g}: the idle KV pool was not read"]
    bad += [f"{rep}: its own memory grew {m['growth']:.1f} MB after warm-up (limit {max_growth_mb:g})"
           for rep, m in res["memory_mb"].items() if m["growth"] > max_growth_mb]
    bad += [f"{rep}: KV pool {u:.1%} in use with no request running (leaked blocks)"
            for rep, u in res["idle_kv_usage"].items() if u > 0]
    if not res["memory_mb"]:
        bad.append("too few memory samples after warm-up to judge growth (lengthen --duration)")
    if res["summary"]["errors"]:
        bad.append(f"{res['summary']['errors']} requests failed: {res['summary']['error_kinds']}")
    return bad


def plot(res: dict[str, Any], path: str) -> str:
    from specserve.tools.bench.plots import pyplot, save, style

    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    for c, rep in enumerate(sorted({r for s in res["samples"] for r in s["anon"]})):
        for kind, line in (("anon", "-"), ("shmem", ":")):
            pts = [(s["t"], s[kind][rep] / 2 ** 20) for s in res["samples"] if rep in s[kind]]
            ax1.plot([t for t, _ in pts], [v for _, v in pts], line, color=f"C{c}",
                     label=f"{rep.split('/')[0]} {rep[-6:]} {'own' if kind == 'anon' else 'object store'}")
    for rep in sorted({r for s in res["samples"] for r in s["kv_usage"]}):
        pts = [(s["t"], 100 * s["kv_usage"][rep]) for s in res["samples"] if rep in s["kv_usage"]]
        ax2.plot([t for t, _ in pts], [v for _, v in pts], label=rep.split("/")[0] + " " + rep[-6:])
    for ax, title in ((ax1, "resident memory per replica (MB): own heap, object store pages"),
                      (ax2, "KV pool in use (%)")):
        ax.axvline(res["warmup_s"], color="grey", linestyle="--", linewidth=1)
        style(ax, title, "seconds into the soak (dashed: end of warm-up)")
    return save(plt, fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specserve soak", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running specserve (default: start one with --set overrides)")
    p.add_argument("--set", dest="overrides", default="", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="config overrides of the server the soak starts (dotted keys)")
    p.add_argument("--model", default=None)
    p.add_argument("--workload", default="chat,shared-prefix,multiturn",
                   help=f"comma list of {', '.join(WORKLOADS)} (default chat,shared-prefix,multiturn)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--warmup", type=float, default=None, help="seconds not judged (default a sixth of --duration)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--sample-every", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--max-growth-mb", type=float, default=64.0,
                   help="most memory a replica may gain after warm-up (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="results here, and a PNG next to it")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    workloads = [w.strip() for w in a.workload.split(",") if w.strip()]
    problems = [f"unknown workload {w!r}" for w in workloads if w not in WORKLOADS]
    problems += [f"{n} must be > 0" for n, v in (("--duration", a.duration), ("--concurrency", a.concurrency),
                                                  ("--sample-every", a.sample_every), ("--max-tokens", a.max_tokens))
                 if v <= 0]
    if problems or not workloads:
        print(f"error: {'; '.join(problems) or 'no workload'}", file=sys.stderr)
        return 2
    warmup = a.duration / 6 if a.warmup is None else a.warmup
    settings = RequestSettings("chat", a.max_tokens, 0.0, a.timeout)
    served = run = None
    ray_started = False
    try:
        url = normalize_url(a.url) if a.url else None
        if url is None:
            served = ServedTarget(Target("soak", "", serve=parse_overrides(a.overrides, "--set")), {})
            ray_started = start_ray_if_needed(served.config.server)
        with sigterm_as_ctrl_c():  # once Ray runs: ray.init puts a SIGTERM handler of its own in place
            if served is not None:
                url = served.start()
            run = SoakProgress(url, workloads, a.concurrency, a.duration, warmup)
            res = asyncio.run(soak(run, a.model, a.sample_every, settings, a.seed))
            res["complete"] = True
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM: report what the load showed so far
        if run is None or run.started is None:
            log("interrupted before the load started")
            return 130
        log("interrupted; reporting what the soak saw so far")
        res = run.report(time.perf_counter() - run.started, None)
        res["complete"] = False
    finally:
        if served is not None:
            served.stop()
        if ray_started:
            stop_ray()
    bad = verdict(res, a.max_growth_mb)
    res["verdict"] = {"passed": not bad, "problems": bad, "max_growth_mb": a.max_growth_mb}
    s = res["summary"]
    print(f"soak: {s['requests']} requests in {res['wall_s']:.0f} s ({s['errors']} failed), "
          f"{s['output_tok_s']:.1f} output tok/s, concurrency {a.concurrency}")
    for rep, m in res["memory_mb"].items():
        shm = res["object_store_mb"].get(rep)
        print(f"  {rep}: own memory {m['after_warmup']:.0f} MB after warm-up -> {m['end']:.0f} MB at the end "
              f"({m['growth']:+.1f} MB), peak {m['peak']:.0f} MB"
              + (f"; object store pages {shm['after_warmup']:.0f} -> {shm['end']:.0f} MB" if shm else ""))
    for rep, k in res["kv_usage"].items():
        print(f"  {rep}: KV pool in use under load {k['after_warmup']:.1%} after warm-up -> {k['end']:.1%} at the "
              f"end (medians), peak {k['peak']:.1%}; after the load {res['idle_kv_usage'].get(rep, 0):.1%}")
    print("soak passed" if not bad else "soak FAILED: " + "; ".join(bad))
    if a.json_path:
        with open(a.json_path, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
        log(f"wrote {a.json_path} and {plot(res, os.path.splitext(a.json_path)[0] + '.png')}")
    return 130 if not res["complete"] else 0 if not bad else 1
