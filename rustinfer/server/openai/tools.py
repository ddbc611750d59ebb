"""Tool calling on ``POST /v1/chat/completions``: the request's tools, their prompt, the forced
call's constraint, and answers in OpenAI's ``tool_calls`` shapes (whole and streamed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError
from rustinfer.server.openai.protocol import ChatCompletionRequest, TokenizeRequest
from rustinfer.tool_calls import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ForcedCallParser,
    Tool,
    ToolChoice,
    ToolParser,
    chat_prompt,
    choose_parser,
    forced_call,
    parse_output,
    read_tool_choice,
    read_tools,
    renders_tools,
)
from rustinfer.tool_calls.parsers import ToolEvent

__all__ = ["ChatTools", "assistant_message", "finish_reason", "stream_deltas"]


@dataclass
class ChatTools:
    """One request's tools (possibly none) and what they change."""

    tools: list[Tool]
    choice: ToolChoice
    parser: type[ToolParser]
    template: str | None
    parallel: bool = True

    @classmethod
    def from_request(
        cls,
        req: ChatCompletionRequest | TokenizeRequest,
        template: str | None,
        configured_parser: str | None,
    ) -> ChatTools:
        """Checked before any work: a bad tool or choice is a 400 naming it."""
        tools = read_tools(req.tools)
        choice = read_tool_choice(req.tool_choice, tools)
        # The template's own format when it renders tools; rustinfer's default when it writes
        # the tools into the prompt itself.
        parser = choose_parser(configured_parser, template if renders_tools(template) else None)
        parallel = getattr(req, "parallel_tool_calls", None) is not False
        return cls(tools, choice, parser, template, parallel)

    def prompt(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Messages and extra template variables for ``engine.render_chat``."""
        return chat_prompt(messages, self.tools, self.choice, self.parser, self.template)

    def constrain(self, params: SamplingParams) -> None:
        """A forced call becomes the request's output constraint."""
        constraint = forced_call(self.tools, self.choice, self.parser.arguments_key)
        if constraint is None:
            return
        if params.structured is not None:
            raise InvalidRequestError(
                "tool_choice",
                f"a forced tool call constrains the output already: drop {params.structured.field}",
            )
        params.structured = constraint

    def new_parser(self) -> ToolParser | None:
        """A parser for one choice's output, or None when the output is plain content."""
        if not self.tools or self.choice.mode == "none":
            return None
        names = [t.name for t in self.tools]
        if self.choice.forced:
            return ForcedCallParser(self.parser.arguments_key, names)
        return self.parser(names, None if self.parallel else 1)


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


def finish_reason(reason: str | None, parser: ToolParser | None) -> str | None:
    """OpenAI says "tool_calls" when an answer that ended by itself made calls."""
    return "tool_calls" if reason == "stop" and parser is not None and parser.calls else reason


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
