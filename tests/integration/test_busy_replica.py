"""A request that waits behind others in a busy replica for longer than `server.stall_timeout_s` is served, not
ended as stalled: the replica's engine reports its steps on the waiting request's stream (real Ray Serve, a tiny
model, one sequence slot)."""

import asyncio
import time

import httpx
import pytest
from ray import serve

from served_apps import start_app
from tiny_models import make_tiny_model

pytestmark = pytest.mark.integration
NAME = "tiny-busy"
STALL_S = 2.0


@pytest.fixture(scope="module")
def busy(ray_cluster, tmp_path_factory):
    # Sixteen layers: steps of a few milliseconds, so the requests ahead outlast the stall timeout on any machine.
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-busy"), arch="llama", seed=5, num_layers=16)
    # One sequence at a time: every request after the first waits its turn, taking no step of its own.
    server = start_app(ray_cluster, str(path), NAME, **{"engine.max_num_seqs": 1, "server.stall_timeout_s": STALL_S,
                                                       "speculative.method": "none"})
    yield server
    server.stop()


def test_a_request_queued_longer_than_the_stall_timeout_is_served(busy):
    async def run():
        async with httpx.AsyncClient(base_url=busy.url, timeout=120) as client:
            async def complete(max_tokens: int):
                start = time.monotonic()
                r = await client.post("/v1/completions", json={
                    "model": NAME, "prompt": [3, 4, 5, 6], "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True})
                return r, time.monotonic() - start

            verifier = serve.get_deployment_handle("Verifier", NAME)

            def engine_holds_all_four() -> bool:  # blocking handle calls, off this event loop
                stats = verifier.stats.remote().result(timeout_s=60)
                return (stats["num_running"], stats["num_waiting"]) == (1, 3)

            await asyncio.to_thread(engine_holds_all_four)  # the handle's first call finds the replica (slow)
            ahead = [asyncio.create_task(complete(500)) for _ in range(4)]
            while not await asyncio.to_thread(engine_holds_all_four):  # the four reach the engine first
                assert not any(t.done() for t in ahead), "a request ahead finished before the others were queued"
                await asyncio.sleep(0.01)
            queued = await complete(4)
            return queued, await asyncio.gather(*ahead)

    (queued, waited), ahead = asyncio.run(run())
    assert [r.status_code for r, _ in ahead] == [200] * 4, [r.text for r, _ in ahead]
    assert all(r.json()["usage"]["completion_tokens"] == 500 for r, _ in ahead)
    assert queued.status_code == 200, queued.text
    assert queued.json()["usage"]["completion_tokens"] == 4
    # It really waited past the stall timeout for its first token (over 1500 steps of the requests ahead).
    assert waited > STALL_S * 1.5, f"the queued request took only {waited:.2f} s: nothing was ahead of it"
