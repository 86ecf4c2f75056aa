"""Tool calls (OpenAI `tools` / `tool_choice`): the tools in the prompt, the grammar that forces a call, and the
parser that finds calls in the generated text.

A model calls a function by writing, for each call, the block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(the Hermes convention, which many chat models were tuned on). The prompt describes the tools and this format
(routing/prompts.py, for templates that do not render tools themselves), `tool_grammar` constrains the output to such
blocks when the client requires a call, and `ToolCallParser` turns the blocks back into OpenAI `tool_calls`.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specserve.actors.engine.sampling_params import StructuredOutput
from specserve.actors.engine.structured import JSON_OPTIONS, check_structured

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"
# OpenAI's rule for function names; it also keeps them safe inside a grammar's string literals.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TOOLS = 128  # as OpenAI's API


@dataclass(frozen=True, slots=True)
class ToolFunction:
    """A function the client offers the model (OpenAI `tools[i].function`)."""
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments

    def openai(self) -> dict:
        """As OpenAI's `tools[i]` (what chat templates that render tools expect)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: the OpenAI `tool_calls[i]` of a response."""
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        """As OpenAI's `tool_calls[i]` of an assistant message."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`; `param` names the field as OpenAI spells it (the front ends answer 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---- checks ------------------------------------------------------------------------------------------------------
def check_tools(tools: Sequence[ToolFunction]) -> None:
    """Names OpenAI accepts, each once, and argument schemas the grammar engine compiles (so that a forced call
    cannot fail later, in the engine)."""
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"{len(tools)} tools, more than the limit of {MAX_TOOLS}")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not FUNCTION_NAME.fullmatch(tool.name):
            raise ToolError(f"tools[{i}].function.name", "must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        if tool.name in seen:
            raise ToolError(f"tools[{i}].function.name", f"{tool.name!r} is offered twice")
        seen.add(tool.name)
        if not isinstance(tool.parameters, dict) or tool.parameters.get("type", "object") != "object":
            raise ToolError(f"tools[{i}].function.parameters", 'must be a JSON schema of {"type": "object"}')
        try:
            check_structured(StructuredOutput("lark", f"start: {_arguments_rule(tool)}\n"))
        except ValueError as exc:
            raise ToolError(f"tools[{i}].function.parameters", f"unsupported JSON schema: {exc}") from None


def forced_function(tools: Sequence[ToolFunction], tool_choice: str | Mapping | None) -> str | None:
    """The function `tool_choice` names (OpenAI's {"type": "function", "function": {"name": ...}}), checked
    against the tools; None when tool_choice is a mode ("none", "auto", "required" or unset)."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "none", "auto", "required"):
            raise ToolError("tool_choice", "must be 'none', 'auto', 'required' or "
                                           '{"type": "function", "function": {"name": ...}}')
        if tool_choice == "required" and not tools:
            raise ToolError("tool_choice", "'required' needs at least one tool in `tools`")
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError("tool_choice", 'a named choice must be {"type": "function", "function": {"name": ...}}')
    if not tools:
        raise ToolError("tool_choice", f"names function {name!r} but `tools` is empty")
    if name not in {t.name for t in tools}:
        raise ToolError("tool_choice.function.name", f"{name!r} is not one of the tools")
    return name


# ---- the grammar that forces calls -------------------------------------------------------------------------------
def tool_grammar(tools: Sequence[ToolFunction], tool_choice: str | Mapping | None, *,
                 parallel: bool = True) -> StructuredOutput | None:
    """The constraint for `tool_choice` (llguidance's Lark dialect): "required", calls to any of the tools; a named
    function, calls to that function; each call's arguments valid for its schema. One call, or (parallel) one or
    more separated by newlines. None when the model may answer freely ("auto", "none", unset)."""
    name = forced_function(tools, tool_choice)
    if name is None and tool_choice != "required":
        return None
    callable_ = [t for t in tools if name is None or t.name == name]
    start = 'call ("\\n" call)*' if parallel else "call"
    rules = [f"start: {start}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(callable_)))]
    for i, tool in enumerate(callable_):
        head = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(tool.name)}, "arguments": '
        tail = f"}}\n{TOOL_CALL_CLOSE}"
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps(tail)}")
        rules.append(f"args_{i}: {_arguments_rule(tool)}")
    grammar = StructuredOutput("lark", "\n".join(rules) + "\n")
    check_structured(grammar)  # check_tools names a bad schema first; this catches a bug of ours
    return grammar


def _arguments_rule(tool: ToolFunction) -> str:
    """The arguments: an object valid for the tool's schema, written with the separators of structured outputs
    (these options override any the schema sets)."""
    schema = {**(tool.parameters or {}), "x-guidance": JSON_OPTIONS}
    if "type" not in schema:  # OpenAI's arguments are always an object
        schema["type"] = "object"
    return "%json " + json.dumps(schema)


# ---- the prompt's side -------------------------------------------------------------------------------------------
def arguments_value(arguments: str):
    """A past call's arguments (JSON text, as OpenAI sends them) as the value they encode; the text itself if it
    is not JSON."""
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def format_tool_call(name: str, arguments: str) -> str:
    """A call as the model writes it (for calls in the conversation history); `arguments` is JSON text."""
    call = {"name": name, "arguments": arguments_value(arguments)}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(call, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def format_tool_response(content: str) -> str:
    """A tool's result as the model reads it (templates without tool support)."""
    return f"{TOOL_RESPONSE_OPEN}\n{content}\n{TOOL_RESPONSE_CLOSE}"


def tools_system_prompt(tools: Sequence[ToolFunction]) -> str:
    """What a system message tells a model whose chat template does not render tools itself."""
    signatures = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                      ensure_ascii=False) for t in tools)
    return ("# Tools\n\n"
            "You may call the functions below. Each line between <tools> and </tools> is one function: its name, "
            "what it does, and the JSON schema of its arguments.\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "To call a function, reply with one block per call, in exactly this format:\n"
            f'{TOOL_CALL_OPEN}\n{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}\n'
            f"{TOOL_CALL_CLOSE}\n"
            "The results come back in <tool_response> blocks.")


# ---- the parser --------------------------------------------------------------------------------------------------
class ToolCallParser:
    """Finds the calls in one choice's generated text, as it streams. feed() returns the text that is safe to show
    now: it holds back what may be the start of a call block, and trailing whitespace until it knows what follows
    (whitespace after a call, and at the end of an output with calls, is dropped). A block whose JSON does not parse, lacks a name, names a function not in
    `tools` or has non-object arguments stays text. The streamed texts, concatenated, equal finish()'s content."""

    def __init__(self, tools: Sequence[ToolFunction]):
        self._names = frozenset(t.name for t in tools)
        self.calls: list[ToolCall] = []  # completed so far
        self._pending = ""  # undecided text: a possible start of TOOL_CALL_OPEN, or a call's body
        self._space = ""  # whitespace held until what follows it is known
        self._in_call = False
        self._after_call = False  # whitespace right after a call is dropped

    def feed(self, text: str) -> str:
        self._pending += text
        shown = []
        while True:
            if self._in_call:
                end = self._pending.find(TOOL_CALL_CLOSE)
                if end < 0:
                    break
                body, self._pending = self._pending[:end], self._pending[end + len(TOOL_CALL_CLOSE):]
                self._in_call = False
                shown.append(self._close_call(body, TOOL_CALL_CLOSE))
                continue
            start = self._pending.find(TOOL_CALL_OPEN)
            if start >= 0:
                shown.append(self._text(self._pending[:start]))
                self._pending = self._pending[start + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            hold = _open_prefix_len(self._pending)
            cut = len(self._pending) - hold
            shown.append(self._text(self._pending[:cut]))
            self._pending = self._pending[cut:]
            break
        return "".join(shown)

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the text not yet returned by feed, every call). A block the output ended inside counts if its JSON is
        whole."""
        if self._in_call:
            self._in_call = False
            rest = self._close_call(self._pending, "")
        else:
            rest = self._text(self._pending)
        if not self.calls:
            rest += self._space
        self._pending = self._space = ""
        return rest, self.calls

    def _text(self, text: str) -> str:
        """Plain text, minus its trailing whitespace, which is held."""
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        stripped = text.rstrip()
        if not stripped:
            self._space += text
            return ""
        shown = self._space + stripped
        self._space = text[len(stripped):]
        return shown

    def _close_call(self, body: str, close: str) -> str:
        call = self._parse(body)
        if call is None:  # stays text, with the whitespace before it
            self._after_call = False
            return self._text(TOOL_CALL_OPEN + body + close)
        self.calls.append(call)  # the whitespace before it stays held: it separates the texts around the call
        self._after_call = True
        return ""

    def _parse(self, body: str) -> ToolCall | None:
        try:
            call = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return None
        if self._names and call["name"] not in self._names:
            return None
        arguments = call.get("arguments", {})
        if isinstance(arguments, str):  # some models write the arguments as JSON text
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ToolCall(new_call_id(), call["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, tools: Sequence[ToolFunction]) -> tuple[str, list[ToolCall]]:
    """(the text without its calls, the calls) of a whole output."""
    parser = ToolCallParser(tools)
    shown = parser.feed(text)
    rest, calls = parser.finish()
    return shown + rest, calls


def _open_prefix_len(text: str) -> int:
    """The length of the longest end of `text` that begins TOOL_CALL_OPEN (it may become a call)."""
    for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0
