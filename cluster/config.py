"""The one configuration schema. It feeds the CLI flags, the YAML file and (later) the Serve config and Helm values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "smollm2-135m"


def default_cache_dir() -> Path:
    """Model cache: $SPECSERVE_CACHE, else $XDG_CACHE_HOME/specserve, else ~/.cache/specserve."""
    if os.environ.get("SPECSERVE_CACHE"):
        return Path(os.environ["SPECSERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "specserve"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    # A name from the model registry (e.g. "smollm2-135m"), a local Hugging Face directory, or a hub id.
    source: str = DEFAULT_MODEL
    # Name served on /v1/models and accepted in requests; defaults to `source`.
    served_name: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # "auto": bfloat16 where the hardware computes it natively, else float32 (CPU) or float16 (GPU).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cache_dir: Path = Field(default_factory=default_cache_dir)
    # Torch threads in each replica that holds a model (CPU); 0 = every core the process may use but one, left to
    # the node's ingress, proxy and Ray (model_loader.default_torch_threads).
    torch_threads: int = Field(0, ge=0)
    # CPU: pack the linear layers' weights for oneDNN once at load (actors/packed_linear.py); off: torch's F.linear.
    pack_weights: bool = True

    @property
    def name(self) -> str:
        return self.served_name or self.source


class EngineConfig(_Strict):
    block_size: int = Field(16, ge=1, le=1024)
    # KV pool size in blocks; 0 = size it from kv_cache_memory_gb.
    num_blocks: int = Field(0, ge=0)
    kv_cache_memory_gb: float = Field(1.0, gt=0)
    max_num_seqs: int = Field(32, ge=1)
    # Token budget of one step: decode tokens first, prefill chunks fill the rest (stall-free batching).
    max_num_batched_tokens: int = Field(512, ge=16)
    # Context window; 0 = the model's max_position_embeddings.
    max_model_len: int = Field(0, ge=0)
    enable_prefix_caching: bool = True
    # CPU: attend decodes and verifications with the compiled kernel that reads the KV cache in place
    # (actors/engine/paged_decode.cpp, built once per machine on first use); off, or where it cannot be built: SDPA
    # over K/V gathered out of the cache.
    paged_kernel: bool = True
    # CPU, Llama-family models (Llama, Mistral, Qwen2, Qwen3, Mixtral, Qwen2-MoE): run the decoder layers as their
    # linears plus a few fused calls (actors/engine/decoder_forward.py), the same arithmetic as the model's own
    # forward; off, or for other models: the model's own forward.
    fused_layers: bool = True
    # Health (Serve's check_health): this many engine steps failing in a row, or one step running longer than
    # max_step_s, fails the replica's health check and Serve replaces it. A step's expert dispatch may wait up to
    # experts.restart_wait_s for an actor to come back, so keep max_step_s above it.
    max_consecutive_step_failures: int = Field(3, ge=1)
    max_step_s: float = Field(180.0, gt=0)
    # CPU, model.torch_threads 0: a step that forwards at least this many tokens (long prefill chunks, or a large
    # batch of draft verifications) runs on every core the process may use rather than every core but one. Such a
    # step is a few large matmuls and streams few tokens a second, so the node's other processes leave the spare
    # core mostly idle meanwhile. 0: off.
    wide_step_tokens: int = Field(256, ge=0)


class SpeculativeConfig(_Strict):
    # none | ngram (prompt lookup + recycled target guesses, inside the verifier) | suffix (draft trees from suffix
    # trees over the request and over recent outputs of its tenant, inside the verifier) | model (a small
    # checkpoint with the target's tokenizer) | layer_skip (the target with a subset of its layers) | int8 (int8
    # copy of the target, CPU). The model methods run in drafter replicas.
    method: Literal["none", "ngram", "suffix", "model", "layer_skip", "int8"] = "suffix"
    # Most draft tokens verified per round, a chain's length or a tree's size (adaptive), or the k of every round
    # (adaptive: false). Unset: 16 for suffix trees, 4 for the chain methods.
    num_speculative_tokens: int | None = Field(None, ge=1, le=64)
    adaptive: bool = True
    # adaptive: also compare, per batch size, the tokens a second of steps commits with drafts and without
    # (alternating windows of steps), and draft only at batch sizes where drafting is ahead.
    gate: bool = True
    # method=model: registry name, local directory or hub id of the draft checkpoint.
    draft_model: str | None = None
    # method=layer_skip: the layers to keep, or else this fraction of them, evenly spaced.
    layer_skip_layers: list[int] | None = None
    layer_skip_fraction: float = Field(0.5, gt=0, le=1)
    # Model drafters: sample drafts from the draft distribution for sampled requests (and ship it back for
    # rejection sampling), or always draft the argmax (one-hot q, nothing to ship).
    draft_sampling: Literal["greedy", "sampled"] = "greedy"
    ngram_min: int = Field(1, ge=1)
    ngram_max: int = Field(3, ge=1)
    recycle: bool = True  # n-gram: extend drafts with recycled target guesses (Token Recycling)
    # n-gram: > 1 keeps each token's top guesses and drafts a tree of them where prompt lookup finds nothing.
    recycle_width: int = Field(1, ge=1, le=16)
    # suffix: longest pattern matched (the suffix trees' depth); tokens of finished outputs kept for the global
    # trees over all tenants (oldest request evicted first); a draft of a pattern of m tokens has at most
    # spec_factor * m tokens; branches less likely than min_token_prob are not drafted.
    # suffix: where the trees live: in each verifier, or in the drafter replicas, where each tenant's global tree
    # learns from the outputs of every verifier.
    suffix_in: Literal["verifier", "drafter"] = "verifier"
    suffix_max_depth: int = Field(24, ge=2, le=128)
    suffix_max_global_tokens: int = Field(200_000, ge=0)
    suffix_spec_factor: float = Field(2.0, gt=0)
    suffix_min_token_prob: float = Field(0.1, ge=0, lt=1)
    # suffix_in: drafter: tokens of live sequences a drafter replica mirrors (least recently drafted dropped first).
    suffix_drafter_max_tokens: int = Field(1_000_000, ge=1)
    draft_kv_cache_memory_gb: float = Field(0.25, gt=0)
    # A drafter call slower than this is given up for the round (the sequence decodes without a draft).
    timeout_s: float = Field(2.0, gt=0)
    # With drafter.autoscaling: drafter replicas follow the verifiers that draft, this many per verifier
    # (cluster/autoscaling.py); the drafter's min/max replicas and delays still apply.
    drafters_per_verifier: float = Field(1.0, gt=0)

    @property
    def remote(self) -> bool:
        """Drafts come from drafter replicas."""
        return self.method in ("model", "layer_skip", "int8") or (self.method == "suffix" and self.suffix_in == "drafter")

    @property
    def max_draft_tokens(self) -> int:
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return 16 if self.method == "suffix" else 4


class AutoscalingConfig(_Strict):
    """Serve autoscaling of one deployment (Serve's own field names): replicas follow the ongoing requests per
    replica. Replicas that cannot be placed become resource demand that Ray's autoscaler (KubeRay's in-tree one
    on Kubernetes) answers with nodes."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.min_replicas must be <= autoscaling.max_replicas")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("autoscaling.initial_replicas must be within [min_replicas, max_replicas]")
        return self

    def serve_options(self) -> dict:
        return self.model_dump(exclude_none=True)


class DeploymentConfig(_Strict):
    # A fixed replica count, unless `autoscaling` is set.
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = Field(0.5, gt=0)
    num_gpus: float = Field(0, ge=0)
    # Custom Ray resources each replica needs (e.g. pin verifiers to a worker group that advertises them).
    resources: dict[str, float] = Field(default_factory=dict)
    # Requests a replica holds at once (running + its engine's queue): the bounded queue per replica.
    max_ongoing_requests: int = Field(64, ge=1)
    # Requests a caller (each ingress replica) queues while every replica is full; beyond it the request is
    # refused at once (HTTP 429 / RESOURCE_EXHAUSTED with Retry-After). -1 = unbounded.
    max_queued_requests: int = Field(-1, ge=-1)
    # A replica being removed stops taking requests and finishes its in-flight ones for up to this long.
    graceful_shutdown_timeout_s: float = Field(60.0, gt=0)


class KVStoreConfig(_Strict):
    """The cluster tier of the KV cache: full blocks published to a store indexed in Redis (cluster/kv/)."""

    enabled: bool = True
    # Where block payloads live: "holder" = a holder actor per node (Ray object store), Redis keeps only the
    # index; "redis" = payloads in Redis too (small deployments, no holder actors).
    payload: Literal["holder", "redis"] = "holder"
    # Object-store bytes each node's holder keeps before evicting its coldest blocks (and their index entries).
    holder_capacity_gb: float = Field(2.0, gt=0)
    # Index entries (ready blocks) per namespace; beyond it the least recently used are deleted.
    max_index_entries: int = Field(200_000, ge=1)
    # A ready entry not hit for this long expires (each hit refreshes it).
    entry_ttl_s: float = Field(3600.0, gt=0)
    # A writer's claim on a block expires after this, so a writer that died never blocks the key.
    claim_ttl_s: float = Field(30.0, gt=0)
    # Export a block the n-th time a replica computes it: 1 = always, 2 = when its prefix is seen a second time.
    admit_after: int = Field(1, ge=1)
    # Prompts whose missing prefix is shorter than this many blocks skip the store (a local prefill is cheaper).
    min_import_blocks: int = Field(1, ge=1)
    # A lookup or payload fetch slower than this is a miss; after a Redis error the store is skipped this long.
    timeout_s: float = Field(2.0, gt=0)
    retry_after_s: float = Field(2.0, gt=0)
    # Exports waiting for Redis/holders beyond this many bytes are dropped (the hot path never waits).
    max_pending_export_mb: float = Field(256.0, gt=0)
    # Blocks computed within this window are exported together (one index claim, transfer and commit). Chat at 16
    # streams on 2 cores: the store on cost 1.23x in output tok/s with one export per engine step, 1.09x with
    # 0.1 s batches (docs/performance.md, "The forward"). 0 = one export per step.
    export_batch_s: float = Field(0.1, ge=0)
    # The tenant of requests that name none (no API key, no tenant field/header). Tenants key their own prefixes.
    tenant: str = "default"


class RouterConfig(_Strict):
    """How requests are spread over verifier replicas (routing/)."""

    # prefix_cost: the replica with the lowest estimated time to first token, from KV events of every replica;
    # pow2: Serve's power of two choices; round_robin: in turn (for comparison).
    policy: Literal["prefix_cost", "pow2", "round_robin"] = "prefix_cost"
    # How often Serve collects each verifier's load report.
    stats_period_s: float = Field(1.0, gt=0)
    # Hot-spot guard: skip a replica whose load exceeds hot_factor x mean + hot_slack.
    hot_factor: float = Field(2.0, ge=1)
    hot_slack: int = Field(4, ge=0)
    # A request leaves the replica holding most of its prefix only for one estimated this much faster (load
    # reports are up to stats_period_s old).
    switch_margin: float = Field(0.2, ge=0)
    max_index_blocks: int = Field(1_000_000, ge=1)
    # prefix_cost: requests carrying this HTTP header go to one replica per header value (session affinity).
    session_header: str = "x-session-id"


class ExpertsAutoscalingConfig(_Strict):
    """Expert actors follow the load (actors/experts/scaling.py): each round of the balancer asks how many
    replicas every expert needs so that none serves more than target_rows_per_slot_s, and how many actors hold
    them (experts.num_actors is the count it starts with)."""

    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(4, ge=1)
    # Token rows per second one replica of an expert should serve at most. A step sends all of an expert's rows
    # to one of its replicas (so outputs stay bit-identical); only more replicas spread a hot expert's load.
    target_rows_per_slot_s: float = Field(1000.0, gt=0)
    # A new count is applied once it has been wanted this long (moving expert weights is not free).
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ExpertsAutoscalingConfig":
        if self.min_actors > self.max_actors:
            raise ValueError(f"experts.autoscaling.min_actors ({self.min_actors}) must be <= "
                             f"experts.autoscaling.max_actors ({self.max_actors})")
        return self


class ExpertsConfig(_Strict):
    """Mixture-of-Experts models: where the experts run (actors/experts/)."""

    # 0: in the verifier, as the model defines them; N: in N expert actors (a placement group spreads them over
    # nodes), each holding expert e of every MoE layer for e % N == its index. Dense models ignore it.
    num_actors: int = Field(0, ge=0)
    num_cpus: float = Field(0.25, gt=0)
    # Custom Ray resources each expert actor asks for (e.g. the chart's expert worker group offers them).
    resources: dict[str, float] = Field(default_factory=dict)
    # Dense models: run each MLP as num_actors slices of its intermediate dimension in the actors (exercises the
    # expert path with a dense model; it only adds transport cost).
    shard_dense_ffn: bool = False
    # A dispatch message unanswered this long is re-sent (to a replica of its experts, or after a restart).
    timeout_s: float = Field(30.0, gt=0)
    # A layer whose actors stay unavailable this long (waiting for Ray to restart one, re-sending) fails its
    # engine step: the requests in it get an error instead of waiting for minutes.
    restart_wait_s: float = Field(90.0, gt=0)
    # Per-layer messages: "channel" (a direct TCP connection to each actor) or "ray" (plain actor calls, slower).
    transport: Literal["channel", "ray"] = "channel"
    # Load balancing: every rebalance_period_s (0: never) recompute placement from the tokens the actors counted,
    # giving each actor redundant_slots extra expert slots per layer for replicas of hot experts.
    rebalance_period_s: float = Field(60.0, ge=0)
    redundant_slots: int = Field(1, ge=0)
    # None: num_actors actors for good. Set: the balancer also resizes the actors each round, from num_actors.
    autoscaling: ExpertsAutoscalingConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> "ExpertsConfig":
        sc = self.autoscaling
        if sc is None:
            return self
        if not sc.min_actors <= self.num_actors <= sc.max_actors:
            raise ValueError(f"experts.num_actors ({self.num_actors}), the initial count with experts.autoscaling, "
                             f"must be within [experts.autoscaling.min_actors, max_actors] = "
                             f"[{sc.min_actors}, {sc.max_actors}]")
        if not self.rebalance_period_s:
            raise ValueError("experts.autoscaling needs experts.rebalance_period_s > 0 (each balancer round "
                             "decides the actor count)")
        if not self.redundant_slots:
            raise ValueError("experts.autoscaling needs experts.redundant_slots >= 1 (replicas of hot experts "
                             "live in the redundant slots; without them more actors add none)")
        return self


class TenantLimits(_Strict):
    """Per-tenant limits, enforced by each ingress replica (0 = no limit)."""

    max_concurrent_requests: int = Field(0, ge=0)
    requests_per_s: float = Field(0.0, ge=0)
    # Requests a tenant may send at once after being idle (token bucket size); 0 = max(1, requests_per_s).
    burst: int = Field(0, ge=0)


class AuthConfig(_Strict):
    """API keys (routing/auth.py). With none configured, requests need no key."""

    # Inline `key: tenant` pairs (demos, tests). Production: api_keys_file.
    api_keys: dict[str, str] = Field(default_factory=dict)
    # A YAML mapping `key: tenant` (e.g. a mounted Kubernetes Secret); re-read when the file changes.
    api_keys_file: str | None = None
    # Limits of every tenant, and per-tenant overrides.
    tenant_limits: TenantLimits = Field(default_factory=TenantLimits)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # gRPC API (protos/specserve/v1), health and reflection; 0 = off. Every ingress replica serves it, so the
    # ingress runs at most one replica per node, and two apps on one node need different ports.
    grpc_port: int = Field(9000, ge=0, le=65535)
    # Ray cluster address to join ("auto": the one `ray start` left on this machine); None joins RAY_ADDRESS if set,
    # else starts a Ray instance of its own.
    ray_address: str | None = None
    # Where `specserve serve` (or the bench) starts Ray itself: Ray Serve's direct ingress, the ingress replica
    # answering HTTP on http_port itself instead of behind Serve's proxy actor (one process hop less per request
    # and streamed chunk; docs/performance.md, "The token path"); Serve's proxy, which that mode keeps on the head
    # node, gets a free port. It starts a Ray instance of its own even where one runs on the machine already. On a
    # Ray cluster specserve joins it does nothing (a warning says so): HTTP goes through Serve's proxy.
    direct_ingress: bool = False
    # Redis URL for the KV block index; None starts an embedded redis-server.
    redis_url: str | None = None
    # Redis Sentinel instead of a URL: "host:port" of each sentinel and the monitored master's name.
    redis_sentinels: list[str] = Field(default_factory=list)
    redis_sentinel_master: str = "mymaster"
    # A file holding Redis's password (AUTH), e.g. a mounted Secret; read where clients connect, so the password
    # itself never travels in configs (keep it out of redis_url too). `specserve serve` sets it for its embedded
    # Redis.
    redis_password_file: str | None = None
    app_name: str = "specserve"
    route_prefix: str = "/"
    # Bounds on a single request: prompt tokens, max_tokens (0 = the context window decides).
    max_prompt_tokens: int = Field(0, ge=0)
    max_tokens: int = Field(0, ge=0)
    # Longest a request may run when the client set no deadline (0 = no limit). A client's own deadline (gRPC
    # deadline, HTTP header X-Request-Timeout in seconds) applies when shorter.
    request_timeout_s: float = Field(0.0, ge=0)
    # Longest a request may wait for its next output (its first token included) while its replica's engine
    # completes no step (0 = no limit): a request whose replica cannot make progress (an expert actor that cannot
    # restart, a stuck step) fails with 504 rather than hang. A request waiting behind others in a busy replica
    # is told of its engine's steps every quarter of this, and waits on.
    stall_timeout_s: float = Field(120.0, ge=0)
    # Work bounded before a request is admitted (HTTP 413 / 400, gRPC RESOURCE_EXHAUSTED / INVALID_ARGUMENT).
    max_request_bytes: int = Field(2 << 20, ge=1024)  # HTTP body, counted while it is read
    max_messages: int = Field(2048, ge=1)  # chat messages of one request
    # Chat templates and tokenizers run in this many threads of each ingress replica (never on its event loop);
    # admitted requests beyond max_pending_prompts waiting for one are refused (429, retriable).
    tokenizer_threads: int = Field(2, ge=1)
    max_pending_prompts: int = Field(64, ge=1)
    # gRPC server: concurrent RPCs per ingress replica (health checks included: keep it well above the ingress's
    # max_ongoing_requests), and connection lifetimes (a client's connection is closed gracefully after
    # grpc_max_connection_age_s, so load spreads over new ingress replicas).
    grpc_max_concurrent_rpcs: int = Field(1024, ge=1)
    grpc_max_connection_age_s: float = Field(1800.0, gt=0)
    grpc_max_connection_idle_s: float = Field(900.0, gt=0)
    # How often an ingress replica re-checks that a verifier answers (its /health and gRPC health follow).
    readiness_period_s: float = Field(5.0, gt=0)
    # How often each replica publishes its metrics (for /metrics, via Redis).
    metrics_period_s: float = Field(2.0, gt=0)
    # 0 = off. Each ingress replica also serves its share of the app's metrics on this port (every replica's
    # series from exactly one ingress), for a scraper of every ingress pod (the chart's ServiceMonitor).
    metrics_port: int = Field(0, ge=0, le=65535)


class SpecserveConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)
    verifier: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(max_queued_requests=128))
    # Drafter replicas (speculative.method model / layer_skip / int8, or suffix in drafters); num_cpus/num_gpus go to
    # the draft worker.
    drafter: DeploymentConfig = Field(default_factory=DeploymentConfig)
    # The ingress's work per request is waiting: many requests per replica, and a bounded queue in Serve's proxy
    # (beyond it a request is refused with 503 rather than wait unboundedly).
    ingress: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig(
        num_cpus=0.25, max_ongoing_requests=256, max_queued_requests=256))
    kv_store: KVStoreConfig = Field(default_factory=KVStoreConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)

    @model_validator(mode="after")
    def _check(self) -> "SpecserveConfig":
        if self.engine.max_num_batched_tokens < self.engine.max_num_seqs:
            raise ValueError("engine.max_num_batched_tokens must be >= engine.max_num_seqs (one decode token each)")
        sp = self.speculative
        if sp.ngram_min > sp.ngram_max:
            raise ValueError("speculative.ngram_min must be <= speculative.ngram_max")
        if sp.remote and self.drafter.autoscaling and self.drafter.autoscaling.min_replicas < 1:
            # Idle drafters would scale to zero, and the verifiers' worker discovery would cold-start one again.
            raise ValueError("drafter.autoscaling.min_replicas must be >= 1 (drafters follow active verifiers)")
        if sp.method == "model" and not sp.draft_model:
            raise ValueError("speculative.method 'model' needs speculative.draft_model")
        ports = [p for p in (self.server.http_port, self.server.grpc_port, self.server.metrics_port) if p]
        if len(ports) != len(set(ports)):
            raise ValueError("server.http_port, server.grpc_port and server.metrics_port must differ")
        if not self.server.route_prefix.startswith("/"):
            raise ValueError("server.route_prefix must start with '/'")
        for s in self.server.redis_sentinels:
            host, _, port = s.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"server.redis_sentinels: {s!r} is not host:port")
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: dict | None = None) -> "SpecserveConfig":
        """YAML file (optional) with dotted-key overrides on top, e.g. {"engine.block_size": 32}."""
        data: dict = {}
        if path:
            text = Path(path).read_text()
            data = yaml.safe_load(text) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping at the top level")
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        return cls.model_validate(data)
