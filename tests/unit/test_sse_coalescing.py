"""The HTTP stream sends chunks that are ready together as one SSE string (one ASGI message, one proxy item):
the opening chunks with the first event's, and the last event's with the usage chunk and [DONE]."""

import asyncio
import json
from types import SimpleNamespace

from specserve.actors.engine.messages import Usage
from specserve.routing.errors import APIError
from specserve.routing.frontend import Event
from specserve.routing.openai_api import OpenAIIngress, sse_frames
from specserve.routing.protocol import ChatCompletionRequest, CompletionRequest


def usage(completion: int) -> Usage:
    return Usage(prompt_tokens=3, completion_tokens=completion, cached_tokens=0, imported_tokens=0, spec_rounds=0,
                 draft_tokens=0, accepted_tokens=0)


def ev(text: str, index: int = 0, reason: str | None = None, completion: int = 1) -> Event:
    return Event(text, [7], reason, usage(completion), index)


async def _events(items):
    for item in items:
        if isinstance(item, BaseException):
            raise item
        yield item


def stream(body, events) -> list[str]:
    """The strings _stream yields (each one ASGI body message) for `events` (an exception: the stream fails)."""
    ingress = SimpleNamespace(fe=SimpleNamespace(token_texts=None), model_name="m", _echo_text=lambda b: "")
    gen = _events(events)

    async def collect():
        first = await gen.__anext__()
        return [s async for s in OpenAIIngress._stream(ingress, body, first, gen, "req", chat=isinstance(
            body, ChatCompletionRequest), include_usage=bool(body.stream_options))]

    return asyncio.run(collect())


def frames(message: str) -> list:
    """The data of each SSE event in one message."""
    assert message.endswith("\n\n")
    out = []
    for frame in message.split("\n\n")[:-1]:
        assert frame.startswith("data: ")
        data = frame.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], stream=True, **kw)


def test_sse_frames_joins_events_and_ends_with_done():
    assert sse_frames([{"a": 1}, {"b": [2]}]) == 'data: {"a":1}\n\ndata: {"b":[2]}\n\n'
    assert sse_frames([{"a": 1}], done=True) == 'data: {"a":1}\n\ndata: [DONE]\n\n'
    assert sse_frames([], done=True) == "data: [DONE]\n\n"
    assert sse_frames([]) == ""


def test_chat_stream_opens_with_the_first_event_and_closes_with_usage_and_done():
    messages = stream(chat(stream_options={"include_usage": True}),
                      [ev("Hel"), ev("lo", completion=2), ev("!", reason="length", completion=3)])
    assert len(messages) == 3
    opening, middle, closing = map(frames, messages)
    assert [c["choices"][0]["delta"] for c in opening] == [{"role": "assistant", "content": ""}, {"content": "Hel"}]
    assert [c["choices"][0]["delta"] for c in middle] == [{"content": "lo"}]
    last, usage_chunk, done = closing
    assert last["choices"][0] == {"index": 0, "delta": {"content": "!"}, "finish_reason": "length", "logprobs": None}
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3
    assert done == "[DONE]"


def test_with_several_choices_only_the_last_choice_to_finish_waits_for_done():
    body = CompletionRequest(model="m", prompt="hi", stream=True, n=2)
    messages = stream(body, [ev("a", 0), ev("b", 1), ev(".", 0, "stop"), ev("c", 1), ev(".", 1, "length")])
    parsed = [frames(m) for m in messages]
    assert [[(c["choices"][0]["index"], c["choices"][0]["text"]) for c in p if c != "[DONE]"] for p in parsed] == \
        [[(0, "a")], [(1, "b")], [(0, ".")], [(1, "c")], [(1, ".")]]
    assert parsed[2][0]["choices"][0]["finish_reason"] == "stop" and parsed[-1][-1] == "[DONE]"
    assert all("[DONE]" not in p for p in parsed[:-1])


def test_an_error_after_the_first_event_ends_the_stream_in_band():
    messages = stream(chat(), [ev("Hel"), APIError(504, "deadline exceeded", code="deadline_exceeded")])
    assert len(messages) == 2
    error, done = frames(messages[1])
    assert error["error"]["code"] == "deadline_exceeded" and done == "[DONE]"


def test_a_stream_without_events_still_opens_and_ends():
    body = chat()
    ingress = SimpleNamespace(fe=SimpleNamespace(token_texts=None), model_name="m", _echo_text=lambda b: "")

    async def collect():
        return [s async for s in OpenAIIngress._stream(ingress, body, None, _events([]), "req", chat=True,
                                                       include_usage=False)]

    (only,) = asyncio.run(collect())
    opening, done = frames(only)
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""} and done == "[DONE]"
