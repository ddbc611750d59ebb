"""Discover installed plugins (entry point group ``rustinfer``) and fill the registries once."""

from __future__ import annotations

import functools
import importlib.metadata
import logging
from collections.abc import Callable, Iterable
from typing import Any

import pluggy
import torch

from rustinfer import hookspecs
from rustinfer.errors import PluginLoadError, RegistryError
from rustinfer.registry import OpImpl, PluginInfo, Registries

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = hookspecs.PROJECT_NAME


class PluginManager(pluggy.PluginManager):
    """pluggy's manager plus the distribution (name, version) each entry-point plugin came from."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT_NAME)
        self.distributions: dict[str, tuple[str, str]] = {}


def make_plugin_manager(load_entry_points: bool = True) -> PluginManager:
    """A plugin manager with rustinfer's hookspecs and, by default, every installed plugin."""
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        _load_entry_points(pm)
    return pm


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
            if pm.get_plugin(ep.name) is not None:
                raise PluginLoadError(
                    f"two installed distributions declare a rustinfer plugin named {ep.name!r} "
                    f"(one is {dist_name}); uninstall one of them"
                )
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"rustinfer plugin {ep.name!r} (distribution {dist_name} {dist.version}, "
                    f"entry point {ep.value!r}) failed to import: {exc!r}"
                ) from exc
            pm.register(plugin, name=ep.name)
            pm.distributions[ep.name] = (dist_name, dist.version)
    pm.check_pending()


def collect_registries(pm: pluggy.PluginManager) -> Registries:
    """Call each plugin's hooks with a register callback bound to that plugin."""
    pm.check_pending()  # a misspelled hook name fails here, loudly
    regs = Registries()
    dists = getattr(pm, "distributions", {})
    infos: dict[str, PluginInfo] = {}
    for name, _plugin in pm.list_name_plugin():
        dist_name, version = dists.get(name, (None, None))
        infos[name] = PluginInfo(name=name, distribution=dist_name, version=version)

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
                    f"plugin {plugin!r} registers op {op!r} ({name!r}) without torch dtypes"
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

    hooks = [
        ("rustinfer_register_devices", lambda p: register_named("devices", p)),
        ("rustinfer_register_ops", register_ops),
        ("rustinfer_register_models", lambda p: register_named("models", p)),
    ]
    for hook_name, make_register in hooks:
        caller = getattr(pm.hook, hook_name)
        for impl in caller.get_hookimpls():
            try:
                impl.function(register=make_register(impl.plugin_name))
            except RegistryError:
                raise
            except Exception as exc:
                raise PluginLoadError(
                    f"rustinfer plugin {impl.plugin_name!r} failed in {hook_name}: {exc!r}"
                ) from exc
    regs.plugins = list(infos.values())
    return regs


@functools.cache
def get_registries() -> Registries:
    """The process-wide registries, built from installed plugins on first use."""
    regs = collect_registries(make_plugin_manager())
    logger.debug("loaded rustinfer plugins: %s", ", ".join(p.name for p in regs.plugins))
    return regs
