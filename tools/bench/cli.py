"""`specserve bench`: the command line, and a run from parsing to the table, the JSON and the plots."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from specserve.tools.bench.http_client import BenchError
from specserve.tools.bench.load import Load
from specserve.tools.bench.peers import DEFAULT_PORT as DEFAULT_PEER_PORT
from specserve.tools.bench.peers import PEER_DTYPES, PEERS
from specserve.tools.bench.report import format_table, table_of, write_json
from specserve.tools.bench.results import parse_slo
from specserve.tools.bench.runner import MATRICES, BenchConfig, Target, log, run_bench
from specserve.tools.bench.workloads import WORKLOADS

if TYPE_CHECKING:
    from specserve.cluster.config import ServerConfig

DEFAULT_URL = "http://127.0.0.1:8000"


def parse_overrides(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in (x.strip() for x in text.split(",") if x.strip()):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"bad {what} item {item!r}: expected KEY=VALUE with a dotted config key")
        out[key.strip()] = value.strip()
    return out


def _parse_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise BenchError(f"empty {what} list")
    return items


def normalize_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme == "grpc" and parsed.netloc:
        return url.rstrip("/")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise BenchError(f"bad URL {url!r}: expected http://HOST:PORT or grpc://HOST:PORT")
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url  # accept both base and .../v1 forms


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specserve bench",
        description="Drive OpenAI-compatible servers (and specserve's gRPC API) with seeded workloads at fixed "
                    "concurrencies or Poisson request rates; report latency, throughput, goodput and specserve's "
                    "own figures as a table, JSON and PNG plots.",
        epilog="examples: specserve bench --target specserve=http://127.0.0.1:8000 --target peer=http://127.0.0.1:8001 "
               "--workload chat,shared-prefix --concurrency 1,4,16 --json out.json | specserve bench --matrix spec "
               "--workload copy --rate 0.5,1,2 --slo ttft_ms=1000,tpot_ms=150 --json spec.json",
    )
    # Targets keep their command-line order across --url, --target, --serve, --peer and --matrix: the first one is
    # the baseline of every ratio.
    p.add_argument("--url", dest="items", action="append", type=lambda v: ("url", v), default=[],
                   help="server base URL (repeatable); default " + DEFAULT_URL)
    p.add_argument("--target", dest="items", action="append", type=lambda v: ("target", v),
                   metavar="LABEL=URL[#MODEL]",
                   help="labelled server to compare (repeatable; #MODEL names its model; grpc://HOST:PORT drives "
                        "specserve's gRPC API); targets run in the order given, the first is the baseline")
    p.add_argument("--model", default=None, help="model name to request (default: first id of GET /v1/models)")
    p.add_argument("--workload", action="append", default=None, metavar="NAME[,NAME]",
                   help=f"workload(s): {', '.join(WORKLOADS)} (repeatable or comma list; default chat)")
    p.add_argument("--concurrency", default=None,
                   help="comma list of client counts, one pass each (default 1,4,16 unless --rate is given)")
    p.add_argument("--rate", default=None, metavar="R[,R...]",
                   help="comma list of request rates (req/s): one pass each with Poisson arrivals (a rate sweep)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="with --rate: at most this many sessions in flight (default unbounded)")
    p.add_argument("--num-requests", type=int, default=None,
                   help="requests per pass (default max(8, 4 x concurrency), or about 10 s of arrivals at a rate)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per target first (default 2)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat",
                   help="chat: /v1/chat/completions (default); completions: /v1/completions")
    p.add_argument("--slo", default="", metavar="KEY=MS[,KEY=MS]",
                   help="goodput bounds in ms: ttft_ms, tpot_ms, e2e_ms (e.g. ttft_ms=1000,tpot_ms=150)")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                   help="write all results here, and the plots next to it (PATH without .json, -NAME.png)")
    p.add_argument("--no-plots", action="store_true", help="with --json: write no PNG plots")
    p.add_argument("--plot", default=None, metavar="JSON", help="only (re)draw the plots of an earlier --json file")
    p.add_argument("--table", default=None, metavar="JSON", help="only print the table of an earlier --json file")
    p.add_argument("--markdown", action="store_true", help="with --table: as a Markdown table")
    p.add_argument("--api-key", default=None, help="sent as a Bearer token")
    p.add_argument("--serve", dest="items", action="append", type=lambda v: ("serve", v),
                   metavar="LABEL=KEY=VALUE[,KEY=VALUE...]",
                   help="start a specserve server with these config overrides (dotted keys, e.g. "
                        "speculative.method=ngram; LABEL= for the defaults) for this target's passes, then stop it "
                        "(repeatable)")
    p.add_argument("--peer", dest="items", action="append", type=lambda v: ("peer", v), metavar="NAME",
                   help="install (once, under .cache/peers/), start and stop a peer server on the --serve model "
                        f"with this machine's settings: {', '.join(PEERS)} (repeatable)")
    p.add_argument("--peers", dest="items", action="append", type=lambda v: ("peers", v), metavar="NAME[,NAME]",
                   help="several --peer at once, as a comma list (an empty list adds none)")
    p.add_argument("--peer-dtype", choices=PEER_DTYPES, default="auto",
                   help="the peers' dtype (default auto: what specserve's model.dtype auto picks on this machine)")
    p.add_argument("--serve-base", default="", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="overrides applied to every --serve server (e.g. model.dtype=bfloat16)")
    p.add_argument("--matrix", dest="items", action="append", type=lambda v: ("matrix", v), metavar="NAME",
                   help="--serve one server per configuration of a preset: " + "; ".join(
                       f"{k}: {', '.join(v)}" for k, v in MATRICES.items()))
    p.add_argument("--spec-matrix", dest="items", action="append_const", const=("matrix", "spec"),
                   help="the same as --matrix spec")
    p.add_argument("--stats-wait", type=float, default=2.5, metavar="S",
                   help="seconds to wait after a pass before reading specserve's /metrics (replicas publish "
                        "every server.metrics_period_s; default 2.5)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="model (registry name or path) whose chat template and tokenizer give each pass's ideal "
                        "prefix hit rate (default: the --serve model)")
    return p


def _loads(a: argparse.Namespace) -> list[Load]:
    loads: list[Load] = []
    if a.concurrency is not None or a.rate is None:
        for c in _parse_list(a.concurrency or "1,4,16", "--concurrency"):
            if not c.isdigit() or int(c) < 1:
                raise BenchError(f"bad --concurrency value {c!r}: expected positive integers like 1,4,16")
            if Load("concurrency", int(c)) not in loads:
                loads.append(Load("concurrency", int(c)))
    for r in _parse_list(a.rate, "--rate") if a.rate is not None else []:
        try:
            rate = float(r)
        except ValueError:
            rate = -1.0
        if not 0 < rate < float("inf"):
            raise BenchError(f"bad --rate value {r!r}: expected positive request rates like 0.5,1,2")
        if Load("rate", rate) not in loads:
            loads.append(Load("rate", rate))
    return loads


def parse_config(argv: list[str]) -> BenchConfig:
    """Parse and validate; raises BenchError on bad values (argparse itself exits on unknown flags)."""
    return config_of(build_parser().parse_args(argv))


def config_of(a: argparse.Namespace) -> BenchConfig:
    base = parse_overrides(a.serve_base, "--serve-base")
    port = int(base.get("server.http_port", 8000))
    targets: list[Target] = []

    def served(label: str, overrides: dict[str, str]) -> Target:
        return Target(label, f"http://127.0.0.1:{overrides.get('server.http_port', port)}", serve=overrides)

    for kind, spec in a.items:
        if kind == "url":
            norm = normalize_url(spec)
            targets.append(Target(urlparse(norm).netloc, norm))
        elif kind == "target":
            label, sep, url = spec.partition("=")
            url, _, model = url.partition("#")  # LABEL=URL#MODEL: a model name for this target only
            if not sep or not label.strip() or not url.strip():
                raise BenchError(f"bad --target {spec!r}: expected LABEL=URL or LABEL=URL#MODEL")
            targets.append(Target(label.strip(), normalize_url(url.strip()), model=model.strip() or None))
        elif kind in ("peer", "peers"):
            for name in [spec.strip()] if kind == "peer" else [x.strip() for x in spec.split(",") if x.strip()]:
                if name not in PEERS:
                    raise BenchError(f"unknown peer {name!r} (choose from {', '.join(PEERS)})")
                targets.append(Target(name, f"http://127.0.0.1:{DEFAULT_PEER_PORT}", peer=name))
        elif kind == "serve":
            label, sep, rest = spec.partition("=")
            if not sep or not label.strip():
                raise BenchError(f"bad --serve {spec!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...]")
            targets.append(served(label.strip(), parse_overrides(rest, "--serve")))
        else:
            if spec not in MATRICES:
                raise BenchError(f"unknown --matrix {spec!r} (choose from {', '.join(MATRICES)})")
            targets += [served(label, overrides) for label, overrides in MATRICES[spec].items()]
    if not targets:
        targets.append(Target(urlparse(DEFAULT_URL).netloc, DEFAULT_URL))
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        raise BenchError(f"duplicate target labels {labels}; use --target LABEL=URL to name them")
    workloads: list[str] = []
    for spec in a.workload or ["chat"]:
        for w in _parse_list(spec, "--workload"):
            if w not in WORKLOADS:
                raise BenchError(f"unknown workload {w!r} (choose from {', '.join(WORKLOADS)})")
            if w not in workloads:
                workloads.append(w)
    for name, value, low in (("--num-requests", a.num_requests, 1), ("--max-tokens", a.max_tokens, 1),
                             ("--warmup", a.warmup, 0), ("--max-concurrency", a.max_concurrency, 1)):
        if value is not None and value < low:
            raise BenchError(f"{name} must be >= {low}")
    if a.timeout <= 0:
        raise BenchError("--timeout must be > 0")
    if a.temperature < 0:
        raise BenchError("--temperature must be >= 0")
    if a.stats_wait < 0:
        raise BenchError("--stats-wait must be >= 0")
    try:
        slo = parse_slo(a.slo)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    return BenchConfig(targets=targets, model=a.model, workloads=workloads, loads=_loads(a),
                       num_requests=a.num_requests, max_tokens=a.max_tokens, temperature=a.temperature,
                       seed=a.seed, warmup=a.warmup, timeout=a.timeout, endpoint=a.endpoint, api_key=a.api_key,
                       json_path=a.json_path, serve_base=base, tokenizer=a.tokenizer, slo=slo,
                       max_concurrency=a.max_concurrency, plots=not a.no_plots, stats_wait_s=a.stats_wait,
                       peer_dtype=a.peer_dtype)


def start_ray_if_needed(server: ServerConfig | None) -> bool:
    """One Ray instance for all servers the bench starts (they start and stop apps on it, not Ray), with the
    server settings of --serve-base (direct ingress on its HTTP port); None: no server to start."""
    if server is None:
        return False
    import ray

    from specserve.deploy.launcher import start_local_ray

    if ray.is_initialized():
        return False
    start_local_ray(server, log_to_driver=False)
    return True


def base_server(serve_base: dict[str, str], targets: list[Target] = ()) -> ServerConfig:
    """The server settings --serve-base gives every server the bench starts. server.direct_ingress is a setting
    of the Ray instance they share, so no single --serve may set it, nor, with it on, move the HTTP port."""
    from specserve.cluster.config import SpecserveConfig
    from specserve.tools.bench.runner import typed

    try:
        server = SpecserveConfig.load(overrides=typed(serve_base)).server
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the field
        raise BenchError(f"--serve-base: invalid server config: {exc}") from exc
    shared = ("server.direct_ingress",) + (("server.http_port", "server.host", "server.ray_address")
                                           if server.direct_ingress else ())
    for t in targets:
        for key in shared:
            if t.serve is not None and key in t.serve:
                raise BenchError(f"--serve {t.label}: {key} is a setting of the Ray instance every --serve server "
                                 "shares (with direct ingress): set it in --serve-base")
    return server


def stop_ray() -> None:
    from specserve.deploy.launcher import stop_local_ray

    stop_local_ray()


def _from_results(json_path: str, *, plots: bool, markdown: bool = False) -> int:
    """Redraw the plots, or print the table, of an earlier run's results file."""
    from specserve.tools.bench.plots import write_plots

    try:
        with open(json_path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {json_path}: {exc}", file=sys.stderr)
        return 2
    if not plots:
        print(table_of(doc, markdown=markdown))
        return 0
    for path in write_plots(doc, json_path):
        log(f"wrote {path}")
    return 0


def _interrupt(signum, frame) -> None:
    signal.raise_signal(signal.SIGINT)


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """Within: SIGTERM (`timeout`, `kill`) ends a run as Ctrl-C does, so asyncio.run cancels it, its cleanup (the
    servers it started) runs first, and the caller reports what finished."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(argv)
        if a.plot or a.table:
            return _from_results(a.plot or a.table, plots=bool(a.plot), markdown=a.markdown)
        cfg = config_of(a)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passes: list[dict[str, Any]] = []
    started = time.time()
    code = 0
    try:
        ray_started = start_ray_if_needed(base_server(cfg.serve_base, cfg.targets)
                                          if any(t.serve is not None for t in cfg.targets) else None)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with sigterm_as_ctrl_c():
        try:
            asyncio.run(run_bench(cfg, passes))
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            log("interrupted; reporting the passes that finished")
            code = 130
        finally:
            if ray_started:
                stop_ray()
    if passes:
        print(format_table(passes, cfg))
    if cfg.json_path:
        write_json(cfg.json_path, cfg, argv, passes, started, complete=code == 0)
        log(f"wrote {cfg.json_path}")
        if cfg.plots and passes:
            code = _from_results(cfg.json_path, plots=True) or code
    return code
