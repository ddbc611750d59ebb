"""The gated MLP activation spec: ``silu_and_mul`` over a fused gate/up projection."""

from __future__ import annotations

import torch

from rustinfer.ops.spec import OpSpec, Tolerance


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in float64, with gate = x[:, :I] and up = x[:, I:]."""
    x64 = x.to(torch.float64)  # [T, 2I]
    inter = x64.shape[-1] // 2
    gate, up = x64[..., :inter], x64[..., inter:]
    return gate * torch.sigmoid(gate) * up


SILU_AND_MUL = OpSpec(
    name="silu_and_mul",
    doc="""silu_and_mul(x) -> out

    x:   [T, 2*I] float, gate in columns [0, I), up in [I, 2I) (the fused gate/up projection's
         output); rows may be strided.
    out: [T, I], x's dtype, contiguous: silu(x[:, :I]) * x[:, I:], silu(g) = g * sigmoid(g).

    Inputs are exact in their dtype, so the only error is the computation's own rounding; every
    step is a product or quotient (no cancellation), hence relative tolerances. Implementations may
    round silu to the dtype before the product (two roundings). Tolerances assume |x| <= 32.
    """,
    reference=silu_and_mul_reference,
    tolerances={
        torch.float64: Tolerance(
            0.0,
            2.0**-48,
            "float64 exp, add, divide, two products: a few ulp (u64 = 2^-53) with margin",
        ),
        torch.float32: Tolerance(
            0.0,
            2.0**-20,
            "fp32: vectorised exp (<= ~2 ulp), 1 + e, the division and two products, ~6 ulp = "
            "12 u32 = 2^-20.4; 2^-20 with no further margin",
        ),
        torch.bfloat16: Tolerance(
            0.0,
            2.5 * 2.0**-8,
            "silu rounded to bf16 (u = 2^-8), the product rounded again (u), fp32 inner work "
            "~2^-20: 2u and a quarter-u margin each side",
        ),
        torch.float16: Tolerance(
            2.0**-20 + 2.0**-24,
            2.5 * 2.0**-11,
            "silu rounded to fp16 (u = 2^-11), the product rounded again (u): 2u plus margin; "
            "atol: for gates below ~-9.7 silu is an fp16 subnormal, off by up to 2^-25 absolute, "
            "and the product scales that by |up| (2^-20 for |up| <= 32); a subnormal product is "
            "itself rounded to 2^-25 absolute: 2^-20 + 2^-24 with margin",
        ),
    },
)
