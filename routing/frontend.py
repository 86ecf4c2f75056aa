"""The request path both front ends share (HTTP routing/openai_api.py, gRPC routing/grpc_api.py): tokenize once,
check limits, authenticate, admit, route, stream from a verifier, measure. Protocol code only parses and formats.

Token ids travel from here on. Text comes back through the incremental detokenizer, which also applies stop
strings (a stop string ends the stream, and the verifier frees the sequence when the stream is closed).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple

from jinja2 import TemplateError

from transformers import AutoConfig, AutoTokenizer

from specserve.actors.engine.engine import context_window
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.model_loader import resolve_model_path
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.namespace import kv_namespace, tenant_namespace
from specserve.cluster.latency import LatencyStat
from specserve.cluster.metrics import FrontendMetrics
from specserve.routing.auth import ApiKeys, TenantLimiter, api_key, resolve_tenant
from specserve.routing.block_hash import block_hashes
from specserve.routing.detokenizer import IncrementalDetokenizer
from specserve.routing.errors import APIError, api_error_of, invalid
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
        path = resolve_model_path(config.model.source, config.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path)
        self.max_model_len = context_window(hf_config, config.engine.max_model_len)
        self.vocab_size = len(self.tokenizer)
        # Prefix-aware routing needs the prompt's block hashes, computed once here with the verifiers' namespace.
        self.kv_namespace = (kv_namespace(config, path, hf_config).id
                             if config.router.policy == "prefix_cost" else None)
        limit = config.server.max_prompt_tokens or self.max_model_len
        self.max_prompt_tokens = min(limit, self.max_model_len - 1)
        self.model_name = config.model.name
        self.created = int(time.time())
        self.keys = ApiKeys(config.auth)
        self.limiter = TenantLimiter(config.auth.tenant_limits, config.auth.tenants)
        self.metrics = FrontendMetrics(self.model_name)
        self.routing = RoutingOutcomes()
        self.hash_latency = LatencyStat(keep=4096)
        self.ready = False  # a verifier has answered
        self.draining = False
        self.in_flight = 0

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    async def check_ready(self, timeout_s: float = 2.0) -> bool:
        if not self.ready:
            try:
                await asyncio.wait_for(self.verifier.ping.remote(), timeout_s)
                self.ready = True
            except Exception:  # noqa: BLE001 - not yet: verifiers are loading or gone
                pass
        return self.ready

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

    def chat_prompt(self, messages: list[dict], param: str = "messages") -> list[int]:
        if not messages:
            raise invalid(param, "must hold at least one message")
        roles = ("system", "user", "assistant", "tool", "developer")
        for i, m in enumerate(messages):
            if m["role"] not in roles:
                raise invalid(f"{param}[{i}].role", f"must be one of {', '.join(roles)}")
        if not any(m["content"] for m in messages):
            raise invalid(param, "all message contents are empty")
        self._check_text_size(sum(len(m["content"]) for m in messages), param)
        if getattr(self.tokenizer, "chat_template", None):
            try:
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as exc:  # templates raise on what they refuse (roles out of order, ...)
                raise invalid(param, f"the model's chat template refused them: {exc}") from exc
        else:  # base models without a template: plain role-prefixed lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _check_text_size(self, chars: int, param: str) -> None:
        """Refuse text far beyond any allowed prompt before tokenizing it (that runs on the event loop)."""
        limit = 64 * self.max_prompt_tokens
        if chars > limit:
            raise APIError(400, f"{param}: {chars} characters, more than any prompt of at most "
                                f"{self.max_prompt_tokens} tokens", param=param, code="context_length_exceeded")

    def _check_prompt_length(self, n: int, param: str) -> None:
        if n > self.max_prompt_tokens:
            raise APIError(400, f"{param}: {n} tokens, more than the limit of {self.max_prompt_tokens}",
                           param=param, code="context_length_exceeded")

    def text_prompt(self, text: str, param: str = "prompt") -> list[int]:
        if not text:
            raise invalid(param, "must not be empty")
        self._check_text_size(len(text), param)
        return self.tokenizer(text).input_ids

    def token_prompt(self, ids: list[int], param: str = "prompt") -> list[int]:
        if not ids:
            raise invalid(param, "must not be empty")
        self._check_prompt_length(len(ids), param)  # before looking at each id
        ids = list(ids)
        if any(t < 0 or t >= self.vocab_size for t in ids):
            raise invalid(param, f"token ids must be in [0, {self.vocab_size})")
        return ids

    def limits(self, prompt_ids: list[int], max_tokens: int | None, prompt_param: str = "prompt") -> int | None:
        """The request's max_tokens after the size limits (None: the engine fills the window)."""
        n = len(prompt_ids)
        self._check_prompt_length(n, prompt_param)
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

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tenant: str,
                       protocol: str, session: str | None = None, deadline: float | None = None,
                       arrival: float | None = None) -> AsyncIterator[Event]:
        """Events of one generation. Closing the generator cancels the verifier stream, which frees the
        sequence. Errors are APIErrors (see routing/errors.py) and are counted by code."""
        arrival = time.monotonic() if arrival is None else arrival
        if self.draining:
            raise self.record_error(APIError(503, "server is draining: retry on another replica",
                                             code="draining", retry_after_s=1.0), protocol)
        finished = False
        try:
            with self.limiter.admit(tenant):
                self.in_flight += 1
                self.metrics.in_flight.inc()
                try:
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
        try:
            while True:
                try:
                    if deadline is None:
                        chunk = await stream.__anext__()
                    else:
                        chunk = await asyncio.wait_for(stream.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise APIError(504, f"deadline exceeded after {completion} generated tokens",
                                   code="deadline_exceeded") from None
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
