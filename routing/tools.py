"""Tool calls (OpenAI `tools` / `tool_choice`): the tools in the prompt, the grammar that forces a call, and the
parser that finds calls in the generated text."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ToolFunction:
    """A function the client offers the model (OpenAI `tools[i].function`)."""
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: the OpenAI `tool_calls[i]` of a response."""
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
