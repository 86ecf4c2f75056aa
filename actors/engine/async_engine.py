"""Runs an LLMEngine in its own thread so the replica's event loop stays free for requests and streaming.

Requests and aborts reach the engine thread through an inbox; outputs go back to each request's asyncio
queue. A consumer that falls behind gets its pending tokens merged into one chunk (fewer messages under load).

All torch work (loading the model, every forward) happens on the engine thread: with OpenMP, matmuls issued
from a second thread after another thread has used torch's thread pool ran 2-3x slower here (measured:
a 576x1536 linear at 63 us from one thread, 195-450 us from a second thread).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from specserve.actors.engine.engine import LLMEngine, RequestOutput, RequestRejected
from specserve.actors.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, build_engine: Callable[[], LLMEngine], ready_timeout: float | None = None):
        """Starts the engine thread, builds the engine there with `build_engine()`, and returns once it is
        ready; an exception raised while building is raised here."""
        self.engine: LLMEngine | None = None
        # Optional `prefetch(prompt_token_ids, hash_root) -> Fetched | None`: blocks of the prompt that the engine
        # lacks, from the KV store. Runs on an I/O thread before the request reaches the engine thread.
        self.prefetch: Callable | None = None
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="specserve-kv-fetch")
        self._build_engine = build_engine
        self._build_error: BaseException | None = None
        self._ready = threading.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
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

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       hash_root: bytes | None = None) -> AsyncIterator[RequestOutput]:
        """`hash_root`: the root of the request's tenant's block hashes (None: the engine's namespace)."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        if request_id in self._streams:
            raise RequestRejected(f"duplicate request id {request_id!r}")
        self._streams[request_id] = (loop, q)
        finished = False
        try:
            fetched = None
            if self.prefetch is not None:
                fetched = await loop.run_in_executor(self._io, self.prefetch, prompt_token_ids, hash_root)
            self._inbox.put(("add", request_id, prompt_token_ids, params, fetched, hash_root))
            self._wake.set()
            while not finished:
                item = await q.get()
                items = [item]
                while not q.empty():
                    items.append(q.get_nowait())
                for it in items:
                    if isinstance(it, BaseException):
                        finished = True
                        raise it
                merged = items[-1]
                if len(items) > 1:
                    merged.new_token_ids = [t for it in items for t in it.new_token_ids]
                finished = merged.finished
                yield merged
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # the client went away: free the sequence's blocks
                self._inbox.put(("abort", request_id))
                self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's event loop is closed: nobody is listening
                self._streams.pop(request_id, None)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, prompt, params, fetched, hash_root = msg
                imported = 0
                if fetched is not None:
                    try:
                        self.engine.import_blocks(fetched.hashes, fetched.blocks)
                        imported = len(fetched.hashes) * self.engine.block_manager.block_size
                    except Exception:  # noqa: BLE001 - an import that fails is a miss: the prompt is prefilled
                        log.exception("KV block import failed")
                try:
                    self.engine.add_request(rid, prompt, params, imported_tokens=imported, hash_root=hash_root)
                except Exception as exc:  # noqa: BLE001 - a bad request fails alone
                    self._deliver(rid, exc)
            elif msg[0] == "abort":
                self.engine.abort_request(msg[1])
            elif msg[0] == "call":  # run a function on the engine thread (block import/export, stats)
                _, fn, loop, fut = msg
                try:
                    result = fn(self.engine)
                    done = lambda r=result: fut.done() or fut.set_result(r)  # noqa: E731
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    done = lambda e=exc: fut.done() or fut.set_exception(e)  # noqa: E731
                try:
                    loop.call_soon_threadsafe(done)
                except RuntimeError:  # caller's loop closed
                    pass

    async def call(self, fn):
        """Run `fn(engine)` on the engine thread between steps and return its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.put(("call", fn, loop, fut))
        self._wake.set()
        return await fut

    def _run(self) -> None:
        try:
            self.engine = self._build_engine()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
            self._build_error = exc
            return
        finally:
            self._ready.set()
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its requests, not the replica
                log.exception("engine step failed")
                for rid in list(self.engine.seqs):
                    self.engine.abort_request(rid)
                    self._deliver(rid, RuntimeError(f"engine step failed: {exc}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
