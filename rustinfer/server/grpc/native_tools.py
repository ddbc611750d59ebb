"""Chat messages and tool calling on the native service: the wire's messages, tools and choice
read into the OpenAI-shaped values that ``rustinfer.tool_calls`` checks, renders and parses (as
REST does), and each answer's calls written back as streamed deltas and whole calls.

The shared readers name a bad part by its OpenAI path (``tools.0.function.parameters``);
:func:`wire_path` turns that into its path in this service's messages (``tools[0].parameters``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from rustinfer.engine.outputs import RequestOutput
from rustinfer.errors import InvalidRequestError
from rustinfer.server.grpc.generated.rustinfer.v1 import inference_pb2 as pb
from rustinfer.server.requests_common import chat_message
from rustinfer.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    RequestTools,
    ToolParser,
    finish_reason,
    read_message_tool_calls,
)
from rustinfer.tool_calls.parsers import ToolEvent, collect

__all__ = ["CallReaders", "chat_messages", "request_tools", "wire_path"]

_MODES = ("auto", "none", "required")
# An item of an OpenAI-shaped list, and the "function" object the wire's Tool and ToolCall flatten.
_ITEM = re.compile(r"\.(\d+)(?:\.function)?(?=\.|$)")


def wire_path(field: str) -> str:
    """A field path of the shared readers as its path in this service's messages."""
    field = _ITEM.sub(r"[\1]", field)
    # The wire's ToolChoice names the function directly, without OpenAI's {"name": ...}.
    return "tool_choice.function" if field == "tool_choice.function.name" else field


def chat_messages(chat: pb.ChatMessages) -> list[dict[str, Any]]:
    """The conversation as chat templates read it (as REST builds it)."""
    messages = []
    for i, m in enumerate(chat.messages):
        where = f"chat.messages[{i}]"
        if not m.role:
            raise InvalidRequestError(f"{where}.role", "give the role")
        message = chat_message(m.role, m.content, m.name if m.HasField("name") else None)
        if m.HasField("tool_call_id"):
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequestError(
                    f"{where}.tool_calls", "only assistant messages carry tool_calls"
                )
            calls = [
                {
                    "id": c.id or None,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments or "{}"},
                }
                for c in m.tool_calls
            ]
            message["tool_calls"] = read_message_tool_calls(calls, f"{where}.tool_calls")
        messages.append(message)
    if not messages:
        raise InvalidRequestError("chat.messages", "no messages: give at least one")
    return messages


def request_tools(
    request: pb.GenerateRequest | pb.TokenizeRequest,
    template: str | None,
    configured_parser: str | None,
) -> RequestTools | None:
    """The request's tools, checked; None when it has neither tools nor a tool choice (so a
    request without them runs exactly as before)."""
    choice = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if not request.tools and choice is None:
        return None
    if request.WhichOneof("input") != "chat":
        field = "tools" if request.tools else "tool_choice"
        raise InvalidRequestError(
            field, "tools need 'chat' input: the chat template puts them in the prompt"
        )
    tools = [_tool_value(t, i) for i, t in enumerate(request.tools)]
    value: Any = None
    if choice == "mode":
        value = request.tool_choice.mode
        if value not in _MODES:
            raise InvalidRequestError(
                "tool_choice.mode",
                f"must be one of {_MODES} (or name a function in tool_choice.function), "
                f"got {value!r}",
            )
    elif choice == "function":
        value = {"type": "function", "function": {"name": request.tool_choice.function}}
    parallel = True
    if isinstance(request, pb.GenerateRequest) and request.HasField("parallel_tool_calls"):
        parallel = request.parallel_tool_calls
    return RequestTools.read(tools, value, template, configured_parser, parallel)


def _tool_value(tool: pb.Tool, i: int) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.HasField("description"):
        function["description"] = tool.description
    if tool.HasField("parameters"):
        try:
            function["parameters"] = json.loads(tool.parameters)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"tools.{i}.function.parameters", f"not JSON: {exc}") from exc
    return {"type": "function", "function": function}


class CallReaders:
    """Reads each of a request's ``n`` answers for calls as it streams (None where the answers
    are plain text: no tools, or tool_choice "none")."""

    def __init__(self, tools: RequestTools | None, n: int) -> None:
        self._parsers: list[ToolParser | None] = [
            tools.new_parser() if tools is not None else None for _ in range(n)
        ]
        self._events: list[list[ToolEvent]] = [[] for _ in range(n)]

    def read(self, out: RequestOutput) -> tuple[str | None, list[pb.ToolCallDelta]]:
        """The chunk's content (None when this answer is not read for calls) and call pieces."""
        parser = self._parsers[out.index]
        if parser is None:
            return None, []
        events = parser.feed(out.text_delta)
        if out.finished:
            events += parser.finish()
        self._events[out.index] += events
        content: list[str] = []
        deltas: list[pb.ToolCallDelta] = []
        for event in events:
            if isinstance(event, ContentDelta):
                content.append(event.text)
            elif isinstance(event, CallStart):
                deltas.append(pb.ToolCallDelta(index=event.index, id=event.id, name=event.name))
            elif isinstance(event, ArgumentsDelta):
                deltas.append(pb.ToolCallDelta(index=event.index, arguments=event.text))
        return "".join(content), deltas

    def complete(self, result: pb.ChoiceResult) -> None:
        """Add the whole answer's content and calls to its final result."""
        parser = self._parsers[result.index]
        if parser is None:
            return
        result.finish_reason = finish_reason(result.finish_reason, parser) or ""
        parsed = collect(self._events[result.index])
        if parsed.content is not None:
            result.content = parsed.content
        result.tool_calls.extend(
            pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in parsed.calls
        )
