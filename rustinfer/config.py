"""The model configuration every loader produces and every model plugin consumes.

Loaders parse HF ``config.json`` (flat, or nested under ``text_config``) and GGUF metadata into this one
dataclass, so a model plugin never parses file formats itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of a decoder-only transformer."""

    architecture: str  # HF ``architectures[0]`` or GGUF ``general.architecture``
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the checkpoint's own dtype, used by ``--dtype auto``
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def parse_rope_scaling(raw: dict[str, Any] | None) -> RopeScaling | None:
    """Read HF ``rope_scaling``; ``None`` or a default/linear-free entry means no scaling."""
    if not raw:
        return None
    rope_type = raw.get("rope_type", raw.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r}; supported: 'llama3' (or none)"
        )
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_hf(raw: dict[str, Any]) -> ModelConfig:
    """Build a :class:`ModelConfig` from a HF ``config.json`` dict (flat or with ``text_config``)."""
    arch = (raw.get("architectures") or [None])[0]
    text = raw.get("text_config") or raw
    if arch is None:
        arch = (text.get("architectures") or [None])[0]
    if arch is None:
        raise ValueError("config.json names no architecture (expected 'architectures': [...])")
    missing = [
        k
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        if k not in text
    ]
    if missing:
        raise ValueError(f"config.json lacks required keys: {', '.join(missing)}")
    n_heads = int(text["num_attention_heads"])
    rope_params = text.get("rope_parameters") or {}
    rope_scaling_raw = text.get("rope_scaling") or (
        rope_params if rope_params.get("rope_type", "default") != "default" else None
    )
    rope_theta = text.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(text["vocab_size"]),
        hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]),
        num_hidden_layers=int(text["num_hidden_layers"]),
        num_attention_heads=n_heads,
        num_key_value_heads=int(text.get("num_key_value_heads") or n_heads),
        head_dim=int(text.get("head_dim") or text["hidden_size"] // n_heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        rope_scaling=parse_rope_scaling(rope_scaling_raw),
        max_position_embeddings=int(text.get("max_position_embeddings", 8192)),
        tie_word_embeddings=bool(
            text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        ),
        attention_bias=bool(text.get("attention_bias", False)),
        mlp_bias=bool(text.get("mlp_bias", False)),
        bos_token_id=text.get("bos_token_id", raw.get("bos_token_id")),
        eos_token_ids=_as_id_tuple(text.get("eos_token_id", raw.get("eos_token_id"))),
        torch_dtype=text.get("torch_dtype") or text.get("dtype") or raw.get("torch_dtype"),
    )
