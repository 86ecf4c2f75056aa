"""`specserve bench-kv`: the KV block store's figures, measured.

Two parts, run on the local machine with a real Redis and real Ray:

micro       one process, two engines over the same model (two KV pools): engine A prefills a long prompt and
            exports its blocks; engine B imports them from the store. Reports the prefill time of the prefix
            against the time to look up, fetch, check and install its blocks; index lookup latency for the whole
            prompt (one round trip); store write and read throughput. Payloads through holder actors and
            through Redis.
multiturn   two single-replica apps behind one HTTP proxy, requests sent round-robin between them (turn i of a
            conversation goes to the other replica than turn i-1); TTFT with the store on versus off. Greedy,
            so both runs see the same conversation, and the bench checks that they did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("specserve.bench_kv")


def _say(msg: str) -> None:
    print(f"[bench-kv] {msg}", file=sys.stderr, flush=True)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.1f}"


# ---------------------------------------------------------------------------------------------------------
# micro: import versus recompute, lookup latency, throughput
# ---------------------------------------------------------------------------------------------------------
@contextmanager
def _redis_and_ray() -> Iterator[str]:
    """An embedded Redis (its URL) and Ray (started here unless running already), both stopped afterwards."""
    import ray

    from specserve.cluster.redis_server import EmbeddedRedis

    redis_server = EmbeddedRedis().start()
    ray_started = not ray.is_initialized()
    if ray_started:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        yield redis_server.url
    finally:
        if ray_started:
            ray.shutdown()
        redis_server.stop()


def run_micro(model_source: str, dtype: str, prefix_tokens: int, repeats: int, payloads: list[str],
              cache_dir: str | None) -> dict[str, Any]:
    import ray
    import torch

    from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
    from specserve.actors.engine.engine import LLMEngine
    from specserve.actors.engine.model_runner import kv_geometry
    from specserve.actors.engine.sampling_params import SamplingParams
    from specserve.actors.model_loader import load_model, resolve_dtype, resolve_model_path
    from specserve.cluster.config import ModelConfig
    from specserve.cluster.kv.holder import HolderPayloads, holder_actor, holder_name, kill_holders
    from specserve.cluster.config import KVStoreConfig
    from specserve.cluster.kv.index import KVIndex
    from specserve.cluster.kv.namespace import KVNamespace, weights_revision
    from specserve.cluster.kv.payload import BlockLayout
    from specserve.cluster.kv.store import KVStoreClient, RedisPayloads
    from specserve.actors.engine.block_hash import block_hashes

    mc = ModelConfig(source=model_source, dtype=dtype, **({"cache_dir": cache_dir} if cache_dir else {}))
    mc.source = str(resolve_model_path(mc.source, mc.cache_dir, progress=True))
    loaded = load_model(mc, attn_implementation=ATTN_IMPLEMENTATION)
    block = 16
    layers, heads, dim = kv_geometry(loaded.config)
    ns = KVNamespace(model_source, weights_revision(loaded.path), dtype, block, layers, heads, dim)
    layout = BlockLayout(dtype, (2, layers, block, heads, dim))
    vocab = loaded.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    # prefix_tokens + 1: the last prompt token is always computed (its logits give the first output token).
    prompts = [torch.randint(100, vocab - 100, (prefix_tokens + 1,), generator=g).tolist() for _ in range(repeats + 1)]
    first_token = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    results: dict[str, Any] = {"model": model_source, "dtype": dtype, "prefix_tokens": prefix_tokens,
                               "block_size": block, "block_bytes": layout.nbytes, "payloads": {}}
    with _redis_and_ray() as redis_url:
        for payload in payloads:
            import redis

            r = redis.Redis.from_url(redis_url, socket_timeout=5)
            r.flushall()
            if payload == "holder":
                node = ray.get_runtime_context().get_node_id()
                cfg = {"url": redis_url, "timeout_s": 5.0}

                def make_transport():
                    return HolderPayloads(lambda: (holder_name("bench-kv", node),
                                                   holder_actor("bench-kv", node, cfg, 4 << 30)))
            else:
                def make_transport():
                    return RedisPayloads()
            config = KVStoreConfig(timeout_s=30)
            index = KVIndex.from_config(r, ns.id, config)
            writer = KVStoreClient.from_config(index, make_transport(), layout, config)
            reader = KVStoreClient.from_config(KVIndex.from_config(r, ns.id, config), make_transport(), layout, config)
            _say(f"micro/{payload}: {repeats} x prefix of {prefix_tokens} tokens ({prefix_tokens // block} blocks, "
                 f"{prefix_tokens // block * layout.nbytes / 1e6:.1f} MB)")
            rows = []
            for i, p in enumerate(prompts):
                a = LLMEngine(loaded.model, block_size=block, kv_cache_memory_gb=0.5, namespace=ns.id,
                              kv_sink=writer.export)
                b = LLMEngine(loaded.model, block_size=block, kv_cache_memory_gb=0.5, namespace=ns.id)
                t0 = time.perf_counter()
                cold = a.generate([p], first_token)[0]
                t_prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                writer.flush(120)
                t_export_wait = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, missing = b.block_manager.missing_prefix(p)
                fetched = reader.fetch(missing)
                b.import_blocks(fetched.hashes, fetched.blocks)
                t_import = time.perf_counter() - t0
                before = b.stats.prompt_tokens
                t0 = time.perf_counter()
                warm = b.generate([p], first_token)[0]
                t_rest = time.perf_counter() - t0
                row = {"prefill_s": t_prefill, "import_s": t_import, "rest_s": t_rest,
                       "imported_blocks": len(fetched.hashes), "computed_after_import": b.stats.prompt_tokens - before,
                       "same_token": warm == cold, "export_wait_s": t_export_wait}
                if i == 0:
                    _say(f"  warm-up: prefill {t_prefill:.2f}s, import {t_import * 1e3:.1f}ms")
                    continue  # first round warms kernels, the holder and the connection pools
                rows.append(row)
                _say(f"  run {i}: prefill {t_prefill:.2f}s, import {t_import * 1e3:.1f}ms "
                     f"({len(fetched.hashes)} blocks), then {row['computed_after_import']} token(s) computed in "
                     f"{t_rest * 1e3:.0f}ms, same first token: {warm == cold}")
            # Index lookup of the whole prompt: one script call.
            hashes = block_hashes(prompts[-1], block, namespace=ns.id)[: prefix_tokens // block]
            lat = []
            for _ in range(200):
                t0 = time.perf_counter()
                entries, _ = index.lookup(hashes, layout)
                lat.append(time.perf_counter() - t0)
            assert len(entries) == len(hashes), "lookup benchmark expects a fully stored prefix"
            # Raw store throughput: write (claim, put, commit) and read (lookup, fetch, checksum) of fresh blocks.
            n = prefix_tokens // block
            kv = torch.randn(n, *layout.shape).to(resolve_dtype(dtype))
            tput_w, tput_r = [], []
            for rep in range(3):
                hs = block_hashes(list(range(rep * 10**6, rep * 10**6 + n * block)), block, namespace=f"tput-{payload}")
                t0 = time.perf_counter()
                writer.export(hs, kv)
                writer.flush(120)
                tput_w.append(n * layout.nbytes / (time.perf_counter() - t0) / 1e6)
                t0 = time.perf_counter()
                got = reader.fetch(hs)
                tput_r.append(n * layout.nbytes / (time.perf_counter() - t0) / 1e6)
                assert len(got.hashes) == n
            med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
            lat.sort()
            results["payloads"][payload] = {
                "runs": rows,
                "prefill_s": med("prefill_s"), "import_s": med("import_s"), "rest_s": med("rest_s"),
                "import_speedup": med("prefill_s") / med("import_s"),
                "ttft_speedup": med("prefill_s") / (med("import_s") + med("rest_s")),
                "all_same_token": all(r["same_token"] for r in rows),
                "all_blocks_imported": all(r["imported_blocks"] == prefix_tokens // block for r in rows),
                "lookup_blocks": len(hashes),
                "lookup_p50_s": lat[len(lat) // 2], "lookup_p99_s": lat[int(len(lat) * 0.99)],
                "write_mb_s": statistics.median(tput_w), "read_mb_s": statistics.median(tput_r),
                "writer_stats": writer.stats(), "reader_stats": reader.stats(),
            }
            writer.close()
            reader.close()
            if payload == "holder":
                kill_holders("bench-kv")
    return results


def format_micro(res: dict[str, Any]) -> str:
    lines = [f"KV store micro benchmark: {res['model']} ({res['dtype']}), prefix {res['prefix_tokens']} tokens = "
             f"{res['prefix_tokens'] // res['block_size']} blocks of {res['block_bytes'] / 1e3:.0f} KB",
             f"{'payload':8} {'prefill ms':>10} {'import ms':>10} {'speedup':>8} {'TTFT x':>7} {'lookup p50':>10} "
             f"{'p99 ms':>7} {'write MB/s':>10} {'read MB/s':>9} {'same':>5}"]
    for name, p in res["payloads"].items():
        lines.append(f"{name:8} {p['prefill_s'] * 1e3:10.0f} {p['import_s'] * 1e3:10.1f} {p['import_speedup']:7.1f}x "
                     f"{p['ttft_speedup']:6.1f}x {_ms(p['lookup_p50_s']):>10} {_ms(p['lookup_p99_s']):>7} "
                     f"{p['write_mb_s']:10.0f} {p['read_mb_s']:9.0f} {str(p['all_same_token']):>5}")
    lines.append("import = lookup + fetch + checksum + install of every block; TTFT x = prefill / (import + the "
                 "remaining token's forward); lookup = one script call for the whole prompt")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# multiturn: TTFT across two replicas, round-robin, store on versus off
# ---------------------------------------------------------------------------------------------------------
async def _conversations(urls: list[str], model: str, convs, max_tokens: int) -> list[dict[str, Any]]:
    """Turn-major: every conversation's turn 0, then every turn 1, ... Requests go round-robin over `urls` in
    that order, so with an odd number of conversations each turn lands on another replica than the turn before."""
    import httpx

    from specserve.tools.bench.http_client import RequestSettings, run_request

    settings = RequestSettings("chat", max_tokens, 0.0, 300.0)
    clients = [httpx.AsyncClient(base_url=u, timeout=300) for u in urls]
    histories = [list(c.messages[:-1]) for c in convs]
    user_turns = [[c.messages[-1]["content"], *c.follow_ups] for c in convs]
    out = []
    k = 0
    try:
        for t_i in range(max(c.turns for c in convs)):
            for c_i, turns in enumerate(user_turns):
                if t_i >= len(turns):
                    continue
                messages = histories[c_i]
                messages.append({"role": "user", "content": turns[t_i]})
                replica = k % len(clients)
                k += 1
                res = await run_request(clients[replica], model, messages, settings)
                if not res.ok:
                    raise RuntimeError(f"conversation {c_i} turn {t_i}: {res.error} {res.detail}")
                messages.append({"role": "assistant", "content": res.text})
                out.append({"conversation": c_i, "turn": t_i, "replica": replica, "ttft_s": res.ttft_s,
                            "prompt_tokens": res.prompt_tokens, "cached_tokens": res.cached_tokens,
                            "imported_tokens": res.imported_tokens, "output_tokens": res.output_tokens,
                            "text": res.text})
                _say(f"  conv {c_i} turn {t_i} -> replica {'AB'[replica]}: TTFT {res.ttft_s * 1e3:.0f} ms, "
                     f"prompt {res.prompt_tokens}, cached {res.cached_tokens} (store {res.imported_tokens})")
    finally:
        for c in clients:
            await c.aclose()
    return out


def _replica_stats(app: str) -> dict[str, Any]:
    from ray import serve

    st = serve.get_deployment_handle("Verifier", app).stats.remote().result(timeout_s=60)
    keep = ("prefix_cache_queries", "prefix_cache_hits", "prompt_tokens_computed", "kv_blocks_total", "kv_store")
    return {k: st.get(k) for k in keep}


def run_multiturn(model_source: str, dtype: str, conversations: int, turns: int, max_tokens: int,
                  overrides: dict[str, Any]) -> dict[str, Any]:
    from specserve.tools.bench.workloads import Session, multiturn_workload
    from specserve.cluster.config import SpecserveConfig
    from specserve.deploy.launcher import LocalServer
    from specserve.cluster.redis_server import free_port

    if conversations % 2 == 0:
        _say(f"note: with {conversations} (even) conversations, round-robin keeps each conversation on one replica")
    convs = multiturn_workload(conversations * turns, turns=turns)
    port = free_port()
    res: dict[str, Any] = {"model": model_source, "dtype": dtype, "conversations": conversations, "turns": turns,
                           "max_tokens": max_tokens, "overrides": overrides, "modes": {}}
    with _redis_and_ray() as redis_url:
        for mode, enabled in (("store_on", True), ("store_off", False)):
            servers = []
            try:
                for name in "ab":
                    app = f"kvbench-{mode.replace('_', '-')}-{name}"
                    cfg = SpecserveConfig.load(overrides={
                        "model.source": model_source, "model.served_name": "kvbench", "model.dtype": dtype,
                        "server.app_name": app, "server.route_prefix": f"/{app}", "server.http_port": port,
                        "server.redis_url": redis_url, "kv_store.enabled": enabled, **overrides})
                    _say(f"{mode}: starting replica {name.upper()} ({app})")
                    servers.append(LocalServer(cfg).start(progress=True))
                urls = [s.url for s in servers]
                # Warm-up: one short request per replica (kernels, connections), unrelated to the workload.
                warm = Session([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
                               ["Bye!"])
                asyncio.run(_conversations(urls, "kvbench", [warm], 8))
                _say(f"{mode}: {conversations} conversations x {turns} turns, round-robin over 2 replicas")
                res["modes"][mode] = asyncio.run(_conversations(urls, "kvbench", convs, max_tokens))
                res.setdefault("replica_stats", {})[mode] = [_replica_stats(s.config.server.app_name) for s in servers]
            finally:
                for s in servers:
                    s.stop()
    summary = {}
    for mode, rows in res["modes"].items():
        ttfts = sorted(r["ttft_s"] for r in rows)
        later = sorted(r["ttft_s"] for r in rows if r["turn"] > 0)
        summary[mode] = {"ttft_p50_s": statistics.median(ttfts), "ttft_p90_s": ttfts[int(0.9 * (len(ttfts) - 1))],
                         "ttft_p50_later_turns_s": statistics.median(later) if later else None,
                         "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
                         "cached_tokens": sum(r["cached_tokens"] or 0 for r in rows),
                         "imported_tokens": sum(r["imported_tokens"] or 0 for r in rows)}
    on, off = summary.get("store_on"), summary.get("store_off")
    if on and off:
        summary["ttft_p50_ratio_off_over_on"] = off["ttft_p50_s"] / on["ttft_p50_s"]
        summary["same_outputs"] = [r["text"] for r in res["modes"]["store_on"]] == \
            [r["text"] for r in res["modes"]["store_off"]]
        summary["prompt_tokens_computed"] = {
            mode: sum(st["prompt_tokens_computed"] for st in res["replica_stats"][mode]) for mode in res["modes"]}
    res["summary"] = summary
    return res


def format_multiturn(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"Multi-turn TTFT, 2 replicas, round-robin: {res['model']} ({res['dtype']}), {res['conversations']} "
             f"conversations x {res['turns']} turns, max_tokens {res['max_tokens']}",
             f"{'store':6} {'TTFT p50 ms':>11} {'p90 ms':>8} {'p50 turns>1':>11} {'prompt tok':>10} {'cached':>7} "
             f"{'from store':>10}"]
    for mode in ("store_on", "store_off"):
        m = s.get(mode)
        if m:
            lines.append(f"{mode[6:]:6} {_ms(m['ttft_p50_s']):>11} {_ms(m['ttft_p90_s']):>8} "
                         f"{_ms(m['ttft_p50_later_turns_s']):>11} {m['prompt_tokens']:10d} {m['cached_tokens']:7d} "
                         f"{m['imported_tokens']:10d}")
    if "ttft_p50_ratio_off_over_on" in s:
        lines.append(f"TTFT p50: store off / store on = {s['ttft_p50_ratio_off_over_on']:.2f}x; prompt tokens "
                     f"computed (incl. warm-up) on {s['prompt_tokens_computed']['store_on']} vs off "
                     f"{s['prompt_tokens_computed']['store_off']}; same replies in both runs: {s['same_outputs']} "
                     f"(greedy; in bfloat16, KV computed in other batch shapes rounds differently, so replies "
                     f"may drift)")
    for i, st in enumerate(res.get("replica_stats", {}).get("store_on", [])):
        kv = st.get("kv_store") or {}
        misses = {k: v for k, v in (kv.get("miss_blocks") or {}).items() if v}
        lines.append(f"replica {'AB'[i]} store: hit {kv.get('hit_blocks')} blocks, misses {misses}, exported "
                     f"{kv.get('exported_blocks')}, import p50 {_ms((kv.get('import_latency') or {}).get('p50_s'))} ms")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
def serve_overrides(text: str) -> dict[str, Any]:
    """--serve "KEY=VAL,...": dotted config keys with YAML-typed values, as `specserve bench --serve` reads them."""
    from specserve.tools.bench.cli import parse_overrides
    from specserve.tools.bench.runner import typed

    return typed(parse_overrides(text, "--serve"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-kv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["micro", "multiturn", "all"], default="all")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--prefix-tokens", type=int, default=1024, help="micro: prefix length (multiple of 16)")
    parser.add_argument("--repeats", type=int, default=3, help="micro: measured runs (after one warm-up)")
    parser.add_argument("--payloads", default="holder,redis", help="micro: holder,redis")
    parser.add_argument("--conversations", type=int, default=15, help="multiturn: interleaved conversations (odd)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32, help="multiturn: reply length")
    parser.add_argument("--serve", default="", help="multiturn: extra config overrides KEY=VAL,... for both runs")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    args = parser.parse_args(argv)
    if args.prefix_tokens % 16 or args.prefix_tokens < 16:
        parser.error("--prefix-tokens must be a positive multiple of 16")
    overrides = serve_overrides(args.serve)
    out: dict[str, Any] = {"argv": argv if argv is not None else sys.argv[1:], "started": time.time()}
    if args.part in ("micro", "all"):
        out["micro"] = run_micro(args.model, args.dtype, args.prefix_tokens, args.repeats,
                                 [p.strip() for p in args.payloads.split(",") if p.strip()], args.cache_dir)
        print(format_micro(out["micro"]), flush=True)
    if args.part in ("multiturn", "all"):
        if args.cache_dir:
            overrides.setdefault("model.cache_dir", args.cache_dir)
        out["multiturn"] = run_multiturn(args.model, args.dtype, args.conversations, args.turns, args.max_tokens,
                                         overrides)
        print(format_multiturn(out["multiturn"]), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(out, f, indent=1, default=str)
        _say(f"wrote {args.json_path}")
    return 0
