"""Quantized weights for tests, made the way checkpoints make them: GGUF formats through
gguf.quants (llama.cpp's reference encoder) and the loader's own block reader, ours through
rustinfer.ops.quant.quantize."""

from __future__ import annotations

import gguf
import numpy as np
import torch

from rustinfer.loaders.dequant import quantized_tensor
from rustinfer.loaders.gguf_reader import GGMLType, GGUFTensorInfo
from rustinfer.ops.quant import QuantizedWeight, quantize

GGUF_KINDS = {
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
    "q4_0": gguf.GGMLQuantizationType.Q4_0,
    "q4_1": gguf.GGMLQuantizationType.Q4_1,
}
FORMATS = ["q8_0", "q4_0", "q4_1", "int8", "int4"]


def make_weight(values: torch.Tensor, format: str, group_size: int = 32) -> QuantizedWeight:
    """``values`` [N, K] quantized to ``format`` (GGUF formats: group size 32)."""
    if format in ("int8", "int4"):
        return quantize(values, format, group_size)
    kind = GGUF_KINDS[format]
    data = gguf.quants.quantize(values.to(torch.float32).numpy(), kind)
    n, k = values.shape
    info = GGUFTensorInfo(
        "blk.0.ffn_up.weight", GGMLType(int(kind)), (k, n), data.reshape(-1).view(np.uint8)
    )
    weight = quantized_tensor(info)
    assert weight is not None
    return weight


def weight_values(n: int, k: int, offset: float = 0.0) -> torch.Tensor:
    """[N, K] float32 like a trained layer (rows of norm ~1, so x @ W.T is O(1) for randn x),
    plus a per-row ``offset`` (in the same unit) that makes the asymmetric formats' mins work."""
    w = torch.randn(n, k, dtype=torch.float64) * k**-0.5
    return (w + offset * k**-0.5 * torch.randn(n, 1, dtype=torch.float64)).to(torch.float32)
