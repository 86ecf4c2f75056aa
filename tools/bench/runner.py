"""A bench run: targets (running servers, or specserve servers the bench starts from config overrides), one
seeded plan of requests per (workload, load), every target given the same requests, one pass at a time."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from typing import Any

from specserve.tools.bench import server_stats
from specserve.tools.bench.grpc_client import GrpcBenchClient
from specserve.tools.bench.http_client import BenchError, RequestSettings, make_client, resolve_model, run_request
from specserve.tools.bench.load import Load, run_pass
from specserve.tools.bench.results import fmt as _fmt
from specserve.tools.bench.results import summarize
from specserve.tools.bench.workloads import Session, build_workload, ideal_prefix_hit_rate, warmup_messages

# --matrix NAME: one --serve server per row, in this order; the first is the baseline of the ratios.
MATRICES: dict[str, dict[str, dict[str, str]]] = {
    "spec": {
        "no-spec": {"speculative.method": "none"},
        "ngram-k2": {"speculative.method": "ngram", "speculative.adaptive": "false",
                     "speculative.num_speculative_tokens": "2"},
        "ngram-k4": {"speculative.method": "ngram", "speculative.adaptive": "false",
                     "speculative.num_speculative_tokens": "4"},
        "layer_skip-k3": {"speculative.method": "layer_skip", "speculative.adaptive": "false",
                          "speculative.num_speculative_tokens": "3"},
        "int8-k3": {"speculative.method": "int8", "speculative.adaptive": "false",
                    "speculative.num_speculative_tokens": "3"},
        "ngram-adaptive": {"speculative.method": "ngram", "speculative.adaptive": "true"},
        "int8-adaptive": {"speculative.method": "int8", "speculative.adaptive": "true"},
    },
    "store": {"store-off": {"kv_store.enabled": "false"}, "store-on": {"kv_store.enabled": "true"}},
    # Routing only matters between replicas: two verifiers each.
    "routing": {policy: {"router.policy": policy, "verifier.num_replicas": "2"}
                for policy in ("round_robin", "pow2", "prefix_cost")},
    # MoE models only: experts in the verifier's process, then in two expert actors.
    "moe": {"experts-local": {"experts.num_actors": "0"}, "experts-actors": {"experts.num_actors": "2"}},
}


@dataclass
class Target:
    label: str
    url: str  # base URL without a trailing /v1 (or grpc://HOST:PORT)
    model: str | None = None
    # --serve targets: config overrides (dotted keys) of a server the bench starts for this target's passes.
    serve: dict[str, str] | None = None
    # --peer targets: the name of a peer server (tools/bench/peers.py) the bench installs, starts and stops.
    peer: str | None = None
    peer_settings: str | None = None  # how the bench ran the peer (its settings, command line and environment)

    @property
    def started_by_bench(self) -> bool:
        return self.serve is not None or self.peer is not None


def typed(overrides: dict[str, str]) -> dict[str, Any]:
    """YAML scalars: "false" -> False, "4" -> 4, lists stay strings unless written as YAML."""
    import yaml

    return {k: yaml.safe_load(v) if v != "" else None for k, v in overrides.items()}


class ServedTarget:
    """A specserve server the bench starts for one target (on the Ray instance the bench started), then stops."""

    def __init__(self, target: Target, base: dict[str, str]):
        from specserve.cluster.config import SpecserveConfig

        overrides = {"server.app_name": "bench", **base, **(target.serve or {})}
        try:
            self.config = SpecserveConfig.load(overrides=typed(overrides))
        except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
            raise BenchError(f"target {target.label}: invalid server config: {exc}") from exc
        self.server = None

    def start(self) -> str:
        from specserve.deploy.launcher import LocalServer

        self.server = LocalServer(self.config).start(progress=True)
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class PeerTarget:
    """A peer server (vLLM CPU, transformers serve) the bench starts for one target on the model the --serve
    servers run (--serve-base's model), with this hardware's settings, then stops."""

    def __init__(self, target: Target, base: dict[str, str], dtype: str = "auto"):
        from specserve.tools.bench import peers

        try:
            self.peer = peers.peer_named(target.peer or "")
        except peers.PeerError as exc:
            raise BenchError(str(exc)) from None
        self.target = target
        self.base = base
        self.dtype = dtype
        self.process = None

    def setup(self) -> None:
        from specserve.tools.bench import peers

        try:
            peers.setup(self.peer)
        except peers.PeerError as exc:
            raise BenchError(str(exc)) from None

    def model_dir(self) -> str:
        from specserve.actors.model_loader import resolve_model_path
        from specserve.cluster.config import SpecserveConfig

        model = SpecserveConfig.load(overrides=typed(self.base)).model
        return str(resolve_model_path(model.source, model.cache_dir, progress=True))

    def start(self) -> str:
        from specserve.tools.bench import peers

        model_dir = self.model_dir()
        self.target.model = self.target.model or model_dir  # peers name the model by the directory they serve
        try:
            settings = peers.hardware_settings(self.dtype)
            line = peers.shell_line(*peers.invocation(self.peer, model_dir, settings))
            self.target.peer_settings = f"{self.peer.describe(settings)}; {line}"
            self.process = peers.start(self.peer, model_dir, settings)
            took = peers.wait_ready(self.process)
        except peers.PeerError as exc:
            self.stop()
            raise BenchError(str(exc)) from None
        log(f"{self.peer.name}: ready in {took:.1f} s (pid {self.process.pid}, log {self.process.log_path})")
        return self.process.url

    def stop(self) -> None:
        from specserve.tools.bench import peers

        if self.process is not None:
            peers.stop(self.process)
            self.process = None


@dataclass
class BenchConfig:
    targets: list[Target]
    model: str | None
    workloads: list[str]
    loads: list[Load]
    num_requests: int | None
    max_tokens: int
    temperature: float
    seed: int
    warmup: int
    timeout: float
    endpoint: str
    api_key: str | None
    json_path: str | None
    serve_base: dict[str, str] = field(default_factory=dict)
    tokenizer: str | None = None  # model to tokenize the workloads with (for the ideal prefix hit rate)
    slo: dict[str, float] = field(default_factory=dict)  # goodput bounds (ms): ttft_ms, tpot_ms, e2e_ms
    max_concurrency: int | None = None  # rate loads: most sessions in flight
    plots: bool = True  # PNGs next to the JSON
    stats_wait_s: float = 2.5  # wait before reading /metrics after a pass (replicas publish every 2 s)
    peer_dtype: str = "auto"  # --peer servers' dtype: auto is what model.dtype auto picks on this machine

    def requests_for(self, load: Load) -> int:
        if self.num_requests:
            return self.num_requests
        if load.kind == "concurrency":
            return max(8, 4 * int(load.value))
        return max(8, round(10 * load.value))  # about ten seconds of arrivals

    def settings(self) -> RequestSettings:
        return RequestSettings(self.endpoint, self.max_tokens, self.temperature, self.timeout)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _requests(sessions: list[Session]) -> int:
    return sum(s.turns for s in sessions)


def plan_sessions(cfg: BenchConfig) -> dict[tuple[str, Load], list[Session]]:
    """Each pass gets its own slice of one seeded stream per workload, so later passes don't replay prompts
    the server just cached; every target gets the same slices, so targets are compared on identical prompts."""
    plan: dict[tuple[str, Load], list[Session]] = {}
    for w in cfg.workloads:
        sessions = build_workload(w, sum(cfg.requests_for(ld) for ld in cfg.loads), cfg.seed)
        pos = 0
        for ld in cfg.loads:
            start, want = pos, cfg.requests_for(ld)
            while pos < len(sessions) and _requests(sessions[start:pos]) < want:
                pos += 1
            plan[(w, ld)] = sessions[start:pos]
    return plan


def ideal_hit_rates(cfg: BenchConfig, plan, served: ServedTarget | None) -> dict[tuple[str, Load], float]:
    """Per pass of single-turn sessions, the ideal prefix hit rate of its prompts, tokenized with their chat
    template by --tokenizer's model, else by the served model (with its block size)."""
    if cfg.endpoint != "chat" or not (cfg.tokenizer or served):
        return {}
    from transformers import AutoTokenizer

    from specserve.actors.model_loader import resolve_model_path
    from specserve.cluster.config import ModelConfig

    model = served.config.model if served and not cfg.tokenizer else ModelConfig(source=cfg.tokenizer)
    block_size = served.config.engine.block_size if served else 16
    try:
        tok = AutoTokenizer.from_pretrained(resolve_model_path(model.source, model.cache_dir))
    except Exception as exc:  # noqa: BLE001 - only a reference figure: report and go on without it
        log(f"no ideal prefix hit rates: cannot load the tokenizer of {model.source!r}: {exc}")
        return {}
    out = {}
    for key, sessions in plan.items():
        if any(s.follow_ups for s in sessions):
            continue  # later turns carry replies not known in advance
        texts = [tok.apply_chat_template(s.messages, add_generation_prompt=True, tokenize=False) for s in sessions]
        out[key] = ideal_prefix_hit_rate([tok(t, add_special_tokens=False).input_ids for t in texts], block_size)
    return out


async def router_summary(client) -> dict[str, Any] | None:
    """specserve's routing figures so far (GET /router/stats), or None for servers without them."""
    import httpx

    if isinstance(client, GrpcBenchClient):
        return None
    try:
        r = await client.get("/router/stats")
        stats = r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if not isinstance(stats, dict) or not stats.get("routers"):
        return None
    routers = stats["routers"]
    lat = [x["decision_latency"] for x in routers]
    p99 = max((x["p99_s"] for x in lat if x.get("p99_s") is not None), default=None)
    p50 = max((x["p50_s"] for x in lat if x.get("p50_s") is not None), default=None)
    return {"policy": stats.get("policy"), "decisions": sum(x["count"] for x in lat),
            "decision_us_p50": p50 * 1e6 if p50 is not None else None,
            "decision_us_p99": p99 * 1e6 if p99 is not None else None,
            "index_blocks": sum(x["index_blocks"] for x in routers),
            "store_trust": min((x.get("store_trust", 1.0) for x in routers), default=None),
            "hash_us_p50": (stats["hash_latency"]["p50_s"] or 0) * 1e6}


def _client(t: Target, cfg: BenchConfig):
    # Open-loop arrivals must never wait for a connection in the client (that would hide server queueing).
    open_loop = any(ld.kind == "rate" for ld in cfg.loads) and not cfg.max_concurrency
    most = max(int(ld.value) if ld.kind == "concurrency" else (cfg.max_concurrency or 1) for ld in cfg.loads)
    return make_client(t.url, cfg.api_key, cfg.timeout, None if open_loop else most + 2)


async def run_bench(cfg: BenchConfig, passes: list[dict[str, Any]]) -> None:
    """Run every pass, appending finished ones to `passes` (so an interrupted run keeps what it measured)."""
    clients = {t.label: _client(t, cfg) for t in cfg.targets if not t.started_by_bench}
    served = {t.label: ServedTarget(t, cfg.serve_base) for t in cfg.targets if t.serve is not None}
    peer_targets = {t.label: PeerTarget(t, cfg.serve_base, cfg.peer_dtype) for t in cfg.targets if t.peer is not None}
    started = {**served, **peer_targets}  # servers the bench starts, one at a time, and stops
    try:
        for t in cfg.targets:  # check every running target (and every --serve config) before measuring anything
            if not t.started_by_bench:
                t.model = await resolve_model(clients[t.label], t.label, t.url, t.model or cfg.model)
        for p in peer_targets.values():  # install peers (once) before anything is measured
            await asyncio.to_thread(p.setup)
        plan = plan_sessions(cfg)
        ideal = None  # once a served model is pulled (or from --tokenizer)
        total = len(cfg.targets) * len(plan)
        for t in cfg.targets:
            if t.label in started:
                log(f"{t.label}: starting " + (f"a server with {t.serve}" if t.serve is not None else "the peer"))
                try:
                    t.url = await asyncio.to_thread(started[t.label].start)
                    clients[t.label] = _client(t, cfg)
                    t.model = await resolve_model(clients[t.label], t.label, t.url, t.model or cfg.model)
                except BaseException:
                    await asyncio.to_thread(started[t.label].stop)
                    raise
            if ideal is None:
                ideal = await asyncio.to_thread(ideal_hit_rates, cfg, plan, served.get(t.label))
            try:
                await _run_target(t, clients[t.label], cfg, plan, passes, total, ideal)
            finally:
                if t.label in started:
                    await clients.pop(t.label).aclose()
                    await asyncio.to_thread(started[t.label].stop)
    finally:
        for c in clients.values():
            await c.aclose()


async def _after_pass_metrics(client, cfg: BenchConfig, *, known: bool) -> str | None:
    if known and cfg.stats_wait_s > 0:
        await asyncio.sleep(cfg.stats_wait_s)  # let every replica publish what the pass did
    return await server_stats.scrape(client)


async def _run_target(t: Target, client, cfg: BenchConfig, plan, passes: list[dict[str, Any]], total: int,
                      ideal: dict) -> None:
    settings = cfg.settings()
    k = len(passes)
    warm = [await run_request(client, t.model, m, settings) for m in warmup_messages(cfg.warmup, cfg.seed)]
    if warm:
        bad = [r for r in warm if not r.ok]
        note = f", {len(bad)} failed ({bad[0].error}: {bad[0].detail})" if bad else ""
        log(f"{t.label}: model {t.model}, warmed up with {len(warm)} requests{note}")
    has_metrics = await server_stats.scrape(client) is not None
    metrics = await _after_pass_metrics(client, cfg, known=has_metrics)  # the warm-up's counters settled
    for w in cfg.workloads:
        for ld in cfg.loads:
            sessions = plan[(w, ld)]
            log(f"[{k + 1}/{total}] {t.label} {w} {ld.label}: {_requests(sessions)} requests ...")
            results, wall, max_in_flight = await run_pass(client, t.model, sessions, ld, settings, cfg.seed,
                                                          cfg.max_concurrency)
            summary = summarize(results, wall, single_stream=ld == Load("concurrency", 1), slo=cfg.slo or None)
            summary["max_in_flight"] = max_in_flight
            summary["router"] = await router_summary(client)
            summary["ideal_prefix_hit_rate"] = ideal.get((w, ld))
            after = await _after_pass_metrics(client, cfg, known=has_metrics)
            summary["server"] = server_stats.pass_figures(metrics, after)
            metrics = after
            passes.append({
                "target": t.label, "url": t.url, "model": t.model, "workload": w,
                "load": {"kind": ld.kind, "value": ld.value, "label": ld.label},
                "summary": summary, "requests": [r.as_json() for r in results],
            })
            k += 1
            mal = summary["mean_accepted_length"]
            log(f"[{k}/{total}] {t.label} {w} {ld.label}: {summary['ok']}/{summary['requests']} ok, "
                f"{_fmt(summary['output_tok_s'], 1)} out tok/s, TTFT p50 {_fmt(summary['ttft_ms_p50'], 0)} ms"
                + (f", mean accepted length {mal:.2f}" if mal else "") + f" ({wall:.1f} s)")
