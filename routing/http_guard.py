"""The HTTP checks that come before a request's body is read: the API key and the body's size.

A pure ASGI middleware in front of the FastAPI app: with keys on, a request without a valid key is refused (401)
before a byte of its body is read or parsed; a body over server.max_request_bytes is refused (413) from its
Content-Length or, without one, as soon as the bytes read pass the limit. An accepted body is replayed to the app.
/health and /metrics stay open (probes and scrapers carry no key).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from specserve.routing.errors import APIError

OPEN_PATHS = ("/health", "/metrics")
FRONTEND_KEY = "specserve.frontend"


def frontend_of(scope):
    """The Frontend serving this request (None before the ingress is built)."""
    return scope.get(FRONTEND_KEY)


class RequestGuard:
    def __init__(self, app, frontend: Callable[[], object | None]):
        self.app = app
        self.frontend = frontend  # this replica's Frontend, once the ingress has built it

    async def __call__(self, scope, receive, send):
        fe = self.frontend() if scope["type"] == "http" else None
        if fe is None:
            return await self.app(scope, receive, send)
        scope[FRONTEND_KEY] = fe  # for the app's exception handlers (frontend_of)
        try:
            path = _route_path(scope)
            if path not in OPEN_PATHS and fe.keys.enabled:
                fe.keys.tenant_of(_api_key(scope))  # 401 for a missing or unknown key
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await _read_body(scope, receive, fe.config.server.max_request_bytes)
                receive = _replay(body, receive)
        except APIError as exc:
            err = fe.record_error(exc, "http")
            if err.status != 499:  # nobody left to answer
                await _respond(send, err)
            return
        return await self.app(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and root != "/" and path.startswith(root):
        path = path[len(root):] or "/"
    return path


def _api_key(scope) -> str | None:
    from specserve.routing.auth import api_key

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    return api_key(headers)


async def _read_body(scope, receive, limit: int) -> bytes:
    too_large = APIError(413, f"request body larger than this server's limit of {limit} bytes "
                              "(server.max_request_bytes)", code="request_too_large")
    for k, v in scope.get("headers", ()):
        if k.lower() == b"content-length":
            try:
                if int(v) > limit:
                    raise too_large
            except ValueError:
                raise APIError(400, "malformed Content-Length header") from None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            raise APIError(499, "client disconnected while sending the request", code="cancelled")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # disconnects, for streaming responses
    return replayed


async def _respond(send, err: APIError) -> None:
    payload = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    if err.status == 413:
        headers.append((b"connection", b"close"))  # the unread rest of the body is not ours to drain
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
