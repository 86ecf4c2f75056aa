"""`specserve bench-structured`: what structured outputs cost per token, measured.

Two parts, on the local machine:

masks    the grammar engine alone (actors/engine/structured.py) with the model's tokenizer and an order-record JSON
         schema: compile time per request, then the mask computation per step for 1 and 16 concurrent matchers,
         synchronously (one matcher after another on the calling thread) and through MaskWorker (llguidance's
         thread pool, off the calling thread), with no draft and with 4-token drafts (1 + 4 rows per matcher).
         Each matcher walks a valid record's tokens, so every step's masks are real ones.
engine   the engine with the model, greedy, at 1 and 16 concurrent requests asking for the same kind of record:
         output tokens/s and mean step time without and with the schema constraint, and how many constrained
         outputs parse and validate. Runs only when the engine takes structured outputs (a grammar_compiler).
"""

from __future__ import annotations

import argparse
import inspect
import json
import random
import statistics
import sys
import time
from typing import Any

# A realistic response_format schema: nested object, enum, pattern, array of objects, numbers, booleans.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 40}, "email": {"type": "string", "maxLength": 60},
                           "vip": {"type": "boolean"}},
            "required": ["name", "email", "vip"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 12},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                               "price": {"type": "number", "minimum": 0}},
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 5,
        },
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "notes": {"type": "string", "maxLength": 80},
    },
    "required": ["order_id", "customer", "items", "status"],
    "additionalProperties": False,
}
PROMPT = ("Write one order record as a JSON object with order_id (like ORD-123456), customer (name, email, vip), "
          "items (sku, quantity, price), status (pending, paid, shipped or cancelled) and notes. Order {i}.")
_NAMES = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov", "Ken Thompson"]
_WORDS = ["fragile", "gift wrap", "leave at the door", "call first", "express", "second attempt"]


def _say(msg: str) -> None:
    print(f"[bench-structured] {msg}", file=sys.stderr, flush=True)


def sample_record(rng: random.Random) -> dict[str, Any]:
    """A record valid under SCHEMA, its values drawn from rng."""
    name = rng.choice(_NAMES)
    record: dict[str, Any] = {
        "order_id": f"ORD-{rng.randrange(10 ** 6):06d}",
        "customer": {"name": name, "email": f"{name.split()[0].lower()}@example.com", "vip": rng.random() < 0.3},
        "items": [{"sku": f"SKU-{rng.randrange(10 ** 5):05d}", "quantity": rng.randint(1, 99),
                   "price": round(rng.uniform(0.5, 500), 2)} for _ in range(rng.randint(1, 5))],
        "status": rng.choice(SCHEMA["properties"]["status"]["enum"]),
    }
    if rng.random() < 0.5:
        record["notes"] = rng.choice(_WORDS)
    return record


def summarize_steps(step_s: list[float], rows_per_step: int) -> dict[str, float]:
    """Per-step latency (p50, p90, mean) in ms and the mean time per mask row in µs."""
    ordered = sorted(step_s)
    mean = statistics.fmean(ordered)
    return {"steps": len(ordered), "step_ms_p50": 1e3 * ordered[len(ordered) // 2],
            "step_ms_p90": 1e3 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
            "step_ms_mean": 1e3 * mean, "us_per_row": 1e6 * mean / rows_per_step}


# ---------------------------------------------------------------------------------------------------------
# masks: the grammar engine alone
# ---------------------------------------------------------------------------------------------------------
def run_masks(model_path: str, concurrencies: list[int], drafts: list[int], min_steps: int,
              threads: int | None) -> dict[str, Any]:
    from specserve.actors.engine.sampling_params import StructuredOutput
    from specserve.actors.engine.structured import (
        GrammarCompiler,
        MaskWorker,
        allocate_masks,
    )
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    vocab = AutoConfig.from_pretrained(model_path).get_text_config().vocab_size
    t0 = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, vocab)
    setup_s = time.perf_counter() - t0
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    compile_s = []
    for _ in range(20):
        t0 = time.perf_counter()
        compiler.matcher(spec)
        compile_s.append(time.perf_counter() - t0)
    rng = random.Random(0)
    worker = MaskWorker(compiler, threads)
    rows: list[dict[str, Any]] = []
    try:
        for c in concurrencies:
            for k in drafts:
                for mode in ("sync", "worker"):
                    step_s: list[float] = []
                    while len(step_s) < min_steps:
                        walks = [tokenizer.encode(json.dumps(sample_record(rng))) + [tokenizer.eos_token_id]
                                 for _ in range(c)]
                        matchers = [compiler.matcher(spec) for _ in range(c)]
                        pos = 0
                        while all(pos + 1 + k <= len(walk) for walk in walks):
                            items = [(m, walk[pos:pos + k]) for m, walk in zip(matchers, walks)]
                            t0 = time.perf_counter()
                            if mode == "sync":
                                masks = allocate_masks(c * (1 + k), vocab)
                                for i, (m, draft) in enumerate(items):
                                    m.fill_masks(masks, i * (1 + k), draft)
                            else:
                                worker.start(items).result()
                            step_s.append(time.perf_counter() - t0)
                            for m, walk in zip(matchers, walks):  # the step's token and its whole draft accepted
                                m.accept(walk[pos:pos + 1 + k])
                            pos += 1 + k
                    row = {"concurrency": c, "draft": k, "mode": mode, **summarize_steps(step_s, c * (1 + k))}
                    rows.append(row)
                    _say(f"masks c={c} draft={k} {mode}: p50 {row['step_ms_p50']:.3f} ms/step, "
                         f"{row['us_per_row']:.1f} us/row")
    finally:
        worker.close()
    return {"tokenizer_setup_ms": 1e3 * setup_s, "compile_ms_p50": 1e3 * statistics.median(compile_s),
            "threads": threads, "rows": rows}


def format_masks(res: dict[str, Any]) -> str:
    lines = [(f"grammar engine: tokenizer setup {res['tokenizer_setup_ms']:.0f} ms (once per engine), "
              f"schema compile {res['compile_ms_p50']:.2f} ms p50 (once per request)"),
             (f"{'conc':>4} {'draft':>5} {'mode':>6} {'steps':>6} {'step p50 ms':>11} {'step p90 ms':>11} "
              f"{'step mean ms':>12} {'us/token':>8}")]
    for r in res["rows"]:
        lines.append(f"{r['concurrency']:>4} {r['draft']:>5} {r['mode']:>6} {r['steps']:>6} {r['step_ms_p50']:>11.3f} "
                     f"{r['step_ms_p90']:>11.3f} {r['step_ms_mean']:>12.3f} {r['us_per_row']:>8.1f}")
    lines.append("step: the masks of all matchers for one engine step (1 + draft rows each); us/token: mean step "
                 "time per mask row, i.e. per sampled position (a token, when the draft is accepted to the end)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# engine: the model, with and without the constraint
# ---------------------------------------------------------------------------------------------------------
def engine_takes_structured() -> bool:
    from specserve.actors.engine.engine import LLMEngine

    return "grammar_compiler" in inspect.signature(LLMEngine.__init__).parameters


def run_engine(model: str, dtype: str, concurrencies: list[int], max_tokens: int, min_requests: int,
               cache_dir: str | None) -> dict[str, Any]:
    import jsonschema
    from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
    from specserve.actors.engine.engine import LLMEngine
    from specserve.actors.engine.sampling_params import SamplingParams, StructuredOutput
    from specserve.actors.engine.structured import GrammarCompiler
    from specserve.actors.model_loader import load_model, resolve_model_path
    from specserve.actors.verifier import eos_ids
    from specserve.cluster.config import ModelConfig

    mc = ModelConfig(source=model, dtype=dtype, **({"cache_dir": cache_dir} if cache_dir else {}))
    mc.source = str(resolve_model_path(mc.source, mc.cache_dir, progress=True))
    loaded = load_model(mc, attn_implementation=ATTN_IMPLEMENTATION)
    tokenizer = loaded.tokenizer
    eos = eos_ids(tokenizer, loaded.config)
    compiler = GrammarCompiler(tokenizer, loaded.config.get_text_config().vocab_size, eos)
    engine = LLMEngine(loaded.model, kv_cache_memory_gb=1.0, max_num_seqs=max(concurrencies), eos_token_ids=eos,
                       grammar_compiler=compiler)
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))

    def prompt(i: int) -> list[int]:
        messages = [{"role": "user", "content": PROMPT.format(i=i)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)

    def run(c: int, structured: StructuredOutput | None, requests: int) -> dict[str, Any]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=structured)
        steps0, step_s0 = engine.stats.steps, engine.stats.step_time_s
        outputs: list[list[int]] = []
        t0 = time.perf_counter()
        for first in range(0, requests, c):  # c requests at a time, each wave to completion
            outputs += engine.generate([prompt(i) for i in range(first, first + c)], params)
        wall = time.perf_counter() - t0
        steps = engine.stats.steps - steps0
        tokens = sum(len(out) for out in outputs)
        valid = 0
        for out in outputs:
            try:
                jsonschema.validate(json.loads(tokenizer.decode(out, skip_special_tokens=True)), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
        return {"concurrency": c, "constrained": structured is not None, "requests": len(outputs),
                "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall, "steps": steps,
                "step_ms_mean": 1e3 * (engine.stats.step_time_s - step_s0) / max(steps, 1),
                "valid_json": valid}

    run(1, spec, 1)  # warm-up: kernels, allocator, the compile path
    rows = []
    for c in concurrencies:
        requests = max(c, min_requests)
        for structured in (None, spec):
            row = run(c, structured, requests)
            rows.append(row)
            _say(f"engine c={c} {'schema' if structured else 'plain'}: {row['tok_per_s']:.1f} tok/s, "
                 f"{row['step_ms_mean']:.1f} ms/step, {row['valid_json']}/{row['requests']} valid")
    if engine.mask_worker is not None:
        engine.mask_worker.close()
    return {"model": model, "dtype": dtype, "device": str(loaded.device), "max_tokens": max_tokens, "rows": rows}


def format_engine(res: dict[str, Any]) -> str:
    lines = [f"engine: {res['model']} {res['dtype']} on {res['device']}, greedy, max_tokens {res['max_tokens']}",
             (f"{'conc':>4} {'output':>11} {'requests':>8} {'tokens':>7} {'tok/s':>8} {'steps':>6} {'ms/step':>8} "
             f"{'valid JSON':>10}")]
    for r in res["rows"]:
        lines.append(f"{r['concurrency']:>4} {'schema' if r['constrained'] else 'plain':>11} {r['requests']:>8} "
                     f"{r['tokens']:>7} {r['tok_per_s']:>8.1f} {r['steps']:>6} {r['step_ms_mean']:>8.1f} "
                     f"{r['valid_json']:>10}")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-structured", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["masks", "engine", "all"], default="all")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--concurrency", default="1,16", help="concurrent matchers / requests")
    parser.add_argument("--drafts", default="0,4", help="masks: draft lengths (rows per matcher - 1)")
    parser.add_argument("--min-steps", type=int, default=200, help="masks: measured steps per configuration")
    parser.add_argument("--threads", type=int, default=None, help="masks: MaskWorker threads (default llguidance's)")
    parser.add_argument("--max-tokens", type=int, default=256, help="engine: output tokens per request")
    parser.add_argument("--min-requests", type=int, default=4, help="engine: requests per row, at least")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--text", dest="text_path", default=None, help="write the tables here")
    args = parser.parse_args(argv)
    from specserve.actors.model_loader import resolve_model_path
    from specserve.cluster.config import default_cache_dir

    out: dict[str, Any] = {"argv": argv if argv is not None else sys.argv[1:], "started": time.time()}
    tables = []
    if args.part in ("masks", "all"):
        path = str(resolve_model_path(args.model, args.cache_dir or default_cache_dir(), progress=True))
        out["masks"] = run_masks(path, _ints(args.concurrency), _ints(args.drafts), args.min_steps, args.threads)
        tables.append(format_masks(out["masks"]))
        print(tables[-1], flush=True)
    if args.part in ("engine", "all"):
        if engine_takes_structured():
            out["engine"] = run_engine(args.model, args.dtype, _ints(args.concurrency), args.max_tokens,
                                       args.min_requests, args.cache_dir)
            tables.append(format_engine(out["engine"]))
            print(tables[-1], flush=True)
        else:
            _say("engine: skipped, this engine takes no grammar_compiler (structured outputs not integrated)")
            if args.part == "engine":
                return 1
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        _say(f"wrote {args.json_path}")
    if args.text_path:
        with open(args.text_path, "w") as f:
            f.write("\n\n".join(tables) + "\n")
        _say(f"wrote {args.text_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
