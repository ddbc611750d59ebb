"""Tool calling on ``POST /v1/chat/completions``: the request's tools, their prompt, the forced
call's constraint, and answers in OpenAI's ``tool_calls`` shapes (whole and streamed)."""

from __future__ import annotations

from typing import Any

from rustinfer.server.openai.protocol import ChatCompletionRequest, TokenizeRequest
from rustinfer.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    RequestTools,
    ToolParser,
    finish_reason,
    parse_output,
)
from rustinfer.tool_calls.parsers import ToolEvent

__all__ = ["ChatTools", "assistant_message", "finish_reason", "stream_deltas"]


class ChatTools(RequestTools):
    """One chat request's tools (the checks, prompt, constraint and parsers every face shares)."""

    @classmethod
    def from_request(
        cls,
        req: ChatCompletionRequest | TokenizeRequest,
        template: str | None,
        configured_parser: str | None,
    ) -> ChatTools:
        """Checked before any work: a bad tool or choice is a 400 naming it."""
        parallel = getattr(req, "parallel_tool_calls", None) is not False
        return cls.read(req.tools, req.tool_choice, template, configured_parser, parallel)


def _call_dicts(parsed_calls: list[Any]) -> list[dict[str, Any]]:
    return [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in parsed_calls
    ]


def assistant_message(text: str, parser: ToolParser | None) -> dict[str, Any]:
    """The assistant message of a whole answer (``parser`` fresh: it reads ``text``)."""
    if parser is None:
        return {"role": "assistant", "content": text, "refusal": None}
    parsed = parse_output(parser, text)
    out: dict[str, Any] = {"role": "assistant", "content": parsed.content, "refusal": None}
    if parsed.calls:
        out["tool_calls"] = _call_dicts(parsed.calls)
    return out


def stream_deltas(parser: ToolParser, text: str, finished: bool) -> list[dict[str, Any]]:
    """Chunk deltas for the next piece of a streamed answer: content, then each call's start
    (index, id, type, name, arguments "") and its arguments, in OpenAI's shapes."""
    events: list[ToolEvent] = parser.feed(text)
    if finished:
        events += parser.finish()
    deltas: list[dict[str, Any]] = []
    for event in events:
        if isinstance(event, ContentDelta):
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += event.text
            else:
                deltas.append({"content": event.text})
        elif isinstance(event, CallStart):
            call = {"index": event.index, "id": event.id, "type": "function"}
            call["function"] = {"name": event.name, "arguments": ""}
            deltas.append({"tool_calls": [call]})
        elif isinstance(event, ArgumentsDelta):
            piece = {"index": event.index, "function": {"arguments": event.text}}
            deltas.append({"tool_calls": [piece]})
    return deltas
