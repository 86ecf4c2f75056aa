"""The errors a client can see, and the one table that maps each to its HTTP status and gRPC code.

Both front ends (routing/openai_api.py, routing/grpc_api.py) raise and translate only these, so a bad request is
400 on HTTP exactly when it is INVALID_ARGUMENT on gRPC.
"""

from __future__ import annotations

import grpc

# HTTP status -> gRPC code. 499 is the de-facto "client closed request" status.
_GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_TYPE = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
         429: "rate_limit_error", 499: "cancelled", 503: "unavailable", 504: "timeout"}


class APIError(Exception):
    """An error answered as an OpenAI-style body {"error": {"message", "type", "param", "code"}} on HTTP and as
    a status code with the message as details on gRPC. `retry_after_s` becomes Retry-After / retry-after."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPE.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.retry_after_s = retry_after_s
        self.counted = False  # in the error metrics (an error may pass several handlers on its way out)

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODE.get(self.status, grpc.StatusCode.UNKNOWN if self.status < 500 else grpc.StatusCode.INTERNAL)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    """INVALID_ARGUMENT / 400 naming the field."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def api_error_of(exc: BaseException) -> APIError:
    """Map an exception from a handle call to what the client sees. A request the engine rejected (too long for
    the KV pool, ...) is the client's to fix; a full queue is a retriable refusal; a replica that cannot be
    reached is UNAVAILABLE; anything else (any other ValueError too) is ours."""
    from specserve.actors.engine.engine import RequestRejected
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, BackPressureError):
        return APIError(429, "server busy: the request queue is full, retry later", code="queue_full",
                        retry_after_s=exc.retry_after_s or 1.0)
    if isinstance(exc, (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, RayActorError)):
        return APIError(503, f"no replica can serve the request now ({type(exc).__name__}), retry later",
                        code="unavailable", retry_after_s=1.0)
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, RequestRejected) or isinstance(exc, RequestRejected):
        lines = str(cause).strip().splitlines()
        return APIError(400, lines[-1] if lines else type(cause).__name__)
    return APIError(500, f"generation failed: {type(cause).__name__}")
