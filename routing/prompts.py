"""Prompts to token ids, off the ingress event loop.

Chat templates (Jinja) and tokenizers take time proportional to the input; on the event loop they would stall
every other request of the replica, its health checks included. They run here in a few threads, each with its
own tokenizer (a fast tokenizer is not safe to call from two threads at once), after the request was admitted,
and only after the cheap bounds (message count, characters) have passed. Requests waiting for a thread are
bounded too: beyond `max_pending` the request is refused (429, retriable), not queued.

Tools (OpenAI `tools`) reach the model through the chat template when it renders them (it names `tools`);
otherwise a system message describes them and the call format of routing/tools.py, and the conversation's past calls
and results are written in that format.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from jinja2 import TemplateError

from specserve.routing.errors import APIError, invalid
from specserve.routing.tools import (ToolFunction, arguments_value, format_tool_call, format_tool_response,
                                     tools_system_prompt)

CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
# A token is rarely more than a few characters; text beyond this many per allowed prompt token cannot fit.
CHARS_PER_TOKEN_BOUND = 64


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the client sent it: chat messages, text or token ids. `param` names the field in
    errors. A chat message is a dict as OpenAI's: "role", "content" (str, or None beside tool calls), and
    optionally "tool_calls" (assistant: [{"id", "type": "function", "function": {"name", "arguments": JSON
    text}}]), "tool_call_id" and "name" (role "tool": the result of that call). `tools` are offered to the model
    (chat only)."""
    kind: Literal["chat", "text", "token_ids"]
    value: list[dict] | str | list[int]
    param: str
    tools: tuple[ToolFunction, ...] = ()


class PromptRenderer:
    def __init__(self, tokenizer, *, vocab_size: int, max_prompt_tokens: int, max_messages: int, threads: int,
                 max_pending: int):
        self.vocab_size = vocab_size  # token ids must index the model's embedding rows
        self.max_prompt_tokens = max_prompt_tokens
        self.max_chars = CHARS_PER_TOKEN_BOUND * max_prompt_tokens
        self.max_messages = max_messages
        self.max_pending = max_pending
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # A template that renders tools itself names them (Jinja has no other way to receive them).
        self.template_renders_tools = "tools" in str(getattr(tokenizer, "chat_template", None) or "")
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
            if not any(m.get("content") or m.get("tool_calls") for m in messages):
                raise invalid(prompt.param, "all message contents are empty")
            chars = sum(_message_chars(m) for m in messages)
            chars += sum(len(t.name) + len(t.description) + len(json.dumps(t.parameters)) for t in prompt.tools)
            self._check_chars(chars, prompt.param)
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
        messages, tools = prompt.value, prompt.tools
        if self.has_template:
            try:
                if self.template_renders_tools:
                    text = tokenizer.apply_chat_template(template_messages(messages),
                                                         tools=[t.openai() for t in tools] or None,
                                                         add_generation_prompt=True, tokenize=False)
                else:
                    text = _apply_with_tools_described(tokenizer, messages, tools)
            except TemplateError as exc:  # templates raise on what they refuse (roles out of order, ...)
                raise invalid(prompt.param, f"the model's chat template refused them: {exc}") from exc
        else:  # base models without a template: plain role-prefixed lines
            lines = tools_described(messages, tools, tool_role="tool")
            text = "".join(f"{m['role']}: {m['content']}\n" for m in lines) + "assistant:"
        # A template may add text per message (role headers, system prompts): bound what reaches the tokenizer.
        self._check_chars(len(text), prompt.param)
        return text


# ---- chat messages with tools ------------------------------------------------------------------------------------
def _message_chars(message: dict) -> int:
    chars = len(message["role"]) + len(message.get("content") or "")
    for call in message.get("tool_calls") or ():
        chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return chars


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages for a template that renders tools: as Hugging Face's templates expect them (content a string,
    a call's arguments an object where they parse)."""
    out = []
    for m in messages:
        message = {"role": m["role"], "content": m.get("content") or ""}
        if m.get("tool_calls"):
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["function"]["name"],
                                                   "arguments": arguments_value(c["function"]["arguments"])}}
                                     for c in m["tool_calls"]]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                message[key] = m[key]
        out.append(message)
    return out


def tools_described(messages: list[dict], tools: tuple[ToolFunction, ...], *, tool_role: str) -> list[dict]:
    """Plain {"role", "content"} messages for a template that knows nothing of tools: the tools and the call format
    in the system message (after the client's own), past calls written as the model writes them, and the results
    of consecutive tool messages in one message of `tool_role`."""
    out: list[dict] = []
    previous_role = None
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(format_tool_call(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        if m["role"] == "tool" and previous_role == "tool":
            out[-1]["content"] += "\n" + format_tool_response(content)
        elif m["role"] == "tool":
            out.append({"role": tool_role, "content": format_tool_response(content)})
        else:
            out.append({"role": m["role"], "content": content})
        previous_role = m["role"]
    if tools:
        described = tools_system_prompt(tools)
        if out and out[0]["role"] in ("system", "developer"):
            own = out[0]["content"]
            out[0] = {"role": out[0]["role"], "content": f"{own}\n\n{described}" if own else described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def _apply_with_tools_described(tokenizer, messages: list[dict], tools: tuple[ToolFunction, ...]) -> str:
    """Tool results as role "tool" where the template takes that role, else as the user's."""
    try:
        return tokenizer.apply_chat_template(tools_described(messages, tools, tool_role="tool"),
                                             add_generation_prompt=True, tokenize=False)
    except TemplateError:
        if not any(m["role"] == "tool" for m in messages):
            raise
    return tokenizer.apply_chat_template(tools_described(messages, tools, tool_role="user"),
                                         add_generation_prompt=True, tokenize=False)
