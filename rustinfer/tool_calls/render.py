"""Tools and past calls into the prompt: through the model's chat template when it renders tools,
else written by rustinfer in the parser's own format.

A template that reads a ``tools`` variable (Llama 3.1+, Qwen, Hermes, Mistral) is given the tools
in OpenAI's shape, assistant messages with ``tool_calls`` and ``tool`` messages as they are: it
knows its model's format best. A template that does not (ChatML as SmolLM2 ships it) would drop
the calls and print "tool" as a role the model never saw, so rustinfer rewrites the conversation
into plain turns: a system-prompt section describing the tools and the call format, past calls
written as the model would write them, and results as user turns.
"""

from __future__ import annotations

from typing import Any

from rustinfer.chat_template import template_variables
from rustinfer.tool_calls.parsers import ToolParser
from rustinfer.tool_calls.spec import Tool, ToolChoice

__all__ = ["chat_prompt", "renders_tools"]


def renders_tools(template: str | None) -> bool:
    """Whether ``template`` (None: the built-in Llama 3 one, which does not) renders tools."""
    return template is not None and "tools" in template_variables(template)


def chat_prompt(
    messages: list[dict[str, Any]],
    tools: list[Tool],
    choice: ToolChoice,
    parser: type[ToolParser],
    template: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages for the template and the extra template variables. With ``tool_choice`` "none"
    the tools are not offered at all, so the model cannot call them; past calls still render."""
    offered = tools if choice.mode != "none" else []
    if renders_tools(template):
        return _named_results(messages), (
            {"tools": [t.as_openai() for t in offered]} if offered else {}
        )
    return _inline(messages, offered, choice, parser), {}


def _named_results(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Some templates print the function's name beside its result: take it from the call.
    names = {
        call["id"]: call["function"]["name"]
        for m in messages
        for call in m.get("tool_calls") or ()
        if call.get("id")
    }
    return [
        {**m, "name": names[m["tool_call_id"]]}
        if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in names
        else m
        for m in messages
    ]


def _inline(
    messages: list[dict[str, Any]],
    tools: list[Tool],
    choice: ToolChoice,
    parser: type[ToolParser],
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after_result = False
    for m in messages:
        if m["role"] == "tool":
            block = parser.render_result(m["content"])
            if after_result:  # results of one turn's calls come back in one user turn
                out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
            after_result = True
            continue
        after_result = False
        calls = [
            parser.render_call(call["function"]["name"], call["function"]["arguments"])
            for call in m.get("tool_calls") or ()
        ]
        m = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        if calls:
            m["content"] = "\n".join([m["content"], *calls] if m["content"] else calls)
        out.append(m)
    if tools:
        section = parser.instructions(tools)
        if choice.mode == "function":
            section += f"\n\nCall the function {choice.name} now."
        elif choice.mode == "required":
            section += "\n\nAnswer with a function call."
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{section}"}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out
