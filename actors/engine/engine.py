"""The engine: requests in, tokens out. Scheduler + block manager + model runner + sampler, stepped by a caller
(the verifier deployment's loop, or a plain loop in tests)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from specserve.actors.engine.block_manager import BlockManager, NoFreeBlocksError
from specserve.actors.engine.messages import RequestOutput, TokenLogprobs
from specserve.actors.engine.model_runner import ModelRunner, wants_prompt_logits
from specserve.actors.engine.sampler import apply_processors, sample, token_logprobs
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from specserve.actors.engine.sequence import Sequence, SequenceStatus
from specserve.actors.engine.speculation import (
    Proposer,
    SpeculationController,
    TargetGuesses,
    draft_round,
    record_round,
    verify_round,
)


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


def logit_layout(scheduled: list[ScheduledSeq]) -> list[tuple[slice | None, slice | None]]:
    """Each scheduled sequence's rows in the step's logits (see ModelRunner.execute), as (prompt rows, token
    rows). Token rows: 1 + k for one verifying k draft tokens, 1 for one that decodes or completes its prompt,
    None for a chunk that leaves prompt for later. Prompt rows, for a chunk that `wants_prompt_logits`: the rows
    before its token row, row j giving the logprobs of the prompt token after the chunk's j-th; else None.
    Read before the step advances the sequences."""
    layout: list[tuple[slice | None, slice | None]] = []
    start = 0
    for item in scheduled:
        prompt = tokens = None
        if wants_prompt_logits(item):
            count = item.num_new_tokens - (1 if item.completes_prompt else 0)
            prompt = slice(start, start + count)
            start += count
        if item.num_draft or item.completes_prompt:
            tokens = slice(start, start + 1 + item.num_draft)
            start += 1 + item.num_draft
        layout.append((prompt, tokens))
    return layout


def logit_rows(scheduled: list[ScheduledSeq]) -> list[slice | None]:
    """Each scheduled sequence's token rows (see `logit_layout`)."""
    return [tokens for _, tokens in logit_layout(scheduled)]


@dataclass
class StepLogits:
    """What a step's forward produced: the raw float32 logits (rows as `logit_layout` says) and, by the index of
    each scheduled sequence that has a grammar and token rows, the grammar's bitmask rows for those rows."""
    logits: torch.Tensor
    masks: dict[int, torch.Tensor]


class RequestRejected(ValueError):
    """The request can never be served by this engine (too long for the context window or the KV pool)."""


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
                 kv_event_sink: Callable[[list[tuple[bool, bytes]]], object] | None = None,
                 grammar_compiler=None, paged_kernel: bool | None = None, fused_layers: bool = True,
                 wide_step_tokens: int = 0, wide_step_threads: int = 0):
        """`paged_kernel`, `fused_layers`, `wide_step_*`: see ModelRunner (by default the compiled kernels on CPU
        where they build, and every step on the calling thread's torch threads)."""
        self.runner = ModelRunner(model, block_size, num_blocks or None, kv_cache_memory_gb,
                                  paged_kernel=paged_kernel, fused_layers=fused_layers,
                                  wide_step_tokens=wide_step_tokens, wide_step_threads=wide_step_threads)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, namespace=namespace,
                                          enable_prefix_caching=enable_prefix_caching,
                                          record_events=kv_event_sink is not None)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = context_window(model.config, max_model_len)
        self.eos_token_ids = set(eos_token_ids or [])
        self.seqs: dict[str, list[Sequence]] = {}  # each request's unfinished choices
        self._to_fork: set[str] = set()  # n > 1 requests whose other choices are not started yet (see _fork)
        self.stats = EngineStats()
        # Speculation: drafts come from `proposer`; `controller` picks k per sequence and holds the aggregate stats.
        self.proposer = proposer
        self.controller = controller or (SpeculationController(4) if proposer else None)
        # Receives (hashes, [n, *block shape] KV copy, their tenant's hash root or None) of blocks newly computed
        # here, one call per tenant: the KV store's export.
        self.kv_sink = kv_sink
        # Receives the prefix cache's (stored?, hash) events after each step: the routers' view of this replica.
        self.kv_event_sink = kv_event_sink
        # Structured outputs (structured.GrammarCompiler, built from the tokenizer); None: requests with
        # params.structured are rejected. Masks are computed on a worker thread while the forward runs.
        self.grammar_compiler = grammar_compiler
        self.mask_worker = None
        if grammar_compiler is not None:
            from specserve.actors.engine.structured import MaskWorker  # llguidance: only engines that use it
            self.mask_worker = MaskWorker(grammar_compiler)

    @property
    def spec_stats(self):
        return self.controller.method_stats if self.controller else None

    @classmethod
    def from_config(cls, model, engine_cfg, eos_token_ids=None, namespace: str = "", proposer=None,
                    controller=None, kv_sink=None, kv_event_sink=None, grammar_compiler=None,
                    wide_step_threads: int = 0) -> LLMEngine:
        return cls(model, block_size=engine_cfg.block_size, num_blocks=engine_cfg.num_blocks,
                   kv_cache_memory_gb=engine_cfg.kv_cache_memory_gb, max_num_seqs=engine_cfg.max_num_seqs,
                   max_num_batched_tokens=engine_cfg.max_num_batched_tokens, max_model_len=engine_cfg.max_model_len,
                   enable_prefix_caching=engine_cfg.enable_prefix_caching, eos_token_ids=eos_token_ids,
                   namespace=namespace, proposer=proposer, controller=controller, kv_sink=kv_sink,
                   kv_event_sink=kv_event_sink, grammar_compiler=grammar_compiler,
                   paged_kernel=None if engine_cfg.paged_kernel else False, fused_layers=engine_cfg.fused_layers,
                   wide_step_tokens=engine_cfg.wide_step_tokens, wide_step_threads=wide_step_threads)

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
        n, prompt_len = params.n, len(prompt_token_ids)
        if params.max_tokens is None:  # the client left it open: fill the window, or the pool if smaller
            # Each of the n choices holds its own tokens past the shared prompt: it gets its share of the pool.
            room = min(self.max_model_len - prompt_len, (capacity - prompt_len) // n)
            shared = f" shared by n={n} choices" if n > 1 else ""
            if room < 1:
                raise RequestRejected(f"prompt of {prompt_len} tokens leaves no room to generate "
                                      f"(context window {self.max_model_len}, KV cache {capacity} tokens{shared})")
            params = dataclasses.replace(params, max_tokens=room)
        total = prompt_len + params.max_tokens
        if total > self.max_model_len:
            raise RequestRejected(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) = "
                                  f"{total} exceeds the context window of {self.max_model_len} tokens")
        needed = prompt_len + n * params.max_tokens  # the prompt once: the choices share its blocks
        if needed > capacity:
            what = ("prompt + max_tokens" if n == 1 else
                    f"prompt ({prompt_len}) + n ({n}) * max_tokens ({params.max_tokens})")
            raise RequestRejected(f"{what} = {needed} tokens exceeds the KV cache capacity of {capacity} tokens")
        seq = Sequence(request_id, prompt_token_ids, params, hash_root)  # choice 0; _fork starts the others
        seq.grammar = self._grammar_matcher(params)
        seq.num_imported_tokens = imported_tokens
        self.seqs[request_id] = [seq]
        if n > 1:
            self._to_fork.add(request_id)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        """Abort every choice of the request still running (or not started yet)."""
        seqs = self.seqs.pop(request_id, None)
        if seqs is None:
            return False
        self._to_fork.discard(request_id)
        for seq in seqs:
            self._finish(seq, "abort")
        return True

    def _finish(self, seq: Sequence, reason: str) -> None:
        """End one choice; the request ends with its last."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        live = self.seqs.get(seq.request_id, [])
        if seq in live:
            live.remove(seq)
        if not live:
            self.seqs.pop(seq.request_id, None)
            self._to_fork.discard(seq.request_id)
        if self.proposer is not None:
            self.proposer.release(seq)

    def _fork(self, sched: SchedulerOutput) -> None:
        """Start choices 1 .. n-1 of each n > 1 request whose prompt this step's forward completed. They share
        the prompt's KV blocks (BlockManager.fork) instead of computing the prompt again. Runs after the forward
        (the prompt's KV is written) and before the parent commits its first token: the parent's per-sequence
        state (its grammar matcher) is still the prompt's, and its blocks are still held even if it finishes.
        The grammar matchers must be at rest here (no mask computation in flight). A choice that finds no
        sequence slot or free block waits for admission like a new request, first in line: the prefix cache
        then serves it the prompt's full blocks."""
        copies: list[tuple[int, int]] = []
        waiting: list[Sequence] = []
        for item in sched.scheduled:
            parent = item.seq
            if parent.request_id not in self._to_fork or not item.completes_prompt:
                continue
            self._to_fork.discard(parent.request_id)
            for index in range(1, parent.params.n):
                child = self._new_choice(parent, index)
                self.seqs[parent.request_id].append(child)
                if self.scheduler.free_seq_slots:
                    try:
                        copy = self.block_manager.fork(parent, child)
                    except NoFreeBlocksError:
                        waiting.append(child)
                        continue
                    if copy is not None:
                        copies.append(copy)
                    self.scheduler.add_running(child)
                else:
                    waiting.append(child)
        if copies:
            self.runner.copy_blocks([src for src, _ in copies], [dst for _, dst in copies])
        for child in reversed(waiting):
            self.scheduler.add(child, first=True)

    @staticmethod
    def _new_choice(parent: Sequence, index: int) -> Sequence:
        """Choice `index` of `parent`'s request, at the end of the prompt: its own generator (seeded from the
        request's seed and `index`), the request's prompt figures, and a fork of the parent's grammar state."""
        child = Sequence(parent.request_id, parent.token_ids[:parent.num_prompt_tokens], parent.params,
                         parent.hash_root, index=index)
        child.arrival_time, child.first_scheduled_time = parent.arrival_time, parent.first_scheduled_time
        child.num_cached_tokens, child.num_imported_tokens = parent.num_cached_tokens, parent.num_imported_tokens
        child.prompt_logprobs = None  # choice 0's first output carries them
        if parent.grammar is not None:
            child.grammar = parent.grammar.fork()
        return child

    def _grammar_matcher(self, params: SamplingParams):
        """The grammar state a request with params.structured starts from (None without)."""
        if params.structured is None:
            return None
        if self.grammar_compiler is None:
            raise RequestRejected("structured output is not enabled on this engine (no grammar compiler)")
        try:
            return self.grammar_compiler.matcher(params.structured)
        except ValueError as exc:
            raise RequestRejected(str(exc)) from None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ---- stepping ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step: schedule (drafts first), run the forward, commit what it produced."""
        t0 = time.perf_counter()
        sched, gate_arm = self._schedule()
        if not sched.scheduled:
            return []
        logits = self._execute(sched)
        if self._to_fork:
            self._fork(sched)
        outputs = self._postprocess(sched, logits)
        elapsed = time.perf_counter() - t0
        self._observe_step(sched, elapsed)
        if gate_arm is not None and sched.decodes_only and not sched.preempted and len(sched.scheduled) == gate_arm[0]:
            self.controller.gate.observe(*gate_arm, sum(len(o.new_token_ids) for o in outputs), elapsed)
        return outputs

    def _schedule(self) -> tuple[SchedulerOutput, tuple[int, bool] | None]:
        """This step's batch. Decoding sequences get their drafts first: the scheduler budgets their tokens.
        Also, where the controller has a gate, (decoding sequences, whether they drafted) for it."""
        gate_arm = None
        if self.proposer is not None:
            decoding = [s for s in self.scheduler.running if s.num_uncomputed_tokens == 1]
            gate = self.controller.gate
            drafting = bool(decoding) and (gate is None or gate.drafting(len(decoding)))
            if drafting:
                draft_round(decoding, self.proposer, self.controller, max_model_len=self.max_model_len)
            if decoding and gate is not None:
                gate_arm = (len(decoding), drafting)
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        return sched, gate_arm

    def _execute(self, sched: SchedulerOutput) -> StepLogits:
        """The forward: logits of the rows that yield tokens (see `logit_layout`), and the grammar masks of
        those rows, computed meanwhile."""
        constrained = [i for i, item in enumerate(sched.scheduled)
                       if item.seq.grammar is not None and (item.num_draft or item.completes_prompt)]
        pending = None
        if constrained:
            pending = self.mask_worker.start([(sched.scheduled[i].seq.grammar, self._draft_tokens(sched.scheduled[i]))
                                              for i in constrained])
        t0 = time.perf_counter()
        logits = self.runner.execute(sched.scheduled)
        if self.controller is not None and sched.decodes_only:
            # The cost model is fitted on decode/verify steps only: that is where k is chosen, and prefill
            # chunks (many tokens of one sequence) cost less per token and would flatten the slope.
            self.controller.observe_step(sched.num_tokens, time.perf_counter() - t0)
        masks: dict[int, torch.Tensor] = {}
        if pending is not None:
            bitmask, start = pending.result(), 0
            for i in constrained:
                rows = 1 + sched.scheduled[i].num_draft
                masks[i] = bitmask[start:start + rows]
                start += rows
        return StepLogits(logits, masks)

    @staticmethod
    def _draft_tokens(item: ScheduledSeq) -> list[int]:
        return item.seq.draft.tokens if item.num_draft else []

    def _processed_logits(self, scheduled: list[ScheduledSeq], rows: list[slice | None],
                          step: StepLogits) -> torch.Tensor:
        """The step's logits after each request's logits processors (sampler.apply_processors); the raw logits
        themselves when no request in the step has any."""
        needs = [i for i, (item, r) in enumerate(zip(scheduled, rows))
                 if r is not None and item.seq.params.has_processors]
        if not needs:
            return step.logits
        logits = step.logits.clone()
        for i in needs:
            seq = scheduled[i].seq
            logits[rows[i]] = apply_processors(step.logits[rows[i]], seq.params, seq.token_ids,
                                               seq.num_prompt_tokens, self._draft_tokens(scheduled[i]),
                                               self.eos_token_ids, step.masks.get(i))
        return logits

    def _postprocess(self, sched: SchedulerOutput, step: StepLogits) -> list[RequestOutput]:
        """Commit each sequence's new tokens (sampled, or its verified draft), register the blocks it filled,
        finish the sequences that stopped, and hand new blocks and prefix-cache events to their sinks."""
        layout = logit_layout(sched.scheduled)
        rows = [tokens for _, tokens in layout]
        raw = step.logits
        logits = self._processed_logits(sched.scheduled, rows, step)
        sampled = self._sample(sched.scheduled, rows, logits)
        observe = self.proposer.observes_target if self.proposer is not None else 0
        guesses = TargetGuesses.from_logits(logits, observe) if observe and len(logits) else None
        outputs: list[RequestOutput] = []
        new_blocks: list[tuple[int, bytes, bytes | None]] = []
        kv_moves: tuple[list[int], list[int]] = ([], [])  # (from slots, to slots) of accepted draft-tree paths
        for i, (item, (prompt_rows, r)) in enumerate(zip(sched.scheduled, layout)):
            seq = item.seq
            self.stats.prompt_tokens += item.num_new_prompt_tokens
            if prompt_rows is not None:  # row j: the prompt token after this chunk's j-th
                first = seq.num_computed_tokens + 1
                targets = seq.token_ids[first:first + prompt_rows.stop - prompt_rows.start]
                seq.prompt_logprobs[first:first + len(targets)] = token_logprobs(
                    raw[prompt_rows], targets, seq.params.prompt_logprobs)
            token_rows = r  # the raw logits each committed token was chosen from, in order
            if seq.draft is not None and r is not None:  # a draft, or the distribution a grammar cut it at
                verified = verify_round(seq, logits[r])
                tokens = verified.tokens
                token_rows = [r.start + j for j in verified.rows]
                if verified.kv_moves:
                    moves = verified.kv_moves
                    kv_moves[0].extend(self.runner.slots(seq.block_table, [a for a, _ in moves]))
                    kv_moves[1].extend(self.runner.slots(seq.block_table, [b for _, b in moves]))
            else:
                seq.num_computed_tokens += item.num_new_tokens
                tokens = sampled.get(i)
            if r is not None and self.proposer is not None:
                record_round(seq, item.num_draft, tokens, self.proposer, self.controller,
                             guesses.rows(r) if guesses is not None else None)
            seq.draft = None
            emitted, reason = self._append(seq, tokens or [])
            new_blocks += self.block_manager.register_computed_blocks(seq)  # before _finish frees the blocks
            if tokens is None:  # a prefill chunk that leaves part of the prompt for later steps: no output
                continue
            self.stats.generated_tokens += len(emitted)
            if reason:
                self._finish(seq, reason)
            logprobs = (token_logprobs(raw[token_rows], emitted, seq.params.logprobs)
                        if seq.params.logprobs is not None else None)
            outputs.append(self._output(seq, emitted, reason, logprobs))
        if kv_moves[0]:  # before any block of those paths is exported
            self.runner.copy_slots(*kv_moves)
        self._export_new_blocks(new_blocks)
        if self.kv_event_sink is not None:
            self.kv_event_sink(self.block_manager.drain_events())
        return outputs

    @staticmethod
    def _sample(scheduled: list[ScheduledSeq], rows: list[slice | None], logits: torch.Tensor) -> dict[int, list[int]]:
        """One token for each sequence that decodes or completes its prompt without a draft, by its index."""
        plain = [i for i, (item, r) in enumerate(zip(scheduled, rows)) if r is not None and item.seq.draft is None]
        if not plain:
            return {}
        starts = [rows[i].start for i in plain]
        # A plain decode step's rows are already these, in order: no copy of the vocabulary-wide rows (advanced
        # indexing copied 16 x 49k floats in 0.7 ms of a 45 ms step).
        picked = logits if starts == list(range(len(logits))) else logits.index_select(
            0, torch.tensor(starts, device=logits.device))
        tokens = sample(picked, [scheduled[i].seq.params for i in plain], [scheduled[i].seq.generator for i in plain])
        return {i: [t] for i, t in zip(plain, tokens)}

    def _append(self, seq: Sequence, tokens: list[int]) -> tuple[list[int], str | None]:
        """Append `tokens` up to the first one that stops the sequence: those appended, and why it stops."""
        emitted: list[int] = []
        reason = None
        for token in tokens:
            seq.token_ids.append(token)
            emitted.append(token)
            if seq.grammar is not None:  # masked to what the grammar allows, so this cannot fail
                seq.grammar.accept([token])
            reason = self._check_stop(seq, token)
            if reason:
                break
        # Verified tokens past a stop are not part of the sequence, and neither is their KV.
        seq.num_computed_tokens = min(seq.num_computed_tokens, len(seq))
        return emitted, reason

    def _check_stop(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if seq.grammar is not None and seq.grammar.done:
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return "length"
        return None

    @staticmethod
    def _output(seq: Sequence, emitted: list[int], reason: str | None,
                logprobs: list[TokenLogprobs] | None = None) -> RequestOutput:
        """The output of a step that committed `emitted` (the first carries the prompt logprobs, if gathered)."""
        st = seq.spec_stats
        prompt_logprobs, seq.prompt_logprobs = seq.prompt_logprobs, None
        return RequestOutput(
            seq.request_id, emitted, finished=reason is not None, finish_reason=reason, index=seq.index,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens, num_spec_rounds=st.rounds, num_draft_tokens=st.draft_tokens,
            num_accepted_tokens=st.accepted_tokens,
            num_imported_tokens=min(seq.num_imported_tokens, seq.num_cached_tokens),
            queue_time_s=(seq.first_scheduled_time or seq.arrival_time) - seq.arrival_time)

    def _observe_step(self, sched: SchedulerOutput, elapsed: float) -> None:
        prefill = sum(it.num_new_tokens for it in sched.scheduled if it.num_new_tokens > 1 + it.num_draft)
        if prefill * 2 >= sched.num_tokens:  # a prefill-dominated step: sample the prefill rate
            self.stats.observe_prefill_rate(sched.num_tokens / elapsed)
        self.stats.steps += 1
        self.stats.step_time_s += elapsed

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
            installed = self.block_manager.end_import(imp, written=written)
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
