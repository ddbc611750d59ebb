"""The mistakes a plugin author makes, each met with a message that names the plugin (and its
distribution, where it has one) and says what to change.

Plugins here are real: modules with ``.dist-info`` entry points found by the same scan that finds
installed plugins, or objects registered with a plugin manager as an entry point's would be.
"""

from __future__ import annotations

import re

import pytest
import torch
from plugin_helpers import install_fake_distribution

from rustinfer.cli.main import main
from rustinfer.cli.plugins_cmd import format_text, op_selection, plugin_report
from rustinfer.errors import PluginLoadError, RegistryError
from rustinfer.hookspecs import hookimpl
from rustinfer.plugins import collect_registries, get_registries, make_plugin_manager

RMSNORM_PLUGIN = """
import torch
from rustinfer.hookspecs import hookimpl

@hookimpl
def rustinfer_register_ops(register):
    register("rmsnorm", "{impl}", "rustinfer_ops_cpu.norm:rmsnorm", device="cpu",
             dtypes=[torch.float32], priority=5{extra})
"""


def _install(tmp_path, monkeypatch, dist: str, module: str, source: str, **kw: str) -> None:
    install_fake_distribution(tmp_path, dist, "1.0", module, source, monkeypatch, **kw)


def test_misspelled_hook_names_distribution_and_the_hook_meant(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "typo-plugin",
        "typo_plugin_mod",
        "from rustinfer.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef rustinfer_register_model(register):\n    pass\n",
    )
    with pytest.raises(PluginLoadError) as err:
        make_plugin_manager()
    assert str(err.value) == (
        "plugin 'typo_plugin_mod' (typo-plugin 1.0) implements unknown hook "
        "'rustinfer_register_model'; did you mean 'rustinfer_register_models'? the hooks are: "
        "rustinfer_register_devices, rustinfer_register_models, rustinfer_register_ops, "
        "rustinfer_register_tool_parsers (rustinfer/hookspecs.py)"
    )


def test_hook_without_hookimpl_is_refused(tmp_path, monkeypatch):
    # pluggy itself ignores an undecorated function: the plugin would silently register nothing.
    _install(
        tmp_path,
        monkeypatch,
        "undecorated-plugin",
        "undecorated_mod",
        "def rustinfer_register_ops(register):\n    pass\n",
    )
    with pytest.raises(
        PluginLoadError,
        match=r"plugin 'undecorated_mod' \(distribution undecorated-plugin 1\.0\) defines "
        r"rustinfer_register_ops without @hookimpl.*"
        r"decorate it with rustinfer\.hookspecs\.hookimpl",
    ):
        make_plugin_manager()


def test_entry_point_naming_a_module_without_hooks(tmp_path, monkeypatch):
    # The classic slip: the entry point names the package, the hooks live in package.plugin.
    _install(tmp_path, monkeypatch, "hookless-plugin", "hookless_mod", '"""no hooks here"""\n')
    with pytest.raises(
        PluginLoadError,
        match=r"'hookless_mod' \(distribution hookless-plugin 1\.0\): its entry point "
        r"'hookless_mod' names an object with no rustinfer hooks; point the entry point at the "
        r"module whose functions carry @hookimpl",
    ):
        make_plugin_manager()


def test_hook_argument_misspelled_names_distribution(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "argname-plugin",
        "argname_mod",
        "from rustinfer.hookspecs import hookimpl\n\n"
        "@hookimpl\ndef rustinfer_register_ops(registr):\n    pass\n",
    )
    with pytest.raises(PluginLoadError) as err:
        make_plugin_manager()
    text = str(err.value)
    assert "'argname_mod' (distribution argname-plugin 1.0)" in text
    assert "registr" in text and "only the arguments its spec names" in text


def test_import_failure_names_entry_point_distribution_and_fix(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "broken-plugin",
        "broken_mod",
        "import module_that_does_not_exist\n",
        entry_point="broken = broken_mod:hooks",
    )
    with pytest.raises(PluginLoadError) as err:
        make_plugin_manager()
    assert str(err.value).startswith(
        "rustinfer plugin 'broken' (distribution broken-plugin 1.0) failed to import its entry "
        "point 'broken_mod:hooks': ModuleNotFoundError(\"No module named "
        "'module_that_does_not_exist'\""
    )
    assert str(err.value).endswith("or uninstall it: pip uninstall broken-plugin")
    assert isinstance(err.value.__cause__, ModuleNotFoundError)  # the traceback stays reachable


def test_duplicate_registration_names_both_plugins_and_distributions(tmp_path, monkeypatch):
    for dist, mod in (("first-kernels", "first_kernels"), ("second-kernels", "second_kernels")):
        _install(tmp_path, monkeypatch, dist, mod, RMSNORM_PLUGIN.format(impl="fast", extra=""))
    with pytest.raises(RegistryError) as err:
        collect_registries(make_plugin_manager())
    # Which one comes first depends on the order hooks run in; both are named either way.
    first = "plugin 'first_kernels' (first-kernels 1.0)"
    second = "plugin 'second_kernels' (second-kernels 1.0)"
    pair = {f"by {first} and by {second}", f"by {second} and by {first}"}
    head = "op 'rmsnorm' implementation 'fast' for device 'cpu' is registered twice: "
    tail = "; uninstall one of them, or give one implementation another name"
    assert str(err.value) in {head + p + tail for p in pair}


def test_same_entry_point_name_in_two_distributions(tmp_path, monkeypatch):
    source = RMSNORM_PLUGIN.format(impl="a", extra="")
    _install(tmp_path, monkeypatch, "kernels-a", "kernels_a", source, entry_point="k = kernels_a")
    _install(tmp_path, monkeypatch, "kernels-b", "kernels_b", source, entry_point="k = kernels_b")
    with pytest.raises(
        PluginLoadError,
        match=r"two installed distributions declare a rustinfer plugin named 'k': "
        r"kernels-(a|b) 1\.0 and kernels-(a|b) 1\.0; uninstall one of them, or rename one",
    ):
        make_plugin_manager()


def test_bad_register_call_points_at_the_hookspec():
    class MissingDtypes:
        @hookimpl
        def rustinfer_register_ops(self, register):
            register("rmsnorm", "x", "torch:abs", device="cpu")

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(MissingDtypes(), name="missing_dtypes")
    with pytest.raises(
        PluginLoadError,
        match=r"plugin 'missing_dtypes' failed in rustinfer_register_ops: TypeError\(.*dtypes.*"
        r"check its register\(\.\.\.\) calls against the hook's docstring",
    ):
        collect_registries(pm)


def test_mistyped_target_names_plugin_when_first_loaded():
    class Typo:
        @hookimpl
        def rustinfer_register_ops(self, register):
            register(
                "argmax", "typo", "torch:argmaxx", device="cpu", dtypes=[torch.float32], priority=9
            )

        @hookimpl
        def rustinfer_register_models(self, register):
            register("TypoForCausalLM", "no_such_module_anywhere:Model")

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Typo(), name="typo")
    regs = collect_registries(pm)
    impl = regs.ops.lookup("argmax", "cpu", torch.float32, overrides={})
    with pytest.raises(
        RegistryError,
        match=r"op 'argmax' implementation 'typo' of plugin 'typo': its target 'torch:argmaxx' "
        r"cannot be loaded \(AttributeError.*fix the 'module:attr' string",
    ):
        impl.load()
    with pytest.raises(
        RegistryError,
        match=r"model architecture 'TypoForCausalLM' of plugin 'typo': its target "
        r"'no_such_module_anywhere:Model' cannot be loaded \(ModuleNotFoundError",
    ):
        regs.models.get("TypoForCausalLM")


def test_unmet_requirement_is_listed_with_its_reason(tmp_path, monkeypatch):
    """An implementation whose requirement fails is skipped by lookups, and the listing says why."""
    extra = ', requires=["faraway_checks:needs_unicorn", "no_such_checks:anything"]'
    _install(
        tmp_path,
        monkeypatch,
        "picky-kernels",
        "picky_kernels",
        RMSNORM_PLUGIN.format(impl="picky", extra=extra),
    )
    (tmp_path / "faraway_checks.py").write_text(
        "def needs_unicorn():\n    return 'needs a unicorn (pip install unicorn)'\n"
    )
    monkeypatch.delenv("RUSTINFER_OP_IMPL", raising=False)
    regs = collect_registries(make_plugin_manager())
    report = {p["name"]: p for p in plugin_report(regs)}
    assert report["picky_kernels"]["unavailable"] == {
        "rmsnorm:picky@cpu": "needs a unicorn (pip install unicorn)"
    }
    selection = op_selection(regs, "cpu", "float32")
    assert selection["selected"]["rmsnorm"] == {"impl": "torch", "plugin": "ops_cpu", "priority": 0}
    text = format_text(list(report.values()), selection)
    assert (
        "picky_kernels  [picky-kernels 1.0]\n"
        "  ops: rmsnorm:picky@cpu\n"
        "  cannot run here (needs a unicorn (pip install unicorn)): rmsnorm:picky@cpu\n"
    ) in text
    # Pinned, it fails with the same reason rather than falling back.
    with pytest.raises(RegistryError, match=r"pins op 'rmsnorm' to 'picky'.*needs a unicorn"):
        regs.ops.lookup("rmsnorm", "cpu", torch.float32, overrides={"rmsnorm": "picky"})


def test_requirement_that_cannot_be_imported_is_a_reason_not_a_crash():
    class Picky:
        @hookimpl
        def rustinfer_register_ops(self, register):
            register(
                "argmax",
                "picky",
                "torch:argmax",
                device="cpu",
                dtypes=[torch.float32],
                priority=3,
                requires=["no_such_module_anywhere:check"],
            )

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(Picky(), name="picky")
    regs = collect_registries(pm)
    (impl,) = regs.ops.implementations("argmax")
    assert impl.unmet_requirement() == (
        "requirement 'no_such_module_anywhere:check' cannot be loaded: "
        "ModuleNotFoundError(\"No module named 'no_such_module_anywhere'\")"
    )


@pytest.fixture
def fresh_registries():
    """The CLI reads the process-wide registries: rebuild them around a test that installs a
    plugin, so neither it nor later tests see a stale set."""
    get_registries.cache_clear()
    yield
    get_registries.cache_clear()


def test_plugins_command_shows_skip_reason_and_pin(tmp_path, monkeypatch, capsys, fresh_registries):
    extra = ', requires=["faraway_checks2:never"]'
    _install(
        tmp_path, monkeypatch, "picky2", "picky2_mod", RMSNORM_PLUGIN.format(impl="p2", extra=extra)
    )
    (tmp_path / "faraway_checks2.py").write_text("def never():\n    return 'never here'\n")
    monkeypatch.setenv("RUSTINFER_OP_IMPL", "rmsnorm=p2")
    assert main(["plugins", "--device", "cpu", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "  cannot run here (never here): rmsnorm:p2@cpu\n" in out
    assert "ops on cpu (float32, RUSTINFER_OP_IMPL=rmsnorm=p2):\n" in out
    # Column width follows the longest op name, which grows as ops are added.
    assert re.search(
        r"^  rmsnorm +none: RUSTINFER_OP_IMPL pins op 'rmsnorm' to 'p2', which cannot run here: "
        r"never here$",
        out,
        re.M,
    ), out


def test_listing_works_without_any_device_plugin():
    """The moment a listing is needed most: nothing registers the cpu device."""

    class ModelsOnly:
        @hookimpl
        def rustinfer_register_models(self, register):
            register("OnlyForCausalLM", "builtins:object")

    pm = make_plugin_manager(load_entry_points=False)
    pm.register(ModelsOnly(), name="models_only")
    regs = collect_registries(pm)
    selection = op_selection(regs, "auto", "auto")
    assert selection["error"] == "device 'cpu': unknown device type 'cpu'; registered: none " + (
        "(is a plugin package installed?)"
    )
    text = format_text(plugin_report(regs), selection)
    assert text.startswith("models_only  [(not a dist)]\n  models: OnlyForCausalLM\n")
    assert text.endswith("ops on auto (auto):\n  none: " + selection["error"] + "\n")
