"""Tool calling, for any face of the server: the tools a request offers (``spec``), how they and
past calls enter the prompt (``render``), how calls are read back out of the output (``parsers``,
one per model family, in a registry), forced calls' constraint and reader (``forced``), and one
request's tools through all of these (``request``)."""

from rustinfer.tool_calls.forced import ForcedCallParser, forced_call
from rustinfer.tool_calls.parsers import (
    DEFAULT_TOOL_PARSER,
    TOOL_PARSERS,
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    ParsedOutput,
    ToolCall,
    ToolParser,
    choose_parser,
    parse_output,
    register_tool_parser,
)
from rustinfer.tool_calls.render import chat_prompt, renders_tools
from rustinfer.tool_calls.request import RequestTools, finish_reason
from rustinfer.tool_calls.spec import (
    Tool,
    ToolChoice,
    read_message_tool_calls,
    read_tool_choice,
    read_tools,
)

__all__ = [
    "DEFAULT_TOOL_PARSER",
    "TOOL_PARSERS",
    "ArgumentsDelta",
    "CallStart",
    "ContentDelta",
    "ForcedCallParser",
    "ParsedOutput",
    "RequestTools",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolParser",
    "chat_prompt",
    "choose_parser",
    "finish_reason",
    "forced_call",
    "parse_output",
    "read_message_tool_calls",
    "read_tool_choice",
    "read_tools",
    "register_tool_parser",
    "renders_tools",
]
