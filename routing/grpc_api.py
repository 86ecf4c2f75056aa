"""The gRPC front end: specserve.v1.Generation, grpc.health.v1.Health and server reflection on server.grpc_port.

Our own grpc.aio server in each ingress replica rather than Ray Serve's gRPC proxy, because the proxy routes by
the method name alone, offers no standard health service (probes would queue on replicas behind generation
traffic) and does not pass the client's deadline to the replica. Here health and reflection are answered
locally, and auth, limits and the deadline are checked before any verifier is called. Requests take the same
path as HTTP (routing/frontend.py), so a greedy request gives the same tokens on both.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import time
from collections.abc import Mapping
from contextlib import aclosing
from dataclasses import replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.protobuf.unknown_fields import UnknownFieldSet
from grpc_reflection.v1alpha import reflection

from specserve.actors.engine.messages import TokenLogprobs, Usage
from specserve.actors.engine.sampling_params import (MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS,
                                                      SamplingParams, StructuredOutput)
from specserve.cluster.config import ServerConfig
from specserve.routing.auth import api_key
from specserve.routing.errors import APIError, invalid
from specserve.routing.frontend import Frontend
from specserve.routing.prompts import Prompt
from specserve.routing.request import FieldNames, RequestFields, ToolChoice
from specserve.routing.tools import ToolCall, ToolError, ToolFunction, check_tools
from specserve.v1 import generation_pb2 as pb
from specserve.v1 import generation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
GRPC_FIELD_NAMES = FieldNames(stop_token_ids="sampling.stop_token_ids", draft_method="speculation.draft_method",
                              logit_bias="sampling.logit_bias", structured="sampling.structured",
                              tool_choice="chat.tool_choice")
# check_tools names OpenAI's fields (tools[i].function.name); ours are chat.tools[i].name / .parameters_json.
_TOOL_PARAM = re.compile(r"\.function\.(name|parameters)")
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "tool_calls": pb.FINISH_REASON_TOOL_CALLS}
# The schema of `json_object` (any JSON object), as StructuredOutput documents it.
JSON_OBJECT_SCHEMA = '{"type": "object"}'


def _metadata(pairs) -> dict[str, str]:
    """A call's text metadata by lower-case name (binary "-bin" values are left out)."""
    return {k.lower(): v for k, v in (pairs or ()) if isinstance(v, str)}


def structured_output(s: pb.SamplingParams) -> StructuredOutput | None:
    """The structured-output oneof as the engine's constraint (Frontend.prepare checks its grammar)."""
    which = s.WhichOneof("structured")
    if which is None:
        return None
    if which == "json_object":
        if not s.json_object:
            return None  # json_object: false is the default: no constraint
        return StructuredOutput("json_schema", JSON_OBJECT_SCHEMA)
    value = getattr(s, which)
    if not value:
        raise invalid(f"sampling.{which}", "must not be empty")
    return StructuredOutput(which, value)


def sampling_params(s: pb.SamplingParams) -> SamplingParams:
    """Checked conversion; each bad field is INVALID_ARGUMENT naming it. max_tokens is the client's (None: unset)
    and speculation is the front end's (Frontend.prepare)."""
    def ranged(name: str, lo: float, hi: float, default: float, *, lo_open: bool = False) -> float:
        if not s.HasField(name):
            return default
        v = getattr(s, name)
        if not math.isfinite(v) or v > hi or v < lo or (lo_open and v == lo):
            raise invalid(f"sampling.{name}", f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return float(v)

    if s.HasField("max_tokens") and s.max_tokens < 1:
        raise invalid("sampling.max_tokens", "must be >= 1")
    if len(s.stop) > MAX_STOP_SEQUENCES:
        raise invalid("sampling.stop", f"at most {MAX_STOP_SEQUENCES} stop sequences")
    if any(not x or len(x) > MAX_STOP_CHARS for x in s.stop):
        raise invalid("sampling.stop", f"stop sequences must be 1-{MAX_STOP_CHARS} characters")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid("sampling.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} token ids")
    if s.HasField("n") and s.n < 1:
        raise invalid("sampling.n", "must be >= 1")
    structured = structured_output(s)
    try:
        params = SamplingParams(
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            temperature=ranged("temperature", 0.0, 2.0, 1.0), top_p=ranged("top_p", 0.0, 1.0, 1.0, lo_open=True),
            top_k=s.top_k, seed=s.seed if s.HasField("seed") else None, stop=list(s.stop),
            stop_token_ids=frozenset(s.stop_token_ids), ignore_eos=s.ignore_eos,
            n=s.n if s.HasField("n") else 1,
            logprobs=s.logprobs if s.HasField("logprobs") else None,
            prompt_logprobs=s.prompt_logprobs if s.HasField("prompt_logprobs") else None,
            logit_bias=dict(s.logit_bias), presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            min_p=s.min_p, min_tokens=s.min_tokens, structured=structured)
    except ValueError as exc:  # SamplingParams' own checks: its messages begin with the field's name
        raise invalid(_sampling_field(str(exc)), str(exc)) from exc
    return params


def _sampling_field(message: str) -> str:
    """The proto field a SamplingParams error is about (its first word names the dataclass field)."""
    first = message.split(maxsplit=1)[0].strip(":,") if message else ""
    return f"sampling.{first}" if first in pb.SamplingParams.DESCRIPTOR.fields_by_name else "sampling"


def prompt_of(request: pb.GenerateRequest | pb.TokenizeRequest) -> Prompt:
    which = request.WhichOneof("input")
    if which is None:
        raise invalid("input", "set one of text, token_ids or chat")
    if which == "text":
        return Prompt("text", request.text, "text")
    if which == "token_ids":
        return Prompt("token_ids", list(request.token_ids.ids), "token_ids.ids")
    return Prompt("chat", [chat_message(m) for m in request.chat.messages], "chat.messages",
                  tools=tuple(tools_of(request.chat)))


def chat_message(m: pb.ChatMessage) -> dict:
    """A chat message as the prompt renderer (and the chat template) takes it: OpenAI's shape."""
    message = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def tools_of(chat: pb.ChatMessages) -> list[ToolFunction]:
    """The chat's tools, each schema parsed and checked (routing/tools.check_tools; INVALID_ARGUMENT naming the
    tool's field)."""
    tools = []
    for i, t in enumerate(chat.tools):
        try:
            parameters = json.loads(t.parameters_json) if t.parameters_json else {"type": "object", "properties": {}}
        except ValueError as exc:
            raise invalid(f"chat.tools[{i}].parameters_json", f"not JSON: {exc}") from exc
        if not isinstance(parameters, dict):
            raise invalid(f"chat.tools[{i}].parameters_json", "must be a JSON object (a JSON schema)")
        tools.append(ToolFunction(name=t.name, description=t.description, parameters=parameters))
    try:
        check_tools(tools)
    except ToolError as exc:
        param = _TOOL_PARAM.sub(lambda m: {"name": ".name", "parameters": ".parameters_json"}[m.group(1)],
                                "chat." + exc.param)
        raise invalid(param, str(exc).removeprefix(f"{exc.param}: ")) from exc
    return tools


def tool_choice_of(chat: pb.ChatMessages) -> ToolChoice:
    """chat.tool_choice: none | auto | required | a function's name; unset: auto with tools, else none."""
    choice = chat.tool_choice
    if not choice:
        return ToolChoice("auto" if chat.tools else "none")
    if choice in ("none", "auto", "required"):
        return ToolChoice(choice)
    return ToolChoice("function", choice)


def request_fields(request: pb.GenerateRequest, *, timeout_s: float | None, metadata: Mapping[str, str],
                   session_header: str) -> RequestFields:
    """A GenerateRequest and its metadata (lower-case names) as the request path's fields."""
    spec = request.speculation
    structured = request.sampling.WhichOneof("structured")
    names = GRPC_FIELD_NAMES if structured is None else replace(GRPC_FIELD_NAMES, structured=f"sampling.{structured}")
    tool_choice = tool_choice_of(request.chat) if request.WhichOneof("input") == "chat" else ToolChoice()
    if structured is not None and tool_choice.mode != "none" and request.chat.tools:
        # as HTTP: the output is either free to hold calls or held to the structure, not both
        raise invalid(names.structured, 'cannot be combined with tools (unless chat.tool_choice is "none")',
                      code="unsupported_option")
    return RequestFields(protocol="grpc", names=names, id_prefix="grpc-", model=request.model,
                         prompt=prompt_of(request), sampling=sampling_params(request.sampling),
                         speculate=spec.enabled if spec.HasField("enabled") else None,
                         draft_method=spec.draft_method, client_request_id=request.request_id, timeout_s=timeout_s,
                         session=metadata.get(session_header), tool_choice=tool_choice)


def usage_pb(u: Usage) -> pb.Usage:
    """The proto of a request's usage (the routing prediction is HTTP's only)."""
    return pb.Usage(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens,
                    cached_tokens=u.cached_tokens, imported_tokens=u.imported_tokens, draft_tokens=u.draft_tokens,
                    accepted_tokens=u.accepted_tokens, spec_rounds=u.spec_rounds)


def tool_calls_pb(calls: list[ToolCall] | None) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls or ()]


class _ChoiceSoFar:
    """One choice of a unary reply, as its events arrive."""

    def __init__(self):
        self.text, self.token_ids, self.logprobs, self.tool_calls = [], [], [], []
        self.finish_reason = None

    def add(self, ev, logprobs: list[pb.TokenLogprob]) -> None:
        self.text.append(ev.text)
        self.token_ids += ev.token_ids
        self.logprobs += logprobs
        self.finish_reason = ev.finish_reason or self.finish_reason
        self.tool_calls += tool_calls_pb(ev.tool_calls)

    def fields(self) -> dict:
        return {"token_ids": self.token_ids, "text": "".join(self.text),
                "finish_reason": _FINISH.get(self.finish_reason, 0), "logprobs": self.logprobs,
                "tool_calls": self.tool_calls}


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, frontend: Frontend):
        self.fe = frontend
        self._token_text = frontend.token_texts

    # ---- request parsing -----------------------------------------------------------------------------------
    def _tenant(self, request, context) -> str:
        return self.fe.tenant(_metadata(context.invocation_metadata()), getattr(request, "tenant", "") or None)

    async def abort(self, context, exc: BaseException):
        """End the call with `exc`'s status code (counted in the error metrics)."""
        err = self.fe.record_error(exc, "grpc")
        if err.status >= 500 and err.status not in (503, 504):
            log.error("gRPC request failed: %s", err.message)
        trailing = tuple((k.lower(), v) for k, v in err.headers().items())
        await context.abort(err.grpc_code, err.message, trailing_metadata=trailing)

    # ---- response formatting -------------------------------------------------------------------------------
    def _logprobs(self, entries) -> list[pb.TokenLogprob]:
        return [self._logprob(e) for e in entries or ()]

    def _logprob(self, e: TokenLogprobs) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=e.token_id, token=self._token_text(e.token_id), logprob=e.logprob,
                               top=[pb.TopLogprob(token_id=t, token=self._token_text(t), logprob=lp)
                                    for t, lp in e.top])

    def _prompt_logprobs(self, entries: list[TokenLogprobs | None] | None) -> list[pb.TokenLogprob]:
        """The prompt's logprobs after its first token (which has none)."""
        if not entries:
            return []
        if any(e is None for e in entries[1:]):
            raise RuntimeError("prompt logprobs are missing for a prompt token after the first")
        return self._logprobs(entries[1:])

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def _events(self, request, context):
        """(request id to reply with, event) of the generation; any error aborts the call with its status code."""
        arrival = time.monotonic()
        try:
            tenant = self._tenant(request, context)  # 401/403 before anything about the body
            fields = request_fields(request, timeout_s=context.time_remaining(),
                                    metadata=_metadata(context.invocation_metadata()),
                                    session_header=self.fe.config.router.session_header)
            prepared = self.fe.prepare(fields, tenant=tenant, arrival=arrival)
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
            await self.abort(context, exc)
        try:
            async with aclosing(self.fe.generate(prepared)) as events:
                async for ev in events:
                    yield prepared.reply_id, ev
        except Exception as exc:  # noqa: BLE001
            await self.abort(context, exc)

    async def Generate(self, request, context):
        async with aclosing(self._events(request, context)) as events:
            async for request_id, ev in events:
                if ev.token_ids or ev.text or ev.finish_reason or ev.prompt_logprobs or ev.tool_calls:
                    yield pb.GenerateResponse(request_id=request_id, index=ev.index, token_ids=ev.token_ids,
                                              text=ev.text, finish_reason=_FINISH.get(ev.finish_reason, 0),
                                              usage=usage_pb(ev.usage) if ev.finish_reason else None,
                                              logprobs=self._logprobs(ev.logprobs),
                                              prompt_logprobs=self._prompt_logprobs(ev.prompt_logprobs),
                                              tool_calls=tool_calls_pb(ev.tool_calls))

    async def GenerateUnary(self, request, context):
        n = request.sampling.n if request.sampling.HasField("n") else 1
        request_id, choices, prompt_logprobs, usage = "", {}, [], None
        async with aclosing(self._events(request, context)) as events:
            async for request_id, ev in events:
                if ev.index not in choices:
                    choices[ev.index] = _ChoiceSoFar()
                choices[ev.index].add(ev, self._logprobs(ev.logprobs))
                prompt_logprobs += self._prompt_logprobs(ev.prompt_logprobs)
                usage = ev.usage
        reply = pb.GenerateResponse(request_id=request_id, prompt_logprobs=prompt_logprobs,
                                    usage=usage_pb(usage) if usage else None)
        if n == 1:
            reply.MergeFrom(pb.GenerateResponse(**choices.get(0, _ChoiceSoFar()).fields()))
        else:
            reply.choices.extend(pb.Choice(index=i, **c.fields()) for i, c in sorted(choices.items()))
        return reply

    async def ListModels(self, request, context):
        try:
            self._tenant(request, context)
        except Exception as exc:  # noqa: BLE001
            await self.abort(context, exc)
        return pb.ListModelsResponse(models=[pb.Model(id=self.fe.model_name, max_model_len=self.fe.max_model_len,
                                                      owned_by="specserve")])

    async def Tokenize(self, request, context):
        try:
            tenant = self._tenant(request, context)
            self.fe.check_model(request.model)
            ids = await self.fe.tokenize(prompt_of(request), tenant, "grpc")
        except Exception as exc:  # noqa: BLE001
            await self.abort(context, exc)
        return pb.TokenizeResponse(token_ids=ids, max_model_len=self.fe.max_model_len)


class _Refused:
    """A request refused before its handler runs: bytes that did not parse (grpc would answer INTERNAL for a
    deserializer error) or fields this server does not know."""

    def __init__(self, details: str):
        self.details = details


def unknown_field(message: Message, path: str = "") -> str | None:
    """The first field of `message` or of a message inside it that this server's proto does not define, as
    INVALID_ARGUMENT details naming where it is and its number; None when there is none. A newer client's
    option must not be silently ignored."""
    for field in UnknownFieldSet(message):
        where = path or message.DESCRIPTOR.full_name
        return (f"{where}: unknown field number {field.field_number} (not in this server's "
                f"{message.DESCRIPTOR.full_name}: an option of a newer API version is not served here)")
    for fd, value in message.ListFields():
        if fd.message_type is None:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["value"].message_type is None:
                continue
            items = [(f"{name}[{k!r}]", v) for k, v in value.items()]
        elif fd.is_repeated:
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(name, value)]
        for where, inner in items:
            found = unknown_field(inner, where)
            if found:
                return found
    return None


def _lenient(parse):
    def deserialize(data: bytes):
        try:
            request = parse(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, bad UTF-8 in a string field, ...
            return _Refused(f"malformed request: {type(exc).__name__}: {exc}")
        unknown = unknown_field(request)
        return request if unknown is None else _Refused(unknown)
    return deserialize


def _refusing(service: GenerationService, fn, *, streaming: bool):
    """`fn` for requests that parsed into known fields; the others are INVALID_ARGUMENT (counted as errors)."""
    if streaming:
        async def stream(request, context):
            if isinstance(request, _Refused):
                await service.abort(context, APIError(400, request.details))
            async for item in fn(request, context):
                yield item
        return stream

    async def unary(request, context):
        if isinstance(request, _Refused):
            await service.abort(context, APIError(400, request.details))
        return await fn(request, context)
    return unary


def generation_handlers(service: GenerationService) -> grpc.GenericRpcHandler:
    """The generated registration, except that a request that does not parse, or holds fields this server does
    not know, is INVALID_ARGUMENT."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["Generation"].methods:
        request_cls, response_cls = GetMessageClass(m.input_type), GetMessageClass(m.output_type)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(_refusing(service, getattr(service, m.name), streaming=m.server_streaming),
                                request_deserializer=_lenient(request_cls.FromString),
                                response_serializer=response_cls.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """With keys on, a Generation call without a valid key is UNAUTHENTICATED before its request is parsed (the
    handler that refuses it takes the raw bytes). Health and reflection stay open for probes and tools."""

    def __init__(self, frontend: Frontend):
        self.fe = frontend

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not self.fe.keys.enabled or not details.method.startswith(f"/{SERVICE}/"):
            return handler
        try:
            self.fe.keys.tenant_of(api_key(_metadata(details.invocation_metadata)))
            return handler
        except APIError as exc:
            err = self.fe.record_error(exc, "grpc")

        async def refuse(_raw: bytes, context):
            await context.abort(err.grpc_code, err.message)

        if handler.response_streaming:
            async def refuse_stream(raw, context):
                await refuse(raw, context)
                yield  # an async generator, as a streaming handler must be
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        return grpc.unary_unary_rpc_method_handler(refuse)


def server_options(server: ServerConfig) -> list[tuple[str, int]]:
    """Bounds on what one client connection may hold or cost."""
    return [
        ("grpc.so_reuseport", 0),  # a second app on the same port must not split another app's traffic
        ("grpc.max_receive_message_length", server.max_request_bytes),
        ("grpc.max_concurrent_streams", 256),  # per connection; maximum_concurrent_rpcs bounds the server
        # Idle and old connections are closed (GOAWAY first: running calls get the grace period to finish).
        ("grpc.max_connection_idle_ms", int(server.grpc_max_connection_idle_s * 1000)),
        ("grpc.max_connection_age_ms", int(server.grpc_max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", 300_000),
        # Keepalive: the server pings quiet connections to find dead peers; clients may ping at most every
        # 10 s, and one that pings more often is disconnected after two strikes.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


class GrpcServer:
    """The gRPC server of one ingress replica. Health is NOT_SERVING until a verifier answers, whenever the
    ingress's readiness task finds none answering, and once the replica drains."""

    def __init__(self, frontend: Frontend, server: ServerConfig):
        self.fe, self.config = frontend, server
        self.address = f"{server.host}:{server.grpc_port}"
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._task: asyncio.Task | None = None
        frontend.ready_listeners.append(self._readiness_changed)

    def _build(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=server_options(self.config), interceptors=[ApiKeyInterceptor(self.fe)],
                                 maximum_concurrent_rpcs=self.config.grpc_max_concurrent_rpcs)
        server.add_generic_rpc_handlers((generation_handlers(GenerationService(self.fe)),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        return server

    def start(self) -> None:
        """Serve from now on (a task on the running loop)."""
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)
        # The port can be held for a while by the replica this one replaces (a rolling update on one host):
        # retry, loudly, rather than fail the replica.
        for attempt in itertools.count():
            self.server = self._build()
            try:
                self.port = self.server.add_insecure_port(self.address)
                break
            except RuntimeError as exc:
                await self.server.stop(None)
                if attempt % 20 == 0:
                    log.error("gRPC: cannot bind %s (%s); retrying. Is another app using server.grpc_port?",
                              self.address, exc)
                await asyncio.sleep(0.5)
        await self.server.start()
        log.info("gRPC API on %s", self.address)
        await self._readiness_changed()

    async def _readiness_changed(self) -> None:
        serving = self.fe.readiness.ready and not self.fe.draining
        await self._set(health_pb2.HealthCheckResponse.SERVING if serving else
                        health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set(self, status) -> None:
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def drain(self) -> None:
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace_s)
