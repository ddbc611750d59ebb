"""Tool calls read back out of generated text: one parser per model family, fed incrementally.

A parser takes the output's text deltas as they are decoded and returns events: content that is
surely not part of a call, the start of a call (its name), pieces of its arguments. Text that
might still open a call is held back, as the stop-string matcher holds a possible stop string. A
whole answer is the same parser fed the whole text at once (:func:`parse_output`), so a streamed
answer's deltas always reassemble into the non-streamed one.

Parsers come from plugins: a model family's plugin registers its format's parser through the
``rustinfer_register_tool_parsers`` hook, with the strings by which a chat template asks for it.
The core supplies "hermes" (``<tool_call>`` blocks), the fallback. :func:`choose_parser` takes
the parser ``rustinfer serve --tool-call-parser`` names, else the one the chat template's
markers select, else "hermes". A parser also knows how to write its format into a prompt, for
templates that cannot render tools themselves (``rustinfer.tool_calls.render``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, overload

from rustinfer.errors import RegistryError
from rustinfer.plugins import get_registries
from rustinfer.registry import TemplateMarkers
from rustinfer.tool_calls.parser_registry import FALLBACK_TOOL_PARSER, ToolParserRegistry
from rustinfer.tool_calls.spec import Tool

__all__ = [
    "DEFAULT_TOOL_PARSER",
    "TOOL_PARSERS",
    "ArgumentsDelta",
    "CallStart",
    "ContentDelta",
    "HermesParser",
    "ParsedOutput",
    "ToolCall",
    "ToolEvent",
    "ToolParser",
    "choose_parser",
    "parse_output",
    "register_tool_parser",
    "tool_lines",
]

DEFAULT_TOOL_PARSER = FALLBACK_TOOL_PARSER


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


ToolEvent = ContentDelta | CallStart | ArgumentsDelta


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # JSON text, as OpenAI's wire carries it


@dataclass
class ParsedOutput:
    content: str | None  # None when there is no text outside the calls
    calls: list[ToolCall] = field(default_factory=list)


def parse_output(parser: ToolParser, text: str) -> ParsedOutput:
    """A whole output read by ``parser`` (a fresh one): the same events a stream would give."""
    return collect([*parser.feed(text), *parser.finish()])


def collect(events: list[ToolEvent]) -> ParsedOutput:
    content: list[str] = []
    calls: dict[int, ToolCall] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls[event.index] = ToolCall(event.id, event.name)
        else:
            calls[event.index].arguments += event.text
    return ParsedOutput("".join(content) or None, [calls[i] for i in sorted(calls)])


def _arguments_text(arguments: Any) -> str | None:
    """Arguments as OpenAI sends them (compact JSON text), or None when they are no object."""
    if isinstance(arguments, str):  # some models write the object as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, Mapping):
        return None
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _partial_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class ToolParser:
    """Reads one output's text into content and calls; subclasses implement ``feed``/``finish``.

    ``tool_names``: the request's functions; a call to any other is not a call (it stays content,
    as OpenAI never answers with a function it was not given). ``max_calls``: calls past it are
    dropped (``parallel_tool_calls: false``).
    """

    # The format's usual name: register_tool_parser registers a class under it (a plugin's hook
    # names its registration itself, so one class may serve under several names).
    name: ClassVar[str] = ""
    # The key of the arguments in the JSON this family writes (forced calls write it too).
    arguments_key: ClassVar[str] = "arguments"

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        self.tool_names = None if tool_names is None else frozenset(tool_names)
        self.max_calls = max_calls
        self.calls = 0  # calls found so far
        self._started = False  # some content was emitted (leading whitespace is dropped)
        self._pending_space = ""  # trailing whitespace, emitted only if more content follows

    def feed(self, delta: str) -> list[ToolEvent]:
        raise NotImplementedError

    def finish(self) -> list[ToolEvent]:
        raise NotImplementedError

    # -- helpers for subclasses -----------------------------------------------------------------

    def _content(self, text: str) -> list[ToolEvent]:
        # Content is stripped as a whole: the whitespace around a call belongs to no one.
        text = self._pending_space + text
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        self._pending_space = text[len(body) :]
        if not body:
            return []
        self._started = True
        return [ContentDelta(body)]

    def _read_call(self, obj: Any) -> tuple[str, str] | None:
        """(name, arguments JSON) when ``obj`` is a call to a known tool, else None."""
        if not isinstance(obj, Mapping):
            return None
        name = obj.get("name")
        if not isinstance(name, str) or not name:
            return None
        if self.tool_names is not None and name not in self.tool_names:
            return None
        key = next((k for k in ("arguments", "parameters") if k in obj), None)
        arguments = _arguments_text(obj[key] if key else {})
        return None if arguments is None else (name, arguments)

    def _start(self, name: str) -> list[ToolEvent]:
        index, self.calls = self.calls, self.calls + 1
        if self.max_calls is not None and index >= self.max_calls:
            return []
        return [CallStart(index, f"call_{uuid.uuid4().hex[:24]}", name)]

    def _call(self, name: str, arguments: str) -> list[ToolEvent]:
        start = self._start(name)
        return [*start, ArgumentsDelta(start[0].index, arguments)] if start else []

    # -- the prompt side, for chat templates that cannot render tools ----------------------------

    @classmethod
    def instructions(cls, tools: list[Tool]) -> str:
        """A system-prompt section listing ``tools`` and how to call them."""
        raise NotImplementedError

    @classmethod
    def render_call(cls, name: str, arguments: Any) -> str:
        """A past call, as the model would have written it."""
        return json.dumps({"name": name, cls.arguments_key: arguments}, ensure_ascii=False)

    @classmethod
    def render_result(cls, content: str) -> str:
        """A function's result, as the user turn that brings it back."""
        return content


def _registry() -> ToolParserRegistry:
    return get_registries().tool_parsers


def load_parser(name: str, registry: ToolParserRegistry | None = None) -> type[ToolParser]:
    """The parser class registered as ``name``, imported on first use and checked."""
    registry = _registry() if registry is None else registry
    cls = registry.get(name)
    if not (isinstance(cls, type) and issubclass(cls, ToolParser)):
        entry = registry.entry(name)
        raise RegistryError(
            f"tool-call parser {name!r} of {registry.who(entry.plugin)}: its target "
            f"{entry.target_text!r} is {cls!r}, not a rustinfer.tool_calls.ToolParser subclass; "
            "fix the 'module:Class' string the plugin registers"
        )
    return cls


def choose_parser(
    configured: str | None, template: str | None, registry: ToolParserRegistry | None = None
) -> type[ToolParser]:
    """The parser ``configured`` names, else the one whose markers ``template`` contains (None:
    a template that cannot render tools, so rustinfer writes the fallback's format itself), else
    the fallback. An unknown ``configured`` name raises, listing the registered ones."""
    registry = _registry() if registry is None else registry
    return load_parser(registry.select(configured, template).key, registry)


class _RegisteredParsers(Mapping[str, type[ToolParser]]):
    """The process's tool-call parsers by name, read from the registries (which are filled from
    the installed plugins on first use, not at import)."""

    def __getitem__(self, name: str) -> type[ToolParser]:
        if name not in self:
            raise KeyError(name)
        return load_parser(name)

    def __contains__(self, name: object) -> bool:
        return name in _registry()

    def __iter__(self) -> Iterator[str]:
        return iter(_registry().keys())

    def __len__(self) -> int:
        return len(_registry().keys())


TOOL_PARSERS: Mapping[str, type[ToolParser]] = _RegisteredParsers()


@overload
def register_tool_parser(cls: type[ToolParser], /) -> type[ToolParser]: ...


@overload
def register_tool_parser(
    *, template_markers: TemplateMarkers = (), priority: int = 0
) -> Callable[[type[ToolParser]], type[ToolParser]]: ...


def register_tool_parser(
    cls: type[ToolParser] | None = None,
    /,
    *,
    template_markers: TemplateMarkers = (),
    priority: int = 0,
) -> Any:
    """Add a parser class to this process's registry under ``cls.name`` (a class decorator, bare
    or with the hook's keywords), for code that builds an engine itself. A distribution
    registers through the ``rustinfer_register_tool_parsers`` hook instead, so that every
    process finds its parser and ``rustinfer plugins`` lists it. A name registered twice is an
    error naming both."""

    def add(cls: type[ToolParser]) -> type[ToolParser]:
        regs = get_registries()
        if cls.name in regs.tool_parsers and load_parser(cls.name) is cls:
            return cls  # the same class again (a module imported twice): nothing changes
        regs.labels.setdefault(cls.__module__, f"module {cls.__module__!r}")
        regs.tool_parsers.add(
            cls.name, cls, cls.__module__, template_markers=template_markers, priority=priority
        )
        return cls

    return add if cls is None else add(cls)


def tool_lines(tools: list[Tool]) -> str:
    """The tools as JSON lines in OpenAI's shape, for a system prompt's tool section."""
    return "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)


class HermesParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks among text (Hermes,
    Qwen 2.5/3). A block whose JSON is no call stays in the content as written."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._buffer = ""
        self._in_call = False

    def feed(self, delta: str) -> list[ToolEvent]:
        self._buffer += delta
        events: list[ToolEvent] = []
        while True:
            if self._in_call:
                end = self._buffer.find(self.CLOSE)
                if end < 0:
                    return events
                events += self._block(self._buffer[:end], closed=True)
                self._buffer = self._buffer[end + len(self.CLOSE) :]
                self._in_call = False
                continue
            start = self._buffer.find(self.OPEN)
            if start < 0:
                cut = len(self._buffer) - _partial_prefix_len(self._buffer, self.OPEN)
                events += self._content(self._buffer[:cut])
                self._buffer = self._buffer[cut:]
                return events
            events += self._content(self._buffer[:start])
            self._buffer = self._buffer[start + len(self.OPEN) :]
            self._in_call = True

    def finish(self) -> list[ToolEvent]:
        # A block left open at the end still counts when its JSON is whole (the model stopped
        # right after it); otherwise it is text.
        if self._in_call:
            events = self._block(self._buffer, closed=False)
        else:
            events = self._content(self._buffer)
        self._buffer, self._in_call = "", False
        return events

    def _block(self, inner: str, closed: bool) -> list[ToolEvent]:
        try:
            call = self._read_call(json.loads(inner))
        except json.JSONDecodeError:
            call = None
        if call is not None:
            return self._call(*call)
        return self._content(self.OPEN + inner + (self.CLOSE if closed else ""))

    @classmethod
    def instructions(cls, tools: list[Tool]) -> str:
        return (
            "# Tools\n\nYou may call one or more functions to help with the request. Their "
            "signatures, with JSON schemas of their arguments, are inside <tools></tools>:\n"
            f"<tools>\n{tool_lines(tools)}\n</tools>\n\n"
            "To call a function, write its name and arguments as a JSON object inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {<arguments>}}\n</tool_call>'
        )

    @classmethod
    def render_call(cls, name: str, arguments: Any) -> str:
        return f"{cls.OPEN}\n{super().render_call(name, arguments)}\n{cls.CLOSE}"

    @classmethod
    def render_result(cls, content: str) -> str:
        return f"<tool_response>\n{content}\n</tool_response>"
