"""The LM head on cuBLAS with a float32 output (the ``logits`` op).

cuBLAS accumulates bf16/fp16 products in float32 either way; asking for a float32 output keeps
that accumulator instead of rounding it to bf16 (spacing 0.125 at typical logit sizes, enough to
flip argmax near-ties) and then widening it again.
"""

from __future__ import annotations

import torch


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K] bf16/fp16, weight [N, K] same dtype -> [T, N] float32."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"logits: x {tuple(x.shape)} and weight {tuple(weight.shape)} mismatch")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"logits: expected bf16/fp16 x and weight, got {x.dtype}, {weight.dtype}")
    return torch.mm(x, weight.t(), out_dtype=torch.float32)
