"""Resolve ``"module:attr"`` strings, the form every plugin registration takes."""

from __future__ import annotations

import importlib
from typing import Any


def resolve(target: str | Any) -> Any:
    """Import ``"package.module:attr.sub"`` and return the attribute; non-strings pass through."""
    if not isinstance(target, str):
        return target
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"expected 'module:attr', got {target!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    return obj
