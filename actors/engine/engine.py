"""The engine: requests in, tokens out. Scheduler + block manager + model runner + sampler, stepped by a caller
(the verifier deployment's loop, or a plain loop in tests)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from specserve.actors.engine.block_manager import BlockManager
from specserve.actors.engine.model_runner import ModelRunner
from specserve.actors.engine.sampler import sample
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.engine.scheduler import Scheduler
from specserve.actors.engine.sequence import Sequence, SequenceStatus


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


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    step_time_s: float = 0.0


class LLMEngine:
    def __init__(self, model, *, block_size: int = 16, num_blocks: int = 0, kv_cache_memory_gb: float = 1.0,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, max_model_len: int = 0,
                 enable_prefix_caching: bool = True, eos_token_ids: list[int] | None = None, namespace: str = ""):
        self.runner = ModelRunner(model, block_size, num_blocks or None, kv_cache_memory_gb)
        self.block_manager = BlockManager(self.runner.num_blocks, block_size, enable_prefix_caching, namespace)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        self.max_model_len = context_window(model.config, max_model_len)
        self.eos_token_ids = set(eos_token_ids or [])
        self.seqs: dict[str, Sequence] = {}
        self.stats = EngineStats()

    @classmethod
    def from_config(cls, model, engine_cfg, eos_token_ids=None, namespace: str = "") -> "LLMEngine":
        return cls(model, block_size=engine_cfg.block_size, num_blocks=engine_cfg.num_blocks,
                   kv_cache_memory_gb=engine_cfg.kv_cache_memory_gb, max_num_seqs=engine_cfg.max_num_seqs,
                   max_num_batched_tokens=engine_cfg.max_num_batched_tokens, max_model_len=engine_cfg.max_model_len,
                   enable_prefix_caching=engine_cfg.enable_prefix_caching, eos_token_ids=eos_token_ids,
                   namespace=namespace)

    # ---- requests -----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
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
        seq = Sequence(request_id, prompt_token_ids, params)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        return True

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

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        self.stats.preemptions += len(sched.preempted)
        if not sched.scheduled:
            return []
        logits = self.runner.execute(sched.scheduled)
        producing = [s for s in sched.scheduled if s.completes_prompt]
        tokens = sample(logits, [s.seq.params for s in producing], [s.seq.generator for s in producing])

        outputs: list[RequestOutput] = []
        for item in sched.scheduled:
            seq = item.seq
            if seq.num_computed_tokens < seq.num_prompt_tokens:
                self.stats.prompt_tokens += min(item.num_new_tokens, seq.num_prompt_tokens - seq.num_computed_tokens)
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.register_computed_blocks(seq)
        for item, token in zip(producing, tokens):
            seq = item.seq
            seq.token_ids.append(token)
            self.stats.generated_tokens += 1
            reason = self._check_stop(seq, token)
            if reason:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = reason
                self.scheduler.remove(seq)
                self.seqs.pop(seq.request_id, None)
            outputs.append(RequestOutput(seq.request_id, [token], reason is not None, reason,
                                         seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_output_tokens))
        self.stats.steps += 1
        self.stats.step_time_s += time.perf_counter() - t0
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
    def export_block(self, block_hash: bytes) -> torch.Tensor | None:
        """KV of a cached, computed block, or None if this engine no longer holds it."""
        block = self.block_manager.cached_block(block_hash)
        return None if block is None else self.runner.read_block(block)

    def import_block(self, block_hash: bytes, kv: torch.Tensor) -> bool:
        """Install a block computed elsewhere under its chained hash; later prompts with that prefix hit it."""
        block = self.block_manager.take_block_for_import(block_hash)
        if block is None:
            return False
        try:
            self.runner.write_block(block, kv)
        except ValueError:
            self.block_manager.drop_cached(block)
            raise
        return True
