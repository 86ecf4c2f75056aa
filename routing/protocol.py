"""OpenAI-compatible request bodies, and their translation into a Prompt and SamplingParams."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from specserve.actors.engine.sampling_params import (MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_N, MAX_STOP_CHARS,
                                                      MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS, SamplingParams,
                                                      StructuredOutput)
from specserve.routing.errors import APIError, invalid
from specserve.routing.prompts import Prompt
from specserve.routing.request import ToolChoice
from specserve.routing.tools import ToolError, ToolFunction, check_tools

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's bound for the completions API (chat's top_logprobs is MAX_LOGPROBS)


def _utf8(s: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"): text that no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode: a lone surrogate at character {exc.start}") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_utf8)]

# Options of OpenAI's API (and common vendor extras) that change the output and are not served, with the values
# that change nothing. Any other value is refused with a 400 naming the option: a client must never get a 200
# whose output ignored what it asked for. Other unknown fields are harmless extras and pass. (An option a request
# class declares never reaches this table: "echo" is served on completions and refused on chat, tools and
# top_logprobs the other way round.)
UNSERVED_OPTIONS: dict[str, tuple] = {
    "echo": (None, False), "tools": (None, []), "tool_choice": (None, "none"), "top_logprobs": (None, 0),
    "suffix": (None, ""), "functions": (None, []), "function_call": (None, "none", "auto"),
    "use_beam_search": (None, False), "length_penalty": (None, 1), "prompt_logprobs": (None, 0),
    "structured_outputs": (None,), "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "truncate_prompt_tokens": (None,), "reasoning_effort": (None,),
    "audio": (None,), "modalities": (None, ["text"]), "guided_decoding_backend": (None,),
}


def refuse_unserved(extra: dict | None) -> None:
    """400 naming the first option of `extra` (a body's unknown fields) that would change the output."""
    for name, value in (extra or {}).items():
        noop = UNSERVED_OPTIONS.get(name)
        if noop is not None and value not in noop:
            raise invalid(name, f"{_show(value)} is not supported by this server (only {_show(noop[-1])} or "
                                "unset); the option would change the output", code="unsupported_option")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ResponseFormatText(BaseModel):
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    name: str = Field("response", max_length=64)
    description: str | None = None
    # "schema" shadows a BaseModel attribute: the field is schema_ and the wire name "schema".
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


class FunctionSpec(BaseModel):
    name: str  # checked by routing/tools.check_tools
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class _Request(BaseModel):
    # Unknown fields are accepted, as clients send vendor extras; those that would change the output are
    # refused (refuse_unserved).
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: Text = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 64)
    stop: StopText | list[StopText] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=2 ** 31)]] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    # Extension: include the generated token ids in each choice (exactness tests, debugging).
    return_token_ids: bool = False
    # Extensions: speculation off for this request (false), and the draft method it expects (must be the
    # configured one; a mismatch is a 400 rather than a silent different method).
    speculate: bool | None = None
    draft_method: Text | None = Field(None, max_length=64)
    n: int = Field(1, ge=1, le=MAX_N)
    best_of: int | None = Field(None, ge=1, le=MAX_N)  # served only as n (all choices are returned)
    stream: bool = False
    stream_options: "StreamOptions | None" = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)  # vLLM's extension
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured-output extensions: one of them (or response_format) per request.
    guided_json: dict | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = Field(None, min_length=1)
    guided_grammar: Text | None = None  # Lark (llguidance's dialect)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} token ids")
        for key in v:
            if not key.isascii() or not key.isdigit():
                raise ValueError(f"keys are token ids (as strings of digits), not {_show(key)}")
        return v

    def output_limit(self) -> int | None:
        """The client's max_tokens (None: unset)."""
        return self.max_tokens

    def check_options(self) -> None:
        """400 for a combination of options that cannot be served together (each field alone is valid)."""
        if self.best_of is not None and self.best_of != self.n:
            raise invalid("best_of", f"{self.best_of} differs from n={self.n}: only best_of == n is served (all "
                                     "choices are returned)", code="unsupported_option")
        limit = self.output_limit()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise invalid("min_tokens", f"{self.min_tokens} is more than max_tokens={limit}")
        asked = self.structured_asked()
        if len(asked) > 1:
            raise invalid(asked[1], f"cannot be combined with {asked[0]}: one structured output per request",
                          code="unsupported_option")

    def structured_asked(self) -> list[str]:
        """The fields that ask for a structured output (response_format "text" asks for nothing)."""
        fields = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
        return [name for name in fields if getattr(self, name) is not None
                and not isinstance(getattr(self, name), ResponseFormatText)]

    def structured_output(self) -> tuple[StructuredOutput | None, str]:
        """The constraint on the output the body asks for, and the field that asked (for errors)."""
        rf = self.response_format
        if isinstance(rf, ResponseFormatJsonObject):
            return StructuredOutput("json_schema", json.dumps({"type": "object"})), "response_format"
        if isinstance(rf, ResponseFormatJsonSchema):
            return StructuredOutput("json_schema", json.dumps(rf.json_schema.schema_)), "response_format"
        if self.guided_json is not None:
            schema = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return StructuredOutput("json_schema", schema), "guided_json"
        if self.guided_regex is not None:
            return StructuredOutput("regex", self.guided_regex), "guided_regex"
        if self.guided_choice is not None:
            # A grammar of literal alternatives: Lark string literals take JSON's escapes.
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.guided_choice)
            return StructuredOutput("lark", f"start: {alternatives}"), "guided_choice"
        if self.guided_grammar is not None:
            return StructuredOutput("lark", self.guided_grammar), "guided_grammar"
        return None, "response_format"

    def output_logprobs(self) -> tuple[int | None, int | None]:
        """(logprobs, prompt_logprobs) as SamplingParams counts them: top alternatives per token, None: off."""
        return None, None

    def sampling_params(self) -> SamplingParams:
        """The body's sampling options (bounded by the fields' validators); speculation is the front end's."""
        self.check_options()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        logprobs, prompt_logprobs = self.output_logprobs()
        return SamplingParams(
            max_tokens=self.output_limit(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=frozenset(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            n=self.n,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            structured=self.structured_output()[0],
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallSpec(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None
    tool_calls: list[ToolCallSpec] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    name: str | None = None  # a tool message: the function that answered

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def as_dict(self) -> dict:
        """The message as the prompt renderer takes it (routing/prompts.py)."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                     for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def check_options(self) -> None:
        super().check_options()
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "requires logprobs: true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise invalid("tool_choice", "requires tools")
        if self.tools and choice != "none":
            structured = self.structured_asked()
            if structured:
                raise invalid(structured[0], "cannot be combined with tools (unless tool_choice is \"none\")",
                              code="unsupported_option")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in self.tools}:
            raise invalid("tool_choice.function.name", f"'{choice.function.name}' is not one of the tools")
        try:
            check_tools(self.tool_selection()[0])
        except ToolError as exc:
            raise invalid(exc.param, str(exc).removeprefix(exc.param + ": ")) from None

    def output_logprobs(self) -> tuple[int | None, int | None]:
        return (self.top_logprobs or 0) if self.logprobs else None, None

    def tool_selection(self) -> tuple[list[ToolFunction], ToolChoice]:
        """The tools offered to the model and how it may call them (OpenAI's default: auto when tools are
        offered)."""
        tools = [ToolFunction(t.function.name, t.function.description, t.function.parameters)
                 for t in self.tools or ()]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return tools, ToolChoice("function", choice.function.name, parallel=self.parallel_tool_calls)
        return tools, ToolChoice(choice or ("auto" if tools else "none"), parallel=self.parallel_tool_calls)

    def as_prompt(self) -> Prompt:
        tools = self.tool_selection()[0]
        messages = [m.as_dict() for m in self.messages]
        return Prompt("chat", messages, "messages", tools=tuple(tools))


class CompletionRequest(_Request):
    prompt: Text | list[int] | list[Text]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False  # the prompt's text before the completion (with its logprobs, when asked)

    def output_logprobs(self) -> tuple[int | None, int | None]:
        return self.logprobs, self.logprobs if self.echo else None

    def as_prompt(self) -> Prompt:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        return Prompt("text", prompt, "prompt") if isinstance(prompt, str) else Prompt("token_ids", prompt, "prompt")


_Request.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
