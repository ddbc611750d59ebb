"""Llama 3.1+'s tool-call format: the answer is the call, as JSON, with "parameters"."""

from __future__ import annotations

import json
from collections.abc import Collection

from rustinfer.tool_calls.parsers import ToolEvent, ToolParser, tool_lines
from rustinfer.tool_calls.spec import Tool

__all__ = ["Llama3JsonParser"]


class Llama3JsonParser(ToolParser):
    """Llama 3.1+'s JSON calls: an answer that is ``{"name": ..., "parameters": {...}}`` (after
    an optional ``<|python_tag|>``), several separated by ``;``. An answer that starts with other
    text is all content; text after the calls is content."""

    name = "llama3_json"
    arguments_key = "parameters"
    PYTHON_TAG = "<|python_tag|>"
    _decoder = json.JSONDecoder()

    def __init__(
        self, tool_names: Collection[str] | None = None, max_calls: int | None = None
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._buffer = ""
        self._state = "start"  # then "calls" (reading JSON objects) or "content" (for good)

    def feed(self, delta: str) -> list[ToolEvent]:
        self._buffer += delta
        events: list[ToolEvent] = []
        while True:
            if self._state == "content":
                events += self._content(self._buffer)
                self._buffer = ""
                return events
            text = self._buffer.lstrip()
            if self._state == "start":
                if text.startswith(self.PYTHON_TAG):
                    text = text[len(self.PYTHON_TAG) :].lstrip()
                elif not text or self.PYTHON_TAG.startswith(text):
                    return events  # nothing yet, or perhaps the tag
                if not text:
                    return events
                self._state = "calls" if text.startswith("{") else "content"
                self._buffer = text
                continue
            text = text.lstrip(" \t\r\n;")
            self._buffer = text
            if not text:
                return events
            if not text.startswith("{"):
                self._state = "content"
                continue
            try:
                obj, end = self._decoder.raw_decode(text)
            except json.JSONDecodeError:
                return events  # not complete yet (or malformed: content at the end)
            call = self._read_call(obj)
            if call is None:
                self._state = "content"
                continue
            events += self._call(*call)
            self._buffer = text[end:]

    def finish(self) -> list[ToolEvent]:
        events = self._content(self._buffer)
        self._buffer, self._state = "", "content"
        return events

    @classmethod
    def instructions(cls, tools: list[Tool]) -> str:
        return (
            "You can call the functions below (JSON schemas of their arguments follow). To call "
            'one, answer with only a JSON object {"name": function name, "parameters": '
            "{argument name: value}}; otherwise answer in plain text.\n\n" + tool_lines(tools)
        )
