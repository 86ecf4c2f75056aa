"""Per-request sampling parameters: the one definition used by ingress, engine and sampler."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Temperatures below this sample as greedy: dividing logits by a tinier one overflows to inf and NaN
# probabilities (a fuzzed 1e-170 failed the whole engine step). vLLM uses the same bound.
GREEDY_BELOW = 1e-5
MAX_STOP_SEQUENCES = 4  # as OpenAI's API
# The detokenizer holds back up to the longest stop string's length of text, and checks every stop string per
# token: both bounds keep that work per token small.
MAX_STOP_CHARS = 256
# The engine checks each sampled token against the set: bounded so a request cannot make the params huge.
MAX_STOP_TOKEN_IDS = 64


# OpenAI's bounds (chat top_logprobs <= 20; completions logprobs <= 5 is checked by that protocol).
MAX_LOGPROBS = 20
MAX_N = 16  # choices per request: each holds its own KV blocks past the shared prompt
MAX_LOGIT_BIAS = 300  # token ids a request may bias (OpenAI's limit)


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, enforced token by token by the grammar engine
    (actors/engine/structured.py): a JSON schema (as JSON text; "json_object" is the schema {"type": "object"}),
    a regular expression, or a Lark grammar (llguidance's dialect, which tool calls use too)."""
    kind: Literal["json_schema", "regex", "lark"]
    value: str


@dataclass
class SamplingParams:
    max_tokens: int | None = 16  # None: as many as the context window and the KV pool allow
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # applied on text by the detokenizer
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    speculate: bool = True  # False: this request decodes without drafts (output is the same either way)
    n: int = 1  # choices; they share the prompt's KV blocks (one prefill, the block table forked)
    # Log-probabilities (float32 log_softmax of the model's raw logits): for each output token the chosen
    # token's and this many top alternatives' (0: the chosen token's only); None: not computed.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for each prompt token (the first has none): `echo`
    # Logits processors, applied in this order before temperature / min_p / top-k / top-p (sampler.py).
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and the output (CTRL-style)
    presence_penalty: float = 0.0  # subtracted once from each token that appeared in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    min_p: float = 0.0  # drop tokens whose probability is below min_p times the top token's
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens were generated
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if len(self.stop) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_CHARS for s in self.stop):
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop strings of at most {MAX_STOP_CHARS} characters")
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be in (0, 2]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias may bias at most {MAX_LOGIT_BIAS} tokens")
        self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()}
        if any(t < 0 for t in self.logit_bias):
            raise ValueError("logit_bias token ids must be >= 0")
        if any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        if self.min_tokens < 0:
            raise ValueError("min_tokens must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be <= max_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_processors(self) -> bool:
        """Logits processors that depend on the sequence's history or a grammar (sampler.apply_processors);
        without them a request takes the plain sampling path."""
        return bool(self.logit_bias or self.repetition_penalty != 1.0 or self.presence_penalty
                    or self.frequency_penalty or self.min_tokens or self.structured is not None)
