#!/usr/bin/env bash
# The runs behind docs/performance.md (`make perf`). Each writes its JSON, table and plots here; the last step
# rewrites the generated section of docs/performance.md from them.
# A peer server on 127.0.0.1:8001 (e.g. `transformers serve --continuous-batching --dtype bfloat16 --device cpu
# --port 8001 <model dir>`) joins the first and third runs when it answers.
set -euo pipefail
cd "$(dirname "$0")"
SPECSERVE=${SPECSERVE:-../../.venv/bin/specserve}
PYTHON=${PYTHON:-../../.venv/bin/python}
MODEL_DIR=${MODEL_DIR:-$HOME/.cache/specserve/models/smollm2-135m}
BASE="model.dtype=bfloat16"
PEER=()
if curl -sf -m 5 http://127.0.0.1:8001/health >/dev/null; then
  PEER=(--target "transformers-serve=http://127.0.0.1:8001#$MODEL_DIR")
fi

# 1. Speculation off and on (n-gram, adaptive k) on short chat and input copying: client counts and a Poisson
#    rate sweep, goodput under an interactive SLO.
"$SPECSERVE" bench --serve-base "$BASE" --serve no-spec=speculative.method=none --serve ngram=speculative.method=ngram \
  "${PEER[@]}" --workload chat,copy --concurrency 1,4 --rate 0.5,1,2 --max-tokens 64 \
  --slo ttft_ms=1000,tpot_ms=100 --json speculation.json | tee speculation.txt

# 2. Prefix reuse across two verifier replicas: routing policies (KV store on), and round-robin without the
#    store, on multi-tenant shared system prompts and multi-turn conversations.
"$SPECSERVE" bench --serve-base "$BASE" --matrix routing \
  --serve "round_robin-no-store=router.policy=round_robin,verifier.num_replicas=2,kv_store.enabled=false" \
  --workload shared-prefix,multiturn --concurrency 4 --rate 1 --num-requests 16 --max-tokens 32 \
  --slo ttft_ms=2000 --json prefix.json | tee prefix.txt

# 3. Long prompts (~2,000 tokens, no shared prefix): chunked prefill.
"$SPECSERVE" bench --serve-base "$BASE" --serve specserve=speculative.method=ngram "${PEER[@]}" \
  --workload long --concurrency 1,2 --num-requests 6 --max-tokens 32 --json long.json | tee long.txt

# 4. Soak: ten minutes at 4 clients over chat, shared prefixes and conversations.
"$SPECSERVE" soak --set "$BASE" --duration 600 --concurrency 4 --json soak.json | tee soak.txt

# 5. The generated section of docs/performance.md: each run's command, full table and plots.
"$PYTHON" -m specserve.tools.bench.perf_page ../performance.md . speculation prefix long soak
