"""Tool calling through the official openai SDK against ``rustinfer serve``, plus the parsers and
the prompt rendering on hand-written inputs.

Forced calls (a named function, "required") are constrained by a grammar, so even the small
embedded model's arguments must parse and validate (checked independently, with jsonschema);
streamed deltas must reassemble into the whole answer; a bad tool is a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rustinfer_models_llama3.tool_parser import Llama3JsonParser
from server_helpers import LiveServer

from rustinfer.chat_template import render_chat_template
from rustinfer.errors import RegistryError
from rustinfer.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ForcedCallParser,
    ToolChoice,
    chat_prompt,
    choose_parser,
    forced_call,
    parse_output,
    read_message_tool_calls,
    read_tools,
    register_tool_parser,
)
from rustinfer.tool_calls.parsers import HermesParser, ParsedOutput, collect

ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def tool(name: str, description: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "description": description}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


def obj(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False, **extra}  # fmt: skip


WEATHER = tool("get_weather", "The current weather in a city.", obj({
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]},
}))  # fmt: skip
ADD = tool("add", "Add two integers.", obj({
    "a": {"type": "integer", "minimum": -1000, "maximum": 1000},
    "b": {"type": "integer", "minimum": -1000, "maximum": 1000},
}))  # fmt: skip
ORDER = tool("place_order", "Order groceries.", obj({
    "items": {"type": "array", "maxItems": 2, "items": obj({
        "name": {"type": "string", "maxLength": 12},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9},
    })},
    "express": {"type": "boolean"},
}))  # fmt: skip
# A shared definition behind "$ref": the constraint must carry "$defs" along.
REMIND = tool("remind", "Set a reminder.", obj(
    {"day": {"$ref": "#/$defs/day"}, "note": {"type": "string", "maxLength": 16}},
    **{"$defs": {"day": {"enum": ["monday", "tuesday", "friday"]}}},
))  # fmt: skip
NO_ARGS = tool("get_time", "The current time.", None)
TOOLS = {t["function"]["name"]: t for t in (WEATHER, ADD, ORDER, REMIND, NO_ARGS)}


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def check_call(call: Any, offered: list[dict[str, Any]]) -> None:
    """A call names an offered function and its arguments validate against its parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    spec = {t["function"]["name"]: t["function"] for t in offered}[call.function.name]
    schema = spec.get("parameters", {"type": "object", "properties": {}})
    jsonschema.validate(json.loads(call.function.arguments), schema)


# -- forced calls ----------------------------------------------------------------------------------


def test_named_calls_validate_against_their_parameters(live_server: LiveServer, model: str) -> None:
    """One request per function, all at once (the engine batches them), each forced to it."""

    async def main() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0)
        async with client:
            return await asyncio.gather(*(
                client.chat.completions.create(
                    model=model, messages=ASK, tools=list(TOOLS.values()), tool_choice=named(name),
                    max_tokens=60, temperature=0.7, seed=i,
                )
                for i, name in enumerate(TOOLS)
            ))  # fmt: skip

    for name, r in zip(TOOLS, asyncio.run(main()), strict=True):
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.function.name == name
        check_call(call, [TOOLS[name]])


def test_required_picks_one_of_the_tools(client: openai.OpenAI, model: str) -> None:
    offered = [WEATHER, ADD]
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is 2 plus 3?"}], tools=offered,
        tool_choice="required", max_tokens=40, temperature=0,
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    check_call(call, offered)


def reassemble(chunks: list[Any]) -> tuple[str | None, list[dict[str, str]], str | None]:
    """(content, calls, finish_reason) from stream chunks, checking OpenAI's delta shapes."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        content += c.delta.content or ""
        for d in c.delta.tool_calls or ():
            if d.index not in calls:  # the first delta of a call: its id, type and name
                assert d.id.startswith("call_") and d.type == "function", d
                assert d.function.name and d.function.arguments == "", d
                calls[d.index] = {"name": d.function.name, "arguments": ""}
            else:  # then only pieces of its arguments
                assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments
        finish = c.finish_reason or finish
    return content or None, [calls[i] for i in sorted(calls)], finish


def summary(r: Any) -> tuple[str | None, list[dict[str, str]], str | None]:
    m = r.choices[0].message
    calls = [{"name": c.function.name, "arguments": c.function.arguments}
             for c in m.tool_calls or ()]  # fmt: skip
    return m.content, calls, r.choices[0].finish_reason


@pytest.mark.parametrize("choice", [named("place_order"), "auto"])
def test_streamed_deltas_reassemble_into_the_whole_answer(client, model, choice) -> None:
    kw = {"model": model, "messages": [{"role": "user", "content": "Order two apples, fast."}],
          "tools": [ORDER, ADD], "tool_choice": choice, "temperature": 0,
          "max_tokens": 20 if choice == "auto" else 40}  # fmt: skip
    whole = summary(client.chat.completions.create(**kw))
    streamed = reassemble(list(client.chat.completions.create(**kw, stream=True)))
    assert streamed == whole
    if choice != "auto":
        assert whole[2] == "tool_calls" and len(whole[1]) == 1
        jsonschema.validate(json.loads(whole[1][0]["arguments"]), ORDER["function"]["parameters"])


# -- free choice, history --------------------------------------------------------------------------


def test_auto_answers_with_content_or_valid_calls(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER, ADD], max_tokens=24, temperature=0
    )
    choice = r.choices[0]
    for call in choice.message.tool_calls or ():
        check_call(call, [WEATHER, ADD])
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        assert "<tool_call>" not in choice.message.content or "</tool_call>" not in (
            choice.message.content
        )


def test_none_offers_no_tools(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "messages": ASK, "max_tokens": 2, "temperature": 0}
    plain = client.chat.completions.create(**kw)
    none = client.chat.completions.create(**kw, tools=[WEATHER], tool_choice="none")
    offered = client.chat.completions.create(**kw, tools=[WEATHER], tool_choice="auto")
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 50  # the tools section
    assert none.choices[0].message.tool_calls is None
    assert none.choices[0].message.content == plain.choices[0].message.content


def history(result: str) -> list[dict[str, Any]]:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}  # fmt: skip
    return [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": result},
    ]


def test_a_tool_result_in_the_history_is_rendered_and_answered(client, model) -> None:
    result = '{"temperature": 18, "sky": "sunny", "wind": "light, from the west"}'
    kw = {"model": model, "tools": [WEATHER], "temperature": 0}
    r = client.chat.completions.create(**kw, messages=history(result), max_tokens=24)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    empty = client.chat.completions.create(**kw, messages=history(""), max_tokens=1)
    # The result's text is in the prompt (not dropped by a template that knows no tool role).
    assert r.usage.prompt_tokens - empty.usage.prompt_tokens >= 15


# -- 400s ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"parameters": obj({})}}]},
         "tools.0.function.name"),
        ({"tools": [tool("f", "x", {"type": "array"})]}, "tools.0.function.parameters"),
        ({"tools": [ADD, tool("f", "x", "not a schema")]}, "tools.1.function.parameters"),
        ({"tools": [ADD, ADD]}, "tools.1.function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
        ({"tools": [ADD], "tool_choice": named("get_weather")}, "tool_choice.function.name"),
        ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [tool("f", "x", obj({"a": {"type": "nope"}}))], "tool_choice": named("f")},
         "tools.0.function.parameters"),
        ({"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": []},
                       {"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}]},
         "messages.1.tool_calls.0.function.name"),
    ],
)  # fmt: skip
def test_bad_tools_are_400_naming_the_part(client, model, extra, param) -> None:
    kw = {"model": model, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kw)
    assert info.value.body["param"] == param, info.value.body


# -- parsers, on hand-written outputs ---------------------------------------------------------------


def fed_in_pieces(parser: Any, text: str, size: int) -> ParsedOutput:
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    return collect([*events, *parser.finish()])


def calls_of(parsed: ParsedOutput) -> list[tuple[str, dict[str, Any]]]:
    assert all(c.id.startswith("call_") for c in parsed.calls)
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


HERMES_CASES = [
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>\nDone.',
     "Let me look.\n\n\nDone.", [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]),
    ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>',
     None, [("add", {"a": 1, "b": 2})]),
    # Malformed JSON, an unknown function, no arguments object: text, as written.
    ('<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call> so',
     '<tool_call>{"name": "add", "arguments": {"a": 1,</tool_call> so', []),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', []),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>',
     '<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', []),
    # Left open at the end: a call if its JSON is whole, else text.
    ('ok <tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}', "ok", [("add", {"a": 3, "b": 4})]),
    ("a < b and <tool_ca", "a < b and <tool_ca", []),
    ("", None, []),
]  # fmt: skip
LLAMA3_CASES = [
    ('{"name": "add", "parameters": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
     '{"name": "add", "parameters": {"a": 5, "b": 6}}\nThat is all.',
     "That is all.", [("get_weather", {"city": "Oslo"}), ("add", {"a": 5, "b": 6})]),
    # Text first: an answer, not a call. Malformed or foreign JSON: content.
    ('Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}',
     'Sure: {"name": "add", "parameters": {"a": 1, "b": 2}}', []),
    ('{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": {"a": 1', []),
    ('  {"answer": 42}', '{"answer": 42}', []),
    ('{"name": "add", "arguments": {"a": 0, "b": 0}}', None, [("add", {"a": 0, "b": 0})]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [(HermesParser, *case) for case in HERMES_CASES]
    + [(Llama3JsonParser, *case) for case in LLAMA3_CASES],
)
def test_parsers_read_calls_and_content_alike_whole_or_streamed(parser, text, content, calls):
    whole = parse_output(parser(["get_weather", "add"]), text)
    assert whole.content == content
    assert calls_of(whole) == calls
    for size in (1, 2, 3, 7):  # every cut between deltas gives the same answer
        streamed = fed_in_pieces(parser(["get_weather", "add"]), text, size)
        assert (streamed.content, calls_of(streamed)) == (content, calls)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(['<tool_call>', '</tool_call>', '{"name": "add", "arguments": ',
                              '{"a": 1}', "}", "<tool", "_call>", " ", "\n", "x", ";", "<|python_tag|>",
                              '{"name": "add", "parameters": {}}']), max_size=12).map("".join),
    st.lists(st.integers(1, 6), min_size=1, max_size=5),
)  # fmt: skip
def test_any_cut_of_any_text_parses_as_the_whole(text: str, sizes: list[int]) -> None:
    for parser in (HermesParser, Llama3JsonParser):
        whole = parse_output(parser(["add"]), text)
        p, events, at = parser(["add"]), [], 0
        while at < len(text):
            size = sizes[len(events) % len(sizes)]
            events += p.feed(text[at : at + size])
            at += size
        streamed = collect([*events, *p.finish()])
        assert streamed.content == whole.content
        assert [(c.name, c.arguments) for c in streamed.calls] == [
            (c.name, c.arguments) for c in whole.calls
        ]


def test_forced_output_streams_its_arguments_and_survives_a_cut() -> None:
    text = '{"name":"add","parameters":{"a":1,"b":22}}'
    parser = ForcedCallParser("parameters", ["add"])
    events = [e for i in range(len(text)) for e in parser.feed(text[i])] + parser.finish()
    starts = [e for e in events if isinstance(e, CallStart)]
    pieces = [e.text for e in events if isinstance(e, ArgumentsDelta)]
    assert [s.name for s in starts] == ["add"] and len(pieces) > 5
    assert "".join(pieces) == '{"a":1,"b":22}'
    cut = parse_output(ForcedCallParser("parameters"), text[:-6])  # max_tokens ended it
    assert cut.calls[0].arguments == '{"a":1,"b' and cut.content is None


def test_the_parser_follows_the_template_unless_one_is_named() -> None:
    assert choose_parser(None, None) is HermesParser
    assert choose_parser(None, "{{ tools }} <tool_call> {{ messages }}") is HermesParser
    assert choose_parser(None, "{{ tools }} <|python_tag|> {{ messages }}") is Llama3JsonParser
    assert choose_parser("llama3_json", "{{ tools }} <tool_call>") is Llama3JsonParser
    with pytest.raises(ValueError, match="hermes"):
        choose_parser("mistral", None)
    with pytest.raises(RegistryError, match="HermesParser"):

        @register_tool_parser
        class Impostor(HermesParser):
            pass

    # A family's forced call writes that family's key for the arguments.
    tools = read_tools([ADD])
    schema = json.loads(forced_call(tools, ToolChoice("function", "add"), "parameters").spec)
    assert schema["required"] == ["name", "parameters"]


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    text = ('<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')  # fmt: skip
    parsed = parse_output(HermesParser(["add"], max_calls=1), text)
    assert calls_of(parsed) == [("add", {"a": 1, "b": 2})] and parsed.content is None


# -- rendering -------------------------------------------------------------------------------------

# SmolLM2's ChatML template, as its GGUF ships it: it knows nothing of tools.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A template that renders tools itself (the shape of Qwen's and Llama 3.1's).
TOOL_AWARE = (
    "{% if tools %}TOOLS {% for t in tools %}{{ t.function.name }} {% endfor %}{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% if m.name %} ({{ m.name }}){% endif %} {% endfor %}"
)


def template_messages(result: str) -> list[dict[str, Any]]:
    messages = history(result)
    messages[1] = {"role": "assistant", "content": "",
                   "tool_calls": read_message_tool_calls(messages[1]["tool_calls"], "m")}  # fmt: skip
    return messages


def test_chatml_gets_the_tools_and_the_history_written_in_hermes_format() -> None:
    tools = read_tools([WEATHER, ADD])
    messages, variables = chat_prompt(
        template_messages("18 C"), tools, ToolChoice("auto"), HermesParser, CHATML
    )
    assert variables == {}
    text = render_chat_template(CHATML, messages)
    assert text.startswith("<|im_start|>system\n# Tools")
    assert '"name": "get_weather"' in text and '"name": "add"' in text
    call = '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
    result = "<|im_start|>user\n<tool_response>\n18 C\n</tool_response><|im_end|>"
    assert text.index(call) < text.index(result)
    assert "<|im_start|>tool" not in text
    # "none": the history still renders, the tools are not offered.
    messages, _ = chat_prompt(template_messages("18 C"), tools, ToolChoice("none"), HermesParser, CHATML)  # fmt: skip
    text = render_chat_template(CHATML, messages)
    assert "# Tools" not in text and call in text and result in text


def test_a_template_that_renders_tools_gets_them_as_they_are() -> None:
    tools = read_tools([WEATHER])
    messages, variables = chat_prompt(
        template_messages("18 C"), tools, ToolChoice("auto"), HermesParser, TOOL_AWARE
    )
    text = render_chat_template(TOOL_AWARE, messages, **variables)
    assert text.startswith("TOOLS get_weather user: ")
    assert 'CALL get_weather {"city": "Paris", "unit": "celsius"}' in text  # a dict, not a string
    assert "tool: 18 C (get_weather)" in text  # the result named after its call
