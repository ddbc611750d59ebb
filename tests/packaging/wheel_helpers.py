"""Build this repository's distributions from a copy of the tree and install their wheels into a
fresh virtual environment that cannot see the editable checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "rustinfer-example-plugin"


def version_script() -> ModuleType:
    """scripts/version.py as a module: the one list of our distributions and their version."""
    spec = importlib.util.spec_from_file_location(
        "rustinfer_version_script", REPO / "scripts" / "version.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Distribution:
    name: str  # as its pyproject.toml spells it
    version: str | None  # as its pyproject.toml writes it; None where dynamic (the root)
    source: Path  # the folder holding its pyproject.toml
    entry_points: dict[str, str]  # its plugins: entry-point name -> "module"

    @property
    def file_stem(self) -> str:
        """The name as wheel and sdist file names normalize it (rustinfer_ops_cpu)."""
        return self.name.replace("-", "_").replace(".", "_").lower()

    def package_dirs(self) -> list[Path]:
        """Its top-level import packages in the source tree (ours all start with rustinfer)."""
        find = (
            tomllib.loads((self.source / "pyproject.toml").read_text())
            .get("tool", {})
            .get("setuptools", {})
            .get("packages", {})
            .get("find", {})
        )
        base = self.source / find.get("where", ["."])[0]
        return sorted(
            p.parent for p in base.glob("*/__init__.py") if p.parent.name.startswith("rustinfer")
        )


def distribution(source: Path) -> Distribution:
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    return Distribution(
        name=project["name"],
        version=project.get("version"),
        source=source,
        entry_points=dict(project.get("entry-points", {}).get("rustinfer", {})),
    )


def first_party() -> list[Distribution]:
    """The root distribution and every plugins/*/ one: a new plugin folder is included as soon as
    it has a pyproject.toml."""
    return [distribution(p.parent) for p in version_script().pyprojects(REPO)]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus what could point a child at the checkout or pin an op."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "RUSTINFER_OP_IMPL"}
    }
    env.update(extra)
    return env


def copy_source(dist: Distribution, dest: Path) -> Path:
    """A copy of the distribution's folder without build debris, version control or the other
    distributions nested in the root (plugins/, examples/): it builds as a fresh clone would."""
    top = dist.source

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {
            n for n in names if n.startswith(".") or n == "__pycache__" or n.endswith(".egg-info")
        }
        if Path(folder) == top:
            skipped |= {"build", "dist", "plugins", "examples"} & set(names)
        return skipped

    shutil.copytree(top, dest, ignore=ignore)
    return dest


def build(dist: Distribution, workdir: Path, outdir: Path) -> tuple[Path, Path]:
    """``python -m build`` (an sdist, then a wheel built from that sdist) -> (sdist, wheel)."""
    src = copy_source(dist, workdir / dist.file_stem)
    # --no-isolation: the build backend comes from the test extras; no network, seconds per build.
    done = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
        cwd=workdir,
    )
    assert done.returncode == 0, (
        f"python -m build failed for {dist.name}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    sdists = sorted(outdir.glob(f"{dist.file_stem}-*.tar.gz"))
    wheels = sorted(outdir.glob(f"{dist.file_stem}-*-py3-none-any.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, (sdists, wheels)
    return sdists[0], wheels[0]


# Imported at start by every interpreter of the venv (a .pth line): with
# RUSTINFER_TEST_MODULE_LOG set, it writes where each rustinfer* module it imported came from.
_RECORDER = """
import atexit, json, os, sys

_LOG = os.environ.get("RUSTINFER_TEST_MODULE_LOG")
if _LOG:
    def _write():
        mods = {
            name: getattr(mod, "__file__", None)
            for name, mod in list(sys.modules.items())
            if name.split(".")[0].startswith("rustinfer")
        }
        with open(_LOG, "w", encoding="utf-8") as f:
            json.dump(mods, f)

    atexit.register(_write)
"""


class Venv:
    """A virtual environment holding our wheels and nothing else of ours.

    Third-party packages (torch, transformers, ...) come from this interpreter's site-packages
    through a plain path line in a .pth file. Unlike --system-site-packages, that does not run the
    .pth files there, so the editable install's import hooks never load: an import of rustinfer
    that the wheels do not satisfy fails instead of quietly reaching the checkout.
    """

    def __init__(self, root: Path) -> None:
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120
        )
        self.root = root.resolve()
        self.bin = self.root / "bin"
        self.cwd = root.parent / f"{root.name}-cwd"  # never the checkout: "" on sys.path is cwd
        self.cwd.mkdir()
        self.log = self.cwd / "modules.json"
        self.modules: dict[str, str | None] = {}  # the last run's rustinfer* modules -> file
        purelib = Path(
            self.run_python("import sysconfig; print(sysconfig.get_path('purelib'))").strip()
        )
        outer = [
            p
            for p in [*site.getsitepackages(), site.getusersitepackages()]
            if p in sys.path and Path(p).is_dir()
        ]
        (purelib / "_outer_site_packages.pth").write_text("\n".join(outer) + "\n")
        (purelib / "_rustinfer_test_recorder.py").write_text(_RECORDER)
        (purelib / "_rustinfer_test_recorder.pth").write_text("import _rustinfer_test_recorder\n")

    def env(self, **extra: str) -> dict[str, str]:
        return clean_env(
            PATH=f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            VIRTUAL_ENV=str(self.root),
            RUSTINFER_TEST_MODULE_LOG=str(self.log),
            **extra,
        )

    def run(self, *argv: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
        """Run a command of the venv (``rustinfer ...`` is its console script) and check that
        every rustinfer* module the process imported lies inside the venv."""
        self.log.unlink(missing_ok=True)
        exe = self.bin / argv[0] if (self.bin / argv[0]).exists() else argv[0]
        done = subprocess.run(
            [str(exe), *argv[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cwd,
            env=self.env(**env),
        )
        if self.log.exists():
            modules = json.loads(self.log.read_text())
            outside = {
                name: path
                for name, path in modules.items()
                if path is None or not Path(path).resolve().is_relative_to(self.root)
            }
            assert not outside, f"modules imported from outside the venv: {outside}"
            self.modules = modules
        else:
            self.modules = {}
        return done

    def run_python(self, code: str, **env: str) -> str:
        done = self.run("python", "-c", code, **env)
        assert done.returncode == 0, done.stderr[-4000:]
        return done.stdout

    def pip_install(self, *wheels: Path) -> None:
        # --no-deps: third-party requirements are met from outside (pip check below says so);
        # --ignore-installed: the editable rustinfer is visible as a distribution and must not
        # count as "already satisfied".
        done = self.run(
            "python",
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--ignore-installed",
            "--disable-pip-version-check",
            "--quiet",
            *map(str, wheels),
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
