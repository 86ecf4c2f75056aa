"""The request path both front ends share (HTTP routing/openai_api.py, gRPC routing/grpc_api.py): check the cheap
bounds, admit, template and tokenize once (off the event loop, routing/prompts.py), route, stream from a verifier,
measure. Protocol code only authenticates, parses and formats.

Token ids travel from here on. Text comes back through the incremental detokenizer, which also applies stop
strings (a stop string ends the stream, and the verifier frees the sequence when the stream is closed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import replace
from typing import NamedTuple

from transformers import AutoConfig, AutoTokenizer

from specserve.actors.engine.engine import context_window
from specserve.actors.engine.model_runner import kv_geometry
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.model_loader import resolve_model_path
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.namespace import kv_namespace, tenant_namespace
from specserve.cluster.latency import LatencyStat
from specserve.cluster.metrics import FrontendMetrics
from specserve.routing.auth import ApiKeys, TenantLimiter, api_key, resolve_tenant
from specserve.actors.engine.block_hash import block_hashes
from specserve.routing.detokenizer import IncrementalDetokenizer
from specserve.routing.errors import APIError, api_error_of, invalid
from specserve.routing.prompts import Prompt, PromptRenderer
from specserve.routing.readiness import Readiness
from specserve.routing.routing_metrics import RoutingOutcomes, take_decision

log = logging.getLogger(__name__)
# How early a cancel may come and still count as the deadline (gRPC's clock and ours read the same timeout).
_DEADLINE_SLACK_S = 0.05


class Event(NamedTuple):
    """One verifier chunk as a client sees it."""
    text: str  # text delta
    token_ids: list[int]  # new token ids (cut at a stop string)
    finish_reason: str | None
    usage: dict  # OpenAI-style usage so far (see _usage)


class Frontend:
    def __init__(self, config: SpecserveConfig, verifier):
        self.config = config
        self.verifier = verifier
        server = config.server
        path = resolve_model_path(config.model.source, config.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the event loop's: incremental detokenizing only
        hf_config = AutoConfig.from_pretrained(path)
        self.max_model_len = context_window(hf_config, config.engine.max_model_len)
        # Ids the tokenizer knows and the model has embedding rows for (either may have more).
        self.vocab_size = min(len(self.tokenizer), getattr(hf_config, "vocab_size", None) or len(self.tokenizer))
        # Prefix-aware routing needs the prompt's block hashes, computed once here with the verifiers' namespace.
        self.kv_namespace = (kv_namespace(config, path, kv_geometry(hf_config)).id
                             if config.router.policy == "prefix_cost" else None)
        limit = server.max_prompt_tokens or self.max_model_len
        self.max_prompt_tokens = min(limit, self.max_model_len - 1)
        self.prompts = PromptRenderer(self.tokenizer, vocab_size=self.vocab_size,
                                      max_prompt_tokens=self.max_prompt_tokens, max_messages=server.max_messages,
                                      threads=server.tokenizer_threads, max_pending=server.max_pending_prompts)
        self.model_name = config.model.name
        self.created = int(time.time())
        self.keys = ApiKeys(config.auth)
        self.limiter = TenantLimiter(config.auth.tenant_limits, config.auth.tenants)
        self.metrics = FrontendMetrics(self.model_name)
        self.routing = RoutingOutcomes()
        self.hash_latency = LatencyStat(keep=4096)
        self.readiness = Readiness()  # a verifier answers (kept current by the readiness task)
        self.ready_listeners: list[Callable[[bool], Awaitable[None]]] = []  # told of every change
        self.draining = False
        self.in_flight = 0
        self.last_output = 0.0  # monotonic time a verifier last streamed to this ingress
        self._readiness: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the readiness task (call on the replica's event loop)."""
        self._readiness = asyncio.get_running_loop().create_task(self._watch_readiness())

    async def close(self) -> None:
        if self._readiness is not None:
            self._readiness.cancel()
        self.prompts.close()

    async def check_ready(self) -> bool:
        """Whether a verifier answered lately. Never waits on a verifier: health checks must stay fast under any
        load, so the probing is the readiness task's."""
        return self.readiness.ready

    async def _probe(self, timeout_s: float) -> bool:
        """Does a verifier answer? A full queue (back-pressure) or a slow answer while outputs are streaming
        still means alive: only a replica that is gone or silent makes an ingress unready."""
        from ray.serve.exceptions import BackPressureError

        try:
            await asyncio.wait_for(self.verifier.ping.remote(), timeout_s)
            return True
        except BackPressureError:
            return True
        except asyncio.TimeoutError:
            return self.in_flight > 0 and time.monotonic() - self.last_output < timeout_s
        except Exception:  # noqa: BLE001 - loading, dead or unreachable replicas: not ready
            return False

    async def _watch_readiness(self) -> None:
        period = self.config.server.readiness_period_s
        while True:
            answered = await self._probe(timeout_s=max(2.0, period))
            if self.readiness.observe(answered):
                ready = self.readiness.ready
                log.log(logging.INFO if ready else logging.WARNING, "ingress %s", "ready: a verifier answers" if
                        ready else f"not ready: no verifier answered {self.readiness.failures} probes in a row")
                for listener in self.ready_listeners:
                    await listener(ready)
            await asyncio.sleep(period if self.readiness.ready else 0.5)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests and wait up to timeout_s for in-flight ones; returns how many are left."""
        self.draining = True
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight

    # ---- input -------------------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model: '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def check_stop_token_ids(self, ids, param: str) -> None:
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise invalid(param, f"token ids must be in [0, {self.vocab_size})")

    async def tokenize(self, prompt: Prompt, tenant: str, protocol: str) -> list[int]:
        """A prompt's token ids under the tenant's admission (the Tokenize RPC)."""
        try:
            self.prompts.check(prompt)
            with self.limiter.admit(tenant):
                return await self.prompts.render(prompt)
        except Exception as exc:
            raise self.record_error(exc, protocol) from exc

    def limits(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str = "prompt") -> int | None:
        """The request's max_tokens after the size limits (None: the engine fills the window)."""
        n = len(prompt_ids)
        self.prompts.check_length(n, prompt_param)
        cap = self.config.server.max_tokens
        if max_tokens is None:
            return min(cap, self.max_model_len - n) if cap else None
        if cap and max_tokens > cap:
            raise invalid("max_tokens", f"{max_tokens} is more than this server's limit of {cap}")
        if max_tokens > self.max_model_len - n:
            raise invalid("max_tokens", f"{max_tokens} + prompt {n} tokens exceeds the context window of "
                                        f"{self.max_model_len} tokens", code="context_length_exceeded")
        return max_tokens

    def speculation(self, enabled: bool | None, draft_method: str | None, param: str = "speculation") -> bool:
        method = self.config.speculative.method
        if draft_method and draft_method != method:
            available = "none (speculation is off)" if method == "none" else f"'{method}'"
            raise invalid(f"{param}.draft_method", f"'{draft_method}' is not served here; available: {available}")
        return enabled is not False

    def tenant(self, credentials: Mapping[str, str], requested: str | None) -> str:
        """The tenant of a request from its HTTP headers / gRPC metadata (lower-case names) and the tenant it
        names (401 without a valid key when keys are on, 403 for another tenant's name)."""
        return resolve_tenant(self.keys, api_key(credentials), requested, self.config.kv_store.tenant)

    @staticmethod
    def new_request_id(prefix: str) -> str:
        """Internal ids are always ours: client ids are only echoed (two clients may send the same one)."""
        return prefix + uuid.uuid4().hex

    @staticmethod
    def check_client_request_id(given: str) -> str:
        if len(given) > 128 or not given.isprintable():
            raise invalid("request_id", "at most 128 printable characters")
        return given

    def record_error(self, exc: BaseException, protocol: str) -> APIError:
        """The client-facing error of `exc`, counted once (it may pass several handlers on its way out)."""
        err = api_error_of(exc)
        if err.counted:
            return err
        err.counted = True
        self.metrics.error(err.grpc_code.name, protocol)
        if err.status == 429 and err.code:
            self.metrics.rejected(err.code)
        return err

    # ---- generation --------------------------------------------------------------------------------------------
    def _routing_fields(self, prompt_ids: list[int], tenant: str, session: str | None) -> dict:
        """What the prefix_cost router reads: the prompt's block hashes (computed once, here, with the
        verifiers' namespace for this tenant), the key to hash when nothing matches, the session key if any."""
        if self.kv_namespace is None:
            return {}
        t0 = time.perf_counter()
        bs = self.config.engine.block_size
        usable = (len(prompt_ids) - 1) // bs * bs  # the blocks a replica's cache could hold for it
        ns = tenant_namespace(self.kv_namespace, tenant, self.config.kv_store.tenant)
        hashes = block_hashes(prompt_ids[:usable], bs, namespace=ns)
        fields = {"block_hashes": hashes, "route_key": hashes[0] if usable else bytes(str(prompt_ids[:bs]), "ascii")}
        if session:
            fields["session_key"] = session
        self.hash_latency.add(time.perf_counter() - t0)
        return fields

    def deadline(self, client_timeout_s: float | None) -> float | None:
        """Monotonic deadline from the client's timeout and server.request_timeout_s (the shorter)."""
        limits = [t for t in (client_timeout_s, self.config.server.request_timeout_s or None) if t is not None]
        return time.monotonic() + min(limits) if limits else None

    async def generate(self, request_id: str, prompt: Prompt, params: SamplingParams, tenant: str,
                       protocol: str, session: str | None = None, deadline: float | None = None,
                       arrival: float | None = None) -> AsyncIterator[Event]:
        """Events of one generation; `params.max_tokens` is the client's (None: unset) until the prompt is
        tokenized. The prompt's cheap bounds are checked first, then the tenant is admitted, and only then is the
        prompt templated and tokenized (in the renderer's threads). Closing the generator cancels the verifier
        stream, which frees the sequence. Errors are APIErrors (see routing/errors.py) and are counted by code."""
        arrival = time.monotonic() if arrival is None else arrival
        finished = False
        try:
            if self.draining:
                raise APIError(503, "server is draining: retry on another replica", code="draining",
                               retry_after_s=1.0)
            self.prompts.check(prompt)
            with self.limiter.admit(tenant):
                self.in_flight += 1
                self.metrics.in_flight.inc()
                try:
                    prompt_ids = await self.prompts.render(prompt)
                    params = replace(params, max_tokens=self.limits(prompt_ids, params.max_tokens, prompt.param))
                    async for ev in self._generate(request_id, prompt_ids, params, tenant, session, deadline,
                                                   arrival):
                        yield ev
                    finished = True
                finally:
                    self.in_flight -= 1
                    self.metrics.in_flight.dec()
        except (GeneratorExit, asyncio.CancelledError):
            if not finished:  # the client went away (the verifier stream is cancelled, the sequence freed)
                # gRPC cancels the handler at the client's deadline, which is ours too: whichever fires first,
                # a request that ran out of time is counted as such.
                late = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S
                self.metrics.error("DEADLINE_EXCEEDED" if late else "CANCELLED", protocol)
            raise
        except Exception as exc:
            raise self.record_error(exc, protocol) from exc

    async def _generate(self, request_id, prompt_ids, params, tenant, session, deadline, arrival):
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        request = {"request_id": request_id, "prompt_token_ids": prompt_ids, "sampling": params.__dict__,
                   "tenant": tenant, **self._routing_fields(prompt_ids, tenant, session)}
        stream = self.verifier.options(stream=True).generate.remote(request)
        m = self.metrics
        prompt_tokens, cached, completion, last = len(prompt_ids), 0, 0, None
        router, decision, ended = None, None, False
        stall_s = self.config.server.stall_timeout_s or None
        try:
            while True:
                wait = stall_s
                if deadline is not None:
                    wait = min(wait or math.inf, max(0.0, deadline - time.monotonic()))
                try:
                    chunk = await asyncio.wait_for(stream.__anext__(), wait)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S:
                        raise APIError(504, f"deadline exceeded after {completion} generated tokens",
                                       code="deadline_exceeded") from None
                    raise APIError(504, f"no output for {stall_s:g} s after {completion} generated tokens: the "
                                        "replica serving the request cannot make progress (server.stall_timeout_s)",
                                   code="stalled") from None
                self.last_output = time.monotonic()
                if decision is None:  # routed by now (prefix_cost keeps its prediction for us)
                    router, decision = take_decision(request_id) or (None, False)
                now = time.monotonic()
                ids = chunk["token_ids"]
                before = len(detok.token_ids)
                delta = detok.push(ids)
                cached = chunk["cached_tokens"]
                completion = chunk["completion_tokens"]
                reason = chunk["finish_reason"]
                if detok.stopped:
                    ids = ids[:detok.num_tokens_at_stop - before]
                    completion = detok.num_tokens_at_stop
                    reason = "stop"
                elif chunk["finished"]:
                    delta += detok.flush()
                if ids:
                    if last is None:
                        m.ttft.observe(now - arrival)
                        m.queue.observe(chunk.get("queue_s", 0.0))
                    else:
                        for _ in ids:
                            m.itl.observe((now - last) / len(ids))
                    last = now
                ended = detok.stopped or chunk["finished"]
                yield Event(delta, ids, reason, self._usage(chunk, prompt_tokens, completion, cached, decision))
                if ended:
                    m.e2e.observe(time.monotonic() - arrival)
                    m.prompt_tokens.inc(prompt_tokens)
                    m.generation_tokens.inc(completion)
                    m.success(reason)
                    return
        finally:
            stream.cancel()
            if ended:
                self.routing.record(prompt_tokens, cached, decision.predicted_cached_tokens if decision else None,
                                    decision.reason if decision else None)
                if decision:
                    m.routed(decision.reason, decision.predicted_cached_tokens, cached)
                if decision and decision.predicted_imported_tokens:  # teaches the router how far to trust the store
                    local = decision.predicted_cached_tokens - decision.predicted_imported_tokens
                    router.policy.observe_import(decision.predicted_imported_tokens, max(0, cached - local))

    @staticmethod
    def _usage(chunk: dict, prompt_tokens: int, completion: int, cached: int, decision) -> dict:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion,
                 "prompt_tokens_details": {"cached_tokens": cached},
                 # OpenAI's predicted-output counters mean the same for drafts: drafted tokens the target
                 # accepted / rejected. `speculation` adds the rounds (mean accepted length).
                 "completion_tokens_details": {
                     "accepted_prediction_tokens": chunk["accepted_tokens"],
                     "rejected_prediction_tokens": chunk["draft_tokens"] - chunk["accepted_tokens"]},
                 "speculation": {"rounds": chunk["spec_rounds"], "draft_tokens": chunk["draft_tokens"],
                                 "accepted_tokens": chunk["accepted_tokens"]},
                 # of the cached prompt tokens, those whose KV blocks came from the cluster's KV store
                 "kv_store": {"imported_tokens": chunk["imported_tokens"]}}
        if decision:
            usage["routing"] = {"reason": decision.reason,
                                "predicted_cached_tokens": decision.predicted_cached_tokens,
                                "predicted_imported_tokens": decision.predicted_imported_tokens}
        return usage
