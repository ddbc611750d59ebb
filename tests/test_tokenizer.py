"""Tokenizers from GGUF metadata, tokenizer.json files and HF directories."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from loader_helpers import (
    TINY_LLAMA,
    hf_smollm2_tokenizer,
    llama3_tokenizer_json,
    smollm2_source,
    write_gguf,
    write_tokenizer_dir,
)
from tokenizers import Tokenizer as HFTokenizer

from rustinfer.config import config_from_hf
from rustinfer.errors import ModelLoadError
from rustinfer.loaders import load_model_source
from rustinfer.loaders.gguf_tokenizer import add_special_tokens, byte_level_bpe
from rustinfer.tokenizer import Tokenizer

QT = gguf.GGMLQuantizationType

TEXTS = [
    "Hello, world! How are you today?",
    "The capital of France is Paris.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "digits: 0 1 12 123 1234 12345 3.14159 1,000,000 2024-11-25",
    "tabs\tand\t\ttabs, newlines\n\n\nand   runs of    spaces   ",
    "   leading and trailing   ",
    "你好，世界！这是一个测试。",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "mixed: café naïve Zürich — “quotes” ‘single’ …",
    "It's we're they've I'm you'll he'd",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "",
]


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    tokenizer = smollm2_source().tokenizer
    assert tokenizer is not None
    return tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_gguf_tokenizer_matches_transformers(smollm2, text):
    reference = hf_smollm2_tokenizer()
    ids = smollm2.encode(text)
    assert ids == reference.encode(text)
    assert smollm2.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert smollm2.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_smollm2_whitespace_before_digits_follows_llama_cpp_not_transformers(smollm2):
    # llama.cpp's "smollm" pre-tokenizer (like SmolLM2's own tokenizer.json) isolates digits
    # before the GPT-2 regex, so "  " before a number stays one piece. transformers' GGUF loader
    # ignores tokenizer.ggml.pre=smollm and splits it as " " + " 12".
    ids = smollm2.encode("x  12")
    assert [smollm2.id_to_token(i) for i in ids] == ["x", "ĠĠ", "1", "2"]
    assert hf_smollm2_tokenizer().convert_ids_to_tokens(hf_smollm2_tokenizer().encode("x  12")) == [
        "x",
        "Ġ",
        "Ġ",
        "1",
        "2",
    ]
    assert smollm2.decode(ids) == "x  12"


def test_smollm2_special_tokens(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_token_id, smollm2.bos_token) == (1, "<|im_start|>")
    assert (smollm2.eos_token_ids, smollm2.eos_token) == ((2,), "<|im_end|>")
    assert not smollm2.add_bos
    assert all(smollm2.is_special(i) for i in range(17)) and not smollm2.is_special(17)
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2.decode(ids) == "user\nhi"
    assert smollm2.decode(np.array(ids)) == smollm2.decode(torch.tensor(ids)) == "user\nhi"
    assert smollm2.id_to_token(0) == "<|endoftext|>" and smollm2.id_to_token(10**6) is None


# ---- Llama 3 ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama3_json() -> dict:
    return json.loads(llama3_tokenizer_json().read_text(encoding="utf-8"))


def test_llama3_tokenizer_file(llama3_json):
    tok = Tokenizer.from_file(llama3_tokenizer_json())
    raw = HFTokenizer.from_file(str(llama3_tokenizer_json()))
    assert tok.vocab_size == 128256
    assert (tok.bos_token_id, tok.bos_token) == (128000, "<|begin_of_text|>")
    assert 128009 in tok.eos_token_ids and 128001 in tok.eos_token_ids
    assert tok.eos_token == "<|eot_id|>"
    assert not tok.add_bos  # this tokenizer.json's post-processor adds nothing
    for text in TEXTS:
        assert tok.encode(text) == raw.encode(text).ids


def test_gguf_llama_bpe_rebuilds_the_llama3_tokenizer(llama3_json):
    # What a Llama 3 GGUF stores (tokens by id, merges, pre="llama-bpe") must tokenize exactly
    # like the tokenizer.json it was converted from.
    vocab = dict(llama3_json["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in llama3_json["added_tokens"]})
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [3 if i >= 128000 else 1 for i in range(len(tokens))]
    rebuilt = byte_level_bpe(tokens, llama3_json["model"]["merges"], "llama-bpe")
    add_special_tokens(rebuilt, tokens, types)
    reference = HFTokenizer.from_file(str(llama3_tokenizer_json()))
    for text in [*TEXTS, "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"]:
        assert rebuilt.encode(text).ids == reference.encode(text).ids, text


# ---- small GGUF vocabularies -------------------------------------------------------------------

_BYTE_LEVEL = {
    "model": "gpt2",
    "pre": "default",
    "tokens": ["<|end|>", "h", "i", "Ġ", "hi", "Ġhi", "<think>"],
    "types": [3, 1, 1, 1, 1, 1, 4],
    "merges": ["h i", "Ġ hi"],
    "bos": 0,
    "eos": 0,
}


def _tiny_gguf_tokenizer(tmp_path, **changes) -> Tokenizer:
    tok = {**_BYTE_LEVEL, **changes}
    path = write_gguf(tmp_path / "t.gguf", {}, tokenizer=tok)
    return load_model_source(path).tokenizer


def test_gguf_token_types_and_add_bos(tmp_path):
    tok = _tiny_gguf_tokenizer(tmp_path, add_bos=True)
    assert tok.encode("hi hi<think>") == [0, 4, 5, 6]
    assert tok.encode("hi", add_special_tokens=False) == [4]
    assert tok.is_special(0) and not tok.is_special(6)  # user-defined: whole, but plain text
    assert tok.decode([0, 4, 6]) == "hi<think>"
    assert load_model_source(tmp_path / "t.gguf").config.vocab_size == 7  # from the token list


def test_unknown_pre_tokenizer_lists_supported(tmp_path):
    with pytest.raises(ModelLoadError, match="'mystery'") as info:
        _tiny_gguf_tokenizer(tmp_path, pre="mystery")
    assert all(name in str(info.value) for name in ("smollm", "llama-bpe", "default", "gpt2"))


def test_unknown_tokenizer_model_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="'bert'"):
        _tiny_gguf_tokenizer(tmp_path, model="bert")


_SPM_PIECES = [
    "▁", "t", "h", "e", "l", "o", "w", "r", "d", "a", "n", "i", "s", "he", "▁t", "▁the", "ll",
    "llo", "▁he", "▁hello", "▁w", "or", "▁wor", "ld", "▁world", "in", "▁a", "an", "▁an", "is",
    "▁is", "▁▁",
]  # fmt: skip


def test_gguf_sentencepiece_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *_SPM_PIECES]
    spm = {
        "model": "llama",
        "tokens": tokens,
        "types": [2, 3, 3, *[6] * 256, *[1] * len(_SPM_PIECES)],
        "scores": [0.0] * 259 + [-float(i) for i in range(len(_SPM_PIECES))],
        "bos": 1,
        "eos": 2,
        "unk": 0,
    }
    hp = {**TINY_LLAMA, "vocab": len(tokens)}
    path = write_gguf(tmp_path / "spm.gguf", {}, hp=hp, tokenizer=spm)
    ours = load_model_source(path).tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    assert ours.add_bos and ours.bos_token == "<s>" and ours.eos_token_ids == (2,)
    texts = ["hello world", " hello  world", "the  is an", "héllo wörld 1", "\nhello", "a</s>b"]
    for text in texts:
        # Pieces only: whether transformers adds BOS to a GGUF SentencePiece tokenizer by default
        # changed between its releases (5.17 does not, 5.24 does); ours follows llama.cpp (adds it).
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.encode(text) == [1, *ids]
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True), text


# ---- HF directories -------------------------------------------------------------------------


def test_hf_dir_reads_tokenizer_and_generation_config(tmp_path):
    write_tokenizer_dir(
        tmp_path,
        bos_template=True,
        tokenizer_config={"bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}},
        generation_config={"eos_token_id": [1, 3]},
    )
    config = config_from_hf(
        {"architectures": ["X"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "eos_token_id": 1}
    )  # fmt: skip
    tok = Tokenizer.from_hf_dir(tmp_path, config)
    assert tok.eos_token_ids == (1, 3) and tok.eos_token == "<|im_end|>"
    assert (tok.bos_token_id, tok.bos_token, tok.add_bos) == (0, "<s>", True)
    assert tok.encode("Hello")[0] == 0 and tok.encode("Hello", add_special_tokens=False)[0] != 0


@pytest.mark.parametrize(
    ("template", "declared", "expected"), [(True, False, False), (False, True, True)]
)
def test_declared_add_bos_overrides_the_post_processor(tmp_path, template, declared, expected):
    write_tokenizer_dir(
        tmp_path,
        bos_template=template,
        tokenizer_config={"bos_token": "<s>", "add_bos_token": declared},
    )
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.add_bos is expected
    ids = tok.encode("Hello world")
    assert ids.count(0) == int(expected) and (ids[0] == 0) is expected


def test_hf_dir_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    write_tokenizer_dir(tmp_path, bos_template=False, tokenizer_config={"bos_token": "<nope>"})
    with pytest.raises(ModelLoadError, match="<nope>"):
        Tokenizer.from_hf_dir(tmp_path)
