"""Tool calling and structured outputs on the native ``rustinfer.v1.Inference`` service, through its
generated stubs against a real engine (the tiny random chat model of conftest, whose ChatML
template cannot render tools, so rustinfer writes them into the prompt in Hermes format).

A random model writes calls only when made to: forced calls through ``tool_choice``, and "auto"
answers through a regex constraint that spells calls out among text. Arguments are validated
independently (jsonschema); each answer's streamed pieces must reassemble into its whole result.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import jsonschema
import pytest

from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2_grpc as pb_grpc
from rustinfer.tool_calls import RequestTools, read_message_tool_calls
from rustinfer.tool_calls.parsers import HermesParser, parse_output


def obj(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}  # fmt: skip


# Bounded strings and numbers: a random model's forced call ends well within max_tokens.
PARAMETERS = {
    "get_weather": obj({"city": {"type": "string", "maxLength": 12},
                        "unit": {"enum": ["celsius", "fahrenheit"]}}),
    "add": obj({"a": {"type": "integer", "minimum": -99, "maximum": 99},
                "b": {"type": "integer", "minimum": -99, "maximum": 99}}),
    "place_order": obj({"items": {"type": "array", "maxItems": 2, "items": obj({
        "name": {"type": "string", "maxLength": 8},
        "qty": {"type": "integer", "minimum": 1, "maximum": 9}})},
        "express": {"type": "boolean"}}),
}  # fmt: skip
TOOLS = [
    pb.Tool(name=name, description=f"The {name} function.", parameters=json.dumps(schema))
    for name, schema in PARAMETERS.items()
]
ASK = [("user", "What is the weather like in Paris today?")]
# Past calls and their results, as a client sends them back.
CALL = pb.ToolCall(
    id="call_1", name="get_weather", arguments='{"city": "Paris", "unit": "celsius"}'
)
HISTORY = pb.ChatMessages(
    messages=[
        pb.ChatMessage(role="user", content=ASK[0][1]),
        pb.ChatMessage(role="assistant", content="", tool_calls=[CALL]),
        pb.ChatMessage(role="tool", content="18 C and sunny", tool_call_id="call_1"),
    ]
)


@pytest.fixture(scope="module")
def client(served: Any) -> Any:
    channel = grpc.insecure_channel(f"127.0.0.1:{served.serve()}")
    yield pb_grpc.InferenceStub(channel)
    channel.close()


def chat(messages: list[tuple[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in messages])


def generate(client: Any, **fields: Any) -> tuple[list[pb.GenerateChunk], pb.GenerateComplete]:
    responses = list(client.Generate(pb.GenerateRequest(**fields), timeout=60))
    assert responses and responses[-1].HasField("complete")
    return [r.chunk for r in responses[:-1]], responses[-1].complete


def reassembled(chunks: list[pb.GenerateChunk], index: int) -> tuple[str | None, list[pb.ToolCall]]:
    """(content, calls) of one answer from its chunks, checking the delta shapes."""
    content, calls = "", {}
    for chunk in chunks:
        if chunk.index != index:
            continue
        assert chunk.HasField("content")  # the answer is read for calls: every chunk says so
        content += chunk.content
        for d in chunk.tool_calls:
            if d.index not in calls:  # a call's first piece: its id and name
                assert d.id.startswith("call_") and d.name, d
                calls[d.index] = pb.ToolCall(id=d.id, name=d.name)
            else:
                assert not d.HasField("id") and not d.HasField("name"), d
            calls[d.index].arguments += d.arguments
    return content or None, [calls[i] for i in sorted(calls)]


def whole(choice: pb.ChoiceResult) -> tuple[str | None, list[pb.ToolCall]]:
    return (choice.content if choice.HasField("content") else None), list(choice.tool_calls)


# -- forced calls ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PARAMETERS, "required"])
def test_forced_calls_validate_and_stream_into_the_whole_call(client: Any, name: str) -> None:
    forced = {"mode": "required"} if name == "required" else {"function": name}
    choice = pb.ToolChoice(**forced)
    sampling = pb.SamplingParams(temperature=0.8, seed=len(name), max_tokens=200)
    chunks, complete = generate(
        client, chat=chat(ASK), tools=TOOLS, tool_choice=choice, sampling=sampling
    )
    (result,) = complete.choices
    assert result.finish_reason == "tool_calls" and not result.HasField("content")
    (call,) = result.tool_calls
    assert call.id.startswith("call_") and (call.name == name or name == "required")
    jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
    assert reassembled(chunks, 0) == whole(result)
    # The raw text is the call as the grammar wrote it, in the parser's own keys.
    text = "".join(c.text for c in chunks)
    assert json.loads(text) == {"name": call.name, "arguments": json.loads(call.arguments)}


# -- "auto": calls read out of the answer ------------------------------------------------------------

TWO_CALLS = (
    r'Let me check\. <tool_call>\{"name": "add", "arguments": \{"a": [1-9], "b": [1-9]\}\}'
    r'</tool_call><tool_call>\{"name": "get_weather", "arguments": \{"city": "Oslo", '
    r'"unit": "(celsius|fahrenheit)"\}\}'
    r"</tool_call> Done\."
)


@pytest.mark.parametrize("parallel", [True, False])
def test_auto_reads_calls_among_text_in_every_answer(client: Any, parallel: bool) -> None:
    # A regex constraint makes the random model write two calls among text; "auto" only reads.
    sampling = pb.SamplingParams(
        n=2,
        temperature=1.0,
        seed=5,
        max_tokens=300,
        structured=pb.StructuredOutput(regex=TWO_CALLS),
    )
    chunks, complete = generate(
        client, chat=chat(ASK), tools=TOOLS, tool_choice=pb.ToolChoice(mode="auto"),
        sampling=sampling, parallel_tool_calls=parallel,
    )  # fmt: skip
    for result in complete.choices:
        text = "".join(c.text for c in chunks if c.index == result.index)
        assert re.fullmatch(TWO_CALLS, text)
        assert result.finish_reason == "tool_calls"
        content, calls = whole(result)
        assert content == "Let me check.  Done."
        names = ["add", "get_weather"] if parallel else ["add"]
        assert [c.name for c in calls] == names
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), PARAMETERS[call.name])
        assert reassembled(chunks, result.index) == (content, calls)
        # The same reading as the shared parser's on the whole text (as REST answers it).
        expected = parse_output(HermesParser(list(PARAMETERS), None if parallel else 1), text)
        assert [(c.name, c.arguments) for c in calls] == [
            (c.name, c.arguments) for c in expected.calls
        ]


def test_none_and_no_tools_leave_the_answer_plain(client: Any) -> None:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    plain_chunks, plain = generate(client, chat=chat(ASK), sampling=sampling)
    none_chunks, none = generate(
        client, chat=chat(ASK), tools=TOOLS, tool_choice=pb.ToolChoice(mode="none"),
        sampling=sampling,
    )  # fmt: skip
    for chunks, complete in ((plain_chunks, plain), (none_chunks, none)):
        assert not any(c.HasField("content") or c.tool_calls for c in chunks)
        (result,) = complete.choices
        assert result.finish_reason == "length" and not result.tool_calls
        assert not result.HasField("content")
    # "none" offers no tools: the same prompt, so the same greedy answer.
    assert plain.usage.prompt_tokens == none.usage.prompt_tokens
    assert "".join(c.text for c in plain_chunks) == "".join(c.text for c in none_chunks)


# -- history -----------------------------------------------------------------------------------------


def test_history_with_calls_and_results_renders_as_rest_renders_it(
    served: Any, client: Any
) -> None:
    choice = pb.ToolChoice(mode="auto")
    got = client.Tokenize(pb.TokenizeRequest(chat=HISTORY, tools=TOOLS, tool_choice=choice))
    # The same prompt through the shared code, from the OpenAI-shaped values REST reads.
    tools = [{"type": "function", "function": {"name": t.name, "description": t.description,
              "parameters": json.loads(t.parameters)}} for t in TOOLS]  # fmt: skip
    openai_call = {"id": CALL.id, "type": "function",
                   "function": {"name": CALL.name, "arguments": CALL.arguments}}  # fmt: skip
    messages = [
        {"role": "user", "content": ASK[0][1]},
        {"role": "assistant", "content": "",
         "tool_calls": read_message_tool_calls([openai_call], "m")},
        {"role": "tool", "content": "18 C and sunny", "tool_call_id": "call_1"},
    ]  # fmt: skip
    template = served.engine.tokenizer.chat_template
    prompt, variables = RequestTools.read(tools, "auto", template, None).prompt(messages)
    assert list(got.token_ids) == served.engine.render_chat(prompt, **variables)

    text = client.Detokenize(pb.DetokenizeRequest(token_ids=got.token_ids)).text
    past_call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": '
    result = "<tool_response>\n18 C and sunny\n</tool_response>"
    assert "# Tools" in text and text.index(past_call) < text.index(result)
    assert "<|im_start|>tool" not in text  # ChatML knows no tool role: the result is a user turn
    # "none": the history still renders, the tools are not offered.
    none = client.Tokenize(
        pb.TokenizeRequest(chat=HISTORY, tools=TOOLS, tool_choice=pb.ToolChoice(mode="none"))
    )
    none_text = client.Detokenize(pb.DetokenizeRequest(token_ids=none.token_ids)).text
    assert "# Tools" not in none_text and past_call in none_text and result in none_text

    sampling = pb.SamplingParams(temperature=0.0, max_tokens=8)
    chunks, complete = generate(client, chat=HISTORY, tools=TOOLS, sampling=sampling)
    assert complete.usage.prompt_tokens == len(got.token_ids)
    assert reassembled(chunks, 0) == whole(complete.choices[0])


# -- structured outputs --------------------------------------------------------------------------------

SCHEMA = obj({"city": {"type": "string", "maxLength": 12},
              "population": {"type": "integer", "minimum": 0, "maximum": 99},
              "sights": {"type": "array", "maxItems": 2, "items": {"enum": ["tower", "river"]}}})  # fmt: skip


@pytest.mark.parametrize(
    ("structured", "check"),
    [
        (pb.StructuredOutput(json_schema=json.dumps(SCHEMA)),
         lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        (pb.StructuredOutput(json_object=True), lambda t: isinstance(json.loads(t), dict)),
        (pb.StructuredOutput(regex=r"[A-Z][a-z]{2,8} [0-9]{2}"),
         lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t)),
        (pb.StructuredOutput(choice=pb.Choices(choices=["yes", "no", "it depends"])),
         lambda t: t in ("yes", "no", "it depends")),
        (pb.StructuredOutput(grammar='start: "(" NUM ("+" NUM)* ")"\nNUM: /[0-9]{1,2}/'),
         lambda t: re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", t)),
    ],
)  # fmt: skip
def test_a_structured_chat_answer_matches_its_constraint(client: Any, structured, check) -> None:
    sampling = pb.SamplingParams(temperature=0.9, seed=2, max_tokens=160, structured=structured)
    chunks, complete = generate(client, chat=chat(ASK), sampling=sampling)
    (result,) = complete.choices
    text = "".join(c.text for c in chunks)
    assert result.finish_reason == "stop", text
    assert check(text) is not False, text
    assert result.completion_tokens == sum(len(c.token_ids) for c in chunks)


# -- refusals ----------------------------------------------------------------------------------------


def tool(name: str, parameters: str | None = None) -> pb.Tool:
    return pb.Tool(name=name) if parameters is None else pb.Tool(name=name, parameters=parameters)


BAD_CALL = pb.ChatMessages(
    messages=[pb.ChatMessage(role="user", content="hi"),
              pb.ChatMessage(role="assistant", tool_calls=[pb.ToolCall(id="c", arguments="{}")])]
)  # fmt: skip
USER_CALL = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi", tool_calls=[CALL])])


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        # Compiles only once the request is otherwise sound: the schema names an unknown type.
        ({"tools": [tool("f", '{"type": "object", "properties": {"a": {"type": "nope"}}}')],
          "tool_choice": pb.ToolChoice(function="f")}, "tools[0].parameters"),
        ({"tools": [tool("f", "{not json")]}, "tools[0].parameters"),
        ({"tools": [tool("f", '{"type": "array"}')]}, "tools[0].parameters"),
        ({"tools": [tool("f"), tool("f")]}, "tools[1].name"),
        ({"tools": [tool("no spaces")]}, "tools[0].name"),
        ({"tools": TOOLS, "tool_choice": pb.ToolChoice(function="rm_rf")}, "tool_choice.function"),
        ({"tools": TOOLS, "tool_choice": pb.ToolChoice(mode="sometimes")}, "tool_choice.mode"),
        ({"tool_choice": pb.ToolChoice(mode="required")}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": pb.ToolChoice(mode="required"),
          "sampling": pb.SamplingParams(structured=pb.StructuredOutput(json_object=True))},
         "tool_choice"),
        ({"chat": BAD_CALL, "tools": TOOLS}, "chat.messages[1].tool_calls[0].name"),
        ({"chat": USER_CALL}, "chat.messages[0].tool_calls"),
        ({"text": "hi", "tools": TOOLS}, "tools"),
        ({"sampling": pb.SamplingParams(structured=pb.StructuredOutput(json_schema='{"type": 5}'))},
         "sampling.structured.json_schema"),
        ({"sampling": pb.SamplingParams(structured=pb.StructuredOutput(regex="([a-z"))},
         "sampling.structured.regex"),
    ],
)  # fmt: skip
def test_bad_tools_and_constraints_are_invalid_argument_naming_the_part(
    served: Any, client: Any, fields: dict[str, Any], field: str
) -> None:
    request = pb.GenerateRequest(**{"chat": chat(ASK), **fields})
    with pytest.raises(grpc.RpcError) as info:
        next(client.Generate(request, timeout=30))
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert dict(err.trailing_metadata())["rustinfer-error-field"] == field
    assert repr(field) in err.details()  # the message names it as this wire spells it
    # The server keeps serving: a sound request right after is answered.
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    _, complete = generate(client, chat=chat(ASK), sampling=sampling)
    assert complete.choices[0].completion_tokens == 3
    served.wait_idle()
