"""One request's tools, as every face of the server handles them: read and checked, put into the
prompt, turned into a constraint when the call is forced, and read back out of each output.

The face reads its own wire into OpenAI-shaped values (REST has them already; gRPC builds them)
and hands them to :meth:`RequestTools.read`, so both check, render and parse alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.errors import InvalidRequestError
from rustinfer.tool_calls.forced import ForcedCallParser, forced_call
from rustinfer.tool_calls.parsers import ToolParser, choose_parser
from rustinfer.tool_calls.render import chat_prompt, renders_tools
from rustinfer.tool_calls.spec import Tool, ToolChoice, read_tool_choice, read_tools

__all__ = ["RequestTools", "finish_reason"]


@dataclass
class RequestTools:
    """One request's tools (possibly none) and what they change."""

    tools: list[Tool]
    choice: ToolChoice
    parser: type[ToolParser]
    template: str | None
    parallel: bool = True

    @classmethod
    def read(
        cls,
        tools: Any,
        tool_choice: Any,
        template: str | None,
        configured_parser: str | None,
        parallel: bool = True,
    ) -> Self:
        """``tools`` and ``tool_choice`` in OpenAI's shapes, checked before any work: a bad tool
        or choice raises InvalidRequestError naming it (``tools.0.function.parameters``)."""
        read = read_tools(tools)
        choice = read_tool_choice(tool_choice, read)
        # The template's own format when it renders tools; rustinfer's default when it writes
        # the tools into the prompt itself.
        parser = choose_parser(configured_parser, template if renders_tools(template) else None)
        return cls(read, choice, parser, template, parallel)

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


def finish_reason(reason: str | None, parser: ToolParser | None) -> str | None:
    """OpenAI says "tool_calls" when an answer that ended by itself made calls."""
    return "tool_calls" if reason == "stop" and parser is not None and parser.calls else reason
