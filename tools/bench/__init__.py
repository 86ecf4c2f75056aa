"""`specserve bench` and `specserve soak`: the benchmark suite behind docs/performance.md.

workloads.py   seeded sessions: chat, shared-prefix (multi-tenant), multiturn, copy (input copying), long
load.py        arrivals: fixed concurrency or Poisson rates; multi-turn sessions feed replies back
http_client.py one streamed request (HTTP; grpc_client.py for specserve's gRPC API), measured as it arrives
results.py     per-request results, percentiles, goodput under an SLO
server_stats.py specserve's own figures per pass from /metrics (acceptance by position, hit rates, experts)
runner.py      targets, --serve / --matrix servers, the run;  report.py table, ratios, JSON;  plots.py PNGs
soak.py        a long steady run that watches replica memory and KV pool usage for growth
perf_page.py   the generated section of docs/performance.md, from `make perf`'s results
"""

from specserve.tools.bench.cli import main

__all__ = ["main"]
