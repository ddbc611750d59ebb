"""``ModelConfig`` from GGUF metadata (``{arch}.*`` hyper-parameters, ``tokenizer.ggml.*`` ids)."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from rustinfer.config import ModelConfig, RopeScaling
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.dequant import dequantize_tensor
from rustinfer.loaders.gguf_meta import field, require_field
from rustinfer.loaders.gguf_reader import GGUFFile

__all__ = ["config_from_gguf"]

logger = logging.getLogger(__name__)

# general.file_type -> the dtype "--dtype auto" should pick. Quantized files have no natural dtype.
_FILE_DTYPES = {0: "float32", 1: "float16", 32: "bfloat16"}

# Published Llama 3 rope scalings. llama.cpp stores Llama 3.1+ scaling only as the precomputed
# per-frequency tensor rope_freqs.weight, so we recognise which of these produced it.
_KNOWN_LLAMA3_SCALINGS = (
    RopeScaling(8.0, 1.0, 4.0, 8192),  # Llama 3.1
    RopeScaling(32.0, 1.0, 4.0, 8192),  # Llama 3.2
    RopeScaling(16.0, 1.0, 4.0, 8192),  # Llama 3.3-era long-context variants
)


def _llama3_factors(scaling: RopeScaling, theta: float, rope_dim: int) -> torch.Tensor:
    """The divisor llama.cpp stores per rotary frequency for a Llama 3 scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    wavelen = 2 * math.pi / inv_freq
    orig = scaling.original_max_position_embeddings
    smooth = (orig / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    mid = 1.0 / ((1 - smooth) / scaling.factor + smooth)
    factors = torch.where(wavelen > orig / scaling.low_freq_factor, scaling.factor, mid)
    return torch.where(wavelen < orig / scaling.high_freq_factor, 1.0, factors)


def _rope_scaling(
    reader: GGUFFile, arch: str, theta: float, rope_dim: int
) -> tuple[RopeScaling | None, bool]:
    """(scaling, whether a rope_freqs tensor is present that no known scaling explains)."""
    kind = field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        raise ModelLoadError(
            f"GGUF file {reader.path} uses rope scaling {kind!r}; rustinfer supports "
            "Llama 3 scaling (stored by llama.cpp as rope_freqs.weight) or none"
        )
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None, False
    stored = dequantize_tensor(freqs, torch.float64)
    for candidate in _KNOWN_LLAMA3_SCALINGS:
        expected = _llama3_factors(candidate, theta, rope_dim)
        if expected.shape == stored.shape and torch.allclose(expected, stored, rtol=1e-4):
            return candidate, False
    logger.warning("rope_freqs.weight matches no known Llama 3 scaling; passing it as a weight")
    return None, True


def _float32_field(reader: GGUFFile, key: str, default: float) -> float:
    # GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that
    # round-trips the float32 is what the converter was given.
    return float(str(np.float32(field(reader, key, default))))


def _int_field(reader: GGUFFile, key: str, default: int | None = None) -> int | None:
    value = field(reader, key, default)
    if isinstance(value, list):  # per-layer values (some hybrid models): only uniform ones work
        if len(set(value)) != 1:
            raise ModelLoadError(f"GGUF key {key!r} varies per layer ({value}); not supported")
        value = value[0]
    return None if value is None else int(value)


def config_from_gguf(reader: GGUFFile) -> ModelConfig:
    """Read the hyper-parameters of a decoder-only GGUF model."""
    arch = str(require_field(reader, "general.architecture"))
    names = {t.name for t in reader.tensors}
    hidden = int(require_field(reader, f"{arch}.embedding_length"))
    n_heads = _int_field(reader, f"{arch}.attention.head_count")
    if n_heads is None:
        raise ModelLoadError(f"GGUF file {reader.path} lacks {arch}.attention.head_count")
    n_kv_heads = _int_field(reader, f"{arch}.attention.head_count_kv", n_heads)
    head_dim = _int_field(reader, f"{arch}.attention.key_length") or hidden // n_heads
    rope_dim = _int_field(reader, f"{arch}.rope.dimension_count") or head_dim
    theta = _float32_field(reader, f"{arch}.rope.freq_base", 10000.0)
    tokens = field(reader, "tokenizer.ggml.tokens")
    vocab = _int_field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if embd is None:
            raise ModelLoadError(f"GGUF file {reader.path} states no vocabulary size")
        vocab = int(embd.shape[0])  # torch order: [vocab, hidden]
    scaling, raw_rope_freqs = _rope_scaling(reader, arch, theta, rope_dim)
    eos_ids = [
        field(reader, f"tokenizer.ggml.{key}")
        for key in ("eos_token_id", "eot_token_id", "eom_token_id")
    ]
    file_type = field(reader, "general.file_type")
    # llama.cpp's converters write a window for the families that use one; the model refuses a
    # window it cannot run (rustinfer.models.decoder.sliding_window_refusal).
    window = _int_field(reader, f"{arch}.attention.sliding_window")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(require_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(require_field(reader, f"{arch}.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float32_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(field(reader, f"{arch}.context_length", 8192)),
        # llama.cpp drops output.weight when the LM head shares the embedding matrix.
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids if i is not None)),
        torch_dtype=_FILE_DTYPES.get(file_type),
        extra={
            "gguf_name": field(reader, "general.name"),
            "gguf_file_type": file_type,
            "rope_dim": rope_dim,
            "rope_freqs_tensor": raw_rope_freqs,
            **({"sliding_window": window} if window is not None else {}),
        },
    )
