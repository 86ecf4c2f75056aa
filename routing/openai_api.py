"""OpenAI-compatible HTTP ingress, and the home of the gRPC front end: each ingress replica also runs the gRPC
server (routing/grpc_api.py). Both parse and format only; the request path is routing/frontend.py.
"""

# No `from __future__ import annotations` here: Serve rewrites the route signatures and FastAPI must see real
# classes in them to read request bodies.
import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from specserve.actors.engine.messages import TokenLogprobs, Usage
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.metrics import app_view, render, serve_shard, start_publisher
from specserve.cluster.priority import use_default_priority
from specserve.routing.errors import APIError, api_error_of
from specserve.routing.frontend import Frontend
from specserve.routing.http_guard import RequestGuard, frontend_of
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest, refuse_unserved
from specserve.routing.request import FieldNames, PreparedRequest, RequestFields, ToolChoice
from specserve.routing.tools import ToolCall

log = logging.getLogger(__name__)
app = FastAPI(title="specserve", docs_url=None, redoc_url=None)
TENANT_HEADER = "x-specserve-tenant"
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP counterpart of a gRPC deadline
HTTP_FIELD_NAMES = FieldNames(stop_token_ids="stop_token_ids", draft_method="draft_method")
_frontends: list[Frontend] = []  # this process's ingress (read by the guard, which hands it to the handlers)
app.add_middleware(RequestGuard, frontend=lambda: _frontends[0] if _frontends else None)
# Pydantic names the member of a union that failed ("function-after[...]", "list[TextPart]"): not a field.
_UNION_MEMBER = re.compile(r"[^A-Za-z0-9_]|^(str|int|float|bool|list|dict|none|constrained-str)$")


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


@app.exception_handler(RequestValidationError)
async def _validation_error(raw: Request, exc: RequestValidationError):
    fe = frontend_of(raw.scope)
    if fe is not None:
        fe.metrics.error("INVALID_ARGUMENT", "http")
    err = exc.errors()[0] if exc.errors() else {}
    if err.get("type") == "json_invalid":
        return JSONResponse(APIError(400, "malformed JSON body: " + str(err.get("msg", ""))).body(), 400)
    loc = [str(p) for p in err.get("loc", ()) if isinstance(p, int) or not _UNION_MEMBER.search(str(p))]
    loc = loc[1:] if loc[:1] == ["body"] else loc
    param = ".".join(loc) or None
    text = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    msg = f"{param}: {text}" if param else text
    return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def sse_frames(objs, *, done: bool = False) -> str:
    """Several SSE events as one string: the server sends it as one ASGI body message, which Serve carries to
    its proxy as one item and the proxy writes with one call (each message costs every hop it crosses)."""
    return "".join(map(_sse, objs)) + (SSE_DONE if done else "")


def openai_usage(u: Usage | None) -> dict:
    """A request's usage as OpenAI's `usage` object, with specserve's additions ({} before any output)."""
    if u is None:
        return {}
    usage = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
             "total_tokens": u.total_tokens,
             "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
             # OpenAI's predicted-output counters mean the same for drafts: drafted tokens the target accepted /
             # rejected. `speculation` adds the rounds (mean accepted length).
             "completion_tokens_details": {"accepted_prediction_tokens": u.accepted_tokens,
                                           "rejected_prediction_tokens": u.rejected_tokens},
             "speculation": {"rounds": u.spec_rounds, "draft_tokens": u.draft_tokens,
                             "accepted_tokens": u.accepted_tokens},
             # of the cached prompt tokens, those whose KV blocks came from the cluster's KV store
             "kv_store": {"imported_tokens": u.imported_tokens}}
    if u.routing is not None:
        usage["routing"] = {"reason": u.routing.reason, "predicted_cached_tokens": u.routing.predicted_cached_tokens,
                            "predicted_imported_tokens": u.routing.predicted_imported_tokens}
    return usage


def request_fields(body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str], *,
                   session_header: str) -> RequestFields:
    """A body and its headers as the request path's fields; 400 for the options this server does not serve."""
    prompt = body.as_prompt()
    refuse_unserved(body.model_extra)
    chat = isinstance(body, ChatCompletionRequest)
    sampling = body.sampling_params()
    names = HTTP_FIELD_NAMES
    if sampling.structured is not None:
        names = replace(names, structured=body.structured_output()[1])
    return RequestFields(protocol="http", names=names, id_prefix="chatcmpl-" if chat else "cmpl-",
                         model=body.model, prompt=prompt, sampling=sampling, speculate=body.speculate,
                         draft_method=body.draft_method, timeout_s=_client_timeout(headers),
                         session=headers.get(session_header),
                         tool_choice=body.tool_selection()[1] if chat else ToolChoice())


# ---- rendering (pure: the unit tests call these) ----------------------------------------------------------------
def chat_logprobs(logprobs: list[TokenLogprobs], token_text: Callable[[int], str]) -> list[dict]:
    """Chat `logprobs.content` entries of some tokens: each token's text, logprob, UTF-8 bytes and alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs]


class CompletionLogprobs:
    """Completions `logprobs` ({tokens, token_logprobs, top_logprobs, text_offset}) of one choice, built as its
    tokens arrive: `take` gives what was added since the last take (a streamed chunk's), `offset` runs on."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text = token_text
        self.offset = 0  # characters of the choice's text before the next token
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        """One token; `logprobs` None for the prompt's first token (nothing precedes it)."""
        text = self.token_text(token_id)
        self.tokens.append(text)
        self.token_logprobs.append(None if logprobs is None else logprobs.logprob)
        self.top_logprobs.append(None if logprobs is None else {self.token_text(t): v for t, v in logprobs.top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def add_all(self, token_ids: list[int], logprobs: list[TokenLogprobs | None]) -> None:
        for token_id, lp in zip(token_ids, logprobs, strict=True):
            self.add(token_id, lp)

    def take(self) -> dict:
        out = {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
               "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out


def tool_calls_json(calls: list[ToolCall], *, streamed: bool = False) -> list[dict]:
    """OpenAI `tool_calls`: of a message, or (streamed) of a delta, where each call carries its index."""
    return [{**({"index": i} if streamed else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for i, c in enumerate(calls)]


class _ChoiceText:
    """One choice of a non-streamed response, gathered from its events."""

    def __init__(self, index: int):
        self.index = index
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprobs] = []
        self.reason: str | None = None
        self.tool_calls: list[ToolCall] = []


def _client_timeout(headers: Mapping[str, str]) -> float | None:
    value = headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        t = float(value)
    except ValueError:
        t = float("nan")
    if not 0 < t < 1e9:
        raise APIError(400, f"{TIMEOUT_HEADER}: must be a positive number of seconds", param=TIMEOUT_HEADER)
    return t


@serve.ingress(app)  # at definition: replicas import this module and must get the routed class
class OpenAIIngress:
    def __init__(self, config: dict, verifier):
        self.config = SpecserveConfig.model_validate(config)
        use_default_priority()
        self.fe = Frontend(self.config, verifier)
        _frontends[:] = [self.fe]
        self.model_name = self.fe.model_name
        self.grpc = None
        server = self.config.server
        if server.grpc_port:
            from specserve.routing.grpc_api import GrpcServer

            self.grpc = GrpcServer(self.fe, server)
            self.grpc.start()  # __init__ runs on the replica's event loop
        self.fe.start()
        self.metrics = start_publisher(self.config, "Ingress", self.fe.metrics.families)
        self._redis = self.metrics.redis if self.metrics else None
        self._metrics_max_age = 3 * server.metrics_period_s + 5  # entries older are of replicas gone
        self.metrics_server = None
        if server.metrics_port:  # one ingress per node (the gRPC port), so one per pod: scraped pod by pod
            self.metrics_server = serve_shard(server.host, server.metrics_port, self._own_metrics, self._redis,
                                              server.app_name, self._metrics_max_age)

    # ---- operations ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        """200 while a verifier answers; 503 while loading, draining or once no verifier answers (a readiness
        probe). Answered from the state the readiness task keeps: never waits on a verifier."""
        if self.fe.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not await self.fe.check_ready():
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(self, scope: Literal["app", "shard"] = "app"):
        """Prometheus text: this replica's metrics and every other replica's last published ones; with
        ?scope=shard only this ingress's share of the others (for scrapers that reach every ingress)."""
        processes = await asyncio.get_running_loop().run_in_executor(
            None, app_view, self._own_metrics(), self._redis, self.config.server.app_name, self._metrics_max_age,
            scope)
        return Response(render(processes), media_type="text/plain; version=0.0.4; charset=utf-8")

    def _own_metrics(self) -> tuple[dict, list]:
        labels = {"deployment": "Ingress", "replica": self.metrics.labels["replica"] if self.metrics else "local"}
        return labels, self.fe.metrics.families()

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop taking requests (health NOT_SERVING / 503, new requests 503 UNAVAILABLE) and wait for in-flight
        ones; returns how many were still running at the timeout. Serve calls it through __del__ whenever it
        removes this replica (scale-down, update, `serve delete`, Ctrl-C or SIGTERM of `specserve serve`)."""
        self.fe.draining = True  # first: nothing may turn health back to SERVING after this
        if self.grpc is not None:
            await self.grpc.drain()
        timeout = self.config.ingress.graceful_shutdown_timeout_s if timeout_s is None else timeout_s
        return await self.fe.drain(timeout)

    async def __del__(self):
        # Serve calls this after its own drain of HTTP requests, within one graceful_shutdown_timeout_s budget
        # that it enforces: gRPC streams get what is left, less a margin to close the server.
        await self.drain(max(1.0, self.config.ingress.graceful_shutdown_timeout_s - 5.0))
        if self.grpc is not None:
            await self.grpc.stop()
        await self.fe.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        if self.metrics is not None:
            self.metrics.close()

    @app.get("/router/stats")
    async def router_stats(self):
        """Routing as this ingress replica sees it: predicted vs actual cached tokens, hit rate, and its
        routers' decisions, decision latency, index size and per-replica load. Needs an API key when keys are
        on (routing/http_guard.py)."""
        feedback = self.fe.router_feedback
        return {"policy": self.config.router.policy, "outcomes": feedback.outcomes.as_dict(),
                "hash_latency": self.fe.hash_latency.as_dict(), "routers": feedback.router_stats()}

    # ---- OpenAI API ----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, raw: Request):
        self._tenant(raw)
        card = {"id": self.model_name, "object": "model", "created": self.fe.created, "owned_by": "specserve",
                "max_model_len": self.fe.max_model_len}
        served = await self.fe.served()  # the dtype and device a verifier resolved on its hardware
        if served is not None:
            card.update(dtype=served.dtype, device=served.device)
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        return await self._serve(body, raw, chat=True)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        return await self._serve(body, raw, chat=False)

    # ---- shared path ---------------------------------------------------------------------------------------
    def _tenant(self, raw: Request) -> str:
        return self.fe.tenant(raw.headers, raw.headers.get(TENANT_HEADER))

    async def _serve(self, body: ChatCompletionRequest | CompletionRequest, raw: Request, *, chat: bool):
        arrival = time.monotonic()
        try:
            tenant = self._tenant(raw)  # before anything about the body is checked
            fields = request_fields(body, raw.headers, session_header=self.config.router.session_header)
            request = self.fe.prepare(fields, tenant=tenant, arrival=arrival)
            return await self._respond(body, request, chat=chat)
        except APIError as exc:
            raise self.fe.record_error(exc, "http") from exc

    async def _respond(self, body: ChatCompletionRequest | CompletionRequest, request: PreparedRequest, *,
                       chat: bool):
        request_id = request.request_id
        events = self.fe.generate(request)
        if body.stream:
            # Wait for the first event before sending headers, so a rejected request gets its 4xx status.
            try:
                first = await events.__anext__()
            except StopAsyncIteration:
                first = None
            except BaseException:
                await events.aclose()
                raise
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(body, first, events, request_id, chat=chat,
                                                  include_usage=include_usage),
                                     media_type="text/event-stream")
        choices = [_ChoiceText(i) for i in range(body.n)]
        usage, prompt_ids, prompt_logprobs = None, None, None
        async with aclosing(events):
            async for ev in events:
                c = choices[ev.index]
                c.text += ev.text
                c.token_ids += ev.token_ids
                c.logprobs += ev.logprobs or ()
                c.reason = ev.finish_reason or c.reason
                c.tool_calls += ev.tool_calls or ()
                usage = ev.usage
                if ev.prompt_logprobs is not None:
                    prompt_ids, prompt_logprobs = ev.prompt_token_ids, ev.prompt_logprobs
        rendered = []
        for c in choices:
            if chat:
                message = {"role": "assistant", "content": c.text or (None if c.tool_calls else "")}
                if c.tool_calls:
                    message["tool_calls"] = tool_calls_json(c.tool_calls)
                logprobs = ({"content": chat_logprobs(c.logprobs, self.fe.token_texts), "refusal": None}
                            if body.logprobs else None)
                choice = {"index": c.index, "message": message, "finish_reason": c.reason, "logprobs": logprobs}
            else:
                text, logprobs = c.text, None
                if body.logprobs is not None:
                    lp = CompletionLogprobs(self.fe.token_texts)
                    if body.echo:
                        if prompt_ids is not None:
                            lp.add_all(prompt_ids, prompt_logprobs)
                        lp.offset = len(self._echo_text(body))  # the completion starts after the echoed text
                    lp.add_all(c.token_ids, c.logprobs)
                    logprobs = lp.take()
                if body.echo:
                    text = self._echo_text(body) + text
                choice = {"index": c.index, "text": text, "finish_reason": c.reason, "logprobs": logprobs}
            if body.return_token_ids:
                choice["token_ids"] = c.token_ids
            rendered.append(choice)
        return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": rendered,
                "usage": openai_usage(usage)}

    def _echo_text(self, body: CompletionRequest) -> str:
        """The prompt as `echo` returns it: the client's text, or its token ids decoded."""
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            return prompt[0]
        return prompt if isinstance(prompt, str) else self.fe.tokenizer.decode(prompt)

    async def _stream(self, body: ChatCompletionRequest | CompletionRequest, first, events, request_id: str, *,
                      chat: bool, include_usage: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        texts = self.fe.token_texts
        want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None
        echo = not chat and body.echo
        completion_logprobs = [CompletionLogprobs(texts) for _ in range(body.n)] if not chat else []

        def chunk(index: int, delta: dict | str, reason: str | None, *, logprobs=None, ids=None) -> dict:
            if chat:
                choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
            else:
                choice = {"index": index, "text": delta, "finish_reason": reason, "logprobs": logprobs}
            if body.return_token_ids and ids is not None:
                choice["token_ids"] = ids
            out = {"id": request_id, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        def render(ev) -> dict | None:
            calls = ev.tool_calls
            if not (ev.text or ev.finish_reason or calls or (want_logprobs and ev.logprobs) or
                    (body.return_token_ids and ev.token_ids)):
                return None
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                if calls:
                    delta["tool_calls"] = tool_calls_json(calls, streamed=True)
                logprobs = ({"content": chat_logprobs(ev.logprobs or [], texts), "refusal": None}
                            if want_logprobs else None)
                return chunk(ev.index, delta, ev.finish_reason, logprobs=logprobs, ids=ev.token_ids)
            logprobs = None
            if want_logprobs:
                lp = completion_logprobs[ev.index]
                lp.add_all(ev.token_ids, ev.logprobs or [])
                logprobs = lp.take()
            return chunk(ev.index, ev.text, ev.finish_reason, logprobs=logprobs, ids=ev.token_ids)

        def opening(ev) -> list[dict]:
            """The chunks before the first event's: each choice's role (chat), or its echoed prompt."""
            if chat:
                return [chunk(i, {"role": "assistant", "content": ""}, None) for i in range(body.n)]
            if not echo:
                return []
            prompt_text, opened = self._echo_text(body), []
            for i in range(body.n):
                logprobs = None
                if want_logprobs:
                    lp = completion_logprobs[i]
                    if ev is not None and ev.prompt_logprobs is not None:
                        lp.add_all(ev.prompt_token_ids, ev.prompt_logprobs)
                    logprobs = lp.take()
                    lp.offset = len(prompt_text)  # the completion starts after the echoed text
                opened.append(chunk(i, prompt_text, None, logprobs=logprobs))
            return opened

        # Chunks are sent together where they are ready together: the opening ones with the first event's, and
        # the last event's with the usage chunk and [DONE] (see sse_frames).
        usage, pending, unfinished = None, [], set(range(body.n))
        try:
            pending += opening(first)

            async def all_events():
                if first is not None:
                    yield first
                async for ev in events:
                    yield ev

            async for ev in all_events():
                usage = ev.usage
                rendered = render(ev)
                if rendered is not None:
                    pending.append(rendered)
                if ev.finish_reason:
                    unfinished.discard(ev.index)
                if pending and unfinished:  # the stream's last chunks wait for the usage chunk and [DONE]
                    yield sse_frames(pending)
                    pending = []
            if include_usage:
                pending.append({"id": request_id, "object": obj, "created": created, "model": self.model_name,
                                "choices": [], "usage": openai_usage(usage)})
            yield sse_frames(pending, done=True)
        except Exception as exc:  # noqa: BLE001 - headers are already sent: report in-band, then end the stream
            err = api_error_of(exc)
            if err.status >= 500:
                log.exception("stream %s failed", request_id)
            yield sse_frames([*pending, err.body()], done=True)
        finally:
            await events.aclose()
