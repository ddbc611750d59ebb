"""Chat templates: HF-compatible rendering, the built-in Llama 3 template, never a double BOS."""

from __future__ import annotations

import pytest
from loader_helpers import (
    hf_smollm2_tokenizer,
    llama3_tokenizer_json,
    smollm2_source,
    write_tokenizer_dir,
)

from rustinfer.chat_template import LLAMA3_CHAT_TEMPLATE, render_chat_template
from rustinfer.errors import ChatTemplateError
from rustinfer.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Count: 1 2 3\n\n  indented"},
    ],
]

# Exercises trim_blocks / lstrip_blocks: block tags on their own indented lines leave no trace.
MULTILINE_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
U: {{ message['content'] }}
    {% else %}
{{ message['role'] | upper }}: {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
A:{% endif %}"""


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_like_transformers(conversation, add_generation_prompt):
    ours = smollm2_source().tokenizer
    reference = hf_smollm2_tokenizer()
    expected_text = reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert ours.render_chat(conversation, add_generation_prompt) == expected_text
    expected_ids = reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=True
    )
    expected_ids = expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids
    assert ours.apply_chat_template(conversation, add_generation_prompt) == list(expected_ids)


def test_whitespace_control_matches_transformers():
    reference = hf_smollm2_tokenizer()
    ours = smollm2_source().tokenizer
    for conversation in CONVERSATIONS:
        for prompt in (True, False):
            expected = reference.apply_chat_template(
                conversation,
                chat_template=MULTILINE_TEMPLATE,
                add_generation_prompt=prompt,
                tokenize=False,
            )
            got = ours.render_chat(conversation, prompt, chat_template=MULTILINE_TEMPLATE)
            assert got == expected


@pytest.fixture(scope="module")
def llama3() -> Tokenizer:
    return Tokenizer.from_file(llama3_tokenizer_json())


def test_builtin_llama3_template_exact_text_and_one_bos(llama3):
    assert llama3.chat_template is None  # a bare tokenizer.json ships no template
    conversation = CONVERSATIONS[1]
    text = llama3.render_chat(conversation)
    assert text == (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCount: 1 2 3\n\n  indented<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = llama3.apply_chat_template(conversation)
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert ids[-4:] == llama3.encode("<|start_header_id|>assistant<|end_header_id|>\n\n")[-4:]


def test_builtin_template_with_content_parts_and_none(llama3):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]
    text = llama3.render_chat(messages, add_generation_prompt=False)
    assert text.endswith("user<|end_header_id|>\n\nab<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n<|eot_id|>")  # fmt: skip


_WITH_BOS = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
_WITHOUT_BOS = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("bos_template", [True, False])
@pytest.mark.parametrize("template", [_WITH_BOS, _WITHOUT_BOS])
def test_never_a_double_bos(tmp_path, bos_template, template):
    # bos_template: the tokenizer's own post-processor prepends <s> (id 0) on encode().
    write_tokenizer_dir(tmp_path, bos_template=bos_template, tokenizer_config={"bos_token": "<s>"})
    tok = Tokenizer.from_hf_dir(tmp_path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello world"}], chat_template=template
    )
    wants_bos = template is _WITH_BOS or bos_template
    assert ids.count(0) == int(wants_bos)
    assert (ids[0] == 0) is wants_bos


@pytest.mark.parametrize("where", ["inline", "named_list", "jinja_file"])
def test_hf_dir_template_sources(tmp_path, where):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    config = {"bos_token": "<s>"}
    if where == "inline":
        config["chat_template"] = template
    elif where == "named_list":
        config["chat_template"] = [
            {"name": "tool_use", "template": "tools!"},
            {"name": "default", "template": template},
        ]
    else:
        config["chat_template"] = "ignored: chat_template.jinja takes precedence"
        (tmp_path / "chat_template.jinja").write_text(template)
    write_tokenizer_dir(tmp_path, bos_template=False, tokenizer_config=config)
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "[hi]"


def test_llama3_template_from_a_model_that_emits_bos_itself(llama3):
    ids = llama3.apply_chat_template(
        [{"role": "user", "content": "hi"}], chat_template=LLAMA3_CHAT_TEMPLATE
    )
    assert ids.count(128000) == 1 and ids[0] == 128000


# ---- the rendering environment --------------------------------------------------------------


def test_helpers_and_extra_variables():
    template = (
        "{{ strftime_now('%Y') | length }}|{{ tools | tojson }}|{{ custom }}|"
        "{{ messages[0]['content'] | tojson }}|{{ bos_token }}{{ eos_token }}"
    )
    text = render_chat_template(
        template,
        [{"role": "user", "content": "<a & b>"}],
        tools=[{"name": "f"}],
        custom="x",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert text == '4|[{"name": "f"}]|x|"<a & b>"|<s></s>'  # tojson does not HTML-escape


def test_tools_default_to_none():
    assert render_chat_template("{{ tools is none }}", []) == "True"


def test_raise_exception_becomes_chat_template_error():
    template = (
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    ("template", "pattern"),
    [
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages[0]['content'] + 1 }}", "TypeError"),
        ("{{ messages.append(1) }}", "SecurityError"),  # the sandbox is immutable
        ("{{ ''.__class__.__mro__ }}", "SecurityError|rendering"),
    ],
)
def test_template_failures_are_clear_errors(template, pattern):
    with pytest.raises(ChatTemplateError, match=pattern):
        render_chat_template(template, [{"role": "user", "content": "x"}])
