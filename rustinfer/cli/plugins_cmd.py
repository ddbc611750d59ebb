"""``rustinfer plugins``: what each installed plugin registered, what cannot run here and why, the
tool-call parsers and how a chat template selects one, and which implementation of each op a
model built on this machine would get."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

from rustinfer import __version__
from rustinfer.device import resolve_device
from rustinfer.errors import RegistryError
from rustinfer.loaders import parse_dtype
from rustinfer.plugins import get_registries
from rustinfer.registry import OP_OVERRIDE_ENV, Registries
from rustinfer.tool_calls.parser_registry import CORE_PLUGIN, FALLBACK_TOOL_PARSER


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


def tool_parser_report(regs: Registries) -> list[dict[str, Any]]:
    """Each tool-call parser as a dict: name, the plugin and distribution that registered it,
    its target, the marker groups by which a chat template selects it, its priority, and whether
    it is the fallback."""
    dists = {p.name: (p.distribution, p.version) for p in regs.plugins}
    dists[CORE_PLUGIN] = ("rustinfer", __version__)
    report = []
    for entry in regs.tool_parsers.entries():
        dist, version = dists.get(entry.plugin, (None, None))
        report.append(
            {
                "name": entry.key,
                "plugin": entry.plugin,
                "distribution": dist,
                "version": version,
                "target": entry.target_text,
                "template_markers": [list(group) for group in entry.template_markers],
                "priority": entry.priority,
                "fallback": entry.key == FALLBACK_TOOL_PARSER,
            }
        )
    return report


def _tool_parser_lines(parsers: list[dict[str, Any]]) -> list[str]:
    lines = [
        "\ntool-call parsers (chosen by --tool-call-parser, else by the chat template's "
        f"markers, else {FALLBACK_TOOL_PARSER}):"
    ]
    width = max(len(p["name"]) for p in parsers)
    for parser in parsers:
        core = parser["plugin"] == CORE_PLUGIN
        source = "the rustinfer core" if core else f"plugin {parser['plugin']}"
        if parser["distribution"]:
            source += f" [{parser['distribution']} {parser['version']}]"
        # "a | b + c": the template contains a, or both b and c.
        markers = " | ".join(" + ".join(group) for group in parser["template_markers"])
        how = "the fallback" if parser["fallback"] else f"template: {markers or '(by name only)'}"
        if parser["priority"]:
            how += f", priority {parser['priority']}"
        lines.append(f"  {parser['name']:<{width}}  {source}; {how}")
    return lines


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


def format_text(
    plugins: list[dict[str, Any]],
    selection: dict[str, Any],
    tool_parsers: list[dict[str, Any]] | None = None,
) -> str:
    """The listing a person reads: :func:`plugin_report`, :func:`tool_parser_report` and
    :func:`op_selection` as text."""
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
    if tool_parsers:
        lines += _tool_parser_lines(tool_parsers)
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
    parsers = tool_parser_report(regs)
    selection = op_selection(regs, args.device, args.dtype)
    if args.json:
        listing = {"plugins": plugins, "tool_parsers": parsers, "ops": selection}
        sys.stdout.write(json.dumps(listing, indent=2) + "\n")
    else:
        sys.stdout.write(format_text(plugins, selection, parsers))
    return 0
