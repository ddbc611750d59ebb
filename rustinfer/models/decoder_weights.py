"""Checkpoint tensor names (HF and GGUF spellings) mapped onto the packed dense-decoder layout.

The decoder keeps one fused QKV matrix and one fused gate/up matrix per layer, so a checkpoint
tensor lands in a *slice* of a packed parameter: ``WeightSlot`` says which rows. Llama, Mistral,
Qwen2 and Qwen3 checkpoints share these spellings (llama.cpp's converter gives them one GGUF naming
too); which optional tensors a model has (biases, per-head q/k norms) is its ``DecoderLayout``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rustinfer.config import ModelConfig

__all__ = [
    "IGNORED",
    "DecoderLayout",
    "WeightSlot",
    "decoder_weight_shapes",
    "slot_for",
    "to_hf_name",
]


@dataclass(frozen=True)
class DecoderLayout:
    """Which optional tensors a dense decoder layer carries, beyond the Llama core set."""

    qkv_bias: bool = False  # q/k/v projections add a bias (Qwen2 always; Llama if attention_bias)
    o_bias: bool = False  # the output projection adds a bias (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # gate/up/down add biases (Llama with mlp_bias)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)


@dataclass(frozen=True)
class WeightSlot:
    param: str  # name of the packed parameter in the model
    row_start: int  # first row of the slice along dim 0 (0 for unpacked tensors)
    rows: int | None  # number of rows; None = the whole parameter


_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")

# GGUF per-layer names -> HF per-layer names.
_GGUF_TO_HF_LAYER = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GGUF_TO_HF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors some checkpoints carry that the decoder derives itself.
IGNORED = re.compile(r"(rotary_emb\.inv_freq$|^rope_freqs\.weight$)")

# Per-layer HF tensors that land whole in one parameter of layer i ("layers.{i}.<param>").
_SINGLE = {
    "self_attn.o_proj.weight": "o_weight",
    "self_attn.o_proj.bias": "o_bias",
    "self_attn.q_norm.weight": "q_norm",
    "self_attn.k_norm.weight": "k_norm",
    "mlp.down_proj.weight": "down_weight",
    "mlp.down_proj.bias": "down_bias",
    "input_layernorm.weight": "input_norm",
    "post_attention_layernorm.weight": "post_attn_norm",
}


def to_hf_name(name: str) -> str:
    """A GGUF tensor name in HF spelling; HF names pass through unchanged."""
    if name in _GGUF_TO_HF_GLOBAL:
        return _GGUF_TO_HF_GLOBAL[name]
    m = _GGUF_LAYER.match(name)
    if m and m.group(2) in _GGUF_TO_HF_LAYER:
        return f"model.layers.{m.group(1)}.{_GGUF_TO_HF_LAYER[m.group(2)]}"
    return name


def slot_for(hf_name: str, config: ModelConfig) -> WeightSlot | None:
    """Where an HF-named tensor goes, or None if no dense decoder has such a tensor.

    The caller checks the slot against the parameters its layout actually made.
    """
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    if hf_name == "model.embed_tokens.weight":
        return WeightSlot("embed_tokens", 0, None)
    if hf_name == "model.norm.weight":
        return WeightSlot("norm", 0, None)
    if hf_name == "lm_head.weight":
        return WeightSlot("lm_head", 0, None)
    m = _HF_LAYER.match(hf_name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= config.num_hidden_layers:
        return None
    p = f"layers.{i}."
    packed = {
        "self_attn.q_proj": ("qkv", 0, q_rows),
        "self_attn.k_proj": ("qkv", q_rows, kv_rows),
        "self_attn.v_proj": ("qkv", q_rows + kv_rows, kv_rows),
        "mlp.gate_proj": ("gate_up", 0, inter),
        "mlp.up_proj": ("gate_up", inter, inter),
    }
    module, _, kind = rest.rpartition(".")
    if module in packed and kind in ("weight", "bias"):
        target, start, rows = packed[module]
        return WeightSlot(f"{p}{target}_{kind}", start, rows)
    if rest in _SINGLE:
        return WeightSlot(p + _SINGLE[rest], 0, None)
    return None


def decoder_weight_shapes(config: ModelConfig, layout: DecoderLayout) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this layout holds, HF spelling."""
    c = config
    h, d = c.hidden_size, c.head_dim
    q_rows, kv_rows = c.num_attention_heads * d, c.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q_rows, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv_rows, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv_rows, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q_rows)
        if layout.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q_rows,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_rows,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_rows,)
        if layout.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if layout.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (c.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, c.intermediate_size)
        if layout.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (c.intermediate_size,)
            shapes[p + "mlp.up_proj.bias"] = (c.intermediate_size,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes
