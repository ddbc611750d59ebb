"""``rustinfer plugins``: what each installed plugin registered, what cannot run here and why, and
which implementation of each op a model built on this machine would get."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from rustinfer.device import resolve_device
from rustinfer.errors import RegistryError
from rustinfer.loaders import parse_dtype
from rustinfer.plugins import get_registries
from rustinfer.registry import OP_OVERRIDE_ENV, Registries


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plugins",
        help="list installed plugins, what they registered and which op implementations apply",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--device",
        default="auto",
        help="show the op implementations chosen for this device: cpu, cuda, cuda:N, auto "
        "(default)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        help="... and this dtype (auto: the device's default)",
    )
    p.set_defaults(func=run)


def plugin_report(regs: Registries) -> list[dict[str, Any]]:
    """Each plugin as a dict: name, distribution, version, what it registered, and ``unavailable``
    (``"op:impl@device"`` -> why its requirements do not hold on this machine)."""
    report = []
    for plugin in regs.plugins:
        entry = dataclasses.asdict(plugin)
        entry["unavailable"] = {
            f"{impl.op}:{impl.name}@{impl.device}": reason
            for impl in regs.ops.implementations()
            if impl.plugin == plugin.name and (reason := impl.unmet_requirement()) is not None
        }
        report.append(entry)
    return report


def op_selection(regs: Registries, device: str, dtype: str) -> dict[str, Any]:
    """The implementation each op resolves to for ``device`` and ``dtype``, honouring
    ``RUSTINFER_OP_IMPL`` exactly as a model build does; an op that cannot resolve carries the
    registry's error instead, and so does the whole selection when the device cannot."""
    from rustinfer.ops import SPECS

    override = os.environ.get(OP_OVERRIDE_ENV) or None
    try:
        dev = resolve_device(device, regs)
    except (RegistryError, ValueError) as exc:
        # The listing must still work when no device plugin is installed: that is when it is
        # needed most.
        return {"device": device, "dtype": dtype, "override": override, "error": str(exc)}
    torch_dtype = dev.auto_dtype(None) if dtype == "auto" else parse_dtype(dtype)
    selected: dict[str, Any] = {}
    for op in SPECS:
        try:
            impl = regs.ops.lookup(op, dev.type, torch_dtype)
        except RegistryError as exc:
            selected[op] = {"error": str(exc)}
            continue
        selected[op] = {"impl": impl.name, "plugin": impl.plugin, "priority": impl.priority}
    return {
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "override": override,
        "selected": selected,
    }


def format_text(plugins: list[dict[str, Any]], selection: dict[str, Any]) -> str:
    """The listing a person reads: :func:`plugin_report` and :func:`op_selection` as text."""
    lines: list[str] = []
    if not plugins:
        lines.append("no rustinfer plugins installed")
    for plugin in plugins:
        dist = plugin["distribution"]
        where = f"{dist} {plugin['version']}" if dist else "(not a dist)"
        lines.append(f"{plugin['name']}  [{where}]")
        for kind, names in sorted(plugin["registered"].items()):
            lines.append(f"  {kind}: {', '.join(names)}")
        # Grouped by reason: a CUDA plugin on a CPU machine has one reason for all its ops.
        by_reason: dict[str, list[str]] = {}
        for key, reason in plugin["unavailable"].items():
            by_reason.setdefault(reason, []).append(key)
        for reason, keys in by_reason.items():
            lines.append(f"  cannot run here ({reason}): {', '.join(keys)}")
    override = selection["override"]
    pinned = f", {OP_OVERRIDE_ENV}={override}" if override else ""
    lines.append(f"\nops on {selection['device']} ({selection['dtype']}{pinned}):")
    if "error" in selection:
        lines.append(f"  none: {selection['error']}")
        return "\n".join(lines) + "\n"
    width = max(len(op) for op in selection["selected"])
    for op, choice in selection["selected"].items():
        if "error" in choice:
            lines.append(f"  {op:<{width}}  none: {choice['error']}")
        else:
            lines.append(
                f"  {op:<{width}}  {choice['impl']} (plugin {choice['plugin']}, "
                f"priority {choice['priority']})"
            )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    regs = get_registries()
    plugins = plugin_report(regs)
    selection = op_selection(regs, args.device, args.dtype)
    if args.json:
        sys.stdout.write(json.dumps({"plugins": plugins, "ops": selection}, indent=2) + "\n")
    else:
        sys.stdout.write(format_text(plugins, selection))
    return 0
