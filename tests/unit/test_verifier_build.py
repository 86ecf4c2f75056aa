"""What a verifier replica builds on its engine thread (actors/verifier.py `build_verifier`), without Ray Serve."""

import asyncio
import threading

import pytest

from specserve.actors.engine.async_engine import AsyncEngine
from specserve.actors.engine.block_hash import root_hash
from specserve.actors.engine.messages import GenerateRequest
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.verifier import VerifierParts, build_verifier
from specserve.cluster.config import SpecserveConfig
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tiny"), arch="llama", seed=3)
    return SpecserveConfig.model_validate({
        "model": {"source": str(path), "dtype": "float32", "device": "cpu"},
        "engine": {"block_size": 4, "num_blocks": 64, "max_num_batched_tokens": 32},
        "speculative": {"method": "ngram"},
    })


def test_the_build_runs_on_the_engine_thread_and_returns_its_parts(config):
    threads = []

    def build() -> VerifierParts:
        threads.append(threading.current_thread().name)
        return build_verifier(config)

    eng = AsyncEngine(build, engine_of=lambda parts: parts.engine)
    try:
        parts = eng.built
        assert threads == ["specserve-engine"] and parts.engine is eng.engine
        # No Redis configured and no expert actors asked for: the engine runs alone, under its namespace.
        assert parts.kv_store is None and parts.kv_events is None
        assert parts.experts is None and parts.expert_balancer is None
        assert parts.engine.block_manager.root == root_hash(parts.namespace.id)
        assert parts.engine.controller is not None and parts.engine.proposer.drafts_are_free
        assert parts.engine.controller.gate is not None  # speculative.gate: on by default

        async def run():
            request = GenerateRequest(request_id="r", prompt_token_ids=list(range(3, 20)),
                                      params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
            return [t async for out in eng.generate(request) for t in out.new_token_ids]
        assert len(asyncio.run(run())) == 5
    finally:
        eng.shutdown()


@pytest.mark.parametrize("overrides,gated", [({}, True), ({"gate": False}, False), ({"adaptive": False}, False)])
def test_the_speculation_gate_follows_the_config(overrides, gated):
    from specserve.actors.draft.ngram import NgramDrafter
    from specserve.actors.verifier import build_controller

    config = SpecserveConfig.model_validate({"speculative": {"method": "ngram", **overrides}})
    controller = build_controller(config, NgramDrafter(1, 3, recycle=True))
    assert (controller.gate is not None) == gated
