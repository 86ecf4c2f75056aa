"""OpenAI-compatible request bodies, and their translation into a Prompt and SamplingParams."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from specserve.actors.engine.sampling_params import (MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_STOP_TOKEN_IDS,
                                                      SamplingParams)
from specserve.routing.errors import APIError, invalid
from specserve.routing.prompts import Prompt


def _utf8(s: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"): text that no tokenizer can encode."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"invalid Unicode: a lone surrogate at character {exc.start}") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]
StopText = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_utf8)]

# Options of OpenAI's API (and common vendor extras) that change the output and are not served yet, with the
# values that change nothing. Any other value is refused with a 400 naming the option: a client must never get a
# 200 whose output ignored what it asked for. Other unknown fields are harmless extras and pass.
UNSERVED_OPTIONS: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "suffix": (None, ""),
    "response_format": (None, {"type": "text"}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "min_p": (None, 0), "min_tokens": (None, 0), "best_of": (None, 1), "use_beam_search": (None, False),
    "length_penalty": (None, 1), "prompt_logprobs": (None, 0), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "structured_outputs": (None,),
    "include_stop_str_in_output": (None, False), "skip_special_tokens": (None, True),
    "add_generation_prompt": (None, True), "continue_final_message": (None, False), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "truncate_prompt_tokens": (None,), "reasoning_effort": (None,),
    "audio": (None,), "modalities": (None, ["text"]),
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
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: "StreamOptions | None" = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        return v

    def output_limit(self) -> int | None:
        """The client's max_tokens (None: unset)."""
        return self.max_tokens

    def sampling_params(self) -> SamplingParams:
        """The body's sampling options (bounded by the fields' validators); speculation is the front end's."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.output_limit(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=frozenset(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
        )


class StreamOptions(BaseModel):
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def as_prompt(self) -> Prompt:
        return Prompt("chat", [{"role": m.role, "content": m.text()} for m in self.messages], "messages")


class CompletionRequest(_Request):
    prompt: Text | list[int] | list[Text]

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

