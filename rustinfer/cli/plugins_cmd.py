"""``rustinfer plugins``: what each installed plugin registered."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from rustinfer.plugins import get_registries


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plugins", help="list installed plugins and what they registered")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    regs = get_registries()
    out = sys.stdout
    if args.json:
        out.write(json.dumps([dataclasses.asdict(p) for p in regs.plugins], indent=2) + "\n")
        return 0
    if not regs.plugins:
        out.write("no rustinfer plugins installed\n")
    for plugin in regs.plugins:
        dist = f"{plugin.distribution} {plugin.version}" if plugin.distribution else "(not a dist)"
        out.write(f"{plugin.name}  [{dist}]\n")
        for kind, names in sorted(plugin.registered.items()):
            out.write(f"  {kind}: {', '.join(names)}\n")
    return 0
