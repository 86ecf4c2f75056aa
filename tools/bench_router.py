"""`specserve bench-router`: the prefix-aware router's decision cost, away from Serve.

Fills a PrefixIndex with N indexed blocks (prefix groups of --prompt-blocks blocks, spread over the replicas),
then times PrefixCostPolicy.choose plus the optimistic index insert for prompts that extend those groups, as the
Serve adapter does per request.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def run(total_blocks: int, replicas: int, prompt_blocks: int, decisions: int, block_size: int | None = None) -> dict:
    """`block_size`: None = the configured default (engine.block_size)."""
    from specserve.actors.engine.block_hash import block_hashes
    from specserve.cluster.config import EngineConfig, RouterConfig
    from specserve.routing.prefix_index import PrefixIndex
    from specserve.routing.router_policy import PrefixCostPolicy, ReplicaState

    block_size = block_size or EngineConfig().block_size
    index = PrefixIndex(max_blocks=total_blocks)
    groups = []
    for g in range(max(1, total_blocks // prompt_blocks)):
        hs = block_hashes(list(range(g * 100_000, g * 100_000 + prompt_blocks * block_size)), block_size,
                          namespace="bench-router")
        index.add(f"replica-{g % replicas}", hs)
        groups.append(hs)
    policy = PrefixCostPolicy(index, block_size, RouterConfig())
    states = [ReplicaState(f"replica-{i}", prefill_tokens_per_s=1000, num_running=i % 3) for i in range(replicas)]
    lat = []
    for i in range(decisions):
        hs = groups[(i * 7919) % len(groups)]
        t0 = time.perf_counter()
        d = policy.choose(states, hs, prompt_blocks * block_size + 5)
        index.add(d.replica_id, hs)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return {"indexed_blocks": len(index), "replicas": replicas, "prompt_blocks": prompt_blocks,
            "decisions": decisions, "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6,
            "max_us": lat[-1] * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-router", description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="10000,1000000", help="indexed blocks, comma-separated sizes")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--prompt-blocks", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    rows = []
    print(f"{'indexed blocks':>14} {'replicas':>8} {'prompt blocks':>13} {'p50 us':>8} {'p99 us':>8} {'max us':>8}")
    for n in (int(x) for x in args.blocks.split(",") if x.strip()):
        print(f"[bench-router] indexing {n} blocks...", file=sys.stderr, flush=True)
        r = run(n, args.replicas, args.prompt_blocks, args.decisions)
        rows.append(r)
        print(f"{r['indexed_blocks']:>14} {r['replicas']:>8} {r['prompt_blocks']:>13} {r['p50_us']:8.1f} "
              f"{r['p99_us']:8.1f} {r['max_us']:8.1f}", flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
