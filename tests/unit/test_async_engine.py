"""The engine thread wrapper: streaming, merging, abort on close, errors, without Ray."""

import asyncio
import dataclasses
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from specserve.actors.engine.async_engine import AsyncEngine, EngineStopped, StepHealth
from specserve.actors.engine.attention import ATTN_IMPLEMENTATION
from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.messages import GenerateRequest, Progress, RequestOutput
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


def request(rid: str, prompt: list[int], params: SamplingParams) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=params)


def collect(eng, rid, prompt, params):
    async def run():
        return [o async for o in eng.generate(request(rid, prompt, params))]
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
        gen = async_engine.generate(request("b", list(range(3, 30)), SamplingParams(max_tokens=150, temperature=0,
                                                                                     ignore_eos=True)))
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
            return [t async for o in async_engine.generate(request(f"d{i}", list(range(3, 8 + i)),
                                                                  SamplingParams(max_tokens=10 + i, temperature=0,
                                                                                 ignore_eos=True)))
                    for t in o.new_token_ids]
        return await asyncio.gather(*[one(i) for i in range(6)])
    results = asyncio.run(run())
    assert [len(r) for r in results] == [10 + i for i in range(6)]


def test_a_stream_of_n_choices_carries_every_choice_and_ends_after_the_last(async_engine):
    prompt = list(range(3, 17))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, n=3)
    outs = collect(async_engine, "n3", prompt, params)
    tokens: dict[int, list[int]] = {}
    finished: list[int] = []
    for out in outs:
        assert out.request_id == "n3" and out.index not in finished  # nothing after a choice's end
        tokens.setdefault(out.index, []).extend(out.new_token_ids)
        if out.finished:
            assert out.finish_reason == "length"
            finished.append(out.index)
    # Every choice finished, and the stream ended with the last of them.
    assert sorted(finished) == [0, 1, 2] and outs[-1].finished
    single = collect(async_engine, "n1", prompt, dataclasses.replace(params, n=1))
    assert all(t == [t for o in single for t in o.new_token_ids] for t in tokens.values())
    state = asyncio.run(async_engine.call(lambda e: (e.has_unfinished(), e.block_manager.num_free_blocks)))
    assert state == (False, 128)


def test_closing_a_stream_of_n_choices_aborts_them_all(async_engine):
    async def run():
        gen = async_engine.generate(request("n4", list(range(3, 30)), SamplingParams(
            max_tokens=40, temperature=0, ignore_eos=True, n=4)))
        seen = set()
        while len(seen) < 4:  # every choice started
            seen.add((await gen.__anext__()).index)
        await gen.aclose()
        deadline = time.monotonic() + 30
        while True:
            state = await async_engine.call(lambda e: (e.has_unfinished(), e.block_manager.num_free_blocks))
            if not state[0] or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.01)
    assert asyncio.run(run()) == (False, 128)


def test_build_error_surfaces_in_constructor():
    def broken():
        raise RuntimeError("no weights here")
    with pytest.raises(RuntimeError, match="no weights here"):
        AsyncEngine(broken)


# ---- health: failed and stuck steps, an engine thread that ends ---------------------------------------------


class Crash(BaseException):
    """Not an Exception: escapes the step's error handling and ends the engine thread (as a bug there would)."""


class FaultyRunner:
    """The real model runner, made to fail (or block) any step that carries a request whose id starts with
    "fail" (or "crash", "stuck"). Plain-Python fault injection: everything else is the real engine."""

    def __init__(self, runner):
        self.runner = runner
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def execute(self, batch):
        ids = {item.seq.request_id for item in batch}
        if any(i.startswith("fail") for i in ids):
            raise RuntimeError("injected step failure")
        if any(i.startswith("crash") for i in ids):
            raise Crash("injected engine thread crash")
        if any(i.startswith("stuck") for i in ids):
            self.release.wait(30)
        return self.runner.execute(batch)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-faulty"), arch="llama", seed=2)


def faulty_engine(path, health: StepHealth, *, max_num_seqs: int = 32,
                  progress_every_s: float | None = None) -> AsyncEngine:
    def build():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=ATTN_IMPLEMENTATION).eval()
        engine = LLMEngine(model, block_size=4, num_blocks=64, max_model_len=200, max_num_seqs=max_num_seqs)
        engine.runner = FaultyRunner(engine.runner)
        return engine
    return AsyncEngine(build, health=health, progress_every_s=progress_every_s)


def wait_for(condition, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)


def test_failed_steps_fail_their_requests_and_the_health_check_after_the_threshold(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth(max_consecutive_failures=3))
    try:
        for n in (1, 2):
            with pytest.raises(RuntimeError, match="engine step failed: injected step failure"):
                collect(eng, f"fail-{n}", [3, 4, 5], GREEDY)
            assert eng.health.consecutive_failures == n and eng.health_problem() is None
        # A good step in between resets the count: only failures in a row mean the engine is broken.
        assert len([t for o in collect(eng, "ok-1", [3, 4, 5], GREEDY) for t in o.new_token_ids]) == 5
        assert eng.health.consecutive_failures == 0
        for n in (1, 2, 3):
            with pytest.raises(RuntimeError, match="injected step failure"):
                collect(eng, f"fail-again-{n}", [3, 4, 5], GREEDY)
        problem = eng.health_problem()
        assert problem and "3 engine steps failed in a row" in problem and "injected step failure" in problem
        assert eng.health.failed_steps == 5
        # The failed requests' blocks are free again.
        assert asyncio.run(eng.call(lambda e: (e.has_unfinished(), e.block_manager.num_free_blocks))) == (False, 64)
    finally:
        eng.shutdown()


def test_a_stuck_step_fails_the_health_check_until_it_ends(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth(max_step_s=0.2))
    try:
        async def run():
            task = asyncio.create_task(asyncio.to_thread(collect, eng, "stuck-1", [3, 4, 5], GREEDY))
            await asyncio.to_thread(wait_for, lambda: eng.health_problem() is not None)
            problem = eng.health_problem()
            eng.engine.runner.release.set()
            return problem, await task
        problem, outs = asyncio.run(run())
        assert "an engine step has run for" in problem and "engine.max_step_s=0.2" in problem
        assert sum(len(o.new_token_ids) for o in outs) == 5 and eng.health_problem() is None
    finally:
        eng.engine.runner.release.set()
        eng.shutdown()


def test_an_ended_engine_thread_fails_waiting_streams_and_new_calls(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth())
    try:
        with pytest.raises(EngineStopped, match="Crash: injected engine thread crash"):
            collect(eng, "crash-1", [3, 4, 5], GREEDY)
        wait_for(lambda: not eng.is_alive())
        assert "engine thread is not running (Crash: injected engine thread crash)" == eng.health_problem()
        with pytest.raises(EngineStopped):
            asyncio.run(eng.call(lambda e: e.has_unfinished()))
        with pytest.raises(EngineStopped):
            collect(eng, "after", [3, 4, 5], GREEDY)
    finally:
        eng.shutdown()


def test_a_cancelled_consumer_frees_its_sequence(async_engine):
    """What Serve does when the ingress gives up on a request (client gone, deadline): it cancels the task
    iterating the stream; the sequence must be aborted and its blocks freed."""
    async def run():
        started = asyncio.Event()

        async def consume():
            async for _ in async_engine.generate(request("cancelled", list(range(3, 30)),
                                                         SamplingParams(max_tokens=150, temperature=0,
                                                                        ignore_eos=True))):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        deadline = time.monotonic() + 30
        while True:
            state = await async_engine.call(lambda e: (e.has_unfinished(), e.block_manager.num_free_blocks))
            if not state[0] or time.monotonic() > deadline:
                return state
            await asyncio.sleep(0.01)
    assert asyncio.run(run()) == (False, 128)


def test_step_health_counts_failures_in_a_row_and_times_a_running_step():
    now = [0.0]
    health = StepHealth(max_consecutive_failures=2, max_step_s=10.0, clock=lambda: now[0])
    health.step_started()
    health.step_failed(ValueError("x"))
    assert health.problem() is None
    health.step_started()
    health.step_failed(ValueError("y"))
    assert health.problem() == ("2 engine steps failed in a row (engine.max_consecutive_step_failures=2); "
                                "last: ValueError: y")
    health.step_started()
    health.step_succeeded()
    assert health.problem() is None
    health.step_started()
    now[0] = 10.0
    assert health.problem() is None  # at the bound, not over it
    now[0] = 10.5
    assert health.problem() == "an engine step has run for 10s (engine.max_step_s=10)"
    health.step_succeeded()
    assert health.problem() is None


def test_calls_queued_behind_a_long_step_each_get_their_own_result(tiny_path):
    """Calls that pile up while a step runs are drained together; each must settle its own future (they once
    settled the last one's, leaving the others waiting forever: Verifier.stats never returned)."""
    eng = faulty_engine(tiny_path, StepHealth())
    try:
        async def run():
            stream = asyncio.create_task(asyncio.to_thread(collect, eng, "stuck-2", [3, 4, 5], GREEDY))
            await asyncio.to_thread(wait_for, lambda: eng.health._step_started is not None)
            calls = [asyncio.create_task(eng.call(lambda e, i=i: i, timeout_s=60)) for i in range(4)]
            await asyncio.sleep(0.05)  # all four are in the inbox before the step ends
            eng.engine.runner.release.set()
            results = await asyncio.gather(*calls)
            await stream
            return results
        assert asyncio.run(run()) == [0, 1, 2, 3]
    finally:
        eng.engine.runner.release.set()
        eng.shutdown()


def test_a_call_behind_a_stuck_step_times_out(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth())
    try:
        async def run():
            stream = asyncio.create_task(asyncio.to_thread(collect, eng, "stuck-3", [3, 4, 5], GREEDY))
            await asyncio.to_thread(wait_for, lambda: eng.health._step_started is not None)
            with pytest.raises(TimeoutError, match="did not get to the call within 0.2s"):
                await eng.call(lambda e: 1, timeout_s=0.2)
            eng.engine.runner.release.set()
            await stream
            return await eng.call(lambda e: 2, timeout_s=30)
        assert asyncio.run(run()) == 2
    finally:
        eng.engine.runner.release.set()
        eng.shutdown()


# ---- progress reports: a request waiting behind others is told its engine steps ------------------------------


async def _record(eng: AsyncEngine, rid: str, params: SamplingParams, into: list):
    """Stream one request, noting each item and when it came."""
    async for item in eng.generate(request(rid, [3, 4, 5], params)):
        into.append((time.monotonic(), item))


def test_a_request_waiting_behind_another_gets_progress_reports_and_then_its_output(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth(), max_num_seqs=1, progress_every_s=0.01)
    try:
        async def run():
            first: list = []
            waiting: list = []
            running = asyncio.create_task(_record(eng, "first", SamplingParams(max_tokens=150, temperature=0,
                                                                                ignore_eos=True), first))
            while not first:  # the first request holds the engine's one sequence slot
                await asyncio.sleep(0.001)
            await _record(eng, "waiting", GREEDY, waiting)
            await running
            return first, waiting
        first, waiting = asyncio.run(run())
        items = [item for _, item in waiting]
        first_output = next(i for i, item in enumerate(items) if isinstance(item, RequestOutput))
        reports = items[:first_output]
        # It waited for the other request's 150 steps and was told of them, then got its tokens.
        assert reports and all(isinstance(r, Progress) and r.steps > 0 for r in reports)
        assert not any(isinstance(item, Progress) for item in items[first_output:])
        assert sum(len(o.new_token_ids) for o in items[first_output:]) == 5 and items[-1].finished
        assert sum(len(item.new_token_ids) for _, item in first if isinstance(item, RequestOutput)) == 150
    finally:
        eng.shutdown()


def test_no_progress_reports_while_the_engine_is_stuck(tiny_path):
    eng = faulty_engine(tiny_path, StepHealth(), max_num_seqs=1, progress_every_s=0.01)
    try:
        async def run():
            stuck_items: list = []
            waiting: list = []
            stuck = asyncio.create_task(_record(eng, "stuck-1", GREEDY, stuck_items))
            await asyncio.to_thread(wait_for, lambda: eng.health._step_started is not None)
            behind = asyncio.create_task(_record(eng, "waiting", GREEDY, waiting))
            await asyncio.sleep(0.5)  # fifty report periods with the engine in one step
            silent = list(waiting)
            eng.engine.runner.release.set()
            await asyncio.gather(stuck, behind)
            return silent, waiting
        silent, waiting = asyncio.run(run())
        assert silent == []
        assert sum(len(item.new_token_ids) for _, item in waiting if isinstance(item, RequestOutput)) == 5
    finally:
        eng.engine.runner.release.set()
        eng.shutdown()
