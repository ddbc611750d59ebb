"""Tool calling per model family: a conversation with tools, an assistant's call and the tool's
result rendered through chat templates written here in each family's documented format (Llama
3.1+'s JSON calls with an ``ipython`` result turn; Qwen 2.5/3's ``<tool_call>`` blocks with
``<tool_response>`` results in a user turn), then representative model outputs read back by the
parser the template selects: one call, several, calls among text, malformed JSON as plain content.

The templates are ours (the families' layouts, in our words), so each expected prompt below is
written out by hand from that layout rather than produced by the code under test.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from rustinfer_models_llama3.tool_parser import Llama3JsonParser

from rustinfer.chat_template import render_chat_template
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.tool_calls import (
    TOOL_PARSERS,
    ForcedCallParser,
    RequestTools,
    parse_output,
    read_message_tool_calls,
)
from rustinfer.tool_calls.parsers import HermesParser, ParsedOutput, collect

# Llama 3.1+: tools as JSON in the first user turn, a call as the whole assistant turn
# ({"name": ..., "parameters": ...}; one per turn), its result in an "ipython" turn.
LLAMA31 = r"""{{- bos_token }}
{%- if messages[0].role == 'system' %}
    {%- set system = messages[0].content %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system = '' %}
    {%- set turns = messages %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if tools %}
    {{- 'Environment: ipython\n' }}
{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\n\n' + system + '<|eot_id|>' }}
{%- for m in turns %}
    {%- if m.role == 'user' and loop.first and tools %}
        {{- '<|start_header_id|>user<|end_header_id|>\n\n' }}
        {{- 'To call one of these functions, answer with only {"name": function name, '
            + '"parameters": {argument: value}}, using literal values.\n\n' }}
        {%- for t in tools %}
            {{- t | tojson(indent=4) + '\n\n' }}
        {%- endfor %}
        {{- m.content + '<|eot_id|>' }}
    {%- elif m.role == 'assistant' and m.tool_calls %}
        {%- if m.tool_calls | length != 1 %}
            {{- raise_exception('one tool call per assistant turn') }}
        {%- endif %}
        {%- set call = m.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}
        {{- '<|eot_id|>' }}
    {%- elif m.role in ('tool', 'ipython') %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if m.content is mapping %}
            {{- m.content | tojson }}
        {%- else %}
            {{- m.content }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}"""

# Qwen 2.5 (and Qwen 3, which adds thinking): tools inside <tools></tools> in the system turn,
# calls as <tool_call> blocks after the assistant's text, results as <tool_response> blocks of
# one user turn.
QWEN25 = r"""{%- set first_system = messages[0].role == 'system' %}
{{- '<|im_start|>system\n' }}
{{- messages[0].content if first_system else 'You are a helpful assistant.' }}
{%- if tools %}
    {{- '\n\n# Tools\n\nFunctions you may call, as JSON signatures inside <tools></tools>:\n<tools>' }}
    {%- for t in tools %}
        {{- '\n' + t | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nWrite each call as a JSON object inside <tool_call></tool_call> tags:\n'
        + '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' }}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- for m in messages %}
    {%- if loop.first and first_system %}
    {%- elif m.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if m.content %}
            {{- '\n' + m.content }}
        {%- endif %}
        {%- for c in m.tool_calls or [] %}
            {{- '\n<tool_call>\n{"name": "' + c.function.name + '", "arguments": '
                + c.function.arguments | tojson + '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif m.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + m.content + '\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""

# SmolLM2's ChatML knows nothing of tools: rustinfer writes them into the prompt itself.
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
NAMES = ["get_weather", "get_time"]


def conversation(calls: list[tuple[str, str]], results: list[str]) -> list[dict[str, Any]]:
    """A system prompt, a question, the assistant's calls (arguments as the wire's JSON text) and
    the tools' results, as a face of the server hands them over."""
    wire = [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": name, "arguments": json.dumps({"city": city})}}
        for i, (name, city) in enumerate(calls)
    ]  # fmt: skip
    return [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": read_message_tool_calls(wire, "m")},
        *(
            {"role": "tool", "tool_call_id": f"call_{i}", "content": r}
            for i, r in enumerate(results)
        ),
    ]


def render(template: str, messages: list[dict[str, Any]], choice: str = "auto") -> str:
    tools = RequestTools.read([WEATHER, TIME], choice, template, None)
    prompt, variables = tools.prompt(messages)
    return render_chat_template(template, prompt, bos_token="<|begin_of_text|>", **variables)


# -- the parser follows the family ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "parser"),
    [(LLAMA31, Llama3JsonParser), (QWEN25, HermesParser), (CHATML, HermesParser)],
    ids=["llama3.1", "qwen2.5", "smollm2"],
)
def test_each_family_gets_its_parser_from_its_template(template: str, parser: type) -> None:
    assert TOOL_PARSERS[parser.name] is parser  # selected by name from the registry
    tools = RequestTools.read([WEATHER, TIME], "auto", template, None)
    assert tools.parser is parser
    assert type(tools.new_parser()) is parser
    # A forced call writes the family's own key for the arguments, and is read back as a call.
    forced = RequestTools.read([WEATHER, TIME], "required", template, None)
    params = SamplingParams(max_tokens=64)
    forced.constrain(params)
    assert params.structured is not None
    key = parser.arguments_key
    for alternative in json.loads(params.structured.spec)["anyOf"]:
        assert alternative["required"] == ["name", key]
    assert isinstance(forced.new_parser(), ForcedCallParser)
    written = json.dumps({"name": "get_time", key: {"city": "Oslo"}}, separators=(",", ":"))
    out = parse_output(forced.new_parser(), written)
    assert [(c.name, json.loads(c.arguments)) for c in out.calls] == [
        ("get_time", {"city": "Oslo"})
    ]


# -- rendering -------------------------------------------------------------------------------------


def test_llama31_renders_tools_a_call_and_its_result() -> None:
    text = render(LLAMA31, conversation([("get_weather", "Paris")], ['{"temp_c": 18}']))
    tool_blocks = "".join(json.dumps(t, indent=4) + "\n\n" for t in (WEATHER, TIME))
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Environment: ipython\nCutting Knowledge Date: December 2023\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
        'To call one of these functions, answer with only {"name": function name, "parameters": '
        "{argument: value}}, using literal values.\n\n"
        f"{tool_blocks}Weather and time in Paris?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 18}<|eot_id|>'
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # "none": the past call still renders; the tools are not offered.
    none = render(LLAMA31, conversation([("get_weather", "Paris")], ["18"]), "none")
    assert "Environment: ipython" not in none and '"description"' not in none
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in none


def test_qwen25_renders_tools_calls_and_grouped_results() -> None:
    messages = conversation([("get_weather", "Paris"), ("get_time", "Paris")], ["18 C", "14:05"])
    text = render(QWEN25, messages)
    assert text == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\n"
        "Functions you may call, as JSON signatures inside <tools></tools>:\n<tools>\n"
        f"{json.dumps(WEATHER)}\n{json.dumps(TIME)}\n</tools>\n\n"
        "Write each call as a JSON object inside <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\nWeather and time in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>'
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n"
        "<tool_response>\n14:05\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_a_parsed_call_renders_back_as_the_model_wrote_it() -> None:
    """What the parser reads out of an answer, sent back in the history, renders in the family's
    own format again (so the model sees its past calls as it writes them)."""
    for template, written, at in [
        (LLAMA31, '{"name": "get_time", "parameters": {"city": "Oslo"}}', "<|eot_id|>"),
        (QWEN25, '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
         "<|im_end|>"),
    ]:  # fmt: skip
        parser = RequestTools.read([TIME], "auto", template, None).new_parser()
        (call,) = parse_output(parser, written).calls
        wire = [{"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}}]  # fmt: skip
        messages = conversation([], [])[:2] + [
            {"role": "assistant", "content": "", "tool_calls": read_message_tool_calls(wire, "m")}
        ]
        assert written + at in render(template, messages)


# -- parsing each family's outputs ---------------------------------------------------------------

Calls = list[tuple[str, dict[str, Any]]]
LLAMA31_OUTPUTS: list[tuple[str, str | None, Calls]] = [
    # One call, bare (the tag is a special token, gone when special tokens are skipped) or tagged.
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"})]),
    ('<|python_tag|>{"name": "get_time", "parameters": {"city": "Oslo"}}', None,
     [("get_time", {"city": "Oslo"})]),
    # Several, separated by ";".
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_time", "parameters": {"city": "Paris"}}', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]),
    # Text after the calls is content; an answer that opens with text is an answer, not a call.
    ('{"name": "get_time", "parameters": {"city": "Rome"}}\nChecking the clock.',
     "Checking the clock.", [("get_time", {"city": "Rome"})]),
    ('It is sunny. {"name": "get_weather", "parameters": {"city": "Rome"}}',
     'It is sunny. {"name": "get_weather", "parameters": {"city": "Rome"}}', []),
    # Malformed JSON, a function it was not given: plain content, as written.
    ('{"name": "get_weather", "parameters": {"city": "Par',
     '{"name": "get_weather", "parameters": {"city": "Par', []),
    ('{"name": "get_weather", "parameters": {"city": }}',
     '{"name": "get_weather", "parameters": {"city": }}', []),
    ('{"name": "send_email", "parameters": {"to": "x"}}',
     '{"name": "send_email", "parameters": {"to": "x"}}', []),
    ("The weather in Paris is mild.", "The weather in Paris is mild.", []),
]  # fmt: skip
QWEN_OUTPUTS: list[tuple[str, str | None, Calls]] = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]),
    ('Let me look both up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
     '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"city": "Rome"}}\n'
     "</tool_call>\nOne moment.", "Let me look both up.\n\n\nOne moment.",
     [("get_weather", {"city": "Rome"}), ("get_time", {"city": "Rome"})]),
    # Qwen 3 thinks first: the thought is content, the call is a call.
    ("<think>\nThe user wants the time.\n</think>\n\n"
     '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>',
     "<think>\nThe user wants the time.\n</think>", [("get_time", {"city": "Oslo"})]),
    # Malformed JSON, an unknown function: the block stays in the content as written.
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>', []),
    ('Sure.\n<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>',
     'Sure.\n<tool_call>\n{"name": "get_weather" "arguments": {}}\n</tool_call>', []),
    ('<tool_call>\n{"name": "send_email", "arguments": {"to": "x"}}\n</tool_call>',
     '<tool_call>\n{"name": "send_email", "arguments": {"to": "x"}}\n</tool_call>', []),
    ("It is 18 C in Paris.", "It is 18 C in Paris.", []),
]  # fmt: skip


def read(parser: Any, text: str, size: int | None) -> ParsedOutput:
    """``text`` read whole (size None) or streamed in pieces of ``size`` characters."""
    if size is None:
        return parse_output(parser, text)
    events = [e for i in range(0, len(text), size) for e in parser.feed(text[i : i + size])]
    return collect([*events, *parser.finish()])


@pytest.mark.parametrize("size", [None, 1, 4])
@pytest.mark.parametrize(
    ("template", "text", "content", "calls"),
    [pytest.param(LLAMA31, *case, id=f"llama3.1-{i}") for i, case in enumerate(LLAMA31_OUTPUTS)]
    + [pytest.param(QWEN25, *case, id=f"qwen-{i}") for i, case in enumerate(QWEN_OUTPUTS)],
)
def test_family_outputs_read_into_calls_and_content(
    template: str, text: str, content: str | None, calls: Calls, size: int | None
) -> None:
    parser = RequestTools.read([WEATHER, TIME], "auto", template, None).new_parser()
    parsed = read(parser, text, size)
    assert parsed.content == content
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == calls
    assert all(c.id.startswith("call_") for c in parsed.calls)
    assert len({c.id for c in parsed.calls}) == len(parsed.calls)
