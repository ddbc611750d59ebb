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


_SLIDING_WINDOW_KEYS = ("sliding_window", "use_sliding_window", "max_window_layers")


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
        # Kept as written so a model can refuse attention it does not implement (the semantics
        # differ by family: rustinfer.models.decoder.sliding_window_refusal reads them).
        extra={key: text[key] for key in _SLIDING_WINDOW_KEYS if key in text},
    )


# ---- quantization ------------------------------------------------------------------------------

QUANTIZATION_METHODS = ("auto", "none", "gguf", "int8", "int4")
DEFAULT_GROUP_SIZE = 32  # the finest group torch's CPU kernel takes, and GGUF's block size


@dataclass(frozen=True)
class QuantizationConfig:
    """How matmul weights are held: ``none`` (dequantized to the model dtype), ``gguf`` (a GGUF
    file's Q8_0/Q4_0/Q4_1 tensors kept as shipped), ``int8``/``int4`` (a float checkpoint
    quantized group-wise at load, weight-only), or ``auto`` (``gguf`` for GGUF files, else
    ``none``). Written ``int4`` or ``int4-g64`` (group size 32, 64 or 128; default 32)."""

    method: str = "auto"
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def is_quantized(self) -> bool:
        return self.method in ("gguf", "int8", "int4")

    def __str__(self) -> str:
        if self.method in ("int8", "int4"):
            return f"{self.method}-g{self.group_size}"
        return self.method

    def for_format(self, source_format: str) -> QuantizationConfig:
        """``auto`` made concrete for a checkpoint of ``source_format`` ("gguf", "safetensors",
        "dummy"); a combination that cannot work raises ValueError naming what would."""
        if self.method == "auto":
            return dataclasses.replace(self, method="gguf" if source_format == "gguf" else "none")
        if self.method == "gguf" and source_format != "gguf":
            raise ValueError(
                f"--quantization gguf keeps a GGUF file's quantized tensors, but this is a "
                f"{source_format} checkpoint: use --quantization int8 or int4 to quantize it at "
                "load, or none"
            )
        return self


def parse_quantization(spec: str | QuantizationConfig | None) -> QuantizationConfig:
    """``"int4"``, ``"int8-g128"``, ``"gguf"``, ``"none"``, ``"auto"`` or None (auto)."""
    if isinstance(spec, QuantizationConfig):
        return spec
    text = "auto" if spec is None else str(spec).strip().lower()
    method, sep, group = text.partition("-g")
    known = "auto, none, gguf, int8, int4 (optionally -g32, -g64 or -g128, e.g. int4-g64)"
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {spec!r}; use one of: {known}")
    if not sep:
        return QuantizationConfig(method)
    if method not in ("int8", "int4") or group not in ("32", "64", "128"):
        raise ValueError(
            f"bad quantization {spec!r}: a group size goes with int8/int4 only; {known}"
        )
    return QuantizationConfig(method, int(group))
