"""Forced calls (``tool_choice`` "required" or one named function): the constraint that makes the
model call, and the parser that reads the call back as it streams.

The constraint is a JSON schema, compiled by llguidance like any ``response_format``: one object
``{"name": NAME, "arguments": ARGS}`` whose name is a constant and whose arguments follow that
function's own schema ("required": any of the tools, as ``anyOf``). Plain JSON rather than a Lark
grammar with ``<tool_call>`` tags around it: one form serves every model family (the key of the
arguments is the family's own, "parameters" for Llama 3), the compiled grammar is cached across
requests, and a model's special tokens (Qwen's ``<tool_call>`` is one) never need spelling out
in a grammar. It allows exactly one call, which is what a forced call is almost always for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Any

from rustinfer.engine.structured import StructuredOutput
from rustinfer.errors import InvalidRequestError
from rustinfer.tool_calls.parsers import ArgumentsDelta, ToolEvent, ToolParser
from rustinfer.tool_calls.spec import Tool, ToolChoice

__all__ = ["ForcedCallParser", "forced_call"]

# Where JSON schemas keep shared definitions that "$ref": "#/$defs/X" points at.
_DEFS_KEYS = ("$defs", "definitions")


def forced_call(
    tools: list[Tool], choice: ToolChoice, arguments_key: str = "arguments"
) -> StructuredOutput | None:
    """The constraint of a forced call, or None when the model may answer freely."""
    if not choice.forced:
        return None
    chosen = [t for t in tools if choice.mode == "required" or t.name == choice.name]
    where = "tools"
    if choice.mode == "function":
        where = f"tools.{[t.name for t in tools].index(choice.name)}.function.parameters"
    defs: dict[str, dict[str, Any]] = {key: {} for key in _DEFS_KEYS}
    alternatives = []
    for tool in chosen:
        parameters = dict(tool.parameters)
        for key in _DEFS_KEYS:
            # "$ref": "#/$defs/X" points at the root: the definitions move up with the schema.
            found = parameters.pop(key, None) or {}
            if not isinstance(found, Mapping):
                raise InvalidRequestError(where, f"{key} must be an object of schemas")
            for name, schema in found.items():
                if defs[key].setdefault(name, schema) != schema:
                    raise InvalidRequestError(
                        where, f"two tools define {key}/{name} differently: rename one"
                    )
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, arguments_key: parameters},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema = {**schema, **{key: found for key, found in defs.items() if found}}
    return StructuredOutput.json_schema(schema, where)


class ForcedCallParser(ToolParser):
    """The output of a forced call: exactly ``{"name":NAME,"<key>":ARGS}``, as the grammar writes
    it (compact, keys in schema order). The call starts once its name is complete; its arguments
    then stream as they are written, all but the last character, which may close the object."""

    def __init__(
        self,
        arguments_key: str = "arguments",
        tool_names: Collection[str] | None = None,
        max_calls: int | None = None,
    ) -> None:
        super().__init__(tool_names, max_calls)
        self._head = re.compile(r'\{"name":"([A-Za-z0-9_-]+)","' + re.escape(arguments_key) + '":')
        self._buffer = ""
        self._index: int | None = None
        self._sent = 0  # buffer offset up to which arguments have been emitted

    def feed(self, delta: str) -> list[ToolEvent]:
        self._buffer += delta
        events: list[ToolEvent] = []
        if self._index is None:
            head = self._head.match(self._buffer)
            if head is None:
                return events
            events += self._start(head.group(1))
            self._index, self._sent = 0, head.end()
        end = len(self._buffer) - 1
        if end > self._sent:
            events.append(ArgumentsDelta(self._index, self._buffer[self._sent : end]))
            self._sent = end
        return events

    def finish(self) -> list[ToolEvent]:
        if self._index is None:  # cut short before the name was whole: no call was made
            return self._content(self._buffer)
        rest = self._buffer[self._sent :]
        try:
            json.loads(self._buffer)
            rest = rest[:-1]  # complete: the last character closes the outer object
        except json.JSONDecodeError:
            pass  # cut short (max_tokens): the arguments end where the output ends
        return [ArgumentsDelta(self._index, rest)] if rest else []
