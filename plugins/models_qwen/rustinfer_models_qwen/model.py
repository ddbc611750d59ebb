"""Qwen2/Qwen2.5 and Qwen3 (dense) on the core dense decoder: only their layouts differ."""

from __future__ import annotations

from rustinfer.config import ModelConfig
from rustinfer.models.decoder import DenseDecoderForCausalLM
from rustinfer.models.decoder_weights import DecoderLayout


class Qwen2ForCausalLM(DenseDecoderForCausalLM):
    """Llama's decoder with biases on the q, k and v projections (never on o or the MLP).

    HF's Qwen2 config has no switch for them: every Qwen2/Qwen2.5 checkpoint carries them, and
    llama.cpp writes them as ``attn_{q,k,v}.bias``. The LM head may be tied (0.5B-3B) or not.
    """

    @classmethod
    def decoder_layout(cls, config: ModelConfig) -> DecoderLayout:
        return DecoderLayout(qkv_bias=True)


class Qwen3ForCausalLM(DenseDecoderForCausalLM):
    """Llama's decoder with a per-head RMSNorm on q and k before rope, and no biases by default.

    ``head_dim`` is its own setting (Qwen3-0.6B: 128 with hidden 1024 and 16 heads); the config
    loaders read it (``head_dim``, GGUF ``attention.key_length``). ``attention_bias`` switches
    biases on q, k, v and o together, as in HF's Qwen3.
    """

    @classmethod
    def decoder_layout(cls, config: ModelConfig) -> DecoderLayout:
        return DecoderLayout(
            qkv_bias=config.attention_bias, o_bias=config.attention_bias, qk_norm=True
        )
