"""The ``decode_layers`` spec: every layer of a dense decoder's decode step in one op.

Why an op for a whole stack of layers: on a CPU, one decode token of a small model is hundreds
of op calls of a few thousand flops each, and the call and dispatch cost from Python (plus a
parallel region per matmul) is as large as the arithmetic. A device may run the stack as one
native call instead. The op is optional and may decline a model or a step (it returns None); the
model then runs its layers op by op, so nothing depends on it but speed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

from rustinfer.ops.activation import silu_and_mul_reference
from rustinfer.ops.attention import attention_decode_reference
from rustinfer.ops.basic import linear_reference
from rustinfer.ops.norm import fused_add_rmsnorm_reference
from rustinfer.ops.quant import QuantizedWeight, quantized_linear_reference
from rustinfer.ops.rope_store import rope_kv_store_reference
from rustinfer.ops.spec import OpSpec, Tolerance

__all__ = ["DECODE_LAYERS", "DecodeDims", "LayerStack", "decode_layers_reference"]


class LayerStack(list):
    """A model's per-layer tensor dicts, as ``decode_layers`` takes them.

    A model builds a new stack whenever its tensors change (at load, after ``.to()``), so an
    implementation may keep what it derives from the tensors (pointers, packed descriptors) in
    ``derived``, under its own name, for the stack's lifetime."""

    def __init__(self, layers: Iterable[dict[str, Any]] = ()) -> None:
        super().__init__(layers)
        self.derived: dict[str, Any] = {}


class DecodeDims(NamedTuple):
    """The shapes and constants a layer stack needs beyond its tensors."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float
    scale: float


def _linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None):
    if isinstance(weight, QuantizedWeight):
        return quantized_linear_reference(x, weight, bias)
    return linear_reference(x, weight, bias)


def decode_layers_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    layers: Sequence[dict[str, torch.Tensor | QuantizedWeight | None]],
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    dims: DecodeDims,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(last MLP output, residual stream, new caches), float64; the caches are clones.

    The decoder's layer loop (rustinfer.models.decoder) spelled with each op's reference, the
    quantized weights canonical."""
    hq, hkv, d, eps, scale = dims
    t = x.shape[0]
    residual = residual.to(torch.float64)
    out: torch.Tensor | None = None
    new_caches = []
    for i, (layer, (k_cache, v_cache)) in enumerate(zip(layers, kv_caches, strict=True)):
        if i > 0:
            assert out is not None
            x, residual = fused_add_rmsnorm_reference(out, residual, layer["input_norm"], eps)
        qkv = _linear(x, layer["qkv_weight"], layer.get("qkv_bias"))
        q = qkv[:, : hq * d].reshape(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].reshape(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].reshape(t, hkv, d)
        q, k_new, v_new = rope_kv_store_reference(
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
        )
        new_caches.append((k_new, v_new))
        o = attention_decode_reference(q, k_new, v_new, block_tables, seq_lens, scale)
        o = _linear(o.reshape(t, hq * d), layer["o_weight"], layer.get("o_bias"))
        x, residual = fused_add_rmsnorm_reference(o, residual, layer["post_attn_norm"], eps)
        gate_up = _linear(x, layer["gate_up_weight"], layer.get("gate_up_bias"))
        out = _linear(silu_and_mul_reference(gate_up), layer["down_weight"], layer.get("down_bias"))
    assert out is not None
    return out, residual, new_caches


DECODE_LAYERS = OpSpec(
    name="decode_layers",
    doc="""decode_layers(x, residual, layers, positions, cos_sin_cache, kv_caches, slot_mapping,
                  block_tables, seq_lens, dims) -> (mlp_out, residual) or None

    Every layer of a dense decoder (rustinfer.models.decoder) for one decode step: T sequences
    of one new token each.

    x:             [T, H] layer 0's input: the model's ``rmsnorm`` of the embedded tokens (the
                   first norm is the one the op-by-op path computes, so both paths share it).
    residual:      [T, H] the embedded tokens.
    layers:        a LayerStack (the decoder's ``_layers``), per layer a dict: input_norm,
                   post_attn_norm [H]; qkv_weight, o_weight, gate_up_weight, down_weight as this
                   device's ``linear`` or ``quantized_linear`` reads them; their biases or None;
                   q_norm, k_norm or None.
    positions, cos_sin_cache, slot_mapping: as in ``rope_kv_store``; kv_caches: per layer its
                   (k_cache, v_cache), written IN PLACE as ``rope_kv_store`` writes them.
    block_tables, seq_lens: as in ``attention_decode``.
    dims:          DecodeDims(num_q_heads, num_kv_heads, head_dim, eps, scale).
    Returns the last layer's MLP output and the residual stream before it, both [T, H] (the
    model's final norm adds them), or None when this implementation does not serve the model or
    the step; the model then runs the ops one by one.

    Optional: offered by a device whose ``quantized_linear`` prepared the weights (it reads their
    layout). Its tolerance is that of the ops it strings together, over a whole stack: the
    float64 reference is those ops' references in the same order.
    """,
    reference=decode_layers_reference,
    tolerances={
        torch.float64: Tolerance(
            2.0**-36,
            2.0**-40,
            "float64 ops with dequantized weights exact; a stack of float64 roundings",
        ),
        torch.bfloat16: Tolerance(
            2.0**-5, 2.0**-7, "quantized_linear's bf16 rules plus bf16 activations between ops"
        ),
        torch.float16: Tolerance(
            2.0**-5, 2.0**-7, "quantized_linear's fp16 rules plus fp16 activations between ops"
        ),
        # What quantized_linear's float32 rules admit for one matmul (2^-5 absolute for O(1)
        # outputs, 2^-8 relative), held for the whole stack: the norms rescale every layer's
        # input to O(1), so the errors do not compound. Measured on three random Q4_1, Q8_0 and
        # int4 layers (tests/ops/test_decode_layers.py): 2^-8.7 at most for outputs up to 2.7.
        torch.float32: Tolerance(
            2.0**-5,
            2.0**-8,
            "quantized_linear's float32 rules, held over a stack of layers",
        ),
    },
)
