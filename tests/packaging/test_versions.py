"""One version for every distribution: scripts/version.py's check on this repository, and on a
copy where it must find drift and ``--set`` must repair it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from wheel_helpers import REPO, version_script

import rustinfer

vs = version_script()


def test_repository_has_one_version() -> None:
    assert vs.check(REPO) == []
    assert vs.read_version(REPO) == rustinfer.__version__
    # Every plugin folder is covered, the ones added after this test was written included.
    covered = {p.parent for p in vs.pyprojects(REPO)}
    assert {p.parent for p in REPO.glob("plugins/*/pyproject.toml")} <= covered
    assert REPO in covered


def test_command_line_prints_the_version() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "version.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == rustinfer.__version__


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The files the version lives in, copied: the root pyproject, __init__ and each plugin's."""
    for path in [*vs.pyprojects(REPO), REPO / vs.VERSION_FILE]:
        dest = tmp_path / path.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_drift_is_found_and_set_repairs_it(repo_copy: Path) -> None:
    version = vs.read_version(REPO)
    cpu = repo_copy / "plugins" / "ops_cpu" / "pyproject.toml"
    _edit(cpu, f'version = "{version}"', 'version = "0.0.9"')
    _edit(cpu, f'"rustinfer=={version}"', '"rustinfer"')
    # A new plugin as one would start it: a copy of another's pyproject with a loose pin.
    new = repo_copy / "plugins" / "models_new" / "pyproject.toml"
    new.parent.mkdir()
    new.write_text(
        '[project]\nname = "rustinfer-models-new"\nversion = "0.0.1"\n'
        'dependencies = ["rustinfer>=0.1", "torch>=2.6"]\n'
    )
    problems = vs.check(repo_copy)
    assert f"plugins/ops_cpu/pyproject.toml: version '0.0.9', expected '{version}'" in problems
    assert (
        f"plugins/ops_cpu/pyproject.toml: requirement 'rustinfer' must pin =={version}" in problems
    )
    assert f"plugins/models_new/pyproject.toml: version '0.0.1', expected '{version}'" in problems
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "version.py"), "--root", str(repo_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"fix: python scripts/version.py --set {version}" in done.stderr

    vs.set_version("2.3.4", repo_copy)
    assert vs.check(repo_copy) == []
    assert vs.read_version(repo_copy) == "2.3.4"
    root = tomllib.loads((repo_copy / "pyproject.toml").read_text())["project"]
    assert root["name"] == "rustinfer" and "version" not in root  # still dynamic
    own = [d for d in root["dependencies"] if d.startswith("rustinfer-")]
    assert own and all(d.endswith("==2.3.4") for d in own), own
    for path in vs.pyprojects(repo_copy)[1:]:
        project = tomllib.loads(path.read_text())["project"]
        assert project["version"] == "2.3.4"
        assert project["name"].startswith("rustinfer-")  # a name is never rewritten as a pin
        assert "rustinfer==2.3.4" in project["dependencies"]
        assert "torch>=2.6" in project["dependencies"]  # others' requirements untouched
