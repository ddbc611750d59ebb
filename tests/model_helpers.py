"""Tiny random Llama checkpoints written to disk, so tests go through the real loaders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rustinfer_models_llama3.weights import hf_weight_shapes
from safetensors.torch import save_file

from rustinfer.config import config_from_hf
from rustinfer.engine.model_runner import ModelRunner, ScheduledSequence
from rustinfer.models.base import Model

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


def _forward_all(runner: ModelRunner, seq: ScheduledSequence) -> torch.Tensor:
    """Logits at every new position of one step (the runner itself returns only the last)."""
    step = runner.prepare([seq])
    hidden = runner.model(step.input_ids, step.positions, runner.kv_caches, step.attn)
    return runner.model.compute_logits(hidden)


@torch.inference_mode()
def prefill_logits(model: Model, ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position from one prefill pass over the paged cache."""
    blocks = -(-len(ids) // block_size)
    runner = ModelRunner(model, torch.device("cpu"), blocks, block_size)
    return _forward_all(runner, ScheduledSequence(ids, 0, list(range(blocks))))


@torch.inference_mode()
def incremental_logits(
    model: Model, ids: list[int], prefill_len: int, block_size: int = 5
) -> torch.Tensor:
    """Prefill ``prefill_len`` tokens, then decode the rest one by one; logits of every position."""
    blocks = -(-len(ids) // block_size)
    runner = ModelRunner(model, torch.device("cpu"), blocks, block_size)
    # A shuffled block table: the paged path must not assume contiguous blocks.
    table = torch.randperm(blocks, generator=torch.Generator().manual_seed(1)).tolist()
    rows = [_forward_all(runner, ScheduledSequence(ids[:prefill_len], 0, table))]
    for pos in range(prefill_len, len(ids)):
        rows.append(_forward_all(runner, ScheduledSequence([ids[pos]], pos, table)))
    return torch.cat(rows)
