"""`specserve bench-hops`: what each hop of the token path costs, in CPU time per output token.

A token goes engine thread -> Verifier.generate (a Ray Serve streaming item) -> the Ingress replica (detokenize,
render) -> the client: over HTTP through Serve's ProxyActor (one item per ASGI body message), over gRPC straight
from the ingress's own grpc.aio server. This starts a server (like `specserve bench --serve`), drives a fixed
streaming load (closed loop: `--concurrency` clients, `--requests` chat requests of `--max-tokens` each) over each
protocol in turn, and reads the CPU time (user + system, from /proc via psutil) of every process of the path
over each measured window: CPU-ms per output token per hop, and output tok/s. The verifier is split further by
thread: the engine thread (named `specserve-engin`, with the torch worker threads it starts, which take its name)
against the rest (Ray's main and event-loop threads, which carry the streaming items).

The figures are for one machine and load: compare rows of one run (the CPUs are shared by every hop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil

# Ray names a replica's process `ray::ServeReplica:<app>:<deployment>`, and the HTTP proxy `ray::ProxyActor`.
_DEPLOYMENT_HOPS = {"Verifier": "verifier", "Ingress": "ingress", "Drafter": "drafter"}
HOPS = ("verifier", "ingress", "proxy", "drafter", "client")
# The engine thread's OS name (AsyncEngine sets it; Linux keeps 15 characters). Threads it starts take it too.
ENGINE_THREAD = "specserve-engin"

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator works to a ten year old.",
    "List some ideas for a rainy weekend at home, with a sentence on each.",
    "Describe the water cycle, step by step.",
    "Write a poem about autumn leaves in a city park.",
    "What makes a good cup of coffee? Give practical advice.",
    "Summarize the plot of a heist film you invent on the spot.",
    "Give directions for planting tomatoes in a small garden.",
]


def hop_of(cmdline: str, app: str) -> str | None:
    """The hop a process plays for application `app`, from its Ray process title; None: not one of ours."""
    title = cmdline.split(" ", 1)[0] if cmdline else ""
    if title.startswith("ray::ProxyActor"):
        return "proxy"
    prefix = f"ray::ServeReplica:{app}:"
    if title.startswith(prefix):
        return _DEPLOYMENT_HOPS.get(title[len(prefix):])
    return None


def find_processes(app: str) -> dict[str, list[psutil.Process]]:
    """This machine's processes of each hop of `app` (the client is this process)."""
    found: dict[str, list[psutil.Process]] = {"client": [psutil.Process()]}
    for p in psutil.process_iter(["cmdline"]):
        hop = hop_of(" ".join(p.info["cmdline"] or ()), app)
        if hop is not None:
            found.setdefault(hop, []).append(p)
    return found


@dataclass
class CpuSample:
    """Cumulative CPU seconds (user + system) at one moment: per hop, and per thread of the verifiers."""
    hops: dict[str, float]
    threads: dict[tuple[int, int], tuple[str, float]]  # (pid, tid) -> (thread name, CPU seconds)


def _thread_name(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def sample_cpu(procs: dict[str, list[psutil.Process]]) -> CpuSample:
    hops: dict[str, float] = {}
    threads: dict[tuple[int, int], tuple[str, float]] = {}
    for hop, ps in procs.items():
        total = 0.0
        for p in ps:
            try:
                t = p.cpu_times()
                total += t.user + t.system
                if hop == "verifier":
                    for th in p.threads():
                        threads[(p.pid, th.id)] = (_thread_name(p.pid, th.id), th.user_time + th.system_time)
            except psutil.NoSuchProcess:
                pass  # a replica that died: its time is lost (the run reports its errors)
        hops[hop] = total
    return CpuSample(hops, threads)


def verifier_split(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Verifier CPU seconds between two samples: the engine thread (and the threads it named) against the rest.
    A thread born in between counts from zero; one that ended is lost to both."""
    split = {"engine_thread": 0.0, "other_threads": 0.0}
    for key, (name, cpu) in after.threads.items():
        spent = cpu - before.threads.get(key, (name, 0.0))[1]
        split["engine_thread" if name == ENGINE_THREAD else "other_threads"] += spent
    return split


def per_token_ms(before: CpuSample, after: CpuSample, tokens: int) -> dict[str, float]:
    """CPU-ms per output token of each hop (and of the verifier's thread groups) between two samples."""
    if tokens <= 0:
        return {}
    spent = {hop: after.hops[hop] - before.hops.get(hop, 0.0) for hop in after.hops}
    if before.threads or after.threads:
        spent.update({f"verifier.{k}": v for k, v in verifier_split(before, after).items()})
    return {k: 1000.0 * v / tokens for k, v in spent.items()}


@dataclass
class HopsRow:
    protocol: str
    requests: int
    errors: int
    output_tokens: int
    wall_s: float
    tok_per_s: float
    chunks_per_request: float  # content chunks the client read per request
    cpu_ms_per_token: dict[str, float] = field(default_factory=dict)
    cpu_util: dict[str, float] = field(default_factory=dict)  # CPU seconds per wall second, per hop
    engine_step_ms_per_token: float | None = None  # the engine's own step wall time, per token generated


def format_table(rows: list[HopsRow]) -> str:
    keys = [k for k in (*HOPS, "verifier.engine_thread", "verifier.other_threads")
            if any(k in r.cpu_ms_per_token for r in rows)]
    head = f"{'protocol':<8} {'tok/s':>7} {'chunks/req':>10} {'step ms/tok':>11} " + \
        " ".join(f"{k.removeprefix('verifier.'):>14}" for k in keys)
    lines = ["CPU-ms per output token, per hop (and CPU utilisation, cores)", head]
    for r in rows:
        step = f"{r.engine_step_ms_per_token:.2f}" if r.engine_step_ms_per_token is not None else "-"
        cells = " ".join(f"{r.cpu_ms_per_token.get(k, 0.0):>7.2f} ({r.cpu_util.get(k, 0.0):>4.2f})" for k in keys)
        lines.append(f"{r.protocol:<8} {r.tok_per_s:>7.1f} {r.chunks_per_request:>10.1f} {step:>11} {cells}")
    return "\n".join(lines)


async def _engine_counters(app: str) -> tuple[float, int] | None:
    """(step seconds, generated tokens) summed over the verifier replicas a stats call reaches (one here)."""
    from ray import serve

    try:
        stats = await serve.get_deployment_handle("Verifier", app).stats.remote()
    except Exception:  # noqa: BLE001 - the step split is optional
        return None
    return stats["step_time_s"], stats["generated_tokens"]


async def _drive(client, model: str, settings, requests: int, concurrency: int) -> list:
    from specserve.tools.bench.http_client import run_request

    todo = iter(range(requests))
    results = []

    async def worker() -> None:
        for i in todo:
            messages = [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (#{i})"}]
            results.append(await run_request(client, model, messages, settings))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def measure(protocol: str, url: str, args, app: str) -> HopsRow:
    from specserve.tools.bench.http_client import RequestSettings, make_client, resolve_model

    settings = RequestSettings(endpoint="chat", max_tokens=args.max_tokens, temperature=0.0, timeout=args.timeout)
    client = make_client(url, None, args.timeout, args.concurrency + 2)
    try:
        model = await resolve_model(client, protocol, url, None)
        await _drive(client, model, settings, args.concurrency, args.concurrency)  # warm: connections, caches
        procs = find_processes(app)
        step0 = await _engine_counters(app)
        before, t0 = sample_cpu(procs), time.perf_counter()
        results = await _drive(client, model, settings, args.requests, args.concurrency)
        wall = time.perf_counter() - t0
        after = sample_cpu(procs)
        step1 = await _engine_counters(app)
    finally:
        await client.aclose()
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    cost = per_token_ms(before, after, tokens)
    util = {k: v * tokens / 1000.0 / wall for k, v in cost.items()}
    step = None
    if step0 and step1 and step1[1] > step0[1]:
        step = 1000.0 * (step1[0] - step0[0]) / (step1[1] - step0[1])
    return HopsRow(protocol=protocol, requests=len(results), errors=len(results) - len(ok), output_tokens=tokens,
                   wall_s=wall, tok_per_s=tokens / wall if wall > 0 else 0.0,
                   chunks_per_request=sum(r.content_chunks for r in ok) / max(1, len(ok)),
                   cpu_ms_per_token=cost, cpu_util=util, engine_step_ms_per_token=step)


def _overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


async def run(args) -> list[HopsRow]:
    from specserve.cluster.config import SpecserveConfig
    from specserve.deploy.launcher import LocalServer
    from specserve.tools.bench.runner import typed

    app = "hops"
    overrides = {"server.app_name": app, "model.source": args.model, "model.dtype": args.dtype,
                 "speculative.method": args.speculation, **args.overrides}
    config = SpecserveConfig.load(overrides=typed(overrides))
    server = await asyncio.to_thread(LocalServer(config).start, progress=True)
    rows = []
    try:
        targets = {"http": server.url, "grpc": f"grpc://{server.grpc_target}"}
        for rnd in range(args.rounds):
            order = args.protocols if rnd % 2 == 0 else args.protocols[::-1]  # A-B-B-A over rounds
            for protocol in order:
                row = await measure(protocol, targets[protocol], args, app)
                print(f"round {rnd + 1}: {protocol}: {row.tok_per_s:.1f} tok/s, {row.errors} errors", flush=True)
                rows.append(row)
    finally:
        await asyncio.to_thread(server.stop)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-hops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--speculation", default="ngram", help="speculative.method of the server")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more server config overrides (dotted keys), repeatable")
    parser.add_argument("--protocols", default="http,grpc", help="comma-separated: http, grpc")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="measured requests per protocol and round")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the protocols (alternating order)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    parser.add_argument("--json", dest="json_path", default=None, help="write the rows here")
    parser.add_argument("--text", dest="text_path", default=None, help="write the table here")
    args = parser.parse_args(argv)
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    bad = [p for p in args.protocols if p not in ("http", "grpc")]
    if bad or not args.protocols:
        parser.error(f"--protocols: expected http and/or grpc, got {args.protocols}")
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1 or args.rounds < 1:
        parser.error("--concurrency, --requests, --max-tokens and --rounds must be at least 1")
    try:
        args.overrides = _overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    rows = asyncio.run(run(args))
    table = format_table(rows)
    load = os.getloadavg()
    header = (f"bench-hops: {args.model} {args.dtype}, speculation {args.speculation}, c={args.concurrency}, "
              f"{args.requests} chat requests x {args.max_tokens} tokens per row, {os.cpu_count()} CPUs, "
              f"load before exit {load[0]:.2f}")
    print(header + "\n" + table)
    if args.text_path:
        with open(args.text_path, "w") as f:
            f.write(header + "\n" + table + "\n")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"settings": {k: v for k, v in vars(args).items()
                                    if k not in ("json_path", "text_path", "overrides")},
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0 if all(r.errors == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
