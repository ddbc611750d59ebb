"""RMSNorm specs: ``rmsnorm`` and ``fused_add_rmsnorm`` (the residual add folded into the norm).

Tolerances are relative: every error source of an RMSNorm is multiplicative (a rounded product,
a rounded reciprocal square root of a sum of positive squares), so the error of each element scales
with that element and ``rtol`` alone carries the bound. ``atol`` only covers float16 subnormals,
where a tiny value cannot carry a relative error.

Unit roundoff u (half an ulp at 1.0): float64 2^-53, float32 2^-24, bfloat16 2^-8, float16 2^-11.
"""

from __future__ import annotations

import torch

from rustinfer.ops.spec import OpSpec, Tolerance

# float16 subnormals are spaced 2^-24 apart: a normalized value below 2^-14 (the smallest normal)
# is rounded to 2^-25 absolute, then multiplied by the weight and rounded again. 2^-22 covers
# |weight| <= 7 (trained norm weights are O(1)).
_FP16_SUBNORMAL_ATOL = 2.0**-22


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, all in float64."""
    x64 = x.to(torch.float64)  # [T, H]
    inv_rms = torch.rsqrt(x64.pow(2).mean(dim=-1, keepdim=True) + eps)  # [T, 1]
    return x64 * inv_rms * weight.to(torch.float64)


def fused_add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual), the sum kept in float64 without rounding."""
    residual_out = x.to(torch.float64) + residual.to(torch.float64)  # [T, H]
    return rmsnorm_reference(residual_out, weight, eps), residual_out


RMSNORM = OpSpec(
    name="rmsnorm",
    doc="""rmsnorm(x, weight, eps) -> out

    x:      [T, H] float; rows may have a stride != H (a view of a wider tensor).
    weight: [H], same dtype as x.
    eps:    float added to the mean square before the reciprocal square root.
    out:    [T, H], x's dtype, contiguous: x * rsqrt(mean(x^2, -1) + eps) * weight.
    Tolerances assume |weight| <= 7.

    Implementations accumulate the mean square in float32 (float64 for float64 inputs), scale x in
    that precision, round to x's dtype and then multiply by weight (the HF LlamaRMSNorm order, so
    end-to-end token ids match HF transformers). x is not modified.
    """,
    reference=rmsnorm_reference,
    tolerances={
        torch.float64: Tolerance(
            0.0,
            2.0**-40,
            "float64 throughout; only summation order differs from the reference: the mean of H "
            "positive squares is off by <= log2(H)*u64 relative, far below 2^-40",
        ),
        torch.float32: Tolerance(
            0.0,
            2.0**-19,
            "fp32 sum of H <= 8192 positive squares errs <= log2(H)=13 u relative with pairwise "
            "sums (halved by rsqrt), rsqrt <= 2 ulp, two rounded products: ~12 u32 = 2^-20.4; "
            "2^-19 leaves room for a sequential accumulator in another kernel",
        ),
        torch.bfloat16: Tolerance(
            0.0,
            2.5 * 2.0**-8,
            "two roundings to bf16 (the normalized x, then times weight), u = 2^-8 each, plus fp32 "
            "work ~2^-20: 2u and a quarter-u of margin",
        ),
        torch.float16: Tolerance(
            _FP16_SUBNORMAL_ATOL,
            2.5 * 2.0**-11,
            "two roundings to fp16 (the normalized x, then times weight), u = 2^-11 each, plus "
            "fp32 work ~2^-20: 2u and a quarter-u of margin; atol: a subnormal normalized value "
            "(off by 2^-25 absolute) times |weight| <= 7",
        ),
    },
)

FUSED_ADD_RMSNORM = OpSpec(
    name="fused_add_rmsnorm",
    doc="""fused_add_rmsnorm(x, residual, weight, eps) -> (out, residual_out)

    x, residual:  [T, H] float, same dtype; rows may be strided.
    weight:       [H], same dtype.
    residual_out: [T, H] = x + residual, rounded once to the input dtype.
    out:          [T, H] = rmsnorm(residual_out, weight, eps) as in ``rmsnorm``.

    Implementations MAY write residual_out into ``residual`` in place (the CUDA kernel does);
    callers always use the returned tensors and never read ``residual`` afterwards.
    """,
    reference=fused_add_rmsnorm_reference,
    tolerances={
        torch.float64: Tolerance(
            0.0,
            2.0**-40,
            "float64 throughout; the sum is rounded once (u64) and the norm differs only in "
            "summation order",
        ),
        torch.float32: Tolerance(
            0.0,
            2.0**-19,
            "implementations round x + residual once (u32) where the reference keeps it exact; "
            "that perturbs the norm by <= u32; add the rmsnorm fp32 budget (~12 u32): 2^-19",
        ),
        torch.bfloat16: Tolerance(
            0.0,
            4.5 * 2.0**-8,
            "implementations round x + residual once to bf16 (u = 2^-8) where the reference keeps "
            "it exact; that moves the mean square by <= 2u, so rsqrt by <= u; then rmsnorm's two "
            "roundings: 4u on out (residual_out needs only u) plus margin",
        ),
        torch.float16: Tolerance(
            _FP16_SUBNORMAL_ATOL,
            4.5 * 2.0**-11,
            "implementations round x + residual once to fp16 (u = 2^-11) where the reference keeps "
            "it exact; that moves rsqrt by <= u; then rmsnorm's two roundings: 4u on out plus "
            "margin; atol: a subnormal normalized value (off by 2^-25) times |weight| <= 7",
        ),
    },
)
