"""`specserve bench-experts`: what putting MoE experts in Ray actors costs, and how well placement balances them.

- dispatch: one MoE layer (random weights, HF eager's expert ops), per call: experts computed in this process
  (the local expert compute) vs in two expert actors over their TCP channels (what serving uses), through plain
  Ray calls, and through a Ray Compiled Graph; the difference is the dispatch overhead per layer (rows out,
  outputs back, grouping and combining).
- decode: greedy decode tokens/s of a small random Mixtral at batch 1 and 16, experts local vs in two actors.
- balance: a seeded skewed routing trace (Zipf-like expert popularity) run through four expert actors with the
  static placement, then the live balancer's round (EPLB replicate-then-pack from the actors' own counts, applied
  in two phases), then the same trace again; max/mean rows per actor from the actors' counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from specserve.cluster.config import ExpertsConfig

EXPERTS = ExpertsConfig()  # message timeouts as configured by default


def _log(msg: str) -> None:
    print(f"[bench-experts] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def _tiny_mixtral(path: Path, hidden: int, intermediate: int, experts: int, layers: int, seed: int = 0,
                  vocab_size: int = 512) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    cfg = MixtralConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers,
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


def _actors_for(path, model, owners, num_actors, link="channel"):
    from specserve.actors.experts.ray_transport import ActorTransport, actor_spec, start_actors

    spec = actor_spec(str(path), model.config.hidden_act, num_cpus=0.1)
    actors, pg = start_actors(spec, owners, num_actors)
    transport = ActorTransport(actors, owners, link=link, timeout_s=EXPERTS.timeout_s,
                               restart_wait_s=EXPERTS.restart_wait_s, channel_key=spec.channel_key)
    transport.placement_group = pg  # transport.shutdown() removes it
    return transport


class CompiledGraphTransport:
    """One Ray Compiled Graph over the actors: each layer's messages go out and come back through channels set
    up once, instead of a task submission per call. Every actor gets a message every layer (None if it has no
    rows). No failover: a dead actor breaks the graph; bench-experts measures it against the other links."""

    def __init__(self, actors: list, replicas: dict):
        from ray.dag import InputNode, MultiOutputNode

        self.actors = actors
        self.replicas = replicas
        with InputNode() as inp:
            dag = MultiOutputNode([a.run_message.bind(inp[i]) for i, a in enumerate(actors)])
        self.graph = dag.experimental_compile()
        self.calls = 0

    def run(self, layer: int, plan: list, rows, counts: list[int]) -> list:
        import ray

        from specserve.actors.experts.dispatch import owner_message, scatter_outputs, split_by_owner

        outputs: list = [None] * len(plan)
        groups = split_by_owner(plan, counts, lambda e: self.replicas[(layer, e)][0])
        messages: list[tuple | None] = [None] * len(self.actors)
        for actor, (positions, offsets) in groups.items():
            experts, n, part = owner_message(plan, rows, counts, positions, offsets)
            messages[actor] = (layer, experts, n, part.cpu())
        replies = ray.get(self.graph.execute(*messages))
        self.calls += 1
        for actor, (positions, _) in groups.items():
            scatter_outputs(outputs, positions, counts, replies[actor].to(rows.device))
        return outputs

    def teardown(self) -> None:
        self.graph.teardown()


def bench_dispatch(path, tokens_list: list[int], iters: int) -> list[dict]:
    import torch
    from transformers.activations import ACT2FN

    from specserve.actors.experts.checkpoint import load_experts
    from specserve.actors.experts.dispatch import combine, gather_rows, plan_dispatch
    from specserve.actors.experts.expert_shard import ExpertShard
    from specserve.actors.experts.hook import experts_modules
    from specserve.actors.experts.ray_transport import ActorTransport
    from specserve.actors.experts.transport import LocalTransport

    model = _load(path)
    owners = _owners(model, 2)
    layer = 0
    block = model.model.layers[layer].mlp
    experts = experts_modules(model)[layer]
    act = ACT2FN[model.config.hidden_act]
    shards = [ExpertShard(load_experts(path, {s for s, o in owners.items() if o[0] == a}), act) for a in range(2)]
    local = LocalTransport(shards, {s: o[0] for s, o in owners.items()})
    rows_out = [{"tokens": n} for n in tokens_list]

    def measure(transports: dict) -> None:
        """Interleaved calls (local first), so noise hits every transport alike."""
        for row in rows_out:
            n = row["tokens"]
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
            row["local_us_p50"] = _pct(times["local"], 0.5) * 1e6
            for name in transports:
                if name != "local":
                    d = [a - b for a, b in zip(times[name], times["local"])]
                    row[f"{name}_us_p50"] = _pct(times[name], 0.5) * 1e6
                    row[f"{name}_overhead_us_p50"] = _pct(d, 0.5) * 1e6
                    row[f"{name}_overhead_us_p90"] = _pct(d, 0.9) * 1e6

    channel = _actors_for(path, model, owners, 2)
    try:
        plain = ActorTransport(channel.actors, owners, link="ray", timeout_s=EXPERTS.timeout_s,
                               restart_wait_s=EXPERTS.restart_wait_s)
        measure({"local": local, "channel": channel, "plain": plain})
    finally:
        channel.shutdown()
    # Alone: a compiled graph's actors poll their channels, which would slow everything else on a small host.
    compiled_actors = _actors_for(path, model, owners, 2)
    compiled = CompiledGraphTransport(compiled_actors.actors, owners)
    try:
        measure({"local": local, "compiled": compiled})
    finally:
        compiled.teardown()
        compiled_actors.shutdown()
    return rows_out


def bench_decode(path, batches: list[int], new_tokens: int) -> list[dict]:
    import torch

    from specserve.actors.experts.hook import install_dispatch

    ref = _load(path)
    model = _load(path)
    owners = _owners(model, 2)
    transport = _actors_for(path, model, owners, 2)
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
        transport.shutdown()
    return out


def replay_trace(transport, trace: list[tuple]) -> list[int]:
    """Dispatch each (layer, rows, top-k index) of `trace` through `transport`; rows each actor computed."""
    from specserve.actors.experts.dispatch import gather_rows, plan_dispatch

    before = [sum(c.values()) for c in transport.token_counts()]
    for layer, x, idx in trace:
        plan = plan_dispatch(idx, transport.experts_per_layer[layer])
        rows, counts = gather_rows(x, plan)
        transport.run(layer, plan, rows, counts)
    return [a - b for a, b in zip((sum(c.values()) for c in transport.token_counts()), before)]


def bench_balance(path, num_actors: int, redundant_slots: int, trace_tokens: int, steps: int) -> dict:
    import threading

    import torch

    from specserve.actors.experts.balancer import ExpertBalancer
    from specserve.actors.experts.eplb import balance_ratio
    from specserve.actors.experts.hook import experts_modules

    model = _load(path)
    layers = experts_modules(model)
    num_experts = next(iter(layers.values())).num_experts
    g = torch.Generator().manual_seed(7)
    popularity = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float) ** 1.2  # Zipf-like skew
    x = torch.randn(trace_tokens, model.config.hidden_size, generator=g)
    trace = []
    for _ in range(steps):
        idx = torch.stack([torch.multinomial(popularity, 2, generator=g) for _ in range(trace_tokens)])
        trace += [(layer, x, idx) for layer in layers]
    transport = _actors_for(path, model, _owners(model, num_actors), num_actors)
    balancer = ExpertBalancer(transport, transport.experts_per_layer, redundant_slots=redundant_slots)
    report: dict = {}
    try:
        before = balance_ratio(replay_trace(transport, trace))
        t0 = time.perf_counter()
        rebalancing = threading.Thread(target=lambda: report.update(balancer.rebalance_once()))
        rebalancing.start()
        replays = 0
        while rebalancing.is_alive():  # traffic goes on while the actors load their new slots
            replay_trace(transport, trace[:len(layers)])
            replays += 1
        round_s = time.perf_counter() - t0
        after = balance_ratio(replay_trace(transport, trace))
    finally:
        transport.shutdown()
    first = min(layers)
    return {"actors": num_actors, "experts": num_experts, "redundant_slots": redundant_slots,
            "before": before, "after": after, "predicted_after": report["predicted_after"],
            "applied": report["applied"], "loaded_slots": report["loaded"], "dropped_slots": report["dropped"],
            "round_s": round_s, "steps_during_round": replays,
            "replicas_per_expert": [len(transport.replicas[(first, e)]) for e in range(num_experts)]}


def bench_served(tmp: Path, args, concurrency: list[int]) -> list[dict]:
    """The same random Mixtral (with SmolLM2's tokenizer, so chat prompts work) served twice by `specserve bench
    --serve`: experts in the verifier, then in two expert actors; output tokens/s per concurrency."""
    from transformers import AutoTokenizer

    from specserve.actors.model_loader import resolve_model_path
    from specserve.tools import bench
    from specserve.cluster.config import ModelConfig

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m", ModelConfig().cache_dir))
    path = _tiny_mixtral(tmp / "served-moe", args.hidden, args.intermediate, args.experts, args.layers,
                         vocab_size=len(tokenizer))
    tokenizer.save_pretrained(path)
    out = tmp / "served.json"
    base = (f"model.source={path},model.served_name=tiny-moe,model.dtype=float32,"
            f"model.torch_threads={args.torch_threads},speculative.method=none,experts.num_cpus=0.25")
    code = bench.main(["--serve", "local=experts.num_actors=0", "--serve", "actors=experts.num_actors=2",
                       "--serve-base", base, "--workload", "chat", "--concurrency", ",".join(map(str, concurrency)),
                       "--max-tokens", str(args.new_tokens), "--json", str(out)])
    if code:
        raise RuntimeError(f"specserve bench exited {code}")
    import json

    return json.loads(out.read_text())["passes"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specserve bench-experts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="dispatch,decode,balance,served")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch threads here and in each actor (on a small host, one each does not oversubscribe)")
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.part.split(",") if p.strip()]
    import ray
    import torch

    torch.set_num_threads(args.torch_threads)  # the actors take the caller's count (actor_spec)
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
                print(f"per MoE layer, us (p50; overhead = minus local, p50/p90), torch threads {args.torch_threads}:"
                      " experts local; in 2 actors over TCP channels / plain Ray calls / a compiled graph")
                print(f"{'tokens':>6} {'local':>6} " + " ".join(f"{k:>8} {'overhead':>13}"
                                                            for k in ("channel", "plain", "compiled")))
                for r in results["dispatch"]:
                    print(f"{r['tokens']:>6} {r['local_us_p50']:6.0f} " + " ".join(
                        f"{r[k + '_us_p50']:8.0f} {r[k + '_overhead_us_p50']:6.0f}/{r[k + '_overhead_us_p90']:<6.0f}"
                        for k in ("channel", "plain", "compiled")), flush=True)
            if "decode" in parts:
                _log("decode: greedy tokens/s, experts local vs in two actors")
                results["decode"] = bench_decode(path, [1, 16], args.new_tokens)
                print(f"{'batch':>5} {'local tok/s':>11} {'actors tok/s':>12} identical")
                for r in results["decode"]:
                    print(f"{r['batch']:>5} {r['local_tok_s']:11.1f} {r['actors_tok_s']:12.1f} {r['identical']}",
                          flush=True)
            if "served" in parts:
                _log("served: a small MoE served with experts local vs in two actors (specserve bench)")
                results["served"] = bench_served(Path(tmp), args, [1, 16])
            if "balance" in parts:
                _log("balance: skewed routing trace, static vs rebalanced placement")
                b = bench_balance(path, num_actors=4, redundant_slots=1, trace_tokens=64, steps=20)
                results["balance"] = b
                print(f"balance (max/mean rows per actor, {b['actors']} actors, {b['experts']} experts, "
                      f"{b['redundant_slots']} redundant slot per actor and layer): before {b['before']:.2f}, "
                      f"after a live rebalance {b['after']:.2f} (round {b['round_s']:.2f}s, "
                      f"{b['steps_during_round']} steps served during it, {b['loaded_slots']} slots loaded, "
                      f"{b['dropped_slots']} dropped)")
    finally:
        if started:
            ray.shutdown()
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=1))
    return 0
