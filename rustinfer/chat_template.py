"""Chat templates: render a conversation into the prompt text a chat model was trained on.

Templates are Jinja2 source shipped with the model (``tokenizer_config.json``,
``chat_template.jinja`` or GGUF ``tokenizer.chat_template``). They are untrusted code, so they run
in Jinja2's immutable sandbox with the whitespace options and helpers HF transformers gives them;
templates written for ``transformers.apply_chat_template`` then render identically here.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rustinfer.errors import ChatTemplateError

__all__ = [
    "LLAMA3_CHAT_TEMPLATE",
    "compile_chat_template",
    "render_chat_template",
    "template_variables",
]

# The Llama 3 instruct format, used when a model ships no template of its own:
#   <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>...
# Content may be a string or a list of OpenAI-style parts, of which the text parts are joined.
LLAMA3_CHAT_TEMPLATE = r"""{{- bos_token if bos_token else '' -}}
{%- for message in messages -%}
    {%- if message['content'] is none -%}
        {%- set text = '' -%}
    {%- elif message['content'] is string -%}
        {%- set text = message['content'] -%}
    {%- else -%}
        {%- set text = message['content'] | selectattr('type', 'equalto', 'text')
            | map(attribute='text') | join('') -%}
    {%- endif -%}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' -}}
    {{- text | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject a conversation (e.g. roles that do not alternate).
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    # Llama 3.1+ templates put today's date into the system prompt.
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes '<', '>' and '&', which would corrupt tool schemas in prompts;
    # HF's variant does not, and templates are written against HF's.
    return json.dumps(
        value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a template once; a syntax error becomes a :class:`ChatTemplateError`."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one"
        ) from exc


@functools.lru_cache(maxsize=32)
def template_variables(source: str) -> frozenset[str]:
    """The names a template reads from its context (``messages``, ``tools``, ...): whether it can
    render tool definitions is whether it reads ``tools``."""
    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(source)))
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not compile (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one"
        ) from exc


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template``; a failure inside it becomes a ChatTemplateError."""
    compiled = compile_chat_template(template)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            tools=tools,
            **kwargs,
        )
    except ChatTemplateError:
        raise
    except Exception as exc:
        # Template code is the model author's: any error in it (undefined name, a list where a
        # string was expected, a sandbox violation) is a template problem, not a rustinfer bug.
        raise ChatTemplateError(
            f"rendering the chat template failed: {type(exc).__name__}: {exc}; check the messages "
            "(roles, string content) against what this model's template expects"
        ) from exc
