"""The messages of the request path, one definition each. They cross Ray process boundaries by pickle.

    front end --GenerateRequest--> router (reads its RoutingHints) --> verifier --> engine thread (an add command)
    engine --RequestOutput--> verifier --> front end (streamed unchanged), which builds a Usage per event
    engine thread --Progress--> front end (on the same stream, while a request waits and its replica steps)
    verifier --LoadReport--> router (Serve carries it as a dict: `as_dict` / `from_dict` at the two ends)
    verifier --ServedModel--> front end (the answer to its readiness probe)

A per-request option belongs in SamplingParams (what the engine and sampler obey) or, if only the path around
the engine reads it, in GenerateRequest; a per-step output in RequestOutput; a usage counter in Usage, rendered by
each protocol (routing/openai_api.py `openai_usage`, routing/grpc_api.py `usage_pb`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from specserve.actors.engine.sampling_params import SamplingParams


@dataclass(slots=True, kw_only=True)
class RoutingHints:
    """What the prefix_cost router reads, computed once by the front end in the verifiers' namespace."""
    block_hashes: list[bytes]  # the prompt's full blocks (those a replica's cache could hold), the tenant's hashes
    route_key: bytes  # hashed to place the request when no replica holds its prefix
    session_key: str | None = None  # hashed instead, when the client names a session


@dataclass(slots=True, kw_only=True)
class GenerateRequest:
    """What the front end sends the verifier (through the request router) for one generation."""
    request_id: str  # the ingress's own id: unique, also the key of the router's decision
    prompt_token_ids: list[int]
    params: SamplingParams  # max_tokens already bounded by the context window
    tenant: str | None = None  # whose namespace of block hashes (None: the engine's own)
    routing: RoutingHints | None = None  # None: the router does not read the prompt (router.policy round_robin)


@dataclass(slots=True, frozen=True)
class ServedModel:
    """What a verifier replica runs the model with, as resolved on its own hardware (model.dtype "auto")."""
    dtype: str  # "bfloat16", "float32", "float16"
    device: str  # "cpu", "cuda:0"


@dataclass(slots=True)
class TokenLogprobs:
    """One position's log-probabilities: the token there and the top alternatives (most likely first)."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), as many as the request asked for


@dataclass(slots=True)
class RequestOutput:
    """One engine step's output for one request: the new tokens and the request's counters so far."""
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    num_spec_rounds: int = 0  # speculative rounds so far, and their drafted / accepted tokens
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_imported_tokens: int = 0  # of the cached prompt tokens, those whose blocks came from the KV store
    queue_time_s: float = 0.0  # arrival to first step
    index: int = 0  # which of the request's n choices (each finishes on its own; the counters are its own)
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked (params.logprobs)
    # In the first output of choice 0 of a request that asked (params.prompt_logprobs): one per prompt token,
    # None for the first (nothing precedes it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @staticmethod
    def merge(outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Outputs of one request that a consumer fell behind on, fewer: each run of consecutive outputs of one
        choice as one output (the per-token fields concatenated, the counters, cumulative, the run's latest),
        in the order given. Outputs of different choices are never merged: each choice's stream keeps its
        order, and the request's interleaving of choices is kept too."""
        merged: list[RequestOutput] = []
        run: list[RequestOutput] = []
        for out in outputs:
            if run and out.index != run[0].index:
                merged.append(RequestOutput._merge_run(run))
                run = []
            run.append(out)
        if run:
            merged.append(RequestOutput._merge_run(run))
        return merged

    @staticmethod
    def _merge_run(run: list[RequestOutput]) -> RequestOutput:
        latest = run[-1]
        if len(run) > 1:
            latest.new_token_ids = [t for out in run for t in out.new_token_ids]
            if any(out.logprobs is not None for out in run):
                latest.logprobs = [lp for out in run for lp in out.logprobs or []]
            latest.prompt_logprobs = next((out.prompt_logprobs for out in run if out.prompt_logprobs is not None),
                                          None)
        return latest


@dataclass(slots=True, frozen=True)
class Progress:
    """Sent on a request's stream, now and then, while the replica's engine completes steps: a request that waits
    for its turn (queued, preempted, its prompt prefilled in chunks) gets these instead of output, so the front end
    tells a busy replica from one that cannot make progress (server.stall_timeout_s). Carries no output."""
    steps: int  # engine steps completed since the last progress report


@dataclass(slots=True, kw_only=True)
class LoadReport:
    """A verifier's load, polled by Serve for the request router (`Verifier.record_routing_stats`)."""
    num_running: int = 0
    num_waiting: int = 0
    queued_prefill_tokens: int = 0  # prompt tokens admitted or waiting, not yet computed
    prefill_tokens_per_s: float = 0.0  # measured by the engine; 0 = not measured yet
    import_tokens_per_s: float = 0.0  # KV store imports, measured by the store client; 0 = not measured yet
    step_s: float = 0.0  # mean engine step time

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, stats: dict | None) -> LoadReport:
        """The report Serve carried; a replica that has not reported yet ({} or None) reads as idle, and keys of
        another version of the verifier (a rolling update) are ignored."""
        stats = stats or {}
        return cls(**{f.name: stats[f.name] for f in fields(cls) if f.name in stats})


@dataclass(slots=True, kw_only=True)
class RoutingUsage:
    """The prefix_cost router's prediction for a request (routing/router_policy.py RouteDecision)."""
    reason: str  # "prefix" | "store" | "hash" | "session" | "only"
    predicted_cached_tokens: int
    predicted_imported_tokens: int


@dataclass(slots=True, kw_only=True)
class Usage:
    """A request's token counts so far, as the front end reports them with each event."""
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens served from a cache: the replica's prefix cache or the KV store
    imported_tokens: int  # of the cached ones, those whose KV blocks came from the cluster's KV store
    spec_rounds: int  # verification rounds that carried a draft
    draft_tokens: int  # draft tokens verified
    accepted_tokens: int  # of those, accepted by the target model
    routing: RoutingUsage | None = None  # None: no prefix_cost router placed the request

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def rejected_tokens(self) -> int:
        return self.draft_tokens - self.accepted_tokens
