"""The tools a request offers and how the answer must use them, read from OpenAI-shaped values.

Every check raises :class:`~rustinfer.errors.InvalidRequestError` naming the part to fix
(``tools.1.function.parameters``), so any face (REST today, gRPC later) reports it the same way.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rustinfer.errors import InvalidRequestError

__all__ = [
    "Tool",
    "ToolChoice",
    "read_message_tool_calls",
    "read_tool_choice",
    "read_tools",
]

# OpenAI's rule for function names; it also keeps names safe inside prompts and JSON grammars.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# A function given no parameters takes none (OpenAI's reading): an empty object, nothing more.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class Tool:
    """One function the model may call; ``parameters`` is a JSON schema of an object."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: dict(NO_PARAMETERS))

    def as_openai(self) -> dict[str, Any]:
        """The OpenAI shape, which chat templates that render tools read."""
        function: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: "none" (never call), "auto" (the model decides), "required" (call one of the
    tools), or "function" (call ``name``)."""

    mode: str
    name: str | None = None

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def _require_mapping(value: Any, where: str, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidRequestError(where, f"must be {what}")
    return value


def read_tools(value: Any, where: str = "tools") -> list[Tool]:
    """``tools`` as a list of :class:`Tool` (None or ``[]``: no tools)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequestError(where, "must be a list of tools")
    tools: list[Tool] = []
    seen: set[str] = set()
    for i, entry in enumerate(value):
        at = f"{where}.{i}"
        entry = _require_mapping(entry, at, 'an object {"type": "function", "function": {...}}')
        if entry.get("type", "function") != "function":
            raise InvalidRequestError(f"{at}.type", 'only "function" tools are supported')
        function = _require_mapping(
            entry.get("function"), f"{at}.function", 'an object with "name" and "parameters"'
        )
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRequestError(
                f"{at}.function.name", "must be 1 to 64 letters, digits, '_' or '-'"
            )
        if name in seen:
            raise InvalidRequestError(f"{at}.function.name", f"{name!r} is given twice")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequestError(f"{at}.function.description", "must be a string")
        tools.append(Tool(name, description, _object_schema(function.get("parameters"), at)))
    return tools


def _object_schema(parameters: Any, at: str) -> dict[str, Any]:
    """A function's parameters: a JSON schema of an object (absent: no parameters)."""
    if parameters is None:
        return dict(NO_PARAMETERS)
    where = f"{at}.function.parameters"
    if not isinstance(parameters, Mapping):
        raise InvalidRequestError(where, "must be a JSON schema (an object)")
    kind = parameters.get("type", "object")
    if kind != "object":
        raise InvalidRequestError(
            where, f'must describe an object ("type": "object"): arguments are named, got {kind!r}'
        )
    return {"type": "object", **parameters}


def read_tool_choice(value: Any, tools: list[Tool], where: str = "tool_choice") -> ToolChoice:
    """``tool_choice`` checked against ``tools`` (absent: "auto" with tools, else "none")."""
    if value is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise InvalidRequestError(
                where,
                f"must be 'none', 'auto', 'required' or "
                f'{{"type": "function", "function": {{"name": ...}}}}, got {value!r}',
            )
        if value != "none" and not tools:
            raise InvalidRequestError(where, f"{value!r} needs tools: give 'tools' too")
        return ToolChoice(value)
    value = _require_mapping(value, where, 'a string or {"type": "function", "function": {...}}')
    if value.get("type", "function") != "function":
        raise InvalidRequestError(f"{where}.type", 'must be "function"')
    function = _require_mapping(
        value.get("function"), f"{where}.function", 'an object {"name": ...}'
    )
    name = function.get("name")
    known = [t.name for t in tools]
    if name not in known:
        raise InvalidRequestError(
            f"{where}.function.name", f"names no tool of this request: {name!r} (tools: {known})"
        )
    return ToolChoice("function", name)


def read_message_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's ``tool_calls``, as chat templates read them: arguments as a JSON
    object (the OpenAI wire carries a JSON string; templates write ``arguments | tojson``)."""
    if not isinstance(value, list):
        raise InvalidRequestError(where, "must be a list of tool calls")
    calls = []
    for j, call in enumerate(value):
        at = f"{where}.{j}"
        call = _require_mapping(call, at, 'an object {"id", "type", "function"}')
        if call.get("type", "function") != "function":
            raise InvalidRequestError(f"{at}.type", 'must be "function"')
        function = _require_mapping(
            call.get("function"), f"{at}.function", 'an object {"name", "arguments"}'
        )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError(f"{at}.function.name", "must be a non-empty string")
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, str):
            # A model's own malformed arguments may come back in the history: kept as text.
            with contextlib.suppress(json.JSONDecodeError):
                arguments = json.loads(arguments)
        elif not isinstance(arguments, Mapping):
            raise InvalidRequestError(f"{at}.function.arguments", "must be a JSON string")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidRequestError(f"{at}.id", "must be a string")
        calls.append(
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        )
    return calls
