"""The request path both front ends share (HTTP routing/openai_api.py, gRPC routing/grpc_api.py): check what
both protocols share (prepare: RequestFields -> PreparedRequest, routing/request.py), check the prompt's cheap
bounds, admit, template and tokenize once (off the event loop, routing/prompts.py), route, stream from a
verifier, measure. Protocol code only authenticates, parses and formats.

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
from specserve.actors.engine.messages import (GenerateRequest, Progress, RequestOutput, RoutingHints, RoutingUsage,
                                              ServedModel, TokenLogprobs, Usage)
from specserve.actors.engine.model_runner import kv_geometry
from specserve.actors.engine.sampling_params import SamplingParams
from specserve.actors.model_loader import resolve_model_path
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.namespace import kv_namespace, tenant_namespace
from specserve.cluster.latency import LatencyStat
from specserve.cluster.metrics import FrontendMetrics
from specserve.routing.auth import ApiKeys, TenantLimiter, api_key, resolve_tenant
from specserve.actors.engine.block_hash import block_hashes
from specserve.routing.detokenizer import IncrementalDetokenizer, TokenTexts
from specserve.routing.errors import APIError, api_error_of, invalid
from specserve.routing.prompts import Prompt, PromptRenderer
from specserve.routing.request import PreparedRequest, RequestFields, ToolChoice
from specserve.routing.tools import ToolCall, ToolCallParser, ToolFunction, tool_grammar
from specserve.routing.readiness import Readiness
from specserve.routing.feedback import Placement, RouteOutcome, router_feedback

log = logging.getLogger(__name__)
# How early a cancel may come and still count as the deadline (gRPC's clock and ours read the same timeout).
_DEADLINE_SLACK_S = 0.05


class Event(NamedTuple):
    """One verifier chunk of one choice, as a client sees it."""
    text: str  # text delta
    token_ids: list[int]  # new token ids (cut at a stop string)
    finish_reason: str | None  # "stop" | "length" | "tool_calls" when this choice ended
    usage: Usage  # so far, all choices together (see _usage); each protocol renders it
    index: int = 0  # the choice (of the request's n)
    logprobs: list[TokenLogprobs] | None = None  # one per token of `token_ids`, when asked
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, on choice 0's first event, when asked (echo)
    tool_calls: list[ToolCall] | None = None  # on the choice's last event, when it called tools
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the tokens they are of


class Frontend:
    def __init__(self, config: SpecserveConfig, verifier):
        self.config = config
        self.verifier = verifier
        server = config.server
        path = resolve_model_path(config.model.source, config.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)  # the event loop's: incremental detokenizing only
        self.token_texts = TokenTexts(self.tokenizer)  # the tokens that logprobs name
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
        self.router_feedback = router_feedback()  # decisions of this process's routers in, outcomes out
        self.hash_latency = LatencyStat(keep=4096)
        self.readiness = Readiness()  # a verifier answers (kept current by the readiness task)
        self.ready_listeners: list[Callable[[], Awaitable[None]]] = []  # told of every change (read readiness)
        self.draining = False
        self.in_flight = 0
        self.last_output = 0.0  # monotonic time a verifier last streamed to this ingress
        self.served_model: ServedModel | None = None  # a verifier's last answer to the readiness probe
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

    async def served(self) -> ServedModel | None:
        """What the verifiers run (dtype, device), asking one if no readiness probe has answered yet."""
        if self.served_model is None:
            await self._probe(timeout_s=2.0)
        return self.served_model

    async def _probe(self, timeout_s: float) -> bool:
        """Does a verifier answer? A full queue (back-pressure) or a slow answer while outputs are streaming
        still means alive: only a replica that is gone or silent makes an ingress unready."""
        from ray.serve.exceptions import BackPressureError

        try:
            self.served_model = await asyncio.wait_for(self.verifier.ping.remote(), timeout_s)
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
            if self.readiness.observe(answered=answered):
                ready = self.readiness.ready
                log.log(logging.INFO if ready else logging.WARNING, "ingress %s", "ready: a verifier answers" if
                        ready else f"not ready: no verifier answered {self.readiness.failures} probes in a row")
                for listener in self.ready_listeners:
                    await listener()
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

    def tenant(self, credentials: Mapping[str, str], requested: str | None) -> str:
        """The tenant of a request from its HTTP headers / gRPC metadata (lower-case names) and the tenant it
        names (401 without a valid key when keys are on, 403 for another tenant's name)."""
        return resolve_tenant(self.keys, api_key(credentials), requested, self.config.kv_store.tenant)

    def prepare(self, fields: RequestFields, *, tenant: str, arrival: float) -> PreparedRequest:
        """The checks both protocols share, on a request its front end authenticated (`tenant`) and parsed:
        the model, the stop token ids against the vocabulary, the draft method, the client's request id. Errors
        are APIErrors naming the field as the protocol spells it (`fields.names`). The prompt is checked and
        tokenized by generate, once the tenant is admitted."""
        names = fields.names
        self.check_model(fields.model)
        if any(t < 0 or t >= self.vocab_size for t in fields.sampling.stop_token_ids):
            raise invalid(names.stop_token_ids, f"token ids must be in [0, {self.vocab_size})")
        method = self.config.speculative.method
        if fields.draft_method and fields.draft_method != method:
            available = "none (speculation is off)" if method == "none" else f"'{method}'"
            raise invalid(names.draft_method, f"'{fields.draft_method}' is not served here; available: {available}")
        client_id = fields.client_request_id
        if len(client_id) > 128 or not client_id.isprintable():
            raise invalid(names.request_id, "at most 128 printable characters")
        params = replace(fields.sampling, speculate=fields.speculate is not False)
        if any(t < 0 or t >= self.vocab_size for t in params.logit_bias):
            raise invalid(names.logit_bias, f"token ids must be in [0, {self.vocab_size})")
        params = self._constrain(params, fields)
        # Our ids are always ours: a client's is only echoed (two clients may send the same one).
        return PreparedRequest(request_id=fields.id_prefix + uuid.uuid4().hex, client_request_id=client_id,
                               protocol=fields.protocol, tenant=tenant, prompt=fields.prompt, params=params,
                               session=fields.session, deadline=self._deadline(fields.timeout_s), arrival=arrival,
                               tool_choice=fields.tool_choice)

    @staticmethod
    def _constrain(params: SamplingParams, fields: RequestFields) -> SamplingParams:
        """The request's structured output, checked (400 naming the field that asked), and for tool_choice
        "required" or a named function the grammar that forces the calls."""
        choice, names = fields.tool_choice, fields.names
        tools = fields.prompt.tools
        if choice.mode != "none" and not tools:
            raise invalid(names.tool_choice, "requires tools")
        if choice.forced:
            if params.structured is not None:
                raise invalid(names.structured, "cannot be combined with a forced tool_choice",
                              code="unsupported_option")
            if choice.mode == "function" and choice.name not in {t.name for t in tools}:
                raise invalid(names.tool_choice, f"function '{choice.name}' is not among the tools")
            openai_choice = ("required" if choice.mode == "required" else
                             {"type": "function", "function": {"name": choice.name}})
            return replace(params, structured=tool_grammar(tools, openai_choice, parallel=choice.parallel))
        if params.structured is not None:
            from specserve.actors.engine.structured import check_structured

            try:
                check_structured(params.structured)
            except ValueError as exc:
                raise invalid(names.structured, str(exc)) from None
        return params

    def _deadline(self, client_timeout_s: float | None) -> float | None:
        """Monotonic deadline from the client's timeout and server.request_timeout_s (the shorter)."""
        limits = [t for t in (client_timeout_s, self.config.server.request_timeout_s or None) if t is not None]
        return time.monotonic() + min(limits) if limits else None

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
    def _routing_hints(self, prompt_ids: list[int], tenant: str, session: str | None) -> RoutingHints | None:
        """What the prefix_cost router reads: the prompt's block hashes (computed once, here, with the
        verifiers' namespace for this tenant), the key to hash when nothing matches, the session key if any.
        None under another router policy."""
        if self.kv_namespace is None:
            return None
        t0 = time.perf_counter()
        bs = self.config.engine.block_size
        usable = (len(prompt_ids) - 1) // bs * bs  # the blocks a replica's cache could hold for it
        ns = tenant_namespace(self.kv_namespace, tenant, self.config.kv_store.tenant)
        hashes = block_hashes(prompt_ids[:usable], bs, namespace=ns)
        hints = RoutingHints(block_hashes=hashes,
                             route_key=hashes[0] if usable else bytes(str(prompt_ids[:bs]), "ascii"),
                             session_key=session or None)
        self.hash_latency.add(time.perf_counter() - t0)
        return hints

    async def generate(self, request: PreparedRequest) -> AsyncIterator[Event]:
        """Events of one request (see prepare). The prompt's cheap bounds are checked first, then the tenant is
        admitted, and only then is the prompt templated and tokenized (in the renderer's threads). Closing the
        generator cancels the verifier stream, which frees the sequence. Errors are APIErrors (see
        routing/errors.py) and are counted by code."""
        prompt, deadline, protocol = request.prompt, request.deadline, request.protocol
        finished = False
        try:
            if self.draining:
                raise APIError(503, "server is draining: retry on another replica", code="draining",
                               retry_after_s=1.0)
            self.prompts.check(prompt)
            with self.limiter.admit(request.tenant):
                self.in_flight += 1
                self.metrics.in_flight.inc()
                try:
                    prompt_ids = await self.prompts.render(prompt)
                    max_tokens = self.limits(prompt_ids, request.params.max_tokens, prompt.param)
                    params = replace(request.params, max_tokens=max_tokens)
                    async for ev in self._generate(request.request_id, prompt_ids, params, request.tenant,
                                                   request.session, deadline, request.arrival, request.tool_choice,
                                                   prompt.tools):
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

    async def _generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, tenant: str,
                        session: str | None, deadline: float | None, arrival: float, tool_choice: ToolChoice,
                        tools: tuple[ToolFunction, ...]) -> AsyncIterator[Event]:
        # The output may hold tool calls unless tool_choice is "none" (a forced choice's grammar makes the model
        # write them in the format the parser reads).
        choices = [_Choice(IncrementalDetokenizer(self.tokenizer, params.stop),
                           None if tool_choice.mode == "none" else ToolCallParser(tools))
                   for _ in range(params.n)]
        request = GenerateRequest(request_id=request_id, prompt_token_ids=prompt_ids, params=params, tenant=tenant,
                                  routing=self._routing_hints(prompt_ids, tenant, session))
        stream = self.verifier.options(stream=True).generate.remote(request)
        m = self.metrics
        prompt_tokens, cached, last = len(prompt_ids), 0, None
        placement: Placement | None = None
        first_item, ended, running = True, False, params.n
        stall_s = self.config.server.stall_timeout_s or None
        try:
            while True:
                wait = stall_s
                if deadline is not None:
                    wait = min(wait or math.inf, max(0.0, deadline - time.monotonic()))
                try:
                    out: RequestOutput | Progress = await asyncio.wait_for(stream.__anext__(), wait)
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    completion = sum(c.completion for c in choices)
                    if deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S:
                        raise APIError(504, f"deadline exceeded after {completion} generated tokens",
                                       code="deadline_exceeded") from None
                    waiting = "in the queue for a replica or " if first_item else ""
                    raise APIError(504, f"no output for {stall_s:g} s after {completion} generated tokens, and no "
                                        f"engine step reported: the request is stuck {waiting}on a replica that "
                                        "cannot make progress (server.stall_timeout_s)", code="stalled") from None
                self.last_output = time.monotonic()
                if first_item:  # routed by now: a prefix_cost router has published its decision
                    placement, first_item = self.router_feedback.take(request_id), False
                if isinstance(out, Progress):  # waiting behind other requests in its replica: busy, not stalled
                    continue
                choice = choices[out.index]
                if choice.ended:  # a choice cut by a stop string while the others run on
                    continue
                now = time.monotonic()
                ids, logprobs = out.new_token_ids, out.logprobs
                detok = choice.detok
                before = len(detok.token_ids)
                delta = detok.push(ids)
                cached = max(cached, out.num_cached_tokens)
                reason = out.finish_reason
                if detok.stopped:
                    ids = ids[:detok.num_tokens_at_stop - before]
                    logprobs = logprobs[:len(ids)] if logprobs is not None else None
                    choice.completion = detok.num_tokens_at_stop
                    reason = "stop"
                else:
                    choice.completion = out.num_output_tokens
                    if out.finished:
                        delta += detok.flush()
                choice.out = out
                choice.ended = detok.stopped or out.finished
                calls = None
                if choice.tools is not None:
                    delta = choice.tools.feed(delta)
                    if choice.ended:
                        rest, calls = choice.tools.finish()
                        delta += rest
                        if calls:
                            reason = "tool_calls"
                        calls = (calls if tool_choice.parallel else calls[:1]) or None
                if ids:
                    if last is None:
                        m.ttft.observe(now - arrival)
                        m.queue.observe(out.queue_time_s)
                    else:
                        for _ in ids:
                            m.itl.observe((now - last) / len(ids))
                    last = now
                if choice.ended:
                    running -= 1
                    choice.reason = reason
                ended = running == 0
                usage = self._usage(choices, prompt_tokens, cached, placement)
                yield Event(delta, ids, reason, usage, out.index, logprobs, out.prompt_logprobs, calls,
                            prompt_ids if out.prompt_logprobs is not None else None)
                if ended:
                    m.e2e.observe(time.monotonic() - arrival)
                    m.prompt_tokens.inc(prompt_tokens)
                    m.generation_tokens.inc(usage.completion_tokens)
                    m.success(choices[0].reason)
                    return
        finally:
            stream.cancel()
            if ended:
                self.router_feedback.report(RouteOutcome(prompt_tokens=prompt_tokens, cached_tokens=cached,
                                                         placement=placement))
                if placement is not None:
                    decision = placement.decision
                    m.routed(decision.reason, decision.predicted_cached_tokens, cached)

    @staticmethod
    def _usage(choices: list[_Choice], prompt_tokens: int, cached: int, placement: Placement | None) -> Usage:
        """The usage an event reports, all choices together (as OpenAI counts them): completion tokens as the
        front end counts them (a stop string cuts a choice short), the speculation and KV store counters as the
        engine reported them."""
        decision = placement.decision if placement is not None else None
        routing = None if decision is None else RoutingUsage(
            reason=decision.reason, predicted_cached_tokens=decision.predicted_cached_tokens,
            predicted_imported_tokens=decision.predicted_imported_tokens)
        outs = [c.out for c in choices if c.out is not None]
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=sum(c.completion for c in choices),
                     cached_tokens=cached, imported_tokens=max(o.num_imported_tokens for o in outs),
                     spec_rounds=sum(o.num_spec_rounds for o in outs),
                     draft_tokens=sum(o.num_draft_tokens for o in outs),
                     accepted_tokens=sum(o.num_accepted_tokens for o in outs), routing=routing)


class _Choice:
    """One choice's state on its way out: its detokenizer (stop strings), its tool-call parser (None: the output
    is plain text), its latest engine output and completion tokens."""
    __slots__ = ("detok", "tools", "out", "completion", "ended", "reason")

    def __init__(self, detok: IncrementalDetokenizer, tools):
        self.detok, self.tools = detok, tools
        self.out: RequestOutput | None = None
        self.completion = 0
        self.ended = False
        self.reason: str | None = None
