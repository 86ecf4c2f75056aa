"""Tool calls: the tools and past calls in the chat prompt (routing/prompts.py), the grammar that forces a call and
the parser that finds calls in generated text (routing/tools.py)."""

import asyncio
import copy
import json

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from specserve.routing.prompts import Prompt, PromptRenderer
from specserve.routing.tools import (ToolCall, ToolCallParser, ToolError, ToolFunction, check_tools,
                                     forced_function, parse_tool_calls, tool_grammar)

MODEL = "/root/.cache/specserve/models/smollm2-135m"

WEATHER = ToolFunction("get_weather", "The weather in a city.",
                       {"type": "object", "properties": {"city": {"type": "string"},
                                                         "unit": {"enum": ["C", "F"]}},
                        "required": ["city"], "additionalProperties": False})
TIME = ToolFunction("get_time", "The time now.", {})
TOOLS = (WEATHER, TIME)

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_1"},
    {"role": "tool", "content": "12:00", "tool_call_id": "call_2", "name": "get_time"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL)


def render(tokenizer, messages, tools=TOOLS) -> str:
    r = PromptRenderer(tokenizer, vocab_size=len(tokenizer), max_prompt_tokens=4096, max_messages=16, threads=1,
                       max_pending=2)
    try:
        prompt = Prompt("chat", messages, "messages", tools)
        r.check(prompt)
        ids = asyncio.run(r.render(prompt))
        text = r._chat_text(tokenizer, prompt)
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
        return text
    finally:
        r.close()


# ---- the prompt --------------------------------------------------------------------------------------------------
def test_smollm_template_gets_the_tools_and_the_call_format_in_its_system_message(tokenizer):
    assert "tools" not in tokenizer.chat_template  # the bundled model's template knows nothing of tools
    text = render(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\n")  # the client's own system message first
    assert json.dumps({"name": WEATHER.name, "description": WEATHER.description,
                       "parameters": WEATHER.parameters}) in system
    assert '"name": "get_time"' in system
    assert '<tool_call>\n{"name": "<function name>", "arguments":' in system and "</tool_call>" in system
    assert text.count("<|im_start|>system") == 1
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_without_a_system_message_one_is_added_for_the_tools(tokenizer):
    text = render(tokenizer, [{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n# Tools\n")
    assert "SmolLM" not in text  # the template's default system message gave way to the tools'


def test_no_tools_renders_as_before(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    assert render(tokenizer, messages, ()) == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                            tokenize=False)


def test_history_of_calls_and_results_renders_in_the_call_format(tokenizer):
    text = render(tokenizer, HISTORY)
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>') in text
    # Consecutive results are one message; SmolLM's template takes the "tool" role.
    assert ('<|im_start|>tool\n<tool_response>\n{"celsius": 21}\n</tool_response>\n'
            '<tool_response>\n12:00\n</tool_response><|im_end|>\n<|im_start|>assistant\n') in text
    assert "None" not in text  # a null content is no text


def test_template_refusing_the_tool_role_gets_results_as_the_users(tokenizer):
    strict = copy.deepcopy(tokenizer)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}{{ '\\n' }}{% endfor %}[assistant] ")
    text = render(strict, HISTORY)
    assert "[user] <tool_response>\n{\"celsius\": 21}\n</tool_response>\n<tool_response>\n12:00\n" in text


def test_template_that_renders_tools_gets_them_natively(tokenizer):
    native = copy.deepcopy(tokenizer)
    native.chat_template = (  # (Hugging Face renders templates with trim_blocks: newlines are written out)
        "{% if tools %}TOOLS:{% for t in tools %} {{ t['function']['name'] }}={{ t['function']['parameters'] | tojson }}"
        "{% endfor %}{{ '\\n' }}{% endif %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% for c in m.get('tool_calls', []) %} CALL {{ c['id'] }} {{ c['function']['name'] }}"
        "{{ c['function']['arguments']['city'] | default('') }}{% endfor %}"
        "{% if m['role'] == 'tool' %} (for {{ m['tool_call_id'] }}){% endif %}{{ '\\n' }}{% endfor %}assistant:")
    text = render(native, HISTORY)
    assert text.startswith("TOOLS: get_weather={\"type\": \"object\"")
    assert " get_time={}\n" in text
    assert "<tool_call>" not in text and "# Tools" not in text  # nothing of ours
    assert "assistant:  CALL call_1 get_weatherParis CALL call_2 get_time\n" in text  # arguments as an object
    assert "tool: 12:00 (for call_2)\n" in text


def test_a_tokenizer_without_template_gets_the_tools_in_plain_lines(tokenizer):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    text = render(base, HISTORY)
    assert text.startswith("system: # Tools\n")
    assert '\nassistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert text.endswith("tool: <tool_response>\n{\"celsius\": 21}\n</tool_response>\n<tool_response>\n12:00\n"
                         "</tool_response>\nassistant:")


def test_check_accepts_null_content_beside_tool_calls_and_counts_the_tools(tokenizer):
    r = PromptRenderer(tokenizer, vocab_size=len(tokenizer), max_prompt_tokens=10, max_messages=8, threads=1,
                       max_pending=1)
    try:
        r.check(Prompt("chat", HISTORY[1:2], "messages"))
        big = ToolFunction("f", "x" * 1000, {})
        with pytest.raises(Exception, match="characters"):
            r.check(Prompt("chat", [{"role": "user", "content": "hi"}], "messages", (big,)))
    finally:
        r.close()


# ---- checks of tools and tool_choice ---------------------------------------------------------------------------
@pytest.mark.parametrize(("tools", "param"), [
    ((ToolFunction("bad name", "", {}),), "tools[0].function.name"),
    ((TIME, TIME), "tools[1].function.name"),
    ((TIME, ToolFunction("f", "", {"type": "object", "properties": {"a": {"type": 3}}})),
     "tools[1].function.parameters"),
    ((ToolFunction("f", "", {"type": "string"}),), "tools[0].function.parameters"),
])
def test_check_tools_names_the_bad_field(tools, param):
    with pytest.raises(ToolError) as err:
        check_tools(tools)
    assert err.value.param == param and str(err.value).startswith(param + ": ")


def test_check_tools_accepts_good_tools():
    check_tools(TOOLS)


@pytest.mark.parametrize(("tools", "choice", "param"), [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
    ((), {"type": "function", "function": {"name": "get_time"}}, "tool_choice"),
    ((), "required", "tool_choice"),
    (TOOLS, "sometimes", "tool_choice"),
    (TOOLS, {"type": "function"}, "tool_choice"),
])
def test_bad_tool_choice_is_a_value_error_naming_the_field(tools, choice, param):
    with pytest.raises(ValueError) as err:
        tool_grammar(tools, choice)
    assert err.value.param == param


def test_modes_and_named_choice():
    assert forced_function(TOOLS, {"type": "function", "function": {"name": "get_time"}}) == "get_time"
    for mode in (None, "none", "auto"):
        assert forced_function(TOOLS, mode) is None and tool_grammar(TOOLS, mode) is None
    assert tool_grammar((), None) is None


# ---- the grammar -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ll_tokenizer(tokenizer):
    return llguidance.hf.from_tokenizer(tokenizer)


def accepts(ll_tokenizer, tokenizer, grammar, text: str) -> bool:
    """Whether the grammar takes `text` whole and may stop after it."""
    assert grammar.kind == "lark"
    matcher = llguidance.LLMatcher(ll_tokenizer, llguidance.grammar_from("lark", grammar.value))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return matcher.try_consume_tokens(ids) == len(ids) and matcher.is_accepting()


def call(name, arguments) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_required_grammar_takes_calls_to_any_tool_with_valid_arguments(tokenizer, ll_tokenizer):
    grammar = tool_grammar(TOOLS, "required")
    assert accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"city": "Paris"}))
    assert accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"city": "Oslo", "unit": "C"}))
    # JSON as structured outputs write it: ", " and ": ", no free whitespace (a small model could loop on it)
    compact = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'
    assert not accepts(ll_tokenizer, tokenizer, grammar, compact)
    assert accepts(ll_tokenizer, tokenizer, grammar, call("get_time", {}))
    assert accepts(ll_tokenizer, tokenizer, grammar,
                   call("get_time", {}) + "\n" + call("get_weather", {"city": "Rome"}))
    assert not accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"town": "Paris"}))  # wrong schema
    assert not accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"city": "Paris", "unit": "K"}))
    assert not accepts(ll_tokenizer, tokenizer, grammar, call("get_news", {}))  # no such tool
    assert not accepts(ll_tokenizer, tokenizer, grammar, "It is sunny.")  # a call is required
    assert not accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"city": "Paris"})[:-3])


def test_named_grammar_takes_only_that_function(tokenizer, ll_tokenizer):
    grammar = tool_grammar(TOOLS, {"type": "function", "function": {"name": "get_weather"}}, parallel=False)
    assert accepts(ll_tokenizer, tokenizer, grammar, call("get_weather", {"city": "Paris"}))
    assert not accepts(ll_tokenizer, tokenizer, grammar, call("get_time", {}))
    two = call("get_weather", {"city": "Paris"}) + "\n" + call("get_weather", {"city": "Rome"})
    assert not accepts(ll_tokenizer, tokenizer, grammar, two)


def test_what_the_grammar_takes_the_parser_reads_as_calls(tokenizer, ll_tokenizer):
    text = call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {})
    assert accepts(ll_tokenizer, tokenizer, tool_grammar(TOOLS, "required"), text)
    parser = ToolCallParser(TOOLS)
    assert parser.feed(text) == ""
    content, calls = parser.finish()
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


# ---- the parser ------------------------------------------------------------------------------------------------
def parse(text: str, chunk: int | None) -> tuple[str, list[ToolCall]]:
    """(the content, the calls), fed whole (chunk None) or in pieces."""
    if chunk is None:
        return parse_tool_calls(text, TOOLS)
    parser = ToolCallParser(TOOLS)
    shown = "".join(parser.feed(text[i:i + chunk]) for i in range(0, len(text), chunk))
    rest, calls = parser.finish()
    return shown + rest, calls


CASES = [
    # (generated text, content, [(name, arguments)])
    ("Just text, no calls. <b>bold</b> <tool", "Just text, no calls. <b>bold</b> <tool", []),
    (call("get_weather", {"city": "Paris"}), "", [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n" + call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {}) + "\n",
     "Let me check.", [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ("<tool_call>\n{not json}\n</tool_call> ok", "<tool_call>\n{not json}\n</tool_call> ok", []),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', '<tool_call>\n{"arguments": {}}\n</tool_call>', []),
    ('<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
     '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>', []),  # not one of the tools
    ('<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>', []),
    ('<tool_call>{"name": "get_time", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("get_time", {"x": 1})]),
    ('<tool_call>{"name": "get_time"}</tool_call>', "", [("get_time", {})]),
    ("A\n\n" + call("get_time", {}) + "\nThen text.\n", "A\n\nThen text.", [("get_time", {})]),
    ("bad <tool_call>{</tool_call>\n" + call("get_time", {}), "bad <tool_call>{</tool_call>", [("get_time", {})]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', "", [("get_time", {})]),  # output ended in the block
    ('<tool_call>\n{"name": "get_time", "argu', '<tool_call>\n{"name": "get_time", "argu', []),
    ("  spaced  \n", "  spaced  \n", []),
]


@pytest.mark.parametrize("chunk", [None, 1, 2, 5])
@pytest.mark.parametrize(("text", "content", "expected"), CASES)
def test_parser(text, content, expected, chunk):
    streamed, calls = parse(text, chunk)
    assert streamed == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == expected
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in calls)
    assert len({c.id for c in calls}) == len(calls)


def test_parser_holds_back_only_what_may_start_a_call():
    parser = ToolCallParser(TOOLS)
    assert parser.feed("Hello <to") == "Hello"  # "<to" may begin a call; the space waits for what follows
    assert parser.feed("p> world") == " <top> world"
    assert parser.feed(" <tool_call>") == ""
    assert parser.feed('{"name": "get_time", "arguments": {}}</tool_call>') == ""
    assert len(parser.calls) == 1
    assert parser.finish() == ("", parser.calls)
