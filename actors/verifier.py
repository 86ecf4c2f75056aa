"""Verifier deployment: one engine per replica, running the target model.

Plain class; the app builder (cluster/app.py) turns it into a Serve deployment with options from config.
"""

from __future__ import annotations

import logging
import time

from specserve.actors.engine.async_engine import AsyncEngine
from specserve.actors.engine.engine import LLMEngine
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.model_loader import load_model
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.priority import use_default_priority

log = logging.getLogger(__name__)


def eos_ids(tokenizer, hf_config) -> list[int]:
    ids = set()
    for src in (getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    gen = getattr(getattr(tokenizer, "generation_config", None), "eos_token_id", None)
    if isinstance(gen, int):
        ids.add(gen)
    return sorted(ids)


class Verifier:
    def __init__(self, config: dict):
        self.config = SpecserveConfig.model_validate(config)
        t0 = time.perf_counter()
        use_default_priority()  # before the engine thread starts, which inherits it
        self.async_engine = AsyncEngine(self._build_engine)
        bm = self.async_engine.engine.block_manager
        log.info("verifier ready: %s, %d KV blocks of %d tokens, loaded in %.1fs", self.config.model.name,
                 bm.num_blocks, bm.block_size, time.perf_counter() - t0)

    def _build_engine(self) -> LLMEngine:
        """Runs on the engine thread (see AsyncEngine)."""
        loaded = load_model(self.config.model, attn_implementation=ATTN_IMPLEMENTATION)
        mc, ec = self.config.model, self.config.engine
        namespace = f"{mc.name}|{loaded.dtype}|block={ec.block_size}"
        return LLMEngine.from_config(loaded.model, ec, eos_token_ids=eos_ids(loaded.tokenizer, loaded.config),
                                     namespace=namespace)

    async def generate(self, request: dict):
        """Stream {token_ids, finished, finish_reason, prompt_tokens, cached_tokens, completion_tokens} dicts."""
        params = SamplingParams(**request["sampling"])
        async for out in self.async_engine.generate(request["request_id"], request["prompt_token_ids"], params):
            yield {
                "token_ids": out.new_token_ids,
                "finished": out.finished,
                "finish_reason": out.finish_reason,
                "prompt_tokens": out.num_prompt_tokens,
                "cached_tokens": out.num_cached_tokens,
                "completion_tokens": out.num_output_tokens,
            }

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine thread died is restarted."""
        if not self.async_engine.is_alive():
            raise RuntimeError("engine thread is not running")

    async def stats(self) -> dict:
        def read(engine: LLMEngine) -> dict:
            bm, s = engine.block_manager, engine.stats
            return {
                "num_running": len(engine.scheduler.running),
                "num_waiting": len(engine.scheduler.waiting),
                "kv_blocks_total": bm.num_blocks,
                "kv_blocks_free": bm.num_free_blocks,
                "kv_usage": bm.usage(),
                "prefix_cache_queries": bm.prefix_queries,
                "prefix_cache_hits": bm.prefix_hits,
                "steps": s.steps,
                "step_time_s": s.step_time_s,
                "torch_threads": __import__("torch").get_num_threads(),
                "generated_tokens": s.generated_tokens,
                "preemptions": s.preemptions,
                "max_model_len": engine.max_model_len,
            }
        return await self.async_engine.call(read)

    def __del__(self):
        if hasattr(self, "async_engine"):
            self.async_engine.shutdown()
