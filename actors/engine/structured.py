"""Structured outputs: token masks that keep the generated text inside a JSON schema, a regular expression or a
Lark grammar, computed by llguidance.

The engine builds one GrammarCompiler from its tokenizer, one GrammarMatcher per constrained sequence, and per step
one bitmask row per position it samples (the next token, and after each draft token): bit i of a row says token i
is allowed. Masks are computed on CPU threads (llguidance releases the GIL), so MaskWorker overlaps them with the
forward pass. The grammar owns EOS: once the text satisfies the grammar EOS is allowed, and after EOS (or at the end
of a grammar that cannot continue) the matcher is done.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import llguidance.torch
import torch

if TYPE_CHECKING:
    from specserve.actors.engine.sampling_params import StructuredOutput

# Fixed separators, no free whitespace: llguidance's default allows any run of whitespace between JSON tokens, and
# a small model that starts on newlines or spaces there can go on with them until max_tokens, never closing the
# object. One space after ',' and ':' is what models see most (Python's json.dumps default), so the constraint
# fights their habits least. Applied as overrides of a schema's own "x-guidance" options.
JSON_OPTIONS: dict = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
MAX_ERROR_CHARS = 500  # llguidance's messages quote the grammar; a client needs the first lines only
_KIND_NAMES = {"json_schema": "JSON schema", "regex": "regular expression", "lark": "Lark grammar"}


def _grammar(spec: StructuredOutput) -> str:
    """llguidance's grammar text for a spec; ValueError if it is not even well formed."""
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.value)
        except ValueError as exc:
            raise ValueError(f"invalid JSON schema: not JSON ({exc})") from None
        if schema is True:
            schema = {}  # any JSON value
        if not isinstance(schema, dict):
            raise ValueError("invalid JSON schema: must be an object (or true)")
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise ValueError(f"invalid JSON schema: {exc}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(spec.value)
    raise ValueError(f"unknown structured output kind {spec.kind!r}")


def _invalid(spec: StructuredOutput, error: str) -> ValueError:
    return ValueError(f"invalid {_KIND_NAMES.get(spec.kind, spec.kind)}: {error.strip()[:MAX_ERROR_CHARS]}")


def check_structured(spec: StructuredOutput) -> None:
    """Raise ValueError saying what is wrong when the schema / regex / grammar is invalid (no tokenizer needed)."""
    error = llguidance.LLMatcher.validate_grammar(_grammar(spec))
    if error:
        raise _invalid(spec, error)


def allocate_masks(rows: int, vocab_size: int) -> torch.Tensor:
    """A CPU bitmask [rows, ceil(vocab_size / 32)] int32 with every token allowed (a row left unfilled
    constrains nothing)."""
    return torch.full(llguidance.torch.get_bitmask_shape(rows, vocab_size), -1, dtype=torch.int32)


def apply_masks(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits [rows, V] of disallowed tokens to -inf, in place (on the logits' device)."""
    rows, vocab = logits.shape
    words = bitmask.to(logits.device, non_blocking=True)
    shifts = torch.arange(32, device=logits.device, dtype=torch.int32)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().reshape(rows, -1)
    width = min(vocab, allowed.shape[1])
    logits[:, :width].masked_fill_(~allowed[:, :width], float("-inf"))
    logits[:, width:] = float("-inf")  # ids past the mask are past the tokenizer: never allowed


def mask_row(tokens, vocab_size: int) -> torch.Tensor:
    """One bitmask row allowing exactly tokens."""
    words = [0] * llguidance.torch.get_bitmask_shape(1, vocab_size)[1]
    for token in tokens:
        words[token // 32] |= 1 << (token % 32)
    return torch.tensor([word - (1 << 32) if word >= 1 << 31 else word for word in words], dtype=torch.int32)


class GrammarCompiler:
    """Builds matchers for one tokenizer; made once per engine (wrapping the tokenizer is the slow part)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int] | None = None) -> None:
        """tokenizer: a fast Hugging Face tokenizer; vocab_size: the model's logits width; eos_token_ids: the
        engine's end tokens (default: the tokenizer's EOS), which the grammar allows once it accepts."""
        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens")
        # n_vocab = the logits' width: ids past the tokenizer have no bytes, so llguidance never allows them.
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size,
                                                      eos_token=list(eos_token_ids) if eos_token_ids else None)
        self.vocab_size = vocab_size
        self.eos_tokens = frozenset(self.tokenizer.eos_tokens)
        self.eos_only_mask = mask_row(self.eos_tokens, vocab_size)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        matcher = llguidance.LLMatcher(self.tokenizer, _grammar(spec), log_level=0)
        if matcher.is_error():
            raise _invalid(spec, matcher.get_error())
        return GrammarMatcher(matcher, self)


class GrammarMatcher:
    """The grammar state of one sequence: which tokens may come next."""

    def __init__(self, matcher: llguidance.LLMatcher, compiler: GrammarCompiler) -> None:
        self._matcher = matcher
        self._compiler = compiler

    @property
    def done(self) -> bool:
        """Nothing may follow: EOS was accepted, or the grammar cannot continue (only EOS is allowed then)."""
        return self._matcher.is_stopped()

    def fork(self) -> GrammarMatcher:
        return GrammarMatcher(self._matcher.deep_copy(), self._compiler)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of tokens, from the start, the grammar accepts in the current state (which is unchanged).
        The mask can be stricter: where the grammar forces some text, llguidance allows only that text's
        canonical tokens, so verification still rejects a draft that spells forced text differently."""
        count = self._matcher.validate_tokens(tokens)
        if count < len(tokens) and tokens[count] in self._compiler.eos_tokens:
            # llguidance's validation refuses EOS once the grammar stopped, while its mask (and consume) allow it.
            self._consume(tokens[:count])
            stopped = self._matcher.is_stopped()
            self._rollback(count)
            count += stopped
        return count

    def accept(self, tokens: list[int]) -> None:
        """Commit tokens; ValueError (state unchanged) if one is not allowed."""
        valid = self.valid_prefix(tokens)
        if valid < len(tokens):
            raise ValueError(f"token {tokens[valid]} at position {valid} violates the grammar")
        if tokens and tokens[-1] in self._compiler.eos_tokens:  # EOS ends a valid list
            self._consume(tokens[:-1])
            if not self._matcher.is_stopped():  # a stopped matcher refuses to consume the EOS it allows
                self._consume(tokens[-1:])
        else:
            self._consume(tokens)

    def fill_masks(self, bitmask: torch.Tensor, start_row: int, draft: list[int]) -> None:
        """Row start_row: the tokens allowed now; row start_row + i + 1: after draft[:i + 1]. The draft must be
        valid (valid_prefix); rows after an EOS allow only EOS. The state is unchanged afterwards."""
        if self.valid_prefix(draft) < len(draft):
            raise ValueError("fill_masks needs a valid draft: cut it with valid_prefix first")
        body = draft[:-1] if draft and draft[-1] in self._compiler.eos_tokens else draft  # EOS ends a valid draft
        for i in range(len(body) + 1):
            llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, start_row + i)
            if i < len(body):
                self._consume(body[i:i + 1])
        self._rollback(len(body))
        if len(body) < len(draft):
            bitmask[start_row + len(draft)] = self._compiler.eos_only_mask

    def _consume(self, tokens: list[int]) -> None:
        if tokens and not self._matcher.consume_tokens(tokens):
            raise RuntimeError(f"grammar matcher failed: {self._matcher.get_error()[:MAX_ERROR_CHARS]}")

    def _rollback(self, count: int) -> None:
        if count and not self._matcher.rollback(count):
            raise RuntimeError(f"grammar matcher failed to roll back: {self._matcher.get_error()[:MAX_ERROR_CHARS]}")


class MaskWorker:
    """Computes a step's masks on a background thread (llguidance spreads the matchers over its own thread pool
    and releases the GIL) while the forward pass runs. The matchers must not change until result() returns."""

    def __init__(self, compiler: GrammarCompiler, threads: int | None = None) -> None:
        self._compiler = compiler
        self._executor = llguidance.LLExecutor(threads)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")

    def start(self, items: list[tuple[GrammarMatcher, list[int]]]) -> Future[torch.Tensor]:
        """Masks for each (matcher, draft): 1 + len(draft) rows each, in order, as fill_masks writes them;
        .result() gives the bitmask (and raises what the computation raised)."""
        return self._thread.submit(self._compute, [(matcher, list(draft)) for matcher, draft in items])

    def _compute(self, items: list[tuple[GrammarMatcher, list[int]]]) -> torch.Tensor:
        eos_tokens = self._compiler.eos_tokens
        bitmask = allocate_masks(sum(1 + len(draft) for _, draft in items), self._compiler.vocab_size)
        now, with_drafts, after_eos, row = [], [], [], 0
        for matcher, draft in items:
            if matcher.valid_prefix(draft) < len(draft):
                raise ValueError("MaskWorker needs valid drafts: cut them with valid_prefix first")
            rows = 1 + len(draft)
            # A valid draft ends at its EOS. llguidance leaves the row after an EOS unwritten where the grammar had
            # already stopped, so the draft goes without it and that row is set here, as fill_masks sets it.
            if draft and draft[-1] in eos_tokens:
                after_eos.append(row + len(draft))
                draft = draft[:-1]
            if draft:
                with_drafts.append((matcher._matcher, row, draft))
            else:  # llguidance's draft variant refuses empty drafts
                now.append((matcher._matcher, row))
            row += rows
        if now:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, now, bitmask)
        if with_drafts:
            llguidance.torch.fill_next_token_bitmask_par_with_draft_tokens(self._executor, with_drafts, bitmask)
        if after_eos:
            bitmask[after_eos] = self._compiler.eos_only_mask
        return bitmask

    def close(self) -> None:
        self._thread.shutdown(wait=True)
