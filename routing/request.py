"""A generation request between a front end and the shared request path.

Each front end (routing/openai_api.py, routing/grpc_api.py) authenticates, parses its wire format into
`RequestFields`, and hands them to `Frontend.prepare`, which checks what both protocols share and returns the
`PreparedRequest` that `Frontend.generate` runs. A new per-request option is a field here, parsed by each front
end, checked once in `prepare`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from specserve.actors.engine.sampling_params import SamplingParams
from specserve.routing.prompts import Prompt

Protocol = Literal["http", "grpc"]


@dataclass(frozen=True)
class ToolChoice:
    """How the model may call the prompt's tools (OpenAI `tool_choice`): not at all, if it likes (the output is
    parsed for calls), at least one call, or a call of the function `name` (both forced by a grammar)."""
    mode: Literal["none", "auto", "required", "function"] = "none"
    name: str | None = None  # the function, for mode "function"
    parallel: bool = True  # False: at most one call (OpenAI `parallel_tool_calls`)

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


@dataclass(frozen=True, kw_only=True)
class FieldNames:
    """How a protocol spells the fields that `prepare` checks, for the errors that name them. (The prompt's
    field travels with the Prompt; max_tokens is "max_tokens" on both.)"""
    stop_token_ids: str
    draft_method: str
    request_id: str = "request_id"
    logit_bias: str = "logit_bias"
    structured: str = "response_format"  # the field that asked for a structured output
    tool_choice: str = "tool_choice"


@dataclass(frozen=True, kw_only=True)
class RequestFields:
    """A generation request as a front end parsed it, before the checks both protocols share."""
    protocol: Protocol
    names: FieldNames
    id_prefix: str  # of our request id
    model: str
    prompt: Prompt
    # Checked by the parser; max_tokens is the client's (None: unset) and `speculate` is set by prepare.
    sampling: SamplingParams
    speculate: bool | None = None  # False: this request decodes without drafts; None: unset
    draft_method: str | None = None  # the method the client expects (must be the one served)
    client_request_id: str = ""  # echoed back, never used as ours
    timeout_s: float | None = None  # the client's (gRPC deadline, HTTP X-Request-Timeout)
    session: str | None = None  # the session key (router.session_header)
    tool_choice: ToolChoice = ToolChoice()  # the tools are the prompt's (Prompt.tools)


@dataclass(frozen=True, kw_only=True)
class PreparedRequest:
    """A checked generation request, whichever protocol it came by: what `Frontend.generate` runs."""
    request_id: str  # ours: the verifier's and the router's (unique)
    client_request_id: str  # the client's, echoed back (two clients may send the same one)
    protocol: Protocol  # the label of its metrics
    tenant: str
    prompt: Prompt  # templated and tokenized by generate, once the tenant is admitted
    params: SamplingParams  # max_tokens is the client's (None: unset) until the prompt is tokenized
    session: str | None
    deadline: float | None  # monotonic
    arrival: float  # monotonic
    tool_choice: ToolChoice = ToolChoice()  # "auto" and the forced modes: the output is parsed into tool calls

    @property
    def reply_id(self) -> str:
        """The id the response carries: the client's when it sent one."""
        return self.client_request_id or self.request_id
