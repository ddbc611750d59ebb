"""RMSNorm for cpu float32 through one ``torch.linalg.vector_norm`` reduction."""

from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] float32 (rows may be strided), weight [H] float32 -> [T, H] float32, contiguous.

    mean(x^2) is ||x||^2 / H; the 2-norm accumulates in float32, its square root and the square
    taken back cost about one rounding each, far inside the spec's float32 tolerance (2^-19
    relative, rustinfer/ops/norm.py). x is read, never written.
    """
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise TypeError(f"this rmsnorm serves float32 only, got {x.dtype} and {weight.dtype}")
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(
            f"expected x [T, H] and weight [H], got {tuple(x.shape)}, {tuple(weight.shape)}"
        )
    hidden = x.shape[1]
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(hidden)  # [T, 1]
    # x * [T, 1] allocates a fresh contiguous [T, H] even when x is a strided view.
    return x * mean_square.add_(eps).rsqrt_() * weight
