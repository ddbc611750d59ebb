"""The tool-call parser registry: name -> parser class, with the strings by which a chat template
asks for each format, filled by the ``rustinfer_register_tool_parsers`` hook and read by
:func:`rustinfer.tool_calls.parsers.choose_parser`.

It imports no parser: targets stay ``"module:Class"`` strings until a request needs one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rustinfer.errors import RegistryError
from rustinfer.registry import Entry, NamedRegistry, TemplateMarkers, plugin_label

__all__ = [
    "CORE_PLUGIN",
    "FALLBACK_TOOL_PARSER",
    "ToolParserEntry",
    "ToolParserRegistry",
    "UnknownToolParserError",
]


class UnknownToolParserError(RegistryError, ValueError):
    """A configured tool-call parser name that nothing registers (a ValueError too: callers of
    ``choose_parser`` have caught that since before parsers came from plugins)."""


# The parser the core itself supplies: it reads Hermes-style ``<tool_call>`` blocks, and it is
# chosen when no parser is configured and no registered parser recognises the chat template
# (ChatML as SmolLM2 ships it cannot render tools, so rustinfer writes this format itself).
FALLBACK_TOOL_PARSER = "hermes"
_FALLBACK_TARGET = "rustinfer.tool_calls.parsers:HermesParser"
# The "plugin" that registers the fallback, for listings and messages.
CORE_PLUGIN = "rustinfer"
CORE_LABEL = "the rustinfer core"


@dataclass
class ToolParserEntry(Entry):
    """One tool-call parser: ``template_markers`` are alternative groups of strings; a chat
    template that contains every string of a group asks for this parser's format."""

    template_markers: tuple[tuple[str, ...], ...] = ()
    priority: int = 0

    def match(self, template: str) -> int:
        """The size of the largest marker group ``template`` contains in full; 0: no match."""
        return max(
            (len(g) for g in self.template_markers if all(m in template for m in g)), default=0
        )

    @property
    def target_text(self) -> str:
        """The target as ``module:attr``, also when a class was registered rather than a string."""
        if isinstance(self.target, str):
            return self.target
        return f"{self.target.__module__}:{self.target.__qualname__}"


def _marker_groups(markers: TemplateMarkers, who: str, name: str) -> tuple[tuple[str, ...], ...]:
    # A bare string would be read as one marker per character: refuse it rather than guess.
    if isinstance(markers, str):
        raise RegistryError(
            f"{who} registers tool-call parser {name!r} with template_markers={markers!r}; pass "
            f"a list: template_markers=[{markers!r}]"
        )
    groups = tuple((m,) if isinstance(m, str) else tuple(m) for m in markers)
    if not all(g and all(isinstance(m, str) and m for m in g) for g in groups):
        raise RegistryError(
            f"{who} registers tool-call parser {name!r} with template_markers={markers!r}; each "
            "marker is a non-empty string, each group a non-empty tuple of them"
        )
    return groups


class ToolParserRegistry(NamedRegistry):
    """Name -> tool-call parser class, with how a chat template asks for each; the core's
    fallback is registered from the start."""

    def __init__(self, labels: Mapping[str, str] | None = None) -> None:
        super().__init__("tool-call parser", labels)
        self.add(FALLBACK_TOOL_PARSER, _FALLBACK_TARGET, CORE_PLUGIN)

    def who(self, plugin: str) -> str:
        return CORE_LABEL if plugin == CORE_PLUGIN else plugin_label(plugin, self.labels)

    def add(
        self,
        key: str,
        target: Any,
        plugin: str,
        *,
        template_markers: TemplateMarkers = (),
        priority: int = 0,
    ) -> None:
        who = self.who(plugin)
        if not isinstance(key, str) or not key:
            raise RegistryError(f"{who} registers a tool-call parser with an empty name")
        entry = ToolParserEntry(
            key, target, plugin, _marker_groups(template_markers, who, key), int(priority)
        )
        other = self._entries.get(key)
        if isinstance(other, ToolParserEntry):
            # The targets too: two registrations from one plugin (or in-process code) differ
            # only there.
            raise RegistryError(
                f"tool-call parser {key!r} is registered twice: by {self.who(other.plugin)} "
                f"({other.target_text}) and by {who} ({entry.target_text}); uninstall one of "
                "them, or have one register another name"
            )
        self._entries[key] = entry

    def entries(self) -> list[ToolParserEntry]:
        return [e for e in super().entries() if isinstance(e, ToolParserEntry)]

    def get(self, key: str) -> Any:
        self.entry(key)  # an unknown name: the message lists every parser with its source
        return super().get(key)

    def entry(self, name: str) -> ToolParserEntry:
        found = self._entries.get(name)
        if not isinstance(found, ToolParserEntry):
            known = "; ".join(f"{e.key} from {self.who(e.plugin)}" for e in self.entries())
            raise UnknownToolParserError(
                f"unknown tool-call parser {name!r}; registered: {known} (a model plugin brings "
                "its family's parser: is it installed?)"
            )
        return found

    def select(self, configured: str | None, template: str | None) -> ToolParserEntry:
        """The parser ``configured`` names; else, for a ``template`` that renders tools, the
        registration that recognises it (highest priority, then the largest matching marker
        group, then the first name); else the core's fallback."""
        if configured:
            return self.entry(configured)
        if template is not None:
            matches = [e for e in self.entries() if e.match(template)]
            if matches:
                return min(matches, key=lambda e: (-e.priority, -e.match(template), e.key))
        return self.entry(FALLBACK_TOOL_PARSER)
