"""Which checkpoint tensors are matmul weights that may be held quantized, and quantizing them.

Only the per-layer projections are quantized (attention q/k/v/o, MLP gate/up/down): the
embedding is a gather (its rows are read one at a time, nothing to gain), and the LM head stays in
the model dtype because its logits feed sampling: ``logits`` promises a float32 result, and a
quantized head through the CPU's bf16 kernel would round every logit to bf16 (spacing 0.125 at
typical sizes), flipping near-ties. It is also the one matrix of a tied model shared with the
embedding, which would otherwise be held twice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import torch

from rustinfer.config import QuantizationConfig
from rustinfer.ops.quant import QuantizedWeight, quantize

__all__ = ["is_linear_weight", "quantize_weights"]

logger = logging.getLogger(__name__)

# HF and GGUF spellings of the per-layer projections of Llama-like decoders.
_LINEAR_WEIGHT = re.compile(
    r"(^model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight$)"
    r"|(^blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight$)"
)


def is_linear_weight(name: str) -> bool:
    """A per-layer projection matrix (HF or GGUF name), the tensors held quantized."""
    return _LINEAR_WEIGHT.match(name) is not None


def quantize_weights(
    weights: Iterator[tuple[str, torch.Tensor]],
    quantization: QuantizationConfig,
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """``(name, float tensor)`` pairs (best read in float32) -> projections quantized to
    ``quantization`` (int8 or int4), every other tensor cast to the model ``dtype``. A projection
    whose K does not split into the groups stays float, with a warning."""
    method, group = quantization.method, quantization.group_size
    for name, tensor in weights:
        if is_linear_weight(name) and tensor.dim() == 2:
            if tensor.shape[1] % group == 0 and tensor.shape[1] % 32 == 0:
                yield name, quantize(tensor, method, group)
                continue
            logger.warning(
                "%s: K=%d does not split into %s groups of %d; it stays %s",
                name,
                tensor.shape[1],
                method,
                group,
                str(dtype).removeprefix("torch."),
            )
        yield name, tensor.to(dtype)
