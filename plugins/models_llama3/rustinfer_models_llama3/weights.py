"""Which optional tensors a Llama checkpoint has; the name maps are the core decoder's."""

from __future__ import annotations

from rustinfer.config import ModelConfig
from rustinfer.models.decoder_weights import DecoderLayout, decoder_weight_shapes


def llama_layout(config: ModelConfig) -> DecoderLayout:
    """HF Llama's ``attention_bias`` covers q/k/v and o alike; ``mlp_bias`` gate, up and down."""
    return DecoderLayout(
        qkv_bias=config.attention_bias, o_bias=config.attention_bias, mlp_bias=config.mlp_bias
    )


def hf_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint holds, HF spelling."""
    return decoder_weight_shapes(config, llama_layout(config))
