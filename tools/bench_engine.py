"""`specserve bench-engine`: the engine alone on a bench workload, closed loop, configurations compared in one process.

What it measures: `--concurrency` requests in flight (a new one added the moment one finishes, as clients that
never wait), greedy, `--max-tokens` each, through LLMEngine as a CPU verifier builds it (the model loaded and
packed once, a fresh engine per pass so no pass inherits another's prefix cache or suffix trees). Each variant is
a set of `engine.*` / `speculative.*` overrides; the variants run in A-B-B-A order over `--rounds`, on the same
prompts, and the report gives each one's median output tok/s and its ratio to the first. Against `specserve
bench` at the same concurrency, the difference is what serving costs (ingress, proxy, streaming, clients' turn-
around, the GIL and cores shared with them); against `bench-forward`, what scheduling, prefill and speculation do
to the plain decode step. Compare figures of one run: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from specserve.tools.bench.cli import BenchError, parse_overrides
from specserve.tools.bench.runner import typed
from specserve.tools.bench.workloads import WORKLOADS, build_workload, warmup_messages
from specserve.tools.bench_forward import add_model_arguments, write_report

VARIANT_SECTIONS = ("engine.", "speculative.")
DEFAULT_VARIANTS = ["default=", "none=speculative.method=none"]


@dataclass
class PassResult:
    """One variant's pass over the workload."""
    seconds: float
    output_tokens: int
    steps: int
    mean_requests: float  # requests in the engine (running or waiting) at a step, averaged over steps
    draft_tokens: int = 0
    accepted_tokens: int = 0
    spec_rounds: int = 0  # verification rounds that carried a draft
    # speculative.gate's record at the pass's end, per batch-size bucket (SpeculationGate.as_dict), or None
    gate: dict | None = None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens committed per speculative round."""
        return (self.accepted_tokens + self.spec_rounds) / self.spec_rounds if self.spec_rounds else None

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps


@dataclass
class EngineBenchReport:
    model: str
    dtype: str
    threads: int
    workload: str
    concurrency: int
    requests: int
    max_tokens: int
    prompt_tokens_mean: float
    variants: dict[str, dict[str, str]] = field(default_factory=dict)  # label -> its overrides
    passes: dict[str, list[PassResult]] = field(default_factory=dict)  # label -> one per round

    def median_tok_s(self, label: str) -> float:
        return statistics.median(p.tok_s for p in self.passes[label])

    def text(self) -> str:
        lines = [f"{self.model} in {self.dtype}, {self.threads} torch threads: the engine alone, {self.workload} "
                 f"workload, {self.requests} requests ({self.prompt_tokens_mean:.0f} prompt tokens on average), "
                 f"{self.concurrency} in flight, {self.max_tokens} tokens each, greedy"]
        first = next(iter(self.passes))
        for label, passes in self.passes.items():
            med = self.median_tok_s(label)
            each = ", ".join(f"{p.tok_s:.1f}" for p in passes)
            last = passes[-1]
            spec = (f", {last.draft_tokens / last.steps:.1f} draft tokens a step, accepted "
                    f"{last.accepted_tokens / last.draft_tokens:.0%}, mean accepted length "
                    f"{last.mean_accepted_length:.2f}" if last.draft_tokens else "")
            if last.gate:
                spec += ("; gate since the engine started (warm-up included), tok/s drafting/plain (steps) by "
                         "batch size: ") + ", ".join(
                    f"{n}+: {_rate(b['drafting_tok_s'])}/{_rate(b['plain_tok_s'])} "
                    f"({b['drafting_steps']}/{b['plain_steps']})" for n, b in last.gate.items())
            ratio = "" if label == first else f" ({med / self.median_tok_s(first):.2f}x {first})"
            lines.append(f"{label}: {med:.1f} output tok/s{ratio} [passes {each}]; last pass {last.ms_per_step:.1f} "
                         f"ms/step, {last.output_tokens / last.steps:.2f} tokens a step, {last.mean_requests:.1f} "
                         f"requests in the engine{spec}")
        return "\n".join(lines)


def _rate(tok_s: float | None) -> str:
    return "-" if tok_s is None else f"{tok_s:.0f}"


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, rest = text.partition("=")
    if not label.strip():
        raise BenchError(f"bad --variant {text!r}: expected LABEL=KEY=VALUE[,KEY=VALUE...] (or LABEL= for defaults)")
    overrides = parse_overrides(rest, "--variant")
    for key in overrides:
        if not key.startswith(VARIANT_SECTIONS):
            raise BenchError(f"--variant {label}: {key!r} is not an engine.* or speculative.* key (the model is "
                             f"loaded once for all variants: set it with --model, --dtype, --threads)")
    return label.strip(), overrides


def _prompts(tokenizer, workload: str, n: int, seed: int) -> list[list[int]]:
    """The first turn of each session, rendered with the model's chat template as the ingress does."""
    sessions = build_workload(workload, n, seed)[:n]
    return [_render(tokenizer, s.messages) for s in sessions]


def _render(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def _build_engine(loaded, overrides: dict[str, str], threads: int):
    """`threads`: --threads (0: a replica's default, with its wide steps)."""
    from specserve.actors.engine.engine import LLMEngine
    from specserve.actors.model_loader import wide_step_threads
    from specserve.actors.verifier import build_controller, build_proposer, eos_ids
    from specserve.cluster.config import ModelConfig, SpecserveConfig

    config = SpecserveConfig.load(overrides=typed(overrides))
    if config.speculative.remote:
        raise BenchError(f"speculative.method={config.speculative.method} (suffix_in="
                         f"{config.speculative.suffix_in}) drafts in drafter replicas; bench-engine runs the "
                         f"in-process methods (none, ngram, suffix in the verifier)")
    proposer = build_proposer(config, loaded.config.get_text_config().vocab_size)
    return LLMEngine.from_config(loaded.model, config.engine, eos_token_ids=eos_ids(loaded.tokenizer, loaded.config),
                                 proposer=proposer, controller=build_controller(config, proposer),
                                 wide_step_threads=wide_step_threads(ModelConfig(torch_threads=threads)))


def run_pass(engine, prompts: list[list[int]], concurrency: int, max_tokens: int, tag: str) -> PassResult:
    from specserve.actors.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    added = in_flight = output = steps = requests = 0
    before = _spec_counts(engine)
    start = time.perf_counter()
    while added < len(prompts) or engine.has_unfinished():
        while added < len(prompts) and in_flight < concurrency:
            engine.add_request(f"{tag}-{added}", prompts[added], params)
            added += 1
            in_flight += 1
        requests += len(engine.scheduler.running) + len(engine.scheduler.waiting)
        steps += 1
        for out in engine.step():
            output += len(out.new_token_ids)
            in_flight -= out.finished
    seconds = time.perf_counter() - start
    drafted, accepted, rounds = (after - b for after, b in zip(_spec_counts(engine), before))
    gate = engine.controller.gate if engine.controller is not None else None
    return PassResult(seconds=seconds, output_tokens=output, steps=steps, mean_requests=requests / steps,
                      draft_tokens=drafted, accepted_tokens=accepted, spec_rounds=rounds,
                      gate=gate.as_dict() if gate is not None else None)


def _spec_counts(engine) -> tuple[int, int, int]:
    """The engine's speculation counters so far (its warm-up's included)."""
    stats = engine.spec_stats
    return (stats.draft_tokens, stats.accepted_tokens, stats.rounds) if stats else (0, 0, 0)


def run(args) -> EngineBenchReport:
    import torch

    from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
    from specserve.actors.model_loader import load_model
    from specserve.actors.packed_linear import pack_linear_weights
    from specserve.cluster.config import ModelConfig

    loaded = load_model(ModelConfig(source=args.model, dtype=args.dtype, device="cpu", torch_threads=args.threads,
                                    **({"cache_dir": args.cache_dir} if args.cache_dir else {})),
                        attn_implementation=ATTN_IMPLEMENTATION)
    if args.pack:
        pack_linear_weights(loaded.model)  # as a CPU verifier does (model.pack_weights)
    prompts = _prompts(loaded.tokenizer, args.workload, args.num_requests, args.seed)
    warmup = [_render(loaded.tokenizer, m) for m in warmup_messages(args.warmup, args.seed)]
    report = EngineBenchReport(model=args.model, dtype=str(loaded.dtype).removeprefix("torch."),
                               threads=torch.get_num_threads(), workload=args.workload,
                               concurrency=args.concurrency, requests=len(prompts), max_tokens=args.max_tokens,
                               prompt_tokens_mean=statistics.fmean(len(p) for p in prompts),
                               variants=dict(args.variants))
    labels = list(args.variants)
    for r in range(args.rounds):  # A-B-B-A: drift on a shared machine hits every variant alike
        for label in labels if r % 2 == 0 else labels[::-1]:
            engine = _build_engine(loaded, args.variants[label], args.threads)
            if warmup:  # its speculation statistics stay, as a running server's would
                run_pass(engine, warmup, args.concurrency, args.max_tokens, f"warmup-{label}-{r}")
            result = run_pass(engine, prompts, args.concurrency, args.max_tokens, f"{label}-{r}")
            report.passes.setdefault(label, []).append(result)
            print(f"round {r + 1}/{args.rounds} {label}: {result.tok_s:.1f} output tok/s, {result.ms_per_step:.1f} "
                  f"ms/step", file=sys.stderr, flush=True)
            del engine  # its KV cache
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="specserve bench-engine", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--workload", default="chat", help=f"first turns of: {', '.join(WORKLOADS)} (default chat)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=None, help="requests per pass (default 4 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="workload seed")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured requests through each fresh engine first")
    p.add_argument("--rounds", type=int, default=2, help="passes of each variant, A-B-B-A")
    p.add_argument("--variant", action="append", default=None, metavar="LABEL=KEY=VALUE[,KEY=VALUE...]",
                   help="an engine configuration to compare: engine.* / speculative.* overrides (repeatable; "
                        "the first is the baseline; default: default= and none=speculative.method=none)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack the linear weights for oneDNN, as a CPU verifier does (default on)")
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--text", default=None, help="write the text report here too")
    args = p.parse_args(argv)
    if args.workload not in WORKLOADS:
        p.error(f"unknown workload {args.workload!r} (choose from {', '.join(WORKLOADS)})")
    args.num_requests = args.num_requests or 4 * args.concurrency
    if min(args.concurrency, args.num_requests, args.max_tokens, args.rounds) < 1 or args.warmup < 0:
        p.error("--concurrency, --num-requests, --max-tokens and --rounds must be positive, --warmup >= 0")
    try:
        variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    except BenchError as exc:
        p.error(str(exc))
    args.variants = dict(variants)
    if len(args.variants) != len(variants):
        p.error("--variant labels must differ")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"specserve bench-engine: {exc}", file=sys.stderr)
        return 2
    write_report(report.text(), {**asdict(report), "median_tok_s": {k: report.median_tok_s(k) for k in report.passes}},
                 args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
