"""Qwen2/Qwen2.5 and Qwen3 (rustinfer-models-qwen) against HF transformers and the float64 reference.

Checkpoints are tiny random HF models saved by transformers itself, at odd sizes and several GQA
ratios, tied and untied LM heads, with and without attention biases; GGUF files are written from
the same weights under gguf's own HF -> GGUF tensor-name map.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from hf_family_helpers import (
    FLOAT32_TOL,
    PROMPT,
    PROMPTS,
    as_numpy,
    build_hf,
    check_float32_against_hf,
    check_float64_against_reference,
    gguf_tokenizer_fields,
    hf_greedy,
    hf_logits,
    hf_state,
    llm_greedy,
    reference_for,
    save_hf,
)
from loader_helpers import TINY_SPECIALS, tiny_trained_tokenizer, write_gguf
from model_helpers import prefill_logits

from rustinfer.errors import ModelLoadError
from rustinfer.llm import LLM
from rustinfer.runtime.loading import load_model

CONFIGS = {
    # Qwen2 always carries q/k/v biases (o has none); heads * head_dim == hidden, as HF's Qwen2 has it.
    "qwen2_gqa5_untied": (
        "Qwen2",
        dict(
            hidden_size=30,
            intermediate_size=46,
            num_hidden_layers=2,
            num_attention_heads=5,
            num_key_value_heads=1,
        ),
    ),
    "qwen2_mha_tied_3layers": (
        "Qwen2",
        dict(
            hidden_size=30,
            intermediate_size=38,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=3,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
    ),
    # Qwen3: head_dim is its own setting (14 and 10 here, hidden / heads would be 6 and 6.5).
    "qwen3_gqa2_tied_nobias": (
        "Qwen3",
        dict(
            hidden_size=36,
            intermediate_size=46,
            num_hidden_layers=2,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=14,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3_gqa4_untied_bias": (
        "Qwen3",
        dict(
            hidden_size=26,
            intermediate_size=50,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=10,
            attention_bias=True,
        ),
    ),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def checkpoint(request, tmp_path_factory):
    family, settings = CONFIGS[request.param]
    hf = build_hf(family, seed=len(request.param), **settings)
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, path


def test_float32_logits_match_hf_transformers_and_reference(checkpoint):
    hf, path = checkpoint
    ours = check_float32_against_hf(path, hf, PROMPT)
    assert type(ours.model).__name__ == hf.config.architectures[0]


def test_float64_model_matches_reference(checkpoint):
    hf, path = checkpoint
    check_float64_against_reference(path, hf, PROMPT)


def test_greedy_generation_matches_hf_generate(checkpoint):
    hf, path = checkpoint
    prompts = [PROMPT, PROMPTS[1]]
    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_bytes=1 << 20)
    assert llm_greedy(llm, prompts, 12) == [hf_greedy(hf, p, 12) for p in prompts]


def test_batched_paged_engine_equals_single_requests_and_reference(checkpoint):
    hf, path = checkpoint
    # Blocks of 4 and a 7-token budget: prompts spread over many blocks, prefill is chunked and
    # mixed with other sequences' decodes.
    block = 4
    llm = LLM(
        str(path),
        device="cpu",
        dtype="float64",
        block_size=block,
        max_num_batched_tokens=7,
        kv_cache_bytes=1 << 20,
    )
    batched = llm_greedy(llm, PROMPTS, 6)
    singles = []
    for prompt in PROMPTS:
        alone = LLM.for_single_request(llm.loaded, len(prompt) + 6)
        singles.append(llm_greedy(alone, [prompt], 6)[0])
    assert batched == singles
    ref = reference_for(path, hf)
    assert batched == [ref.greedy(p, 6) for p in PROMPTS]


def test_dummy_load_format_builds_every_tensor(checkpoint):
    hf, path = checkpoint
    loaded = load_model(
        str(path / "config.json"), device="cpu", dtype="float32", load_format="dummy"
    )
    # The dummy shapes are the checkpoint's own: same names, same shapes as HF's state dict.
    assert type(loaded.model).weight_shapes(loaded.config) == {
        name: tuple(t.shape) for name, t in hf_state(hf).items()
    }
    logits = prefill_logits(loaded.model, PROMPT)
    assert torch.isfinite(logits).all() and logits.std() > 0


def test_missing_qkv_bias_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    family, settings = CONFIGS["qwen2_gqa5_untied"]
    path = save_hf(build_hf(family, **settings), tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        load_model(str(path), device="cpu", dtype="float32")


def test_qwen_sliding_window_is_refused_only_where_a_layer_slides(tmp_path):
    family, settings = CONFIGS["qwen2_gqa5_untied"]
    sliding = dict(settings, use_sliding_window=True, sliding_window=8)
    # max_window_layers=1 of 2: layer 1 would slide over 8 tokens.
    path = save_hf(build_hf(family, max_window_layers=1, **sliding), tmp_path / "slides")
    with pytest.raises(ModelLoadError, match=r"use_sliding_window=true.*not supported yet"):
        load_model(str(path), device="cpu", dtype="float32")
    # Every layer below max_window_layers: HF runs full attention everywhere, and so do we.
    hf = build_hf(family, max_window_layers=2, **sliding)
    path = save_hf(hf, tmp_path / "full")
    ours = load_model(str(path), device="cpu", dtype="float32")
    torch.testing.assert_close(
        prefill_logits(ours.model, PROMPT).double(), hf_logits(hf, PROMPT), **FLOAT32_TOL
    )


# ---- GGUF ---------------------------------------------------------------------------------------

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["Hello world 12345", "def add(a, b):\n    return a + b\n", "quick  brown\n\nfox 2024!"]

GGUF_CONFIGS = {
    "qwen2": (
        "Qwen2",
        dict(hidden_size=30, intermediate_size=46, num_attention_heads=5, num_key_value_heads=1),
    ),
    "qwen3": (
        "Qwen3",
        dict(
            hidden_size=36,
            intermediate_size=46,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=14,
            tie_word_embeddings=True,
        ),
    ),
}


def write_hf_as_gguf(path, arch: str, hf, tokenizer: dict) -> None:
    """The HF model's tensors (F32) under llama.cpp's names, with its hyper-parameters."""
    c = hf.config
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(model_arch, c.num_hidden_layers)
    tensors = {}
    for name, value in hf_state(hf).items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        tensors[gguf_name] = (as_numpy(value), gguf.GGMLQuantizationType.F32)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    hp = {
        "hidden": c.hidden_size,
        "ffn": c.intermediate_size,
        "heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": head_dim,
        "layers": c.num_hidden_layers,
        "vocab": c.vocab_size,
    }
    u32 = gguf.GGUFValueType.UINT32
    extra = {f"{arch}.attention.key_length": (head_dim, u32)}
    extra[f"{arch}.attention.value_length"] = (head_dim, u32)
    write_gguf(path, tensors, arch=arch, hp=hp, extra=extra, tokenizer=tokenizer)


@pytest.mark.parametrize("arch", list(GGUF_CONFIGS))
def test_gguf_round_trip_model_tokenizer_and_chat_template(tmp_path, arch):
    transformers = pytest.importorskip("transformers")
    hf_tok = tiny_trained_tokenizer(bos_template=False)
    fields = gguf_tokenizer_fields(hf_tok, TINY_SPECIALS)
    im_end = fields["tokens"].index("<|im_end|>")
    tokenizer = fields | {"pre": "qwen2", "eos": im_end, "chat_template": CHATML}
    family, settings = GGUF_CONFIGS[arch]
    # write_gguf's hyper-parameters: rope base 500000, RMS eps 1e-6, context 256.
    hf = build_hf(
        family,
        seed=3,
        vocab_size=len(fields["tokens"]),
        num_hidden_layers=2,
        rope_theta=500000.0,
        **settings,
    )
    path = tmp_path / f"{arch}.gguf"
    write_hf_as_gguf(path, arch, hf, tokenizer)

    ours = load_model(str(path), device="cpu", dtype=torch.float32)
    assert ours.config.architecture == arch
    assert ours.config.head_dim == settings.get("head_dim", 6)
    assert ours.config.tie_word_embeddings == settings.get("tie_word_embeddings", False)
    assert im_end in ours.config.eos_token_ids
    # transformers builds its own tokenizer from the file (its qwen2 split): an independent oracle.
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ids) == text
    assert len(ours.tokenizer.encode("12345")) == 5  # Qwen's split: one piece per digit
    messages = [{"role": "user", "content": "Hello world"}]
    rendered = ours.tokenizer.render_chat(messages)
    assert rendered == "<|im_start|>user\nHello world<|im_end|>\n<|im_start|>assistant\n"
    chat_ids = ours.tokenizer.apply_chat_template(messages)
    assert chat_ids[0] == fields["tokens"].index("<|im_start|>")

    prompt = ours.tokenizer.encode(TEXTS[1])
    expected = hf_logits(hf, prompt)
    torch.testing.assert_close(prefill_logits(ours.model, prompt).double(), expected, **FLOAT32_TOL)
    llm = LLM(str(path), device="cpu", dtype="float32", kv_cache_bytes=1 << 20)
    assert llm_greedy(llm, [prompt, chat_ids], 10) == [
        hf_greedy(hf, prompt, 10),
        hf_greedy(hf, chat_ids, 10),
    ]
