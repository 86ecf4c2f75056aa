"""The `specserve` command: serve, generate, models pull, bench."""

from __future__ import annotations

import argparse
import sys


def _models(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="specserve models")
    sub = parser.add_subparsers(dest="action", required=True)
    pull = sub.add_parser("pull", help="fetch models into the model cache (idempotent)")
    pull.add_argument("name", nargs="+", help="registry name (e.g. smollm2-135m), hub id or local directory")
    pull.add_argument("--cache-dir", default=None, help="model cache directory (default: $SPECSERVE_CACHE or ~/.cache/specserve)")
    args = parser.parse_args(argv)
    from specserve.actors import model_loader
    from specserve.cluster.config import default_cache_dir

    for name in args.name:  # a registry name is pulled, a hub id downloaded, a directory checked
        try:
            path = model_loader.resolve_model_path(name, args.cache_dir or default_cache_dir(), progress=True)
        except model_loader.ModelLoadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "serve": lambda a: __import__("specserve.deploy.launcher", fromlist=["main"]).main(a),
        "generate": lambda a: __import__("specserve.tools.generate", fromlist=["main"]).main(a),
        "models": _models,
        "bench": lambda a: __import__("specserve.tools.bench", fromlist=["main"]).main(a),
        "bench-kv": lambda a: __import__("specserve.tools.bench_kv", fromlist=["main"]).main(a),
        "bench-router": lambda a: __import__("specserve.tools.bench_router", fromlist=["main"]).main(a),
        "bench-experts": lambda a: __import__("specserve.tools.bench_experts", fromlist=["main"]).main(a),
        "bench-structured": lambda a: __import__("specserve.tools.bench_structured", fromlist=["main"]).main(a),
        "bench-hops": lambda a: __import__("specserve.tools.bench_hops", fromlist=["main"]).main(a),
        "bench-forward": lambda a: __import__("specserve.tools.bench_forward", fromlist=["main"]).main(a),
        "bench-engine": lambda a: __import__("specserve.tools.bench_engine", fromlist=["main"]).main(a),
        "deploy": lambda a: __import__("specserve.deploy.serve_config", fromlist=["main"]).main(a),
        "chaos": lambda a: __import__("specserve.tools.chaos", fromlist=["main"]).main(a),
        "soak": lambda a: __import__("specserve.tools.bench.soak", fromlist=["main"]).main(a),
    }
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: specserve {serve,generate,models,bench,bench-kv,bench-router,bench-experts,bench-structured,"
              "bench-hops,bench-forward,bench-engine,deploy,chaos,soak} "
              "[options]\n\n"
              "  serve      start Ray, the embedded Redis and the app; serve until Ctrl-C\n"
              "  generate   stream a completion from a running server\n"
              "  models     models pull NAME...: fetch models into the cache\n"
              "  bench      drive OpenAI-compatible servers with workloads and loads; table, JSON and plots\n"
              "  bench-kv   measure the KV block store: import vs prefill, lookup, throughput, multi-turn TTFT\n"
              "  bench-router  time the prefix-aware router's decisions at a given index size\n"
              "  bench-experts  MoE experts in actors: dispatch overhead, decode tokens/s, load balance\n"
              "  bench-structured  structured outputs: grammar mask time per token, engine tok/s with a schema\n"
              "  bench-hops  the token path: CPU-ms per output token of each process it crosses (HTTP, gRPC)\n"
              "  bench-forward  the engine's forward against the model's bare forward: decode, batches, prefill\n"
              "  bench-engine  the engine alone on a workload, closed loop: engine configurations side by side\n"
              "  deploy     deploy render: the Serve config YAML (serve deploy, KubeRay RayService serveConfigV2)\n"
              "  chaos      kill parts of a served app under steady load; check answers and time the recovery\n"
              "  soak       a long steady run; fails if replica memory or the KV pool grows after warm-up",
              file=sys.stderr if argv else sys.stdout)
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    return int(commands[argv[0]](argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
