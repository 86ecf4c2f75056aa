"""The bench's client side: one streamed request to an OpenAI-compatible HTTP server or specserve's gRPC API,
measured as it arrives (time to first token, gaps between chunks, the usage the server reports)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from specserve.tools.bench.grpc_client import GrpcBenchClient
from specserve.tools.bench.results import RequestResult
from specserve.tools.bench.workloads import Messages


class BenchError(Exception):
    """A problem that stops the run before any measurement (bad target, no model)."""


# (usage section, its field, RequestResult attribute): OpenAI's cached tokens and specserve's own usage.
USAGE_FIELDS = (
    ("prompt_tokens_details", "cached_tokens", "cached_tokens"),
    ("kv_store", "imported_tokens", "imported_tokens"),
    ("routing", "predicted_cached_tokens", "predicted_cached_tokens"),
    ("speculation", "rounds", "spec_rounds"),
    ("speculation", "draft_tokens", "draft_tokens"),
    ("speculation", "accepted_tokens", "accepted_tokens"),
)


@dataclass
class RequestSettings:
    endpoint: str  # "chat" or "completions"
    max_tokens: int
    temperature: float
    timeout: float


def request_body(model: str, messages: Messages, s: RequestSettings) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if s.endpoint == "completions":
        # No chat template on this route: a plain concatenation keeps the shared prefix intact.
        body["prompt"] = "\n\n".join(m["content"] for m in messages)
        return "/v1/completions", body
    body["messages"] = messages
    return "/v1/chat/completions", body


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    c0 = choices[0] or {}
    delta = c0.get("delta")
    text = (delta or {}).get("content") if isinstance(delta, dict) else None
    if text is None:
        text = c0.get("text")
    return text or "", c0.get("finish_reason")


async def _stream_request(client: httpx.AsyncClient, path: str, body: dict[str, Any], res: RequestResult,
                          t0: float) -> None:
    async with client.stream("POST", path, json=body) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            res.error = f"HTTP {resp.status_code}"
            res.detail = (await resp.aread()).decode("utf-8", "replace")[:300]
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                res.done = True
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                res.error, res.detail = "BadSSE", data[:300]
                return
            if not isinstance(chunk, dict):
                continue
            if chunk.get("error"):
                res.error, res.detail = "StreamError", json.dumps(chunk["error"])[:300]
                return
            usage = chunk.get("usage")
            if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                res.usage_reported = True
                res.output_tokens = int(usage["completion_tokens"])
                res.prompt_tokens = usage.get("prompt_tokens")
                for section, key, attr in USAGE_FIELDS:
                    part = usage.get(section)
                    if isinstance(part, dict):
                        setattr(res, attr, part.get(key))
            text, finish = _chunk_text(chunk)
            if finish:
                res.finish_reason = finish
            if text:
                res.add_text(text, t0)


async def run_request(client: httpx.AsyncClient, model: str, messages: Messages, s: RequestSettings,
                      pass_t0: float | None = None) -> RequestResult:
    res = RequestResult()
    t0 = time.perf_counter()
    res.start_s = t0 - (pass_t0 if pass_t0 is not None else t0)
    if isinstance(client, GrpcBenchClient):
        work = client.stream(model, messages, s, res, t0)
    else:
        path, body = request_body(model, messages, s)
        work = _stream_request(client, path, body, res, t0)
    try:
        # httpx's timeout is per read; this bounds the whole request.
        await asyncio.wait_for(work, timeout=s.timeout)
    except asyncio.TimeoutError:
        res.error = "Timeout"
    except httpx.HTTPError as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    except (OSError, ValueError) as exc:
        res.error, res.detail = type(exc).__name__, str(exc)[:300]
    res.e2e_s = time.perf_counter() - t0
    if res.error is None and not res.done and res.content_chunks == 0:
        res.error = "EmptyStream"
    res.ok = res.error is None
    if not res.usage_reported:
        res.output_tokens = res.content_chunks  # servers without usage: one chunk ~ one token
    return res


async def resolve_model(client: "httpx.AsyncClient | GrpcBenchClient", label: str, url: str, model: str | None) -> str:
    """Check the target answers and pick its model: --model, else the first id of GET /v1/models."""
    if isinstance(client, GrpcBenchClient):
        try:
            ids = await client.models()
        except Exception as exc:  # noqa: BLE001 - grpc errors: unreachable, auth, ...
            raise BenchError(f"target {label} ({url}) unreachable: {exc}") from exc
        if not (model or ids):
            raise BenchError(f"target {label}: ListModels lists no models; pass --model")
        return model or ids[0]
    try:
        resp = await client.get("/v1/models")
    except httpx.HTTPError as exc:
        raise BenchError(f"target {label} ({url}) unreachable: {type(exc).__name__}: {exc}") from exc
    if model:
        return model  # reachable is enough; some servers have no /v1/models
    if resp.status_code != 200:
        raise BenchError(f"target {label}: GET /v1/models returned HTTP {resp.status_code}; pass --model")
    try:
        ids = [m["id"] for m in resp.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BenchError(f"target {label}: unexpected /v1/models response; pass --model") from exc
    if not ids:
        raise BenchError(f"target {label}: /v1/models lists no models; pass --model")
    return ids[0]



def make_client(url: str, api_key: str | None, timeout: float,
                connections: int | None) -> "httpx.AsyncClient | GrpcBenchClient":
    """A client for `url` holding up to `connections` connections (None: as many as requests in flight)."""
    if url.startswith("grpc://"):
        return GrpcBenchClient(url, api_key)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(
        base_url=url,
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=False,  # a proxy from the environment would distort every latency measured
    )
