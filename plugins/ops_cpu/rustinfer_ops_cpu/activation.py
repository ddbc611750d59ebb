"""silu_and_mul over the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I] in x's dtype (two torch ops, no copies)."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]
