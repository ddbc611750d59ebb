"""Plugin discovery, registries, op lookup priority / requirements / override, and error messages."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pluggy
import pytest
import torch
from plugin_helpers import install_fake_distribution

from rustinfer.cli.main import main
from rustinfer.errors import PluginLoadError, RegistryError
from rustinfer.hookspecs import hookimpl
from rustinfer.plugins import collect_registries, make_plugin_manager

FAKE_PLUGIN = """
from rustinfer.hookspecs import hookimpl

def my_rmsnorm(x, weight, eps):
    return x

@hookimpl
def rustinfer_register_ops(register):
    register("rmsnorm", "fake", "{mod}:my_rmsnorm", device="cpu", dtypes=[__import__("torch").float32],
             priority=100)

@hookimpl
def rustinfer_register_models(register):
    register("FakeForCausalLM", "{mod}:my_rmsnorm")
"""


def test_fake_distribution_is_discovered_and_outranks_torch(tmp_path, monkeypatch):
    mod = "fake_rustinfer_plugin_ok"
    install_fake_distribution(
        tmp_path, "fake-rustinfer-plugin", "1.2.3", mod, FAKE_PLUGIN.format(mod=mod), monkeypatch
    )
    regs = collect_registries(make_plugin_manager())
    info = {p.name: p for p in regs.plugins}[mod]
    assert (info.distribution, info.version) == ("fake-rustinfer-plugin", "1.2.3")
    assert info.registered == {"ops": ["rmsnorm:fake@cpu"], "models": ["FakeForCausalLM"]}
    # The shipped plugins are discovered beside it.
    assert {"ops_cpu", "models_llama3"} <= {p.name for p in regs.plugins}
    monkeypatch.delenv("RUSTINFER_OP_IMPL", raising=False)
    assert regs.ops.lookup("rmsnorm", "cpu", torch.float32).name == "fake"  # priority 100 wins
    # Other dtypes are not served by the fake one.
    assert regs.ops.lookup("rmsnorm", "cpu", torch.bfloat16).name == "torch"
    monkeypatch.setenv("RUSTINFER_OP_IMPL", "rmsnorm=torch")
    assert regs.ops.lookup("rmsnorm", "cpu", torch.float32).name == "torch"
    assert regs.models.get("FakeForCausalLM").__name__ == "my_rmsnorm"


def test_broken_plugin_fails_loudly_naming_it(tmp_path, monkeypatch):
    mod = "fake_rustinfer_plugin_broken"
    install_fake_distribution(
        tmp_path, "broken-plugin", "0.1", mod, "import module_that_does_not_exist\n", monkeypatch
    )
    with pytest.raises(
        PluginLoadError, match=r"'fake_rustinfer_plugin_broken'.*broken-plugin 0\.1"
    ):
        make_plugin_manager()


class _ModelPlugin:
    def __init__(self, arch: str) -> None:
        self.arch = arch

    @hookimpl
    def rustinfer_register_models(self, register):
        register(self.arch, "builtins:object")


def _manager(**plugins: object) -> pluggy.PluginManager:
    pm = make_plugin_manager(load_entry_points=False)
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return pm


def test_duplicate_model_names_both_plugins():
    pm = _manager(first=_ModelPlugin("DupForCausalLM"), second=_ModelPlugin("DupForCausalLM"))
    with pytest.raises(
        RegistryError, match=r"registered twice: by plugin '\w+' and by plugin '\w+'"
    ):
        collect_registries(pm)


class _OpPlugin:
    def __init__(self, name: str, priority: int, requires: tuple = ()) -> None:
        self.name, self.priority, self.requires = name, priority, requires

    @hookimpl
    def rustinfer_register_ops(self, register):
        register(
            "argmax",
            self.name,
            "torch:argmax",
            device="cpu",
            dtypes=[torch.float32],
            priority=self.priority,
            requires=self.requires,
        )


def test_duplicate_op_implementation_names_both_plugins():
    pm = _manager(a=_OpPlugin("same", 0), b=_OpPlugin("same", 1))
    with pytest.raises(RegistryError, match="by plugin 'a' and by plugin 'b'"):
        collect_registries(pm)


def test_unmet_requirement_falls_back_to_next_priority(monkeypatch):
    monkeypatch.delenv("RUSTINFER_OP_IMPL", raising=False)
    pm = _manager(
        fast=_OpPlugin("fast", 10, requires=(lambda: "needs a unicorn",)),
        slow=_OpPlugin("slow", 0),
    )
    regs = collect_registries(pm)
    assert regs.ops.lookup("argmax", "cpu", torch.float32).name == "slow"
    # Pinning the one that cannot run is an error that says why, not a silent fallback.
    with pytest.raises(RegistryError, match="needs a unicorn"):
        regs.ops.lookup("argmax", "cpu", torch.float32, overrides={"argmax": "fast"})


def test_override_to_missing_implementation_fails(monkeypatch):
    regs = collect_registries(_manager(slow=_OpPlugin("slow", 0)))
    monkeypatch.setenv("RUSTINFER_OP_IMPL", "argmax=nonexistent")
    with pytest.raises(RegistryError, match=r"pins op 'argmax' to 'nonexistent'.*registered: slow"):
        regs.ops.lookup("argmax", "cpu", torch.float32)
    monkeypatch.setenv("RUSTINFER_OP_IMPL", "argmax")
    with pytest.raises(RegistryError, match="expected 'op=impl"):
        regs.ops.lookup("argmax", "cpu", torch.float32)


def test_miss_messages_list_what_exists(monkeypatch):
    monkeypatch.delenv("RUSTINFER_OP_IMPL", raising=False)
    regs = collect_registries(_manager(slow=_OpPlugin("slow", 0)))
    with pytest.raises(RegistryError, match=r"device 'tpu'.*registered: slow \[cpu; float32"):
        regs.ops.lookup("argmax", "tpu", torch.float32)
    with pytest.raises(RegistryError, match="no plugin registers op 'rmsnorm'"):
        regs.ops.lookup("rmsnorm", "cpu", torch.float32)
    with pytest.raises(RegistryError, match=r"unknown model architecture 'Nope'; registered: none"):
        regs.models.get("Nope")


def test_unknown_op_name_is_rejected():
    class Bad:
        @hookimpl
        def rustinfer_register_ops(self, register):
            register("rmsnrom", "x", "torch:abs", device="cpu", dtypes=[torch.float32])

    with pytest.raises(RegistryError, match="unknown op 'rmsnrom'; known ops: .*rmsnorm"):
        collect_registries(_manager(bad=Bad()))


def test_misspelled_hook_fails_at_registration():
    class Typo:
        @hookimpl
        def rustinfer_register_opz(self, register):
            pass

    with pytest.raises(
        PluginLoadError,
        match=r"plugin 'typo' implements unknown hook 'rustinfer_register_opz'; "
        r"did you mean 'rustinfer_register_ops'\?",
    ):
        collect_registries(_manager(typo=Typo()))


def test_plugins_command_json(capsys):
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["plugins"]}
    cpu = listed["ops_cpu"]
    assert cpu["distribution"] == "rustinfer-ops-cpu"
    assert "rmsnorm:torch@cpu" in cpu["registered"]["ops"]
    assert cpu["registered"]["devices"] == ["cpu"]
    assert listed["models_llama3"]["registered"]["models"] == [
        "LlamaForCausalLM",
        "llama",
        "MistralForCausalLM",
    ]
    assert listed["models_qwen"]["distribution"] == "rustinfer-models-qwen"
    assert listed["models_qwen"]["registered"]["models"] == [
        "Qwen2ForCausalLM",
        "qwen2",
        "Qwen3ForCausalLM",
        "qwen3",
    ]
    assert listed["ops_cuda"]["registered"]["devices"] == ["cuda"]
    cuda_ops = set(listed["ops_cuda"]["registered"]["ops"])
    assert {"linear:torch@cuda", "rmsnorm:triton@cuda"} <= cuda_ops


def test_plugins_command_text(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert textwrap.dedent("models_llama3  [rustinfer-models-llama3 0.1.0]") in out
    assert "  models: LlamaForCausalLM, llama, MistralForCausalLM" in out


# In a fresh interpreter: import every module of rustinfer-ops-cuda, run its hooks and load every
# target they register (lazy "module:attr" strings), then report which modules came along.
_LOAD_ALL_OPS_CUDA = """
import importlib, json, pkgutil, sys
import torch
import rustinfer_ops_cuda
from rustinfer.lazy import resolve
from rustinfer_ops_cuda import plugin
names = [m.name for m in pkgutil.walk_packages(rustinfer_ops_cuda.__path__, "rustinfer_ops_cuda.")]
for name in names:
    importlib.import_module(name)
targets = []
plugin.rustinfer_register_ops(register=lambda op, name, target, **kw: targets.append(target))
plugin.rustinfer_register_devices(register=lambda device_type, target: targets.append(target))
for target in targets:
    resolve(target)
print(json.dumps({
    "modules": names,
    "targets": targets,
    "ops_cpu": sorted(m for m in sys.modules if m.split(".")[0] == "rustinfer_ops_cpu"),
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""


def test_ops_cuda_stands_alone_without_ops_cpu():
    """rustinfer-ops-cuda never imports rustinfer-ops-cpu (not at import, not in its hooks, not
    through a registered target), and none of that initialises CUDA."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_ALL_OPS_CUDA],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    # The check covered the plugin, every kernel module and every registered target.
    assert {
        "rustinfer_ops_cuda.plugin",
        "rustinfer_ops_cuda.device",
        "rustinfer_ops_cuda.kernels.torch_ops",
        "rustinfer_ops_cuda.kernels.decode_attention",
    } <= set(report["modules"])
    assert len(report["targets"]) > 10
    assert all(t.startswith("rustinfer_ops_cuda.") for t in report["targets"]), report["targets"]
    assert report["ops_cpu"] == []
    assert report["cuda_initialized"] is False


def test_ops_cuda_distribution_does_not_depend_on_ops_cpu():
    pyproject = Path(__file__).parents[1] / "plugins" / "ops_cuda" / "pyproject.toml"
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    # Requirement names, normalised as PEP 503 does: case, "-", "_" and "." all alike.
    names = {
        re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", dep)[1]).lower()
        for dep in deps
    }
    assert "rustinfer" in names
    assert "rustinfer-ops-cpu" not in names
