"""Tool-call parsers as a plugin point: each model family's plugin registers its format's parser
with the strings by which a chat template asks for it; the core keeps "hermes" as the fallback.

Selection is checked on template snippets in each family's shape, through the same path a
request takes (``RequestTools.read``), and third-party registrations come from plugin objects
registered with a plugin manager, as an entry point's module would be.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from rustinfer_models_llama3 import plugin as llama3_plugin
from rustinfer_models_llama3.tool_parser import Llama3JsonParser
from rustinfer_models_qwen import plugin as qwen_plugin

from rustinfer.cli.main import main
from rustinfer.errors import PluginLoadError, RegistryError
from rustinfer.hookspecs import hookimpl
from rustinfer.plugins import collect_registries, get_registries, make_plugin_manager
from rustinfer.registry import Registries
from rustinfer.tool_calls import (
    TOOL_PARSERS,
    RequestTools,
    choose_parser,
    parse_output,
    register_tool_parser,
)
from rustinfer.tool_calls.parsers import HermesParser, ToolParser

# Template snippets in each family's shape; each reads a `tools` variable, so it renders tools
# itself and its markers choose the parser.
LLAMA31 = (
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{% if tools %}Environment: ipython"
    "{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
    "{{ '<|python_tag|>' if builtin_tools is defined }}"
)
# Llama 3.2's templates offer no built-in tools, so no <|python_tag|>: "parameters" marks them.
LLAMA32 = (
    "{% if tools %}{{ '<|start_header_id|>user<|end_header_id|>\\n\\n' }}Respond with "
    '{"name": function name, "parameters": dictionary}{% endif %}'
    "{% for m in messages %}{{ m.content }}{% endfor %}"
)
QWEN25 = (
    "{{ '<|im_start|>system\\n' }}{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools> Write calls inside <tool_call></tool_call> tags{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}{% endfor %}"
)
QWEN3 = QWEN25 + "{% if enable_thinking is false %}<think>\\n\\n</think>{% endif %}"
# Hermes-style calls without ChatML turns: no family claims it, the core's fallback reads it.
HERMES_ONLY = (
    "{% if tools %}<tool_call>{% endif %}{% for m in messages %}{{ m.content }}{% endfor %}"
)
# SmolLM2's ChatML cannot render tools: rustinfer writes the fallback's format itself.
CHATML = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content }}{% endfor %}"

TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


@pytest.fixture(scope="module")
def installed() -> Registries:
    """The registries as a process builds them from the installed plugins."""
    return collect_registries(make_plugin_manager())


@pytest.fixture
def fresh_registries() -> Iterator[None]:
    """For tests that change the process-wide registries: rebuilt before and after."""
    get_registries.cache_clear()
    yield
    get_registries.cache_clear()


class _ParserPlugin:
    """A third-party plugin object with one tool-parser registration."""

    def __init__(self, name: str, target: Any, **options: Any) -> None:
        self.name, self.target, self.options = name, target, options

    @hookimpl
    def rustinfer_register_tool_parsers(self, register):
        register(self.name, self.target, **self.options)


class BracketParser(ToolParser):
    """``[TOOL_CALLS]{"name": ..., "arguments": ...}``: just enough of a third-party format."""

    name = "bracket"
    TAG = "[TOOL_CALLS]"

    def __init__(self, tool_names=None, max_calls=None) -> None:
        super().__init__(tool_names, max_calls)
        self._text = ""

    def feed(self, delta):
        self._text += delta
        return []

    def finish(self):
        head, tag, call = self._text.partition(self.TAG)
        found = self._read_call(json.loads(call)) if tag else None
        return self._content(head) + (self._call(*found) if found else self._content(tag + call))


def _with(installed_too: bool = True, **plugins: object) -> Registries:
    pm = make_plugin_manager(load_entry_points=installed_too)
    for name, plugin in plugins.items():
        pm.register(plugin, name=name)
    return collect_registries(pm)


# -- the installed families ----------------------------------------------------------------------


def test_the_registry_holds_each_familys_parser_from_its_distribution(installed) -> None:
    entries = {e.key: e for e in installed.tool_parsers.entries()}
    assert {"hermes", "llama3_json", "qwen"} <= set(entries)
    assert (entries["llama3_json"].plugin, entries["qwen"].plugin) == (
        "models_llama3",
        "models_qwen",
    )
    assert entries["hermes"].plugin == "rustinfer"  # the core's own, not a plugin's
    infos = {p.name: p for p in installed.plugins}
    assert infos["models_llama3"].distribution == "rustinfer-models-llama3"
    assert infos["models_llama3"].registered["tool_parsers"] == ["llama3_json"]
    assert infos["models_qwen"].distribution == "rustinfer-models-qwen"
    assert infos["models_qwen"].registered["tool_parsers"] == ["qwen"]
    assert installed.tool_parsers.get("llama3_json") is Llama3JsonParser
    # Qwen writes Hermes's format: its registration names the core's class.
    assert installed.tool_parsers.get("qwen") is HermesParser
    # The process-wide view the server's settings validate against.
    assert {"hermes", "llama3_json", "qwen"} <= set(TOOL_PARSERS)
    assert TOOL_PARSERS["llama3_json"] is Llama3JsonParser


def test_family_plugins_register_strings_so_importing_them_stays_cheap() -> None:
    targets: list[Any] = []
    for plugin in (llama3_plugin, qwen_plugin):
        plugin.rustinfer_register_tool_parsers(register=lambda n, t, **kw: targets.append(t))
    assert targets and all(isinstance(t, str) and ":" in t for t in targets)


@pytest.mark.parametrize(
    ("template", "name", "plugin", "parser"),
    [
        (LLAMA31, "llama3_json", "models_llama3", Llama3JsonParser),
        (LLAMA32, "llama3_json", "models_llama3", Llama3JsonParser),
        (QWEN25, "qwen", "models_qwen", HermesParser),
        (QWEN3, "qwen", "models_qwen", HermesParser),
        (HERMES_ONLY, "hermes", "rustinfer", HermesParser),
    ],
    ids=["llama3.1", "llama3.2", "qwen2.5", "qwen3", "hermes"],
)
def test_a_familys_template_selects_its_plugins_parser(
    installed, template: str, name: str, plugin: str, parser: type
) -> None:
    entry = installed.tool_parsers.select(None, template)
    assert (entry.key, entry.plugin) == (name, plugin)
    assert choose_parser(None, template, installed.tool_parsers) is parser
    # A request takes the same path, and its parser reads the family's output.
    tools = RequestTools.read([TIME], "auto", template, None)
    assert tools.parser is parser
    key = parser.arguments_key
    written = json.dumps({"name": "get_time", key: {"city": "Oslo"}})
    if parser is HermesParser:
        written = f"<tool_call>\n{written}\n</tool_call>"
    (call,) = parse_output(tools.new_parser(), written).calls
    assert (call.name, json.loads(call.arguments)) == ("get_time", {"city": "Oslo"})


def test_a_template_that_cannot_render_tools_gets_the_fallback(installed) -> None:
    assert installed.tool_parsers.select(None, None).key == "hermes"
    assert RequestTools.read([TIME], "auto", CHATML, None).parser is HermesParser
    # A configured name wins over the template.
    assert choose_parser("llama3_json", QWEN25, installed.tool_parsers) is Llama3JsonParser


def test_an_unknown_configured_parser_lists_the_known_ones_with_their_sources(installed) -> None:
    with pytest.raises(RegistryError) as caught:
        choose_parser("mistral", QWEN25, installed.tool_parsers)
    message = str(caught.value)
    assert message.startswith("unknown tool-call parser 'mistral'; registered: hermes from ")
    assert "the rustinfer core" in message
    assert "llama3_json from plugin 'models_llama3' (rustinfer-models-llama3 " in message
    assert "qwen from plugin 'models_qwen' (rustinfer-models-qwen " in message
    assert isinstance(caught.value, ValueError)  # what settings validation catches


# -- third-party registrations -------------------------------------------------------------------


def test_a_third_party_parser_is_registered_selected_and_listed() -> None:
    regs = _with(extra=_ParserPlugin("bracket", BracketParser, template_markers=["[TOOL_CALLS]"]))
    template = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}[TOOL_CALLS]"
    assert choose_parser(None, template, regs.tool_parsers) is BracketParser
    assert {p.name: p for p in regs.plugins}["extra"].registered == {"tool_parsers": ["bracket"]}
    parsed = parse_output(BracketParser(["get_time"]), 'On it.[TOOL_CALLS]{"name": "get_time"}')
    assert parsed.content == "On it." and [c.name for c in parsed.calls] == ["get_time"]
    # The families' templates still select theirs.
    assert regs.tool_parsers.select(None, QWEN25).key == "qwen"


def test_priority_then_the_larger_marker_group_decides_between_matches() -> None:
    def choose(**options: Any) -> str:
        regs = _with(extra=_ParserPlugin("bracket", BracketParser, **options))
        return regs.tool_parsers.select(None, QWEN25).key

    # Qwen's group is <|im_start|> and <tool_call>: one marker of the same priority says less.
    assert choose(template_markers=["<tool_call>"]) == "qwen"
    # A group as large ties, and names break ties: "bracket" sorts before "qwen".
    assert choose(template_markers=[("<tools>", "<tool_call>")]) == "bracket"
    # A higher priority wins whatever the groups.
    assert choose(template_markers=["<tool_call>"], priority=5) == "bracket"
    assert choose(template_markers=[("<tools>", "<tool_call>")], priority=-1) == "qwen"


@pytest.mark.parametrize(
    ("name", "first"),
    [
        ("llama3_json", r"plugin 'models_llama3' \(rustinfer-models-llama3 [^)]+\)"),
        ("hermes", "the rustinfer core"),
    ],
)
def test_a_duplicate_name_is_an_error_naming_both(name: str, first: str) -> None:
    both = rf"by {first} \([\w.:]+\) and by plugin 'extra' \([\w.]+:BracketParser\)"
    with pytest.raises(RegistryError, match=rf"parser '{name}' is registered twice: {both}"):
        _with(extra=_ParserPlugin(name, BracketParser))


def test_two_third_parties_with_one_name_are_named_both() -> None:
    with pytest.raises(RegistryError, match="by plugin 'one' .* and by plugin 'two'"):
        _with(False, one=_ParserPlugin("x", BracketParser), two=_ParserPlugin("x", HermesParser))


@pytest.mark.parametrize(
    ("markers", "complaint"),
    [
        ("<tool_call>", r"pass a list: template_markers=\['<tool_call>'\]"),
        (["<tool_call>", ()], "each group a non-empty tuple"),
        ([("<tool_call>", "")], "each marker is a non-empty string"),
    ],
)
def test_malformed_template_markers_are_refused(markers: Any, complaint: str) -> None:
    who = "plugin 'extra' registers tool-call parser 'x'"
    with pytest.raises(RegistryError, match=rf"{who}.*{complaint}"):
        _with(False, extra=_ParserPlugin("x", BracketParser, template_markers=markers))


def test_a_misspelled_register_keyword_points_at_the_hookspec() -> None:
    with pytest.raises(PluginLoadError, match="failed in rustinfer_register_tool_parsers"):
        _with(False, extra=_ParserPlugin("x", BracketParser, markers=["[TOOL_CALLS]"]))


def test_a_target_that_is_no_parser_is_an_error_naming_the_plugin() -> None:
    regs = _with(False, extra=_ParserPlugin("odd", "json:loads"))
    with pytest.raises(RegistryError, match=r"'odd' of plugin 'extra': its target 'json:loads'"):
        choose_parser("odd", None, regs.tool_parsers)


def test_in_process_registration_joins_the_process_registry(fresh_registries) -> None:
    register_tool_parser(template_markers=["[TOOL_CALLS]"])(BracketParser)
    assert TOOL_PARSERS["bracket"] is BracketParser
    assert choose_parser(None, "{{ tools }}[TOOL_CALLS]") is BracketParser
    register_tool_parser(BracketParser)  # the same class again changes nothing


# -- the listing ---------------------------------------------------------------------------------


def test_plugins_command_lists_tool_parsers_with_their_distribution(capsys) -> None:
    assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["tool_parsers"]}
    assert listed["llama3_json"]["distribution"] == "rustinfer-models-llama3"
    assert listed["llama3_json"]["target"] == "rustinfer_models_llama3.tool_parser:Llama3JsonParser"
    assert listed["llama3_json"]["template_markers"] == [
        ["<|python_tag|>"],
        ["<|start_header_id|>", '"parameters"'],
    ]
    assert listed["qwen"]["distribution"] == "rustinfer-models-qwen"
    assert (listed["hermes"]["distribution"], listed["hermes"]["fallback"]) == ("rustinfer", True)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "  tool_parsers: llama3_json\n" in out
    assert "  qwen         plugin models_qwen [rustinfer-models-qwen " in out
    assert "; template: <|im_start|> + <tool_call>\n" in out
