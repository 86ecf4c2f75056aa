"""Runs an LLMEngine in its own thread so the replica's event loop stays free for requests and streaming.

Requests, aborts and calls reach the engine thread as commands in its inbox (AddRequest, AbortRequest,
EngineCall); outputs go back to each request's asyncio queue (a step's in one callback per event loop). A
consumer that falls behind gets its pending tokens merged into one chunk (fewer messages under load). While the
engine runs batches, a stream with no output in a step gets a Progress now and then (`progress_every_s`): a
request waiting for its turn is then told from one whose engine is stuck.

All torch work (loading the model, every forward) happens on the engine thread: with OpenMP, matmuls issued
from a second thread after another thread has used torch's thread pool ran slower (docs/measurements.md).

A request with n > 1 choices is one stream: its outputs carry their choice's index, and it ends when every
choice has finished.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import queue
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from specserve.actors.engine.engine import LLMEngine, RequestRejected
from specserve.actors.engine.messages import GenerateRequest, Progress, RequestOutput

log = logging.getLogger(__name__)


class StepHealth:
    """Whether the engine thread still serves, for Serve's health check: it is unhealthy once
    `max_consecutive_failures` steps in a row have failed (a broken device, an expert layer that cannot be
    reached: every request would fail), or while the engine thread has been in one step (or one round of its
    inbox) longer than `max_step_s` (stuck: no progress while it has work)."""

    def __init__(self, max_consecutive_failures: int = 3, max_step_s: float = 180.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_consecutive_failures = max_consecutive_failures
        self.max_step_s = max_step_s
        self._clock = clock
        self.consecutive_failures = 0
        self.failed_steps = 0  # all time (a metric)
        self.last_error = ""
        self._step_started: float | None = None

    def busy(self) -> None:
        """The engine thread starts a round of work (its inbox, then a step)."""
        self._step_started = self._clock()

    def idle(self) -> None:
        """The engine thread waits for work: no progress is owed."""
        self._step_started = None

    step_started = busy

    def step_succeeded(self) -> None:
        self._step_started = None
        self.consecutive_failures = 0

    def step_failed(self, exc: BaseException) -> None:
        self._step_started = None
        self.consecutive_failures += 1
        self.failed_steps += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def problem(self) -> str | None:
        """Why the engine is unhealthy, or None. Read from other threads: plain attribute reads."""
        if self.consecutive_failures >= self.max_consecutive_failures:
            return (f"{self.consecutive_failures} engine steps failed in a row (engine.max_consecutive_step_"
                    f"failures={self.max_consecutive_failures}); last: {self.last_error}")
        started = self._step_started
        if started is not None and self._clock() - started > self.max_step_s:
            return (f"an engine step has run for {self._clock() - started:.0f}s "
                    f"(engine.max_step_s={self.max_step_s:g})")
        return None


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future, result=None,
             error: BaseException | None = None) -> None:
    """Settle `fut` (a caller's, on its loop) from the engine thread. Everything is bound here, per call: a
    callback that looked `fut` up in the draining loop's variable later would settle the next call's future
    and leave its own waiting forever (two calls drained together: Verifier.stats never returning)."""
    def settle() -> None:
        if fut.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the caller's loop is closed: nobody is waiting
        pass


def _name_os_thread(name: str) -> None:
    """Give the calling thread `name` where the OS shows it (top -H, py-spy, /proc/.../comm; Linux keeps 15
    characters): the threads it starts (torch's workers) take the name too, so the engine's CPU time can be told
    from the event loop's (`specserve bench-hops`). Elsewhere, or without libc, nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _put_all(items: list[tuple[str, asyncio.Queue, Any]]) -> None:
    for _, q, item in items:
        q.put_nowait(item)


class EngineStopped(RuntimeError):
    """The engine thread is no longer running: nothing sent to it will be answered."""


# ---- the engine thread's inbox -------------------------------------------------------------------------------
@dataclass(slots=True)
class AddRequest:
    request: GenerateRequest
    fetched: Any  # the prompt's blocks prefetched from the KV store (see AsyncEngine.prefetch), or None
    hash_root: bytes | None  # the root of the request's tenant's block hashes (None: the engine's namespace)


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class EngineCall:
    """Run `fn(engine)` on the engine thread between steps; its result settles `future` on `loop`."""
    fn: Callable[[LLMEngine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


Command = AddRequest | AbortRequest | EngineCall


class AsyncEngine:
    def __init__(self, build: Callable[[], Any], *, engine_of: Callable[[Any], LLMEngine] = lambda built: built,
                 ready_timeout: float | None = None, health: StepHealth | None = None,
                 progress_every_s: float | None = None):
        """Starts the engine thread, runs `build()` there, and returns once it is done; an exception raised
        while building is raised here. `build` returns the engine, or a bundle holding it that `engine_of`
        picks it out of; the caller finds the result in `built`. `progress_every_s`: how often, at most, every
        open stream gets a Progress while steps complete (None: never)."""
        self.engine: LLMEngine | None = None
        self.built = None
        # Optional `prefetch(prompt_token_ids, hash_root) -> Fetched | None`: blocks of the prompt that the engine
        # lacks, from the KV store. Runs on an I/O thread before the request reaches the engine thread.
        self.prefetch: Callable | None = None
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="specserve-kv-fetch")

        def build_engine() -> LLMEngine:  # on the engine thread (`_run`)
            self.built = build()
            return engine_of(self.built)

        self._build_engine = build_engine
        self._build_error: BaseException | None = None
        self._ready = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.progress_every_s = progress_every_s
        self._reported_steps = 0  # engine steps (those that ran a batch) told to the streams so far
        self._last_progress = time.monotonic()
        self._stopped = False
        self.health = health or StepHealth()
        self._death: str | None = None  # why the engine thread ended, if it ended on its own
        self._ended = False  # set (under _submit_lock) when the engine thread stops taking messages
        self._submit_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="specserve-engine", daemon=True)
        self._thread.start()
        if not self._ready.wait(ready_timeout):
            raise TimeoutError("engine did not start in time")
        if self._build_error is not None:
            raise self._build_error

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._io.shutdown(wait=False)

    async def generate(self, request: GenerateRequest, *,
                       hash_root: bytes | None = None) -> AsyncIterator[RequestOutput | Progress]:
        """The request's outputs, and a Progress where the engine stepped but nothing came for the request.
        `hash_root`: the root of the request's tenant's block hashes (None: the engine's namespace)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        request_id = request.request_id
        if request_id in self._streams:
            raise RequestRejected(f"duplicate request id {request_id!r}")
        self._streams[request_id] = (loop, q)
        finished = False  # every choice finished (or the stream failed)
        unfinished_choices = set(range(request.params.n))
        try:
            fetched = None
            if self.prefetch is not None:
                fetched = await loop.run_in_executor(self._io, self.prefetch, request.prompt_token_ids, hash_root)
            self._submit(AddRequest(request, fetched, hash_root))
            while not finished:
                item = await q.get()
                items = [item]
                while not q.empty():
                    items.append(q.get_nowait())
                for it in items:
                    if isinstance(it, BaseException):
                        finished = True
                        raise it
                outputs = [it for it in items if not isinstance(it, Progress)]
                if not outputs:
                    yield Progress(sum(it.steps for it in items))
                    continue
                for out in RequestOutput.merge(outputs):
                    if out.finished:
                        unfinished_choices.discard(out.index)
                    finished = not unfinished_choices
                    yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the client went away: free the sequence's blocks
                self._inbox.put(AbortRequest(request_id))
                self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                self._streams.pop(request_id, None)

    def _deliver_many(self, items: Iterable[tuple[str, RequestOutput | Progress]]) -> None:
        """A step's items for many streams, one callback per caller loop: each call_soon_threadsafe writes to the
        loop's wake-up pipe, and a step has an output for every running request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, asyncio.Queue, Any]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((request_id, target[1], item))
        for loop, queued in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, queued)
            except RuntimeError:  # the callers' event loop is closed: nobody is listening
                for request_id, _, _ in queued:
                    self._streams.pop(request_id, None)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def health_problem(self) -> str | None:
        """Why this engine cannot serve (its thread ended, steps keep failing, a step is stuck), or None."""
        if not self.is_alive():
            return f"engine thread is not running ({self._death or 'shut down'})"
        return self.health.problem()

    def _submit(self, command: Command) -> None:
        """Hand `command` to the engine thread; raises EngineStopped once that thread has ended (under the lock
        that its ending takes, so nothing is queued after it failed the waiting ones)."""
        with self._submit_lock:
            if self._ended:
                raise EngineStopped(f"engine thread is not running ({self._death or 'shut down'})")
            self._inbox.put(command)
        self._wake.set()

    def _take_inbox(self) -> Iterator[Command]:
        """The commands waiting in the inbox, oldest first, until it is empty."""
        while True:
            try:
                yield self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drain_inbox(self) -> None:
        for command in self._take_inbox():
            match command:
                case AddRequest():
                    self._add(command)
                case AbortRequest(request_id=rid):
                    try:
                        self.engine.abort_request(rid)
                    except Exception:  # noqa: BLE001 - a failed abort must not end the engine thread
                        log.exception("abort of request %s failed", rid)
                case EngineCall(fn=fn, loop=loop, future=fut):  # block import/export, stats
                    try:
                        _resolve(loop, fut, result=fn(self.engine))
                    except Exception as exc:  # noqa: BLE001 - handed to the caller
                        _resolve(loop, fut, error=exc)

    def _add(self, command: AddRequest) -> None:
        """Install the prefetched blocks (as many as fit), then queue the request."""
        request, fetched = command.request, command.fetched
        imported = 0
        if fetched is not None:
            try:
                installed = self.engine.import_blocks(fetched.hashes, fetched.blocks)  # may be cut short
                imported = installed * self.engine.block_manager.block_size
            except Exception:  # noqa: BLE001 - an import that fails is a miss: the prompt is prefilled
                log.exception("KV block import failed")
        try:
            self.engine.add_request(request.request_id, request.prompt_token_ids, request.params,
                                    imported_tokens=imported, hash_root=command.hash_root)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone
            self._deliver(request.request_id, exc)

    async def call(self, fn, timeout_s: float | None = None):
        """Run `fn(engine)` on the engine thread between steps and return its result. `timeout_s`: raise
        TimeoutError if the engine thread has not run it by then (a step that takes that long)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._submit(EngineCall(fn, loop, fut))
        if timeout_s is None:
            return await fut
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the engine thread did not get to the call within {timeout_s:g}s "
                               f"(a step running that long)") from None

    def _run(self) -> None:
        _name_os_thread("specserve-engine")
        try:
            self.engine = self._build_engine()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
            self._build_error = exc
            return
        finally:
            self._ready.set()
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - reported by health_problem; callers are told below
            log.exception("engine thread ended")
            self._death = f"{type(exc).__name__}: {exc}"
        finally:
            if not self._stopped:
                self._death = self._death or "ended"
            self._fail_everything_waiting(EngineStopped(f"engine thread is not running ({self._death or 'shut down'})"))

    def _serve(self) -> None:
        while not self._stopped:
            self.health.busy()
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self.health.idle()
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            self.health.step_started()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the replica
                log.exception("engine step failed")
                self.health.step_failed(exc)
                for rid in list(self.engine.seqs):
                    try:
                        self.engine.abort_request(rid)
                    except Exception:  # noqa: BLE001 - the request is told either way
                        log.exception("abort of request %s failed", rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
                continue
            self.health.step_succeeded()
            self._deliver_many(self._with_progress(outputs))

    def _with_progress(self, outputs: list[RequestOutput]) -> list[tuple[str, RequestOutput | Progress]]:
        """A step's outputs and, every `progress_every_s` if the engine ran a batch since the last report, a
        Progress for each open stream that has no output in this step (delivered with the outputs, in the same
        callback). A step that scheduled nothing is no progress: a request that can never be scheduled stalls."""
        items: list[tuple[str, RequestOutput | Progress]] = [(out.request_id, out) for out in outputs]
        if self.progress_every_s is None:
            return items
        steps = self.engine.stats.steps - self._reported_steps
        now = time.monotonic()
        if steps and now - self._last_progress >= self.progress_every_s:
            self._reported_steps, self._last_progress = self.engine.stats.steps, now
            progress, stepped = Progress(steps), {out.request_id for out in outputs}
            items += [(request_id, progress) for request_id in list(self._streams) if request_id not in stepped]
        return items

    def _fail_everything_waiting(self, exc: BaseException) -> None:
        """The engine thread is ending: every stream and call still waiting gets `exc` rather than a hang."""
        with self._submit_lock:
            self._ended = True
        for rid in list(self._streams):
            self._deliver(rid, exc)  # the streams of queued adds among them
        for command in self._take_inbox():
            if isinstance(command, EngineCall):
                _resolve(command.loop, command.future, error=exc)
