"""Prompts to token ids, off the ingress event loop.

Chat templates (Jinja) and tokenizers take time proportional to the input; on the event loop they would stall
every other request of the replica, its health checks included. They run here in a few threads, each with its
own tokenizer (a fast tokenizer is not safe to call from two threads at once), after the request was admitted,
and only after the cheap bounds (message count, characters) have passed. Requests waiting for a thread are
bounded too: beyond `max_pending` the request is refused (429, retriable), not queued.
"""

from __future__ import annotations

import asyncio
import copy
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError

from specserve.routing.errors import APIError, invalid

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# A token is rarely more than a few characters; text beyond this many per allowed prompt token cannot fit.
CHARS_PER_TOKEN_BOUND = 64


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the client sent it: chat messages ({"role", "content"}), text or token ids.
    `param` names the field in errors."""
    kind: Literal["chat", "text", "token_ids"]
    value: list[dict] | str | list[int]
    param: str


class PromptRenderer:
    def __init__(self, tokenizer, *, vocab_size: int, max_prompt_tokens: int, max_messages: int, threads: int,
                 max_pending: int):
        self.vocab_size = vocab_size  # token ids must index the model's embedding rows
        self.max_prompt_tokens = max_prompt_tokens
        self.max_chars = CHARS_PER_TOKEN_BOUND * max_prompt_tokens
        self.max_messages = max_messages
        self.max_pending = max_pending
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(threads):  # one per thread: a thread always finds one free
            self._tokenizers.put(copy.deepcopy(tokenizer))
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="prompts")
        self.pending = 0  # admitted requests waiting for or holding a thread

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- bounds checked on the event loop (cheap: no template, no tokenizer) ---------------------------------
    def check(self, prompt: Prompt) -> None:
        """Refuse what is malformed or too large before any real work (400 naming the field)."""
        if not prompt.value:
            raise invalid(prompt.param, "must hold at least one message" if prompt.kind == "chat" else
                          "must not be empty")
        if prompt.kind == "chat":
            messages = prompt.value
            if len(messages) > self.max_messages:
                raise invalid(prompt.param, f"{len(messages)} messages, more than this server's limit of "
                                            f"{self.max_messages}")
            for i, m in enumerate(messages):
                if m["role"] not in CHAT_ROLES:
                    raise invalid(f"{prompt.param}[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
            if not any(m["content"] for m in messages):
                raise invalid(prompt.param, "all message contents are empty")
            self._check_chars(sum(len(m["content"]) + len(m["role"]) for m in messages), prompt.param)
        elif prompt.kind == "text":
            self._check_chars(len(prompt.value), prompt.param)
        else:
            self.check_length(len(prompt.value), prompt.param)  # before looking at each id
            if any(t < 0 or t >= self.vocab_size for t in prompt.value):
                raise invalid(prompt.param, f"token ids must be in [0, {self.vocab_size})")

    def _check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise APIError(400, f"{param}: {chars} characters, more than any prompt of at most "
                                f"{self.max_prompt_tokens} tokens", param=param, code="context_length_exceeded")

    def check_length(self, n: int, param: str) -> None:
        if n > self.max_prompt_tokens:
            raise APIError(400, f"{param}: {n} tokens, more than the limit of {self.max_prompt_tokens}",
                           param=param, code="context_length_exceeded")

    # ---- the work, in the pool -------------------------------------------------------------------------------
    async def render(self, prompt: Prompt) -> list[int]:
        """The prompt's token ids (checked: call after check(), once the request is admitted)."""
        if prompt.kind == "token_ids":
            return list(prompt.value)
        if self.pending >= self.max_pending:
            raise APIError(429, f"server busy: {self.pending} prompts are waiting to be tokenized, retry later",
                           code="tokenizer_busy", retry_after_s=1.0)
        self.pending += 1
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._pool, self._render, prompt)
        finally:
            self.pending -= 1
        self.check_length(len(ids), prompt.param)
        return ids

    def _render(self, prompt: Prompt) -> list[int]:
        tokenizer = self._tokenizers.get()
        try:
            if prompt.kind == "text":
                return tokenizer(prompt.value).input_ids
            return tokenizer(self._chat_text(tokenizer, prompt), add_special_tokens=False).input_ids
        finally:
            self._tokenizers.put(tokenizer)

    def _chat_text(self, tokenizer, prompt: Prompt) -> str:
        messages = prompt.value
        if self.has_template:
            try:
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except TemplateError as exc:  # templates raise on what they refuse (roles out of order, ...)
                raise invalid(prompt.param, f"the model's chat template refused them: {exc}") from exc
        else:  # base models without a template: plain role-prefixed lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        # A template may add text per message (role headers, system prompts): bound what reaches the tokenizer.
        self._check_chars(len(text), prompt.param)
        return text
