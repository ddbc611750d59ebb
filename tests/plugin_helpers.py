"""Fake installed distributions for plugin tests: a module plus a ``.dist-info`` on sys.path, found
by the same ``importlib.metadata`` scan that finds real plugins."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def install_fake_distribution(
    root: Path,
    dist: str,
    version: str,
    module: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    entry_point: str | None = None,
) -> None:
    """Lay out ``module.py`` plus a ``.dist-info`` declaring ``entry_point`` (default: the module
    itself, named after it) in the ``rustinfer`` group."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        f"[rustinfer]\n{entry_point or f'{module} = {module}'}\n"
    )
    if str(root) not in sys.path:
        monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)
