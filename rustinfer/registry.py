"""Plain registries for ops, models, devices and tool-call parsers, filled once from plugin hooks.

The hot path never touches pluggy: models resolve their ops once, when they are built, through
:meth:`OpRegistry.lookup`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from rustinfer.errors import RegistryError
from rustinfer.lazy import resolve

if TYPE_CHECKING:
    from rustinfer.tool_calls.parser_registry import ToolParserRegistry

OP_OVERRIDE_ENV = "RUSTINFER_OP_IMPL"
# The implementation name a plugin gives an op whose result for a row (a sequence) does not depend
# on the other rows of the call nor on their number; ``--batch-invariant`` pins every op that has
# one. Plugins register them at a low priority: they trade speed for that guarantee.
BATCH_INVARIANT_IMPL = "batch_invariant"

Requirement = str | Callable[[], str | None]


class RegisterOp(Protocol):
    def __call__(
        self,
        op: str,
        name: str,
        target: str | Callable[..., Any],
        *,
        device: str,
        dtypes: Iterable[torch.dtype],
        priority: int = 0,
        requires: Iterable[Requirement] = (),
    ) -> None: ...


class RegisterModel(Protocol):
    def __call__(self, architecture: str, target: str | type) -> None: ...


class RegisterDevice(Protocol):
    def __call__(self, device_type: str, target: str | type) -> None: ...


# How a chat template asks for a tool-call format: alternatives, each a string the template
# contains or a tuple of strings it contains all of.
TemplateMarkers = Iterable[str | Iterable[str]]


class RegisterToolParser(Protocol):
    def __call__(
        self,
        name: str,
        target: str | type,
        *,
        template_markers: TemplateMarkers = (),
        priority: int = 0,
    ) -> None: ...


@dataclass
class OpImpl:
    """One registered implementation of an op for one device type."""

    op: str
    name: str
    target: str | Callable[..., Any]
    device: str
    dtypes: frozenset[torch.dtype]
    priority: int
    requires: tuple[Requirement, ...]
    plugin: str
    _fn: Callable[..., Any] | None = field(default=None, repr=False, compare=False)

    def load(self) -> Callable[..., Any]:
        if self._fn is None:
            try:
                self._fn = resolve(self.target)
            except Exception as exc:
                # A mistyped "module:attr" only shows when a model first needs the op: say whose.
                raise RegistryError(
                    f"op {self.op!r} implementation {self.name!r} of plugin {self.plugin!r}: its "
                    f"target {self.target!r} cannot be loaded ({exc!r}); fix the 'module:attr' "
                    "string the plugin registers, or the import error inside that module"
                ) from exc
        return self._fn

    def unmet_requirement(self) -> str | None:
        """``None`` when every requirement holds here, else the first reason it cannot run."""
        for req in self.requires:
            try:
                check = resolve(req)
            except Exception as exc:  # a requirement that cannot even be imported cannot hold
                return f"requirement {req!r} cannot be loaded: {exc!r}"
            try:
                reason = check()
            except Exception as exc:  # a requirement check that crashes means "cannot run here"
                reason = f"{getattr(check, '__name__', check)} raised {exc!r}"
            if reason:
                return str(reason)
        return None

    def describe(self) -> str:
        dts = ",".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
        return f"{self.name} [{self.device}; {dts}; priority {self.priority}; from {self.plugin}]"


def parse_op_overrides(text: str | None) -> dict[str, str]:
    """Parse ``"rmsnorm=torch,attention_decode=triton"`` into ``{op: impl name}``."""
    overrides: dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, name = item.partition("=")
        if not sep or not op.strip() or not name.strip():
            raise RegistryError(f"{OP_OVERRIDE_ENV}: expected 'op=impl[,op=impl...]', got {item!r}")
        overrides[op.strip()] = name.strip()
    return overrides


def plugin_label(plugin: str, labels: Mapping[str, str]) -> str:
    """``plugin 'name' (distribution version)`` where the distribution is known, for messages."""
    return labels.get(plugin, f"plugin {plugin!r}")


class OpRegistry:
    def __init__(self, labels: Mapping[str, str] | None = None) -> None:
        self._impls: dict[str, list[OpImpl]] = {}
        # plugin name -> "plugin 'x' (dist version)": messages name the package to act on.
        self.labels: Mapping[str, str] = labels if labels is not None else {}

    def add(self, impl: OpImpl) -> None:
        from rustinfer.ops import SPECS  # the op must be one the core specifies

        who = plugin_label(impl.plugin, self.labels)
        if impl.op not in SPECS:
            raise RegistryError(
                f"{who} registers an implementation of unknown op {impl.op!r}; "
                f"known ops: {', '.join(sorted(SPECS))}"
            )
        for other in self._impls.get(impl.op, []):
            if other.name == impl.name and other.device == impl.device:
                raise RegistryError(
                    f"op {impl.op!r} implementation {impl.name!r} for device {impl.device!r} is "
                    f"registered twice: by {plugin_label(other.plugin, self.labels)} and by {who}; "
                    "uninstall one of them, or give one implementation another name"
                )
        self._impls.setdefault(impl.op, []).append(impl)

    def implementations(self, op: str | None = None) -> list[OpImpl]:
        if op is not None:
            return list(self._impls.get(op, []))
        return [impl for impls in self._impls.values() for impl in impls]

    def lookup(
        self,
        op: str,
        device_type: str,
        dtype: torch.dtype,
        overrides: dict[str, str] | None = None,
    ) -> OpImpl:
        """The highest-priority implementation of ``op`` for this device and dtype that can run here.

        ``overrides`` (default: parsed from ``RUSTINFER_OP_IMPL``) pin an implementation by name; a
        pinned one must exist and run here, or this raises: no silent fallback.
        """
        if overrides is None:
            overrides = parse_op_overrides(os.environ.get(OP_OVERRIDE_ENV))
        all_impls = self._impls.get(op, [])
        candidates = [i for i in all_impls if i.device == device_type and dtype in i.dtypes]
        candidates.sort(key=lambda i: -i.priority)
        pinned = overrides.get(op)
        if pinned is not None:
            chosen = [i for i in candidates if i.name == pinned]
            if not chosen:
                raise RegistryError(
                    f"{OP_OVERRIDE_ENV} pins op {op!r} to {pinned!r}, but no implementation of that "
                    f"name serves device {device_type!r} dtype {dtype}; "
                    + self._registered_text(op)
                )
            reason = chosen[0].unmet_requirement()
            if reason:
                raise RegistryError(
                    f"{OP_OVERRIDE_ENV} pins op {op!r} to {pinned!r}, which cannot run here: {reason}"
                )
            return chosen[0]
        unmet: list[str] = []
        for impl in candidates:
            reason = impl.unmet_requirement()
            if reason is None:
                return impl
            unmet.append(f"{impl.name} from {impl.plugin}: {reason}")
        detail = f" (unmet requirements: {'; '.join(unmet)})" if unmet else ""
        raise RegistryError(
            f"no implementation of op {op!r} for device {device_type!r} dtype {dtype}{detail}; "
            + self._registered_text(op)
        )

    def batch_invariant_overrides(
        self, ops: Iterable[str], device_type: str, dtype: torch.dtype
    ) -> dict[str, str]:
        """``{op: BATCH_INVARIANT_IMPL}`` for each op of ``ops`` that has a batch-invariant
        implementation able to run here (empty: none does)."""
        pins: dict[str, str] = {}
        for op in ops:
            for impl in self._impls.get(op, []):
                if (
                    impl.name == BATCH_INVARIANT_IMPL
                    and impl.device == device_type
                    and dtype in impl.dtypes
                    and impl.unmet_requirement() is None
                ):
                    pins[op] = BATCH_INVARIANT_IMPL
        return pins

    def _registered_text(self, op: str) -> str:
        impls = self._impls.get(op, [])
        if not impls:
            return f"no plugin registers op {op!r} (is rustinfer-ops-cpu installed?)"
        return "registered: " + "; ".join(i.describe() for i in impls)


@dataclass
class Entry:
    key: str
    target: Any
    plugin: str


class NamedRegistry:
    """Name -> lazily imported object (model classes, device classes)."""

    def __init__(self, kind: str, labels: Mapping[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, Any] = {}
        self.labels: Mapping[str, str] = labels if labels is not None else {}

    def add(self, key: str, target: Any, plugin: str) -> None:
        who = plugin_label(plugin, self.labels)
        if not isinstance(key, str) or not key:
            raise RegistryError(f"{who} registers a {self.kind} with an empty name")
        if key in self._entries:
            other = self._entries[key]
            raise RegistryError(
                f"{self.kind} {key!r} is registered twice: by "
                f"{plugin_label(other.plugin, self.labels)} and by {who}; uninstall one of them, "
                "or have one register another name"
            )
        self._entries[key] = Entry(key, target, plugin)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in self.keys()]

    def get(self, key: str) -> Any:
        if key not in self._entries:
            known = ", ".join(self.keys()) or "none (is a plugin package installed?)"
            raise RegistryError(f"unknown {self.kind} {key!r}; registered: {known}")
        if key not in self._loaded:
            entry = self._entries[key]
            try:
                self._loaded[key] = resolve(entry.target)
            except Exception as exc:
                raise RegistryError(
                    f"{self.kind} {key!r} of {plugin_label(entry.plugin, self.labels)}: its "
                    f"target {entry.target!r} cannot be loaded ({exc!r}); fix the 'module:attr' "
                    "string the plugin registers, or the import error inside that module"
                ) from exc
        return self._loaded[key]


@dataclass
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    registered: dict[str, list[str]] = field(default_factory=dict)


def _tool_parser_registry() -> ToolParserRegistry:
    # Imported when registries are built, not with this module: the tool_calls package imports
    # rustinfer.plugins, which imports this module.
    from rustinfer.tool_calls.parser_registry import ToolParserRegistry

    return ToolParserRegistry()


@dataclass
class Registries:
    ops: OpRegistry = field(default_factory=OpRegistry)
    models: NamedRegistry = field(default_factory=lambda: NamedRegistry("model architecture"))
    devices: NamedRegistry = field(default_factory=lambda: NamedRegistry("device type"))
    tool_parsers: ToolParserRegistry = field(default_factory=_tool_parser_registry)
    plugins: list[PluginInfo] = field(default_factory=list)
    # plugin name -> "plugin 'x' (dist version)", shared by the registries' messages.
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ops.labels = self.models.labels = self.devices.labels = self.labels
        self.tool_parsers.labels = self.labels
