"""Random weights at real shapes (the "dummy" load format), for benchmarks without checkpoints."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from rustinfer.config import ModelConfig, config_from_hf
from rustinfer.errors import ModelLoadError
from rustinfer.loaders.source import ModelSource, parse_dtype
from rustinfer.tokenizer import Tokenizer

__all__ = ["dummy_source", "dummy_weights"]


def _name_seed(seed: int, name: str) -> int:
    # A seed per tensor name: a tensor's values do not depend on which other tensors are generated
    # or in what order (a model may ask for a subset, or in another order).
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _is_norm_scale(name: str, shape: tuple[int, ...]) -> bool:
    # input_layernorm.weight, model.norm.weight, blk.0.attn_norm.weight, output_norm.weight, ...
    return len(shape) == 1 and "norm" in name and not name.endswith(".bias")


def dummy_weights(
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype,
    seed: int = 0,
    std: float = 0.02,
    *,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every name: N(0, std), norm scales 1 + N(0, std / 10).

    Norm weights near one keep activations at a sane scale through many layers. Deterministic for a
    seed per (name, device type); values are drawn in float32 so every ``dtype`` rounds the same
    numbers. ``device="cuda"`` generates on the GPU, which is much faster at 8B shapes.
    """
    dtype = parse_dtype(dtype)
    generator = torch.Generator(device=device)
    for name, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        generator.manual_seed(_name_seed(seed, name))
        values = torch.randn(shape, generator=generator, dtype=torch.float32, device=device)
        norm = _is_norm_scale(name, shape)
        values.mul_(std / 10 if norm else std)
        if norm:
            values.add_(1.0)
        yield name, values.to(dtype)


def dummy_source(
    config: ModelConfig | Mapping[str, Any], tokenizer: Tokenizer | None = None
) -> ModelSource:
    """A "dummy" ModelSource from a config (a ModelConfig or a HF config.json dict)."""
    if not isinstance(config, ModelConfig):
        try:
            config = config_from_hf(dict(config))
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"invalid model config: {exc}") from exc
    return ModelSource(path=None, format="dummy", config=config, tokenizer=tokenizer)
