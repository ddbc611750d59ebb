"""Op specs: each op's contract, float64 reference and per-dtype tolerances.

Plugins implement these ops (``rustinfer_register_ops``); the registry refuses an op not in
:data:`SPECS`, and tests check every implementation against its spec's reference.
"""

from __future__ import annotations

from rustinfer.ops.activation import SILU_AND_MUL
from rustinfer.ops.attention import ATTENTION_DECODE, ATTENTION_PREFILL, KV_CACHE_STORE
from rustinfer.ops.basic import ARGMAX, EMBEDDING, LINEAR, LOGITS, PREPARE_LINEAR_WEIGHT
from rustinfer.ops.decode_layers import DECODE_LAYERS, DecodeDims
from rustinfer.ops.norm import FUSED_ADD_RMSNORM, RMSNORM
from rustinfer.ops.quant import (
    PREPARE_QUANTIZED_WEIGHT,
    QUANTIZED_LINEAR,
    QUANTIZED_LOGITS,
    QuantizedWeight,
)
from rustinfer.ops.rope import ROPE, build_cos_sin_cache, llama3_inv_freq
from rustinfer.ops.rope_store import ROPE_KV_STORE
from rustinfer.ops.spec import EXACT, OpSpec, Tolerance

SPECS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        EMBEDDING,
        RMSNORM,
        FUSED_ADD_RMSNORM,
        ROPE,
        ROPE_KV_STORE,
        SILU_AND_MUL,
        LINEAR,
        LOGITS,
        PREPARE_LINEAR_WEIGHT,
        QUANTIZED_LINEAR,
        QUANTIZED_LOGITS,
        PREPARE_QUANTIZED_WEIGHT,
        ARGMAX,
        KV_CACHE_STORE,
        ATTENTION_PREFILL,
        ATTENTION_DECODE,
        DECODE_LAYERS,
    )
}

__all__ = [
    "ARGMAX",
    "ATTENTION_DECODE",
    "ATTENTION_PREFILL",
    "DECODE_LAYERS",
    "EMBEDDING",
    "EXACT",
    "FUSED_ADD_RMSNORM",
    "KV_CACHE_STORE",
    "LINEAR",
    "LOGITS",
    "PREPARE_LINEAR_WEIGHT",
    "PREPARE_QUANTIZED_WEIGHT",
    "QUANTIZED_LINEAR",
    "QUANTIZED_LOGITS",
    "RMSNORM",
    "ROPE",
    "ROPE_KV_STORE",
    "SILU_AND_MUL",
    "SPECS",
    "OpSpec",
    "QuantizedWeight",
    "DecodeDims",
    "Tolerance",
    "build_cos_sin_cache",
    "llama3_inv_freq",
]
