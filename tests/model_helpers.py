"""Tiny random Llama checkpoints written to disk, so tests go through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rustinfer_models_llama3.weights import hf_weight_shapes
from safetensors.torch import save_file

from rustinfer.config import config_from_hf
from rustinfer.models.base import Model
from rustinfer.runtime.kv_cache import allocate_kv_caches, single_sequence_metadata

ROPE_SCALING = {
    # original_max 16 with head_dim 8 puts the four frequencies in all three llama3 regimes
    # (kept, smoothed, divided by factor), so the test exercises every branch.
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_config(
    rope_scaling: bool = False, tied: bool = False, kv_heads: int = 2, layers: int = 2
) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 97,
        "hidden_size": 48,
        "intermediate_size": 76,
        "num_hidden_layers": layers,
        "num_attention_heads": 6,
        "num_key_value_heads": kv_heads,
        "head_dim": 8,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": tied,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    if rope_scaling:
        cfg["rope_scaling"] = dict(ROPE_SCALING)
    return cfg


def random_weights(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights at a scale where every layer matters (HF's 0.02 init makes logits nearly flat)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_weight_shapes(config_from_hf(cfg)).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = shape[-1]
            out[name] = torch.randn(shape, generator=gen) / fan_in**0.5
    return out


def write_checkpoint(directory: Path, cfg: dict, weights: dict[str, torch.Tensor]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory


@torch.inference_mode()
def prefill_logits(model: Model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position from one prefill pass over the paged cache."""
    n = len(ids)
    blocks = -(-n // block_size)
    caches = allocate_kv_caches(model, blocks, block_size, torch.device("cpu"))
    table = torch.arange(blocks, dtype=torch.int32)
    attn = single_sequence_metadata(0, n, table, block_size)
    hidden = model(torch.tensor(ids), torch.arange(n), caches, attn)
    return model.compute_logits(hidden)


@torch.inference_mode()
def incremental_logits(
    model: Model, ids: list[int], prefill_len: int, block_size: int = 5
) -> torch.Tensor:
    """Prefill ``prefill_len`` tokens, then decode the rest one by one; logits of every position."""
    n = len(ids)
    blocks = -(-n // block_size)
    caches = allocate_kv_caches(model, blocks, block_size, torch.device("cpu"))
    # A shuffled block table: the paged path must not assume contiguous blocks.
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    attn = single_sequence_metadata(0, prefill_len, table, block_size)
    rows = [
        model.compute_logits(
            model(torch.tensor(ids[:prefill_len]), torch.arange(prefill_len), caches, attn)
        )
    ]
    for pos in range(prefill_len, n):
        attn = single_sequence_metadata(pos, 1, table, block_size)
        hidden = model(torch.tensor([ids[pos]]), torch.tensor([pos]), caches, attn)
        rows.append(model.compute_logits(hidden))
    return torch.cat(rows)
