"""The engine: requests in, tokens out. Scheduler + block manager + model runner + sampler, stepped by a caller
(the verifier deployment's loop, or a plain loop in tests)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.actors.engine.block_manager import BlockManager
from specserve.actors.engine.model_runner import ModelRunner
from specserve.actors.engine.rejection_sampler import verify_draft
from specserve.actors.engine.sampler import sample
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.scheduler import Scheduler
from specserve.actors.engine.sequence import Sequence, SequenceStatus
from specserve.actors.engine.speculation import Draft, Proposer, SpeculationController


def context_window(hf_config, max_model_len: int = 0) -> int:
    """The context window the engine serves: the configured one, else the model's. Capped at a sliding
    attention window, because the paged attention here attends over the whole context: within the window
    both are the same computation, beyond it they are not."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    window = max_model_len or getattr(cfg, "max_position_embeddings", 0) or 4096
    sliding = getattr(cfg, "sliding_window", None)
    if sliding and getattr(cfg, "use_sliding_window", True):
        window = min(window, int(sliding))
    return window


class RequestRejected(ValueError):
    """The request can never be served by this engine (too long for the context window or the KV pool)."""


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_spec_rounds: int = 0  # speculative rounds so far, and their drafted / accepted tokens
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_imported_tokens: int = 0  # of the cached prompt tokens, those whose blocks came from the KV store
    queue_time_s: float = 0.0  # arrival to first step


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    step_time_s: float = 0.0
    prefill_tokens_per_s: float = 0.0  # moving average over prefill-dominated steps (0 until one ran)

    def observe_prefill_rate(self, tokens_per_s: float) -> None:
        a = 0.2
        self.prefill_tokens_per_s = tokens_per_s if not self.prefill_tokens_per_s else (
            (1 - a) * self.prefill_tokens_per_s + a * tokens_per_s)


class LLMEngine:
    def __init__(self, model, *, block_size: int = 16, num_blocks: int = 0, kv_cache_memory_gb: float = 1.0,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, max_model_len: int = 0,
                 enable_prefix_caching: bool = True, eos_token_ids: list[int] | None = None, namespace: str = "",
                 proposer: Proposer | None = None, controller: SpeculationController | None = None,
                 kv_sink: Callable[[list[bytes], torch.Tensor, bytes | None], object] | None = None,
                 kv_event_sink: Callable[[list[tuple[bool, bytes]]], object] | None = None):
        self.runner = ModelRunner(model, block_size, num_blocks or None, kv_cache_memory_gb)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching, namespace,
                                          record_events=kv_event_sink is not None)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = context_window(model.config, max_model_len)
        self.eos_token_ids = set(eos_token_ids or [])
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()
        # Speculation: drafts come from `proposer`; `controller` picks k per sequence and holds the aggregate stats.
        self.proposer = proposer
        self.controller = controller or (SpeculationController(4) if proposer else None)
        # Receives (hashes, [n, *block shape] KV copy, their tenant's hash root or None) of blocks newly computed
        # here, one call per tenant: the KV store's export.
        self.kv_sink = kv_sink
        # Receives the prefix cache's (stored?, hash) events after each step: the routers' view of this replica.
        self.kv_event_sink = kv_event_sink

    @property
    def spec_stats(self):
        return self.controller.method_stats if self.controller else None

    @classmethod
    def from_config(cls, model, engine_cfg, eos_token_ids=None, namespace: str = "", proposer=None,
                    controller=None, kv_sink=None, kv_event_sink=None) -> "LLMEngine":
        return cls(model, block_size=engine_cfg.block_size, num_blocks=engine_cfg.num_blocks,
                   kv_cache_memory_gb=engine_cfg.kv_cache_memory_gb, max_num_seqs=engine_cfg.max_num_seqs,
                   max_num_batched_tokens=engine_cfg.max_num_batched_tokens, max_model_len=engine_cfg.max_model_len,
                   enable_prefix_caching=engine_cfg.enable_prefix_caching, eos_token_ids=eos_token_ids,
                   namespace=namespace, proposer=proposer, controller=controller, kv_sink=kv_sink,
                   kv_event_sink=kv_event_sink)

    # ---- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    imported_tokens: int = 0, hash_root: bytes | None = None) -> None:
        """`imported_tokens`: prompt tokens whose blocks were just imported from the store for this request;
        `hash_root`: the root of its tenant's block hashes (None: the engine's namespace)."""
        if request_id in self.seqs:
            raise RequestRejected(f"duplicate request id {request_id!r}")
        if not prompt_token_ids:
            raise RequestRejected("prompt is empty")
        capacity = self.block_manager.num_blocks * self.block_manager.block_size
        if params.max_tokens is None:  # the client left it open: fill the window, or the pool if smaller
            room = min(self.max_model_len, capacity) - len(prompt_token_ids)
            if room < 1:
                raise RequestRejected(f"prompt of {len(prompt_token_ids)} tokens leaves no room to generate "
                                      f"(context window {self.max_model_len}, KV cache {capacity} tokens)")
            params = dataclasses.replace(params, max_tokens=room)
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestRejected(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                                  f"{total} exceeds the context window of {self.max_model_len} tokens")
        if total > capacity:
            raise RequestRejected(f"prompt + max_tokens = {total} tokens exceeds the KV cache capacity of "
                                  f"{capacity} tokens")
        seq = Sequence(request_id, prompt_token_ids, params, hash_root)
        seq.num_imported_tokens = imported_tokens
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self._finish(seq, "abort")
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        self.seqs.pop(seq.request_id, None)
        if self.proposer is not None:
            self.proposer.release(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------------------------
    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    def _pending_prefill_tokens(self, num_decodes: int) -> int:
        """Prefill tokens the next step will likely carry besides the decodes (for the cost model)."""
        pending = sum(s.num_uncomputed_tokens for s in self.scheduler.running if s.num_uncomputed_tokens > 1)
        pending += sum(len(s) for s in self.scheduler.waiting)
        return min(pending, max(0, self.scheduler.max_num_batched_tokens - num_decodes))

    def _draft(self) -> None:
        """Give each decoding sequence this step's draft, or none."""
        seqs = [s for s in self.scheduler.running if s.num_uncomputed_tokens == 1]
        if not seqs:
            return
        ctl = self.controller
        limits = []
        for seq in seqs:
            if seq.acceptance is None:
                seq.acceptance = ctl.new_estimate()
            # Never draft past the end: tokens beyond max_tokens or the window would be thrown away.
            remaining = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))
            # A seeded sampled request must repeat itself: drafts depend on other traffic (recycled guesses,
            # adaptive k) and would change how its generator is consumed, so it decodes without speculation.
            seeded = not seq.params.greedy and seq.params.seed is not None
            off = seeded or not seq.params.speculate
            limits.append(0 if off else max(0, min(remaining - 1, ctl.max_k)))
        alphas = [s.acceptance.value for s in seqs]
        idle = [s.rounds_without_draft for s in seqs]
        other = self._pending_prefill_tokens(len(seqs))
        if self.proposer.drafts_are_free:  # look first, then choose k within what was found
            drafts = self.proposer.propose(seqs, limits)
            limits = [min(lim, len(d.tokens)) if d else 0 for lim, d in zip(limits, drafts)]
            ks = ctl.choose(alphas, limits, idle, other)
        else:  # drafting costs a forward per token: choose k first
            ks = ctl.choose(alphas, limits, idle, other)
            t0 = time.perf_counter()
            drafts = self.proposer.propose(seqs, ks) if any(ks) else [None] * len(seqs)
            ctl.observe_draft(max(ks), time.perf_counter() - t0)
        for seq, k, draft in zip(seqs, ks, drafts):
            if draft is None or k == 0 or not draft.tokens:
                seq.draft = None
                seq.rounds_without_draft += 1
            else:
                probs = draft.probs[:k] if draft.probs is not None else None
                seq.draft = Draft(list(draft.tokens[:k]), probs)
                seq.rounds_without_draft = 0

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        if self.proposer is not None:
            self._draft()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if not sched.scheduled:
            return []
        t_exec = time.perf_counter()
        logits = self.runner.execute(sched.scheduled)
        if self.controller is not None and all(it.num_new_tokens == 1 + it.num_draft for it in sched.scheduled):
            # The cost model is fitted on decode/verify steps only: that is where k is chosen, and prefill
            # chunks (many tokens of one sequence) cost less per token and would flatten the slope.
            self.controller.observe_step(sched.num_tokens, time.perf_counter() - t_exec)

        # Rows of `logits`: 1 + k per verifying sequence, 1 per other sequence that produces a token.
        plain = [i for i, it in enumerate(sched.scheduled) if it.completes_prompt and not it.num_draft]
        row_of, row = {}, 0
        for i, item in enumerate(sched.scheduled):
            if item.num_draft or item.completes_prompt:
                row_of[i] = row
                row += item.num_draft + 1
        rows = [row_of[i] for i in plain]
        sampled = sample(logits[rows], [sched.scheduled[i].seq.params for i in plain],
                         [sched.scheduled[i].seq.generator for i in plain]) if plain else []
        new_tokens = dict(zip(plain, ([t] for t in sampled)))
        observe = self.proposer is not None and self.proposer.observes_target
        argmax = logits.argmax(dim=-1).tolist() if observe else None

        outputs: list[RequestOutput] = []
        new_blocks: list[tuple[int, bytes, bytes | None]] = []
        for i, item in enumerate(sched.scheduled):
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            k = item.num_draft
            if k:
                r = row_of[i]
                tokens = verify_draft(logits[r:r + k + 1], seq.draft.tokens, seq.draft.probs, seq.params,
                                      seq.generator)
                new_tokens[i] = tokens
                # KV is valid for the last committed token and the accepted draft tokens only; the rest is
                # overwritten by later steps (rolled back).
                seq.num_computed_tokens += len(tokens)
            else:
                seq.num_computed_tokens += item.num_new_tokens
            if i in row_of and self.proposer is not None:
                if observe:
                    r = row_of[i]
                    inputs = [seq.token_ids[-1]] + (seq.draft.tokens if k else [])
                    self.proposer.observe(seq, inputs, argmax[r:r + k + 1])
                accepted = len(new_tokens[i]) - 1
                seq.spec_stats.record(k, accepted)
                self.controller.method_stats.record(k, accepted)
                if seq.acceptance is not None:
                    seq.acceptance.update(k, accepted)
            seq.draft = None
            if i not in new_tokens:
                new_blocks += self.block_manager.register_computed_blocks(seq)
                continue
            reason = None
            emitted = []
            for token in new_tokens[i]:
                seq.token_ids.append(token)
                emitted.append(token)
                reason = self._check_stop(seq, token)
                if reason:
                    break
            seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq))
            new_blocks += self.block_manager.register_computed_blocks(seq)
            self.stats.generated_tokens += len(emitted)
            if reason:
                self._finish(seq, reason)
            st = seq.spec_stats
            outputs.append(RequestOutput(seq.request_id, emitted, reason is not None, reason,
                                         seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_output_tokens,
                                         st.rounds, st.draft_tokens, st.accepted_tokens,
                                         min(seq.num_imported_tokens, seq.num_cached_tokens),
                                         (seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time))
        self._export_new_blocks(new_blocks)
        if self.kv_event_sink is not None:
            self.kv_event_sink(self.block_manager.drain_events())
        elapsed = time.perf_counter() - t0
        prefill = sum(it.num_new_tokens for it in sched.scheduled if it.num_new_tokens > 1 + it.num_draft)
        if prefill * 2 >= sched.num_tokens:  # a prefill-dominated step: sample the prefill rate
            self.stats.observe_prefill_rate(sched.num_tokens / elapsed)
        self.stats.steps += 1
        self.stats.step_time_s += elapsed
        return outputs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Blocking helper: run prompts to completion, return their output token ids (tests, benchmarks)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]

    # ---- KV blocks shared with other replicas ------------------------------------------------------------------------
    def import_blocks(self, hashes: list[bytes], blocks: list[torch.Tensor]) -> int:
        """Install blocks computed elsewhere under their chained hashes (a prompt's missing prefix, fetched from
        the store); the next admission of that prompt hits them. Returns how many were installed: those cached
        meanwhile are skipped, and the run is cut where the pool cannot hold more (see BlockManager.begin_import)."""
        imp = self.block_manager.begin_import(hashes[:len(blocks)])
        written = False
        try:
            if imp.new:
                self.runner.write_blocks([b for _, b, _ in imp.new], torch.stack([blocks[i] for i, _, _ in imp.new]))
            written = True
        finally:
            installed = self.block_manager.end_import(imp, written)
        return installed

    def _export_new_blocks(self, new_blocks: list[tuple[int, bytes, bytes | None]]) -> None:
        """Hand blocks that just entered the prefix cache to the KV sink: one copy here, the rest is the sink's
        (it only queues). Only committed tokens are ever registered, so no draft token leaves the engine.
        One hand-over per tenant (hash root): each tenant's blocks use its own share of the store."""
        if not new_blocks or self.kv_sink is None:
            return
        by_root: dict[bytes | None, list[tuple[int, bytes]]] = {}
        for block, h, root in new_blocks:
            by_root.setdefault(root, []).append((block, h))
        for root, blocks in by_root.items():
            self.kv_sink([h for _, h in blocks], self.runner.read_blocks([b for b, _ in blocks]), root)
