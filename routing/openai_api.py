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
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from specserve.actors.engine.messages import Usage
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.metrics import app_view, render, serve_shard, start_publisher
from specserve.cluster.priority import use_default_priority
from specserve.routing.errors import APIError, api_error_of
from specserve.routing.frontend import Frontend
from specserve.routing.http_guard import RequestGuard, frontend_of
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest, refuse_unserved
from specserve.routing.request import FieldNames, PreparedRequest, RequestFields

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
    return RequestFields(protocol="http", names=HTTP_FIELD_NAMES, id_prefix="chatcmpl-" if chat else "cmpl-",
                         model=body.model, prompt=prompt, sampling=body.sampling_params(), speculate=body.speculate,
                         draft_method=body.draft_method, timeout_s=_client_timeout(headers),
                         session=headers.get(session_header))


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
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.fe.created,
                                            "owned_by": "specserve", "max_model_len": self.fe.max_model_len}]}

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
            return StreamingResponse(self._stream(first, events, request_id, chat=chat, include_usage=include_usage,
                                                  return_token_ids=body.return_token_ids),
                                     media_type="text/event-stream")
        text, token_ids, reason, usage = "", [], None, None
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
                "choices": [choice], "usage": openai_usage(usage)}

    async def _stream(self, first, events, request_id: str, *, chat: bool, include_usage: bool,
                      return_token_ids: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta_text: str | None, reason: str | None, *, first: bool = False, ids=None) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else
                         {"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_text or "", "finish_reason": reason, "logprobs": None}
            if return_token_ids and ids is not None:
                choice["token_ids"] = ids
            out = {"id": request_id, "object": obj, "created": created, "model": self.model_name, "choices": [choice]}
            if include_usage:
                out["usage"] = None
            return out

        usage = None
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
                            "choices": [], "usage": openai_usage(usage)})
            yield "data: [DONE]\n\n"
        except Exception as exc:  # noqa: BLE001 - headers are already sent: report in-band, then end the stream
            err = api_error_of(exc)
            if err.status >= 500:
                log.exception("stream %s failed", request_id)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
