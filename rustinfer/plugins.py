"""Discover installed plugins (entry point group ``rustinfer``) and fill the registries once."""

from __future__ import annotations

import difflib
import functools
import importlib.metadata
import logging
from collections.abc import Callable, Iterable
from typing import Any

import pluggy
import torch

from rustinfer import hookspecs
from rustinfer.errors import PluginLoadError, RegistryError
from rustinfer.registry import OpImpl, PluginInfo, Registries, TemplateMarkers, plugin_label

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution (name, version) each entry-point plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.distributions: dict[str, tuple[str, str]] = {}

    def label(self, name: str) -> str:
        """``plugin 'name' (distribution version)``: how messages name a plugin."""
        dist = self.distributions.get(name)
        return f"plugin {name!r} ({dist[0]} {dist[1]})" if dist else f"plugin {name!r}"


def make_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """A plugin manager with rustinfer's hookspecs and, by default, every installed plugin."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def hook_names() -> list[str]:
    """Every hook a plugin may implement (the functions of :mod:`rustinfer.hookspecs`)."""
    return sorted(
        name
        for name, fn in vars(hookspecs).items()
        if callable(fn) and hasattr(fn, f"{hookspecs.PROJECT_NAME}_spec")
    )


def _hook_hint(name: str) -> str:
    close = difflib.get_close_matches(name, hook_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}the hooks are: {', '.join(hook_names())} (rustinfer/hookspecs.py)"


def _load_entry_points(pm: PluginManager) -> None:
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        dist_name = dist.metadata["Name"]
        # The same distribution can appear twice on sys.path (an editable and a regular install);
        # the first one wins, as it does for imports.
        if dist_name is None or dist_name in seen:
            continue
        seen.add(dist_name)
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            where = f"rustinfer plugin {ep.name!r} (distribution {dist_name} {dist.version})"
            if pm.get_plugin(ep.name) is not None:
                first = pm.distributions.get(ep.name, ("?", "?"))
                raise PluginLoadError(
                    f"two installed distributions declare a rustinfer plugin named {ep.name!r}: "
                    f"{first[0]} {first[1]} and {dist_name} {dist.version}; uninstall one of them, "
                    "or rename one entry point in its pyproject.toml"
                )
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"{where} failed to import its entry point {ep.value!r}: {exc!r}; fix the "
                    f"module (or the entry point in its pyproject.toml), or uninstall it: "
                    f"pip uninstall {dist_name}"
                ) from exc
            pm.distributions[ep.name] = (dist_name, dist.version)
            try:
                pm.register(plugin, name=ep.name)
            except pluggy.PluginValidationError as exc:
                # pluggy checked a hook's arguments against its spec: the hook takes a name
                # the spec does not pass.
                raise PluginLoadError(
                    f"{where}: {exc}; a hook takes only the arguments its spec names "
                    "(see rustinfer/hookspecs.py)"
                ) from exc
            _check_entry_point_plugin(pm, ep.name, ep.value, plugin, where)
    check_hooks(pm)


def _check_entry_point_plugin(
    pm: PluginManager, name: str, value: str, plugin: object, where: str
) -> None:
    """Catch the mistakes pluggy lets pass silently: a hook without ``@hookimpl`` is ignored, and
    an entry point that names the wrong module registers nothing at all."""
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    for attr in dir(plugin):
        fn = getattr(plugin, attr, None)
        if attr.startswith("rustinfer_") and callable(fn) and not hasattr(fn, marker):
            raise PluginLoadError(
                f"{where} defines {attr} without @hookimpl, so it would never be called; decorate "
                "it with rustinfer.hookspecs.hookimpl"
            )
    if not pm.get_hookcallers(pm.get_plugin(name)):
        raise PluginLoadError(
            f"{where}: its entry point {value!r} names an object with no rustinfer hooks; point "
            "the entry point at the module whose functions carry @hookimpl"
        )


def check_hooks(pm: pluggy.PluginManager) -> None:
    """pluggy's ``check_pending`` with a message that names the plugin and the hook meant: a hook
    name with no spec (a typo) would otherwise never be called."""
    label = pm.label if isinstance(pm, PluginManager) else (lambda n: f"plugin {n!r}")
    for name in list(vars(pm.hook)):
        if name.startswith("_"):
            continue
        caller = getattr(pm.hook, name)
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                raise PluginLoadError(
                    f"{label(impl.plugin_name)} implements unknown hook {name!r}; "
                    + _hook_hint(name)
                )


def collect_registries(pm: pluggy.PluginManager) -> Registries:
    """Call each plugin's hooks with a register callback bound to that plugin."""
    check_hooks(pm)  # a misspelled hook name fails here, loudly
    regs = Registries()
    dists = getattr(pm, "distributions", {})
    infos: dict[str, PluginInfo] = {}
    for name, _plugin in pm.list_name_plugin():
        dist_name, version = dists.get(name, (None, None))
        infos[name] = PluginInfo(name=name, distribution=dist_name, version=version)
        if dist_name is not None:
            regs.labels[name] = f"plugin {name!r} ({dist_name} {version})"

    def register_ops(plugin: str) -> Callable[..., None]:
        def register(
            op: str,
            name: str,
            target: Any,
            *,
            device: str,
            dtypes: Iterable[torch.dtype],
            priority: int = 0,
            requires: Iterable[Any] = (),
        ) -> None:
            dts = frozenset(dtypes)
            if not dts or not all(isinstance(d, torch.dtype) for d in dts):
                raise RegistryError(
                    f"{plugin_label(plugin, regs.labels)} registers op {op!r} ({name!r}) without "
                    f"torch dtypes (got {dtypes!r}); pass dtypes=[torch.float32, ...]"
                )
            regs.ops.add(
                OpImpl(op, name, target, device, dts, int(priority), tuple(requires), plugin)
            )
            infos[plugin].registered.setdefault("ops", []).append(f"{op}:{name}@{device}")

        return register

    def register_named(kind: str, plugin: str) -> Callable[[str, Any], None]:
        registry = regs.models if kind == "models" else regs.devices

        def register(key: str, target: Any) -> None:
            registry.add(key, target, plugin)
            infos[plugin].registered.setdefault(kind, []).append(key)

        return register

    def register_tool_parsers(plugin: str) -> Callable[..., None]:
        def register(
            name: str,
            target: Any,
            *,
            template_markers: TemplateMarkers = (),
            priority: int = 0,
        ) -> None:
            regs.tool_parsers.add(
                name, target, plugin, template_markers=template_markers, priority=priority
            )
            infos[plugin].registered.setdefault("tool_parsers", []).append(name)

        return register

    hooks = [
        ("rustinfer_register_devices", lambda p: register_named("devices", p)),
        ("rustinfer_register_ops", register_ops),
        ("rustinfer_register_models", lambda p: register_named("models", p)),
        ("rustinfer_register_tool_parsers", register_tool_parsers),
    ]
    for hook_name, make_register in hooks:
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            # pluggy lets a hook take a subset of its spec's arguments; pass only those.
            kwargs = {"register": make_register(impl.plugin_name)}
            kwargs = {k: v for k, v in kwargs.items() if k in impl.argnames}
            try:
                impl.function(**kwargs)
            except RegistryError:
                raise  # already names the plugin and what to change
            except Exception as exc:
                raise PluginLoadError(
                    f"{plugin_label(impl.plugin_name, regs.labels)} failed in {hook_name}: "
                    f"{exc!r}; check its register(...) calls against the hook's docstring in "
                    "rustinfer/hookspecs.py"
                ) from exc
    regs.plugins = list(infos.values())
    return regs


@functools.cache
def get_registries() -> Registries:
    """The process-wide registries, built from installed plugins on first use."""
    regs = collect_registries(make_plugin_manager())
    logger.debug("loaded rustinfer plugins: %s", ", ".join(p.name for p in regs.plugins))
    return regs
