"""RMSNorm kernels in the HF LlamaRMSNorm form, so CPU runs match HF transformers bit for bit."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_WIDE_TYPES = (torch.float32, torch.float64)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (rows may be strided), weight [H] -> [T, H] in x's dtype.

    HF's order of operations: upcast to fp32, x * rsqrt(mean(x^2) + eps), round back to x's dtype,
    then times weight. float64 stays float64. Dtype checks skip no-op casts (each torch call is
    1-2 us on the CPU hot path).
    """
    dtype = x.dtype
    if dtype in _WIDE_TYPES:
        # No rounding between the scaling and the weight here, so torch's own rms_norm computes
        # the very same ops (checked bit for bit on float32 rows of 64-2048) in one call.
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    xf = x.float()
    inv_rms = xf.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()  # [T, 1]
    return weight * (xf * inv_rms).to(dtype)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual); the sum is rounded once to the input dtype.

    Out of place: the contract allows writing into ``residual``, but on the CPU the one saved
    allocation is not worth aliasing a caller's tensor.
    """
    residual_out = x + residual  # [T, H]
    return rmsnorm(residual_out, weight, eps), residual_out
