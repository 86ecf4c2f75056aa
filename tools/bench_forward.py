"""`specserve bench-forward`: the engine's forward against the model's bare forward, in one process.

What it measures, on this machine's cores and the dtype `model.dtype` resolves to:
- single-stream decode: the engine's step time per token (one greedy sequence: schedule, paged attention, sample)
  against the bare Hugging Face forward per token (the same weights, its own attention and DynamicCache, argmax),
  rounds in A-B-B-A order, the median of each side: issue 22's "within 1.2x of the bare forward" ratio;
- the engine's decode step at each `--batch-sizes` (ms per step, output tok/s);
- prefill: one chunk of `--prefill-tokens` prompt tokens through the engine against one bare forward over them;
- the machine's floors for each decode step (`tools/machine_limit.py`): the model's linear layers alone at that many
  rows, and reading the linear weights once at the measured memory bandwidth;
- verification: the step at the largest batch size with every sequence verifying k draft tokens, for each
  `--draft-tokens` k (random drafts, so almost all rejected: the cost of a round, not its gain);
- the attention paths: the decode step at the largest batch size with the compiled paged kernel (the default on
  CPU, actors/engine/paged_decode.cpp) and with the SDPA path over gathered K/V, A-B-B-A;
- the layer paths: the same step with the layers run as DecoderForward (the default on CPU for Llama-family
  models, actors/engine/decoder_forward.py) and as the model's own forward, A-B-B-A.
The engine's model is what a CPU verifier runs (linear weights packed for oneDNN unless --no-pack); the bare one is
the model as transformers loads it.
The bare model is a second copy of the weights (the engine's copy runs the paged attention), so the model must fit
twice. Compare figures of one run: the machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.speculation import Draft, SpeculationController
from specserve.tools import machine_limit


@dataclass
class ForwardReport:
    model: str
    dtype: str
    threads: int
    prompt_tokens: int
    packed_linears: int  # the engine's linear layers packed for oneDNN (0: --no-pack, or not packable here)
    bare_ms_per_token: float = 0.0
    engine_ms_per_token: float = 0.0
    decode_ratio: float = 0.0  # engine / bare, single stream
    batch_steps: dict[int, float] = field(default_factory=dict)  # batch size -> ms per decode step
    prefill_tokens: int = 0
    bare_prefill_ms: float = 0.0
    engine_prefill_ms: float = 0.0
    stream_gb_s: float = 0.0  # memory read bandwidth (0: --no-limits)
    weight_mb: float = 0.0  # the linear weights a decode step reads
    linears_ms: dict[int, float] = field(default_factory=dict)  # batch size -> the model's linears alone, ms
    verify_batch: int = 0  # the batch size of the verification steps
    verify_steps: dict[int, float] = field(default_factory=dict)  # draft tokens a sequence -> ms per step
    verify_drafted: dict[int, float] = field(default_factory=dict)  # k -> draft tokens the engine verified per round
    paged_kernel: bool = False  # the engine's decodes attend through the compiled kernel (all figures above)
    fused_layers: bool = False  # the engine's layers run as DecoderForward (all figures above)
    attention_batch: int = 0  # the batch size of the comparison below (0: not run)
    kernel_step_ms: float = 0.0  # decode step with the kernel, median of the A-B-B-A rounds
    sdpa_step_ms: float = 0.0  # the same with the SDPA path
    layers_batch: int = 0  # the batch size of the layer comparison (0: not run)
    fused_step_ms: float = 0.0  # decode step with the layers as DecoderForward, median of the A-B-B-A rounds
    eager_step_ms: float = 0.0  # the same through the model's own forward

    def text(self) -> str:
        attention = "the compiled paged kernel" if self.paged_kernel else "SDPA over gathered K/V"
        layers = "DecoderForward" if self.fused_layers else "the model's own forward"
        lines = [f"{self.model} in {self.dtype}, {self.threads} torch threads, prompts of {self.prompt_tokens} tokens, "
                 f"{self.packed_linears} linear layers of the engine's model packed for oneDNN, decode attention "
                 f"through {attention}, layers through {layers}",
                 f"single-stream decode: bare forward {self.bare_ms_per_token:.2f} ms/token, engine step "
                 f"{self.engine_ms_per_token:.2f} ms/token: {self.decode_ratio:.2f}x"]
        for b, ms in self.batch_steps.items():
            lines.append(f"engine decode step, {b:>3} sequences: {ms:7.2f} ms, {b / ms * 1e3:7.1f} output tok/s")
        if self.stream_gb_s:
            read_ms = machine_limit.MachineLimit(self.stream_gb_s, self.weight_mb).read_floor_ms()
            lines.append(f"floors: {self.weight_mb:.0f} MB of linear weights, read once at {self.stream_gb_s:.1f} GB/s "
                         f"in {read_ms:.2f} ms")
            for b, ms in self.linears_ms.items():
                step = self.batch_steps[b]
                lines.append(f"decode step, {b:>3} sequences: the linears alone {ms:7.2f} ms (engine step "
                             f"{step / ms:.2f}x), reading the weights {read_ms:.2f} ms (engine step "
                             f"{step / read_ms:.2f}x)")
        for k, ms in self.verify_steps.items():
            plain = self.batch_steps[self.verify_batch]
            lines.append(f"engine verify step, {self.verify_batch:>3} sequences x (1 + {k} draft tokens): {ms:7.2f} ms "
                         f"({ms / plain:.2f}x the decode step)")
        if self.attention_batch:
            lines.append(f"decode step, {self.attention_batch:>3} sequences, attention through the paged kernel "
                         f"{self.kernel_step_ms:7.2f} ms, through SDPA over gathered K/V {self.sdpa_step_ms:7.2f} ms: "
                         f"kernel {self.sdpa_step_ms / self.kernel_step_ms:.2f}x")
        if self.layers_batch:
            lines.append(f"decode step, {self.layers_batch:>3} sequences, layers as DecoderForward "
                         f"{self.fused_step_ms:7.2f} ms, as the model's own forward {self.eager_step_ms:7.2f} ms: "
                         f"DecoderForward {self.eager_step_ms / self.fused_step_ms:.2f}x")
        if self.prefill_tokens:
            lines.append(f"prefill of {self.prefill_tokens} tokens: bare forward {self.bare_prefill_ms:.1f} ms, engine "
                         f"{self.engine_prefill_ms:.1f} ms: {self.engine_prefill_ms / self.bare_prefill_ms:.2f}x")
        return "\n".join(lines)


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(min(100, vocab - 1), vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def bare_decode_ms(model, prompt: list[int], tokens: int) -> float:
    """ms per token of the plain loop: one forward of the last token over the DynamicCache, argmax."""
    out = model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True)
    cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(2):  # warm
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / tokens * 1e3


def engine_decode_ms(engine: LLMEngine, prompts: list[list[int]], steps: int) -> float:
    """ms per decode step with len(prompts) greedy sequences running (prefilled first, then 2 warm steps)."""
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p,
                           SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    for _ in range(2):
        engine.step()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = (time.perf_counter() - t0) / steps * 1e3
    while engine.has_unfinished():
        engine.step()
    return elapsed


class RandomDrafts:
    """A proposer (speculation.Proposer) drafting k seeded random tokens for every sequence: verification's cost
    without its gain (nearly every draft is rejected, so sequences advance one token a step as in plain decode)."""
    drafts_are_free = True
    prior_acceptance = 0.5
    observes_target = 0

    def __init__(self, vocab: int, seed: int = 0):
        self.vocab, self.generator = vocab, torch.Generator().manual_seed(seed)

    def propose(self, seqs, ks: list[int]) -> list[Draft | None]:
        return [Draft(torch.randint(min(100, self.vocab - 1), self.vocab, (k,), generator=self.generator).tolist())
                if k else None for k in ks]

    def observe(self, seq, input_tokens, guesses) -> None:
        pass

    def release(self, seq) -> None:
        pass


@torch.inference_mode()
def bare_prefill_ms(model, prompt: list[int]) -> float:
    t0 = time.perf_counter()
    model(input_ids=torch.tensor([prompt], device=model.device), use_cache=True, logits_to_keep=1)
    return (time.perf_counter() - t0) * 1e3


def engine_prefill_ms(engine: LLMEngine, prompt: list[int]) -> float:
    engine.add_request(f"bench-prefill-{time.monotonic_ns()}", prompt, SamplingParams(max_tokens=1, temperature=0.0))
    t0 = time.perf_counter()
    engine.step()  # the whole prompt in one chunk (max_num_batched_tokens >= its length)
    elapsed = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished():
        engine.step()
    return elapsed


def compare_steps(engine: LLMEngine, switch: str, prompts: list[list[int]], args) -> dict[bool, list[float]]:
    """Decode steps of `prompts` with the runner's `switch` on and off, rounds A-B-B-A; left on."""
    steps = {True: [], False: []}
    for r in range(max(2, args.rounds)):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            setattr(engine.runner, switch, on)
            steps[on].append(engine_decode_ms(engine, prompts, args.decode_tokens))
    setattr(engine.runner, switch, True)
    return steps


def run(args) -> ForwardReport:
    from transformers import AutoModelForCausalLM

    from specserve.actors.model_loader import load_model
    from specserve.actors.packed_linear import pack_linear_weights
    from specserve.cluster.config import ModelConfig

    loaded = load_model(ModelConfig(source=args.model, dtype=args.dtype, device="cpu", torch_threads=args.threads,
                                    **({"cache_dir": args.cache_dir} if args.cache_dir else {})))
    packed = pack_linear_weights(loaded.model) if args.pack else 0  # as a CPU verifier does (model.pack_weights)
    bare = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.dtype).eval()
    vocab = loaded.config.get_text_config().vocab_size
    largest = max(args.batch_sizes)
    engine = LLMEngine(loaded.model, block_size=16, max_num_seqs=max(largest, 1),
                       max_num_batched_tokens=max(512, args.prefill_tokens, largest),
                       kv_cache_memory_gb=args.kv_cache_gb, enable_prefix_caching=False)
    report = ForwardReport(model=args.model, dtype=str(loaded.dtype).removeprefix("torch."),
                           threads=torch.get_num_threads(), prompt_tokens=args.prompt_tokens,
                           packed_linears=packed, paged_kernel=engine.runner.paged_kernel,
                           fused_layers=engine.runner.fused_decoder() is not None)
    bare_ms, engine_ms = [], []
    for r in range(args.rounds):  # A-B-B-A: drift on a shared machine hits both sides alike
        prompt = _prompt(args.prompt_tokens, vocab, seed=r)
        order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
        for side in order:
            if side == "bare":
                bare_ms.append(bare_decode_ms(bare, prompt, args.decode_tokens))
            else:
                engine_ms.append(engine_decode_ms(engine, [prompt], args.decode_tokens))
        print(f"round {r + 1}/{args.rounds}: bare {bare_ms[-1]:.2f} ms/token, engine {engine_ms[-1]:.2f}",
              file=sys.stderr, flush=True)
    report.bare_ms_per_token = statistics.median(bare_ms)
    report.engine_ms_per_token = statistics.median(engine_ms)
    report.decode_ratio = report.engine_ms_per_token / report.bare_ms_per_token
    for b in args.batch_sizes:
        report.batch_steps[b] = engine_decode_ms(engine, [_prompt(args.prompt_tokens, vocab, seed=100 + i)
                                                          for i in range(b)], args.decode_tokens)
        print(f"batch {b}: {report.batch_steps[b]:.2f} ms/step", file=sys.stderr, flush=True)
    if args.limits:
        limit = machine_limit.measure(loaded.model, args.batch_sizes)
        report.stream_gb_s, report.weight_mb, report.linears_ms = limit.stream_gb_s, limit.weight_mb, limit.linears_ms
        print(f"floors: {limit.stream_gb_s:.1f} GB/s, linears {limit.linears_ms}", file=sys.stderr, flush=True)
    report.verify_batch = largest
    for k in args.draft_tokens:
        verifier = LLMEngine(loaded.model, block_size=16, max_num_seqs=largest,
                             max_num_batched_tokens=max(512, largest * (1 + k)), kv_cache_memory_gb=args.kv_cache_gb,
                             enable_prefix_caching=False, proposer=RandomDrafts(vocab),
                             controller=SpeculationController(k, adaptive=False))
        report.verify_steps[k] = engine_decode_ms(verifier, [_prompt(args.prompt_tokens, vocab, seed=100 + i)
                                                              for i in range(largest)], args.decode_tokens)
        stats = verifier.spec_stats
        report.verify_drafted[k] = stats.draft_tokens / stats.rounds if stats.rounds else 0.0
        del verifier  # its KV cache
        print(f"verify k={k}: {report.verify_steps[k]:.2f} ms/step", file=sys.stderr, flush=True)
    prompts = [_prompt(args.prompt_tokens, vocab, seed=300 + i) for i in range(largest)]
    if engine.runner.paged_kernel and args.compare_attention:
        steps = compare_steps(engine, "paged_kernel", prompts, args)
        report.attention_batch = largest
        report.kernel_step_ms, report.sdpa_step_ms = statistics.median(steps[True]), statistics.median(steps[False])
        print(f"attention at {largest}: kernel {steps[True]}, SDPA {steps[False]} ms/step", file=sys.stderr, flush=True)
    if report.fused_layers and args.compare_layers:
        steps = compare_steps(engine, "fused_layers", prompts, args)
        report.layers_batch = largest
        report.fused_step_ms, report.eager_step_ms = statistics.median(steps[True]), statistics.median(steps[False])
        print(f"layers at {largest}: DecoderForward {steps[True]}, own forward {steps[False]} ms/step",
              file=sys.stderr, flush=True)
    if args.prefill_tokens:
        prompt = _prompt(args.prefill_tokens, vocab, seed=7)
        engine_prefill_ms(engine, prompt), bare_prefill_ms(bare, prompt)  # warm both
        bare_p, engine_p = [], []
        for r in range(args.rounds):
            prompt = _prompt(args.prefill_tokens, vocab, seed=200 + r)
            sides = [lambda: bare_p.append(bare_prefill_ms(bare, prompt)),
                     lambda: engine_p.append(engine_prefill_ms(engine, prompt))]
            for measure in sides if r % 2 == 0 else sides[::-1]:
                measure()
        report.prefill_tokens = args.prefill_tokens
        report.bare_prefill_ms, report.engine_prefill_ms = statistics.median(bare_p), statistics.median(engine_p)
    return report


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model an in-process bench loads (bench-forward, bench-engine)."""
    p.add_argument("--model", default="smollm2-135m", help="registry name or local directory (default smollm2-135m)")
    p.add_argument("--cache-dir", default=None, help="model cache (default: the model loader's)")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16 (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: every core but one, as a replica uses)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="specserve bench-forward", description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=48, help="measured tokens (steps) per round")
    p.add_argument("--rounds", type=int, default=4, help="single-stream and prefill rounds, A-B-B-A")
    p.add_argument("--batch-sizes", default="1,4,16", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--prefill-tokens", type=int, default=256, help="0: skip the prefill comparison")
    p.add_argument("--draft-tokens", default="2,4", type=lambda s: [int(x) for x in s.split(",") if x],
                   help="verification steps at the largest batch size, k draft tokens a sequence (comma list; "
                        "empty: none)")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True,
                   help="pack the engine's linear weights for oneDNN, as a CPU verifier does (default on)")
    p.add_argument("--limits", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the machine's floors for each decode step (default on)")
    p.add_argument("--compare-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="time the largest batch's decode step through the paged kernel and through SDPA (default on)")
    p.add_argument("--compare-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="time the largest batch's decode step with the layers as DecoderForward and as the model's "
                        "own forward (default on)")
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--json", default=None, help="write the report as JSON here")
    p.add_argument("--text", default=None, help="write the text report here too")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.decode_tokens < 1 or args.prompt_tokens < 1 or not args.batch_sizes \
            or min(args.batch_sizes) < 1 or min(args.draft_tokens, default=1) < 1:
        p.error("--rounds, --decode-tokens, --prompt-tokens, --batch-sizes and --draft-tokens must be positive")
    return args


def write_report(text: str, doc: dict, args) -> None:
    """Print an in-process bench's report; write it to --text and its figures to --json where asked."""
    print(text)
    if args.text:
        with open(args.text, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    write_report(report.text(), asdict(report), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
