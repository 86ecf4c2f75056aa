"""`specserve bench-experts`: what putting MoE experts in Ray actors costs, and how well placement balances them.

- dispatch: one MoE layer (random weights, HF eager's expert ops), per call: experts computed in this process
  (the local expert compute) vs in two expert actors through plain Ray calls, and through a Ray Compiled Graph;
  the difference is the dispatch overhead per layer (rows out, outputs back, grouping and combining).
- decode: greedy decode tokens/s of a small random Mixtral at batch 1 and 16, experts local vs in two actors.
- balance: a seeded skewed routing trace (Zipf-like expert popularity) run through expert actors with the static
  placement, then with EPLB's replicate-then-pack placement; max/mean rows per actor from the actors' own counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def _log(msg: str) -> None:
    print(f"[bench-experts] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _tiny_mixtral(path: Path, hidden: int, intermediate: int, experts: int, layers: int, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts,
                        num_experts_per_tok=2, max_position_embeddings=1024, sliding_window=None,
                        tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path)
    return path


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_experts_implementation("eager")
    return model.eval()


def _owners(model, num_actors: int) -> dict[tuple[int, int], list[int]]:
    from specserve.actors.experts.eplb import static_owners
    from specserve.actors.experts.hook import experts_modules

    return static_owners({layer: m.num_experts for layer, m in experts_modules(model).items()}, num_actors)


def _actors_for(path, model, owners, num_actors):
    from specserve.actors.experts.ray_transport import RayTransport, start_expert_actors

    actors, pg = start_expert_actors(str(path), owners, num_actors, model.config.hidden_act, num_cpus=0.1)
    return RayTransport(actors, owners), pg


def bench_dispatch(path, tokens_list: list[int], iters: int) -> list[dict]:
    import torch
    from ray.util.placement_group import remove_placement_group
    from transformers.activations import ACT2FN

    from specserve.actors.experts.checkpoint import load_experts
    from specserve.actors.experts.dispatch import combine, gather_rows, plan_dispatch
    from specserve.actors.experts.expert_shard import ExpertShard
    from specserve.actors.experts.hook import experts_modules
    from specserve.actors.experts.ray_transport import CompiledGraphTransport
    from specserve.actors.experts.transport import LocalTransport

    model = _load(path)
    owners = _owners(model, 2)
    layer = 0
    block = model.model.layers[layer].mlp
    experts = experts_modules(model)[layer]
    act = ACT2FN[model.config.hidden_act]
    shards = [ExpertShard(load_experts(path, {s for s, o in owners.items() if o[0] == a}), act) for a in range(2)]
    local = LocalTransport(shards, {s: o[0] for s, o in owners.items()})
    remote, pg = _actors_for(path, model, owners, 2)
    compiled_actors, compiled_pg = _actors_for(path, model, owners, 2)  # a compiled graph keeps its actors
    compiled = CompiledGraphTransport(compiled_actors.actors, owners)
    transports = {"local": local, "plain": remote, "compiled": compiled}
    rows_out = []
    try:
        for n in tokens_list:
            x = torch.randn(n, model.config.hidden_size, generator=torch.Generator().manual_seed(n))
            with torch.no_grad():
                _, weights, index = block.gate(x)
            times: dict[str, list[float]] = {name: [] for name in transports}
            for i in range(iters + 5):
                for name, transport in transports.items():
                    t0 = time.perf_counter()
                    plan = plan_dispatch(index, experts.num_experts)
                    rows, counts = gather_rows(x, plan)
                    outs = transport.run(layer, plan, rows, counts)
                    combine(x, plan, outs, weights)
                    if i >= 5:
                        times[name].append(time.perf_counter() - t0)
            row = {"tokens": n, "local_us_p50": _pct(times["local"], 0.5) * 1e6}
            for name in ("plain", "compiled"):
                d = [a - b for a, b in zip(times[name], times["local"])]
                row[f"{name}_us_p50"] = _pct(times[name], 0.5) * 1e6
                row[f"{name}_overhead_us_p50"] = _pct(d, 0.5) * 1e6
                row[f"{name}_overhead_us_p90"] = _pct(d, 0.9) * 1e6
            rows_out.append(row)
    finally:
        compiled.teardown()
        remove_placement_group(pg)
        remove_placement_group(compiled_pg)
    return rows_out


def bench_decode(path, batches: list[int], new_tokens: int) -> list[dict]:
    import torch
    from ray.util.placement_group import remove_placement_group

    from specserve.actors.experts.hook import install_dispatch

    ref = _load(path)
    model = _load(path)
    owners = _owners(model, 2)
    transport, pg = _actors_for(path, model, owners, 2)
    install_dispatch(model, transport)
    out = []
    try:
        for b in batches:
            prompt = torch.randint(3, 500, (b, 16), generator=torch.Generator().manual_seed(b))
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            row = {"batch": b}
            with torch.no_grad():
                for name, m in (("local", ref), ("actors", model)):
                    m.generate(prompt[:, :4], max_new_tokens=2, do_sample=False)  # warm-up
                    t0 = time.perf_counter()
                    got = m.generate(prompt, **kw)
                    row[f"{name}_tok_s"] = b * new_tokens / (time.perf_counter() - t0)
                    row[f"{name}_ids"] = got
            row["identical"] = bool(torch.equal(row.pop("local_ids"), row.pop("actors_ids")))
            out.append(row)
    finally:
        remove_placement_group(pg)
    return out


def bench_balance(path, num_actors: int, slots_per_actor: int, trace_tokens: int, steps: int) -> dict:
    import torch
    from ray.util.placement_group import remove_placement_group

    from specserve.actors.experts.dispatch import gather_rows, plan_dispatch
    from specserve.actors.experts.eplb import balance_ratio, rebalance
    from specserve.actors.experts.hook import experts_modules

    model = _load(path)
    layers = experts_modules(model)
    num_experts = next(iter(layers.values())).num_experts
    g = torch.Generator().manual_seed(7)
    popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float) ** 1.2  # Zipf-like skew
    trace = []
    for _ in range(steps):
        idx = torch.stack([torch.multinomial(popularity, 2, generator=g) for _ in range(trace_tokens)])
        trace.append(idx)
    x = torch.randn(trace_tokens, model.config.hidden_size, generator=g)

    def run(owners) -> float:
        transport, pg = _actors_for(path, model, owners, num_actors)
        try:
            for idx in trace:
                for layer in layers:
                    plan = plan_dispatch(idx, num_experts)
                    rows, counts = gather_rows(x, plan)
                    transport.run(layer, plan, rows, counts)
            per_actor = [sum(c.values()) for c in transport.token_counts()]
        finally:
            remove_placement_group(pg)
        return balance_ratio(per_actor)

    static = _owners(model, num_actors)
    loads = torch.bincount(torch.cat(trace).reshape(-1), minlength=num_experts).tolist()
    placed = rebalance([float(v) for v in loads], num_actors, slots_per_actor)
    balanced = {(layer, e): placed.replicas[e] for layer in layers for e in range(num_experts)}
    return {"actors": num_actors, "slots_per_actor": slots_per_actor, "experts": num_experts,
            "before": run(static), "after": run(balanced),
            "replicas_per_expert": [len(r) for r in placed.replicas]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-experts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="dispatch,decode,balance")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = _tiny_mixtral(Path(tmp) / "moe", args.hidden, args.intermediate, args.experts, args.layers)
            if "dispatch" in parts:
                _log("dispatch: one MoE layer, local vs two actors")
                results["dispatch"] = bench_dispatch(path, [1, 16, 64], args.iters)
                print("per MoE layer, us: experts local; in 2 actors by plain Ray calls / by a compiled graph; "
                      "overhead = minus local (p50, p90)")
                print(f"{'tokens':>6} {'local':>7} {'plain':>7} {'overhead':>15} {'compiled':>8} {'overhead':>15}")
                for r in results["dispatch"]:
                    print(f"{r['tokens']:>6} {r['local_us_p50']:7.0f} {r['plain_us_p50']:7.0f} "
                          f"{r['plain_overhead_us_p50']:7.0f} {r['plain_overhead_us_p90']:7.0f} "
                          f"{r['compiled_us_p50']:8.0f} {r['compiled_overhead_us_p50']:7.0f} "
                          f"{r['compiled_overhead_us_p90']:7.0f}", flush=True)
            if "decode" in parts:
                _log("decode: greedy tokens/s, experts local vs in two actors")
                results["decode"] = bench_decode(path, [1, 16], args.new_tokens)
                print(f"{'batch':>5} {'local tok/s':>11} {'actors tok/s':>12} identical")
                for r in results["decode"]:
                    print(f"{r['batch']:>5} {r['local_tok_s']:11.1f} {r['actors_tok_s']:12.1f} {r['identical']}",
                          flush=True)
            if "balance" in parts:
                _log("balance: skewed routing trace, static vs rebalanced placement")
                b = bench_balance(path, num_actors=4, slots_per_actor=args.experts // 4 + 1, trace_tokens=64,
                                  steps=20)
                results["balance"] = b
                print(f"balance (max/mean rows per actor, {b['actors']} actors, {b['experts']} experts, "
                      f"{b['slots_per_actor']} slots each): before {b['before']:.2f}, after {b['after']:.2f}")
    finally:
        if started:
            ray.shutdown()
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1))
    return 0
