"""OpenAI-compatible HTTP ingress: validate, apply the chat template, tokenize once, stream from a verifier.

Token ids travel from here on. Text comes back through the incremental detokenizer, which also applies stop
strings (a stop string ends the stream, and the verifier frees the sequence when the stream is closed).
"""

# No `from __future__ import annotations` here: Serve rewrites the route signatures and FastAPI must see real
# classes in them to read request bodies.
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from transformers import AutoConfig, AutoTokenizer

from specserve.actors.model_loader import resolve_model_path
from specserve.actors.engine.engine import context_window
from specserve.cluster.config import SpecserveConfig
from specserve.cluster.kv.namespace import kv_namespace
from specserve.cluster.priority import use_default_priority
from specserve.routing.block_hash import block_hashes
from specserve.routing.detokenizer import IncrementalDetokenizer
from specserve.cluster.latency import LatencyStat
from specserve.routing.protocol import APIError, ChatCompletionRequest, CompletionRequest
from specserve.routing.routing_metrics import RoutingOutcomes, router_stats, take_decision

log = logging.getLogger(__name__)
app = FastAPI(title="specserve", docs_url=None, redoc_url=None)


@app.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError):
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError):
    err = exc.errors()[0] if exc.errors() else {}
    if err.get("type") == "json_invalid":
        return JSONResponse(APIError(400, "malformed JSON body: " + str(err.get("msg", ""))).body(), 400)
    loc = [str(p) for p in err.get("loc", ())]
    loc = loc[1:] if loc[:1] == ["body"] else loc
    param = ".".join(loc) or None
    msg = f"{param}: {err.get('msg', 'invalid value')}" if param else str(err.get("msg", "invalid request"))
    return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"



# Defined before the class: serve.ingress captures the module's names when it wraps the class.
def _api_error_of(exc: BaseException) -> APIError:
    """Map an exception from the verifier to the error a client sees. A rejected request (too long for the
    KV pool, ...) is the client's to fix; anything else is ours."""
    if isinstance(exc, APIError):
        return exc
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ValueError) or isinstance(exc, ValueError):
        lines = str(cause).strip().splitlines()
        return APIError(400, lines[-1] if lines else type(cause).__name__)
    return APIError(500, f"generation failed: {type(cause).__name__}", type_="server_error")


@serve.ingress(app)  # at definition: replicas import this module and must get the routed class
class OpenAIIngress:
    def __init__(self, config: dict, verifier):
        self.config = SpecserveConfig.model_validate(config)
        use_default_priority()
        self.verifier = verifier
        path = resolve_model_path(self.config.model.source, self.config.model.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        hf_config = AutoConfig.from_pretrained(path)
        self.max_model_len = context_window(hf_config, self.config.engine.max_model_len)
        # Prefix-aware routing needs the prompt's block hashes, computed once here with the verifiers' namespace.
        self.kv_namespace = (kv_namespace(self.config, path, hf_config).id
                             if self.config.router.policy == "prefix_cost" else None)
        limit = self.config.server.max_prompt_tokens or self.max_model_len
        self.max_prompt_tokens = min(limit, self.max_model_len - 1)
        self.model_name = self.config.model.name
        self.created = int(time.time())
        self.routing = RoutingOutcomes()
        self.hash_latency = LatencyStat(keep=4096)

    # ---- endpoints ---------------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        return {"status": "ok"}

    @app.get("/router/stats")
    async def router_stats(self):
        """Routing as this ingress replica sees it: predicted vs actual cached tokens, hit rate, and its
        routers' decisions, decision latency, index size and per-replica load."""
        return {"policy": self.config.router.policy, "outcomes": self.routing.as_dict(),
                "hash_latency": self.hash_latency.as_dict(), "routers": router_stats()}

    @app.get("/v1/models")
    async def models(self):
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "specserve", "max_model_len": self.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatCompletionRequest, raw: Request):
        self._check_model(body.model)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "messages: all message contents are empty", param="messages")
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:  # base models without a template: plain role-prefixed lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        prompt_ids = self.tokenizer(text, add_special_tokens=False).input_ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._respond(body, prompt_ids, max_tokens, chat=True, raw=raw)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, raw: Request):
        self._check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "prompt: must not be empty", param="prompt")
            prompt_ids = self.tokenizer(prompt).input_ids
        else:
            prompt_ids = list(prompt)
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt_ids):
                raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if not prompt_ids:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        return await self._respond(body, prompt_ids, body.max_tokens, chat=False, raw=raw)

    # ---- shared path -------------------------------------------------------------------------------------------
    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def _limits(self, prompt_ids: list[int], max_tokens: int | None) -> int | None:
        n = len(prompt_ids)
        if n > self.max_prompt_tokens:
            raise APIError(400, f"prompt is {n} tokens, more than the limit of {self.max_prompt_tokens}",
                           param="messages", code="context_length_exceeded")
        room = self.max_model_len - n
        if max_tokens is None:
            return None  # the engine fills the window (or its KV pool, if smaller)
        if max_tokens > room:
            raise APIError(400, f"max_tokens: {max_tokens} + prompt {n} tokens exceeds the context window of "
                                f"{self.max_model_len} tokens", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def _routing_fields(self, prompt_ids: list[int], raw: Request | None) -> dict:
        """What the prefix_cost router reads: the prompt's block hashes (computed once, here, with the
        verifiers' namespace), the key to hash when nothing matches, and the session key if the client sent one."""
        if self.kv_namespace is None:
            return {}
        t0 = time.perf_counter()
        bs = self.config.engine.block_size
        usable = (len(prompt_ids) - 1) // bs * bs  # the blocks a replica's cache could hold for it
        hashes = block_hashes(prompt_ids[:usable], bs, namespace=self.kv_namespace)
        fields = {"block_hashes": hashes, "route_key": hashes[0] if usable else bytes(str(prompt_ids[:bs]), "ascii")}
        session = raw.headers.get(self.config.router.session_header) if raw is not None else None
        if session:
            fields["session_key"] = session
        self.hash_latency.add(time.perf_counter() - t0)
        return fields

    async def _respond(self, body, prompt_ids: list[int], max_tokens: int | None, chat: bool,
                       raw: Request | None = None):
        params = body.sampling_params(self._limits(prompt_ids, max_tokens))
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request = {"request_id": request_id, "prompt_token_ids": prompt_ids, "sampling": params.__dict__,
                   **self._routing_fields(prompt_ids, raw)}
        events = self._generate(request, params.stop)
        if body.stream:
            # Wait for the first event before sending headers, so a rejected request gets its 4xx status.
            try:
                first = await events.__anext__()
            except StopAsyncIteration:
                first = None
            except Exception as exc:  # noqa: BLE001 - mapped to a status code
                await events.aclose()
                raise _api_error_of(exc) from exc
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._stream(first, events, request_id, chat, include_usage,
                                                  body.return_token_ids), media_type="text/event-stream")
        text, token_ids, reason, usage = "", [], None, {}
        try:
            async for delta, ids, finish_reason, u in events:
                text += delta
                token_ids += ids
                reason, usage = finish_reason or reason, u
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            raise _api_error_of(exc) from exc
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

    async def _generate(self, request: dict, stop: list[str]) -> AsyncIterator[tuple[str, list[int], str | None, dict]]:
        """(text delta, new token ids, finish reason or None, usage) per verifier chunk; closing this generator cancels the
        verifier stream, which frees the sequence."""
        detok = IncrementalDetokenizer(self.tokenizer, stop)
        stream = self.verifier.options(stream=True).generate.remote(request)
        prompt_tokens, cached, completion = len(request["prompt_token_ids"]), 0, 0
        router, decision, ended = None, None, False
        try:
            async for chunk in stream:
                if decision is None:  # routed by now (prefix_cost keeps its prediction for us)
                    router, decision = take_decision(request["request_id"]) or (None, False)
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
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion,
                         "prompt_tokens_details": {"cached_tokens": cached},
                         # OpenAI's predicted-output counters mean the same for drafts: drafted tokens the
                         # target accepted / rejected. `speculation` adds the rounds (mean accepted length).
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
                ended = detok.stopped or chunk["finished"]
                yield delta, ids, reason, usage
                if ended:
                    return
        finally:
            stream.cancel()
            if ended:
                self.routing.record(prompt_tokens, cached, decision.predicted_cached_tokens if decision else None,
                                    decision.reason if decision else None)
                if decision and decision.predicted_imported_tokens:  # teaches the router how far to trust the store
                    local = decision.predicted_cached_tokens - decision.predicted_imported_tokens
                    router.policy.observe_import(decision.predicted_imported_tokens, max(0, cached - local))

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
            err = _api_error_of(exc)
            if err.status >= 500:
                log.exception("stream %s failed", request_id)
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
