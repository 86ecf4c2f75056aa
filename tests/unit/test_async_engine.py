"""The engine thread wrapper: streaming, merging, abort on close, errors, without Ray."""

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.engine.async_engine import AsyncEngine
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.sampling_params import SamplingParams
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def async_engine(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="llama", seed=2)

    def build():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=ATTN_IMPLEMENTATION).eval()
        return LLMEngine(model, block_size=4, num_blocks=128, max_model_len=200)

    eng = AsyncEngine(build)
    yield eng
    eng.shutdown()


def collect(eng, rid, prompt, params):
    async def run():
        outs = [o async for o in eng.generate(rid, prompt, params)]
        return outs
    return asyncio.run(run())


def test_stream_yields_all_tokens_and_matches_blocking_generate(async_engine):
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outs = collect(async_engine, "a", list(range(3, 15)), params)
    tokens = [t for o in outs for t in o.new_token_ids]
    assert len(tokens) == 20 and outs[-1].finished and outs[-1].finish_reason == "length"
    expected = asyncio.run(async_engine.call(lambda e: e.generate([list(range(3, 15))], params)[0]))
    assert tokens == expected


def test_closing_the_stream_aborts_and_frees_blocks(async_engine):
    async def run():
        gen = async_engine.generate("b", list(range(3, 30)), SamplingParams(max_tokens=150, temperature=0,
                                                                             ignore_eos=True))
        first = await gen.__anext__()
        await gen.aclose()
        for _ in range(100):
            state = await async_engine.call(lambda e: (e.has_unfinished(), e.block_manager.num_free_blocks))
            if not state[0]:
                break
            await asyncio.sleep(0.01)
        return first, state
    first, (busy, free) = asyncio.run(run())
    assert first.new_token_ids and not busy and free == 128


def test_rejected_request_raises_in_the_stream(async_engine):
    with pytest.raises(RequestRejected, match="context window"):
        collect(async_engine, "c", [5] * 190, SamplingParams(max_tokens=20))


def test_concurrent_streams_all_finish(async_engine):
    async def run():
        async def one(i):
            return [t async for o in async_engine.generate(f"d{i}", list(range(3, 8 + i)),
                                                          SamplingParams(max_tokens=10 + i, temperature=0,
                                                                         ignore_eos=True))
                    for t in o.new_token_ids]
        return await asyncio.gather(*[one(i) for i in range(6)])
    results = asyncio.run(run())
    assert [len(r) for r in results] == [10 + i for i in range(6)]


def test_build_error_surfaces_in_constructor():
    def broken():
        raise RuntimeError("no weights here")
    with pytest.raises(RuntimeError, match="no weights here"):
        AsyncEngine(broken)
