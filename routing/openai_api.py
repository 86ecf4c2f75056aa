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
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from specserve.cluster.config import SpecserveConfig
from specserve.cluster.metrics import app_view, render, serve_shard, start_publisher
from specserve.cluster.priority import use_default_priority
from specserve.routing.errors import APIError, api_error_of
from specserve.routing.frontend import Frontend
from specserve.routing.http_guard import RequestGuard, frontend_of
from specserve.routing.prompts import Prompt
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest, refuse_unserved
from specserve.routing.routing_metrics import router_stats

log = logging.getLogger(__name__)
app = FastAPI(title="specserve", docs_url=None, redoc_url=None)
TENANT_HEADER = "x-specserve-tenant"
TIMEOUT_HEADER = "x-request-timeout"  # seconds; the HTTP counterpart of a gRPC deadline
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


def _client_timeout(raw: Request) -> float | None:
    value = raw.headers.get(TIMEOUT_HEADER)
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
        return {"policy": self.config.router.policy, "outcomes": self.fe.routing.as_dict(),
                "hash_latency": self.fe.hash_latency.as_dict(), "routers": router_stats()}

    # ---- OpenAI API ----------------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models(self, raw: Request):
        self._tenant(raw)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.fe.created,
                                            "owned_by": "specserve", "max_model_len": self.fe.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        arrival = time.monotonic()
        try:
            tenant = self._tenant(raw)
            self.fe.check_model(body.model)
            prompt = Prompt("chat", [{"role": m.role, "content": m.text()} for m in body.messages], "messages")
            max_tokens = body.max_completion_tokens or body.max_tokens
            return await self._respond(body, prompt, max_tokens, True, raw, tenant, arrival)
        except APIError as exc:
            raise self.fe.record_error(exc, "http") from exc

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        arrival = time.monotonic()
        try:
            tenant = self._tenant(raw)
            self.fe.check_model(body.model)
            prompt = body.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
                prompt = prompt[0]
            prompt = Prompt("text", prompt, "prompt") if isinstance(prompt, str) else Prompt("token_ids", prompt,
                                                                                            "prompt")
            return await self._respond(body, prompt, body.max_tokens, False, raw, tenant, arrival)
        except APIError as exc:
            raise self.fe.record_error(exc, "http") from exc

    # ---- shared path ---------------------------------------------------------------------------------------
    def _tenant(self, raw: Request) -> str:
        return self.fe.tenant(raw.headers, raw.headers.get(TENANT_HEADER))

    async def _respond(self, body, prompt: Prompt, max_tokens: int | None, chat: bool, raw: Request,
                       tenant: str, arrival: float):
        refuse_unserved(body.model_extra)
        self.fe.check_stop_token_ids(body.stop_token_ids or (), "stop_token_ids")
        speculate = self.fe.speculation(body.speculate, body.draft_method, param="draft_method")
        params = body.sampling_params(max_tokens, speculate)  # max_tokens bounded once the prompt is tokenized
        request_id = Frontend.new_request_id("chatcmpl-" if chat else "cmpl-")
        deadline = self.fe.deadline(_client_timeout(raw))
        session = raw.headers.get(self.config.router.session_header)
        events = self.fe.generate(request_id, prompt, params, tenant, "http", session=session,
                                  deadline=deadline, arrival=arrival)
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
            return StreamingResponse(self._stream(first, events, request_id, chat, include_usage,
                                                  body.return_token_ids), media_type="text/event-stream")
        text, token_ids, reason, usage = "", [], None, {}
        async with aclosing(events):
            async for delta, ids, finish_reason, u in events:
                text += delta
                token_ids += ids
                reason, usage = finish_reason or reason, u
        created = int(time.time())
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            obj = "text_completion"
        if body.return_token_ids:
            choice["token_ids"] = token_ids
        return {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                "choices": [choice], "usage": usage}

    async def _stream(self, first, events, request_id: str, chat: bool, include_usage: bool,
                      return_token_ids: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, first: bool = False, ids=None) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            if return_token_ids and ids is not None:
                choice["token_ids"] = ids
            out = {"id": request_id, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        usage = {}
        try:
            if chat:
                yield _sse(chunk(None, None, first=True))
            async def all_events():
                if first is not None:
                    yield first
                async for ev in events:
                    yield ev

            async for delta, ids, reason, usage in all_events():
                if delta or reason or (return_token_ids and ids):
                    yield _sse(chunk(delta, reason, ids=ids))
            if include_usage:
                yield _sse({"id": request_id, "object": obj, "created": created, "model": self.model_name,
                            "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - headers are already sent: report in-band, then end the stream
            err = api_error_of(exc)
            if err.status >= 500:
                log.exception("stream %s failed", request_id)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
