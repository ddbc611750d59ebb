"""The one version of every distribution in this repository, and the check that keeps it so.

``rustinfer/__init__.py``'s ``__version__`` is the source. The root ``pyproject.toml`` reads it
(setuptools' dynamic ``attr``); each ``plugins/*/pyproject.toml`` cannot (a plugin's sdist holds
only its own folder), so it carries a copy that this script writes and checks, together with every
requirement between our own distributions, pinned ``==`` that version: they are released together
and no other combination is tested.

    python scripts/version.py              print the version; exit 1 listing any drift
    python scripts/version.py --set 0.2.0  write 0.2.0 into __init__ and every pyproject.toml

``tests/packaging/test_versions.py`` runs the check, so drift fails CI. A new plugin folder is
covered as soon as it has a ``pyproject.toml``; ``--set`` with the current version pins it.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
VERSION_FILE = Path("rustinfer") / "__init__.py"
ROOT_DYNAMIC_ATTR = "rustinfer.__version__"
_VERSION_ASSIGN = re.compile(r'^__version__ = "([^"]+)"$', re.MULTILINE)
# `version = "..."` as the [project] table spells it (the first such line: [project] comes first
# in every pyproject.toml of this repository, and the check below would catch one that did not).
_PROJECT_VERSION = re.compile(r'^version = "([^"]*)"$', re.MULTILINE)
# A quoted array element (after "[", "," or indentation), never a `key = "value"`: so a
# project's own `name = "rustinfer"` is left alone while the same text in a dependency list is not.
_ELEMENT = re.compile(r'(?P<pre>(?:^|[\[,])[ \t]*)"(?P<text>[^"\n]*)"', re.MULTILINE)


def read_version(root: Path = REPO) -> str:
    """``__version__`` of ``rustinfer/__init__.py``, read without importing it."""
    tree = ast.parse((root / VERSION_FILE).read_text(encoding="utf-8"))
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    raise SystemExit(f"{root / VERSION_FILE} has no literal __version__ = '...'")


def pyprojects(root: Path = REPO) -> list[Path]:
    """The root pyproject.toml, then every plugin's, sorted: all our own distributions."""
    return [root / "pyproject.toml", *sorted(root.glob("plugins/*/pyproject.toml"))]


def _project(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]


def own_names(root: Path = REPO) -> set[str]:
    """Canonical names of our distributions (``rustinfer``, ``rustinfer-ops-cpu``, ...)."""
    return {canonicalize_name(_project(p)["name"]) for p in pyprojects(root)}


def _requirements(project: dict) -> list[str]:
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return reqs


def check(root: Path = REPO) -> list[str]:
    """Every way the pyproject.toml files disagree with ``__version__``, one line each."""
    version = read_version(root)
    names = own_names(root)
    problems = []
    for path in pyprojects(root):
        rel = path.relative_to(root)
        project = _project(path)
        if path.parent == root:
            dynamic = tomllib.loads(path.read_text(encoding="utf-8"))
            attr = dynamic.get("tool", {}).get("setuptools", {}).get("dynamic", {})
            if "version" in project or "version" not in project.get("dynamic", []):
                problems.append(f"{rel}: the version must be dynamic (read from {VERSION_FILE})")
            elif attr.get("version", {}).get("attr") != ROOT_DYNAMIC_ATTR:
                problems.append(
                    f"{rel}: [tool.setuptools.dynamic] version must be attr = {ROOT_DYNAMIC_ATTR!r}"
                )
        elif project.get("version") != version:
            problems.append(f"{rel}: version {project.get('version')!r}, expected {version!r}")
        for text in _requirements(project):
            req = Requirement(text)
            if canonicalize_name(req.name) in names and str(req.specifier) != f"=={version}":
                problems.append(f"{rel}: requirement {text!r} must pin =={version}")
    return problems


def _pinned(text: str, names: set[str], version: str) -> str:
    """A requirement string with our own distributions pinned ==version, others untouched."""
    try:
        req = Requirement(text)
    except Exception:  # not a requirement: some other quoted string in the file
        return text
    if canonicalize_name(req.name) not in names:
        return text
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}=={version}{marker}"


def set_version(version: str, root: Path = REPO) -> None:
    """Write ``version`` into ``__init__`` and every plugin's pyproject.toml, and pin every
    requirement between our distributions to it."""
    init = root / VERSION_FILE
    text = init.read_text(encoding="utf-8")
    if not _VERSION_ASSIGN.search(text):
        raise SystemExit(f'{init} has no line __version__ = "..."')
    init.write_text(_VERSION_ASSIGN.sub(f'__version__ = "{version}"', text), encoding="utf-8")
    names = own_names(root)
    for path in pyprojects(root):
        text = path.read_text(encoding="utf-8")
        if path.parent != root:
            text = _PROJECT_VERSION.sub(f'version = "{version}"', text, count=1)
        # Array elements that are not requirements of ours (globs, other packages) pass through.
        text = _ELEMENT.sub(lambda m: f'{m["pre"]}"{_pinned(m["text"], names, version)}"', text)
        path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", metavar="VERSION", help="write this version everywhere")
    parser.add_argument("--root", type=Path, default=REPO, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.set:
        set_version(args.set, args.root)
    problems = check(args.root)
    for problem in problems:
        sys.stderr.write(f"{problem}\n")
    if problems:
        current = read_version(args.root)
        sys.stderr.write(f"fix: python scripts/version.py --set {current}\n")
        return 1
    sys.stdout.write(f"{read_version(args.root)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
