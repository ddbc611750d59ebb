"""``silu_and_mul`` (bf16 / fp16 / fp32): silu(gate) * up over the fused gate/up projection output.

Rounding matches the CPU implementation (``F.silu(gate) * up`` in the input dtype): silu is
computed in fp32 and rounded to the dtype, then the product of two 16-bit values is formed exactly
in fp32 and rounded once more. fp32 inputs take silu in float64 instead (see ``_silu_dtype``) and
round it once to fp32, then the product rounds once in fp32.

Grid: (rows, column blocks). Each program reads BLOCK gate and BLOCK up values of one row and
writes BLOCK outputs; at T=4096, I=4096 that is 16k programs, plenty to keep every SM streaming.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rustinfer_ops_cuda.kernels.checks import check_device, check_tensor
from rustinfer_ops_cuda.kernels.dependent_launch import (
    dependent_launch_supported,
    gdc_launch_dependents,
)
from rustinfer_ops_cuda.kernels.launch import launch_on

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Columns per program: large enough that launch and index math are amortised over 2 KiB of
# output, small enough that a decode step (a handful of rows) still spreads over many programs.
MAX_BLOCK = 1024
# One 16-byte vector of 16-bit values per thread per load: BLOCK = 1024 -> 4 warps.
ELEMS_PER_THREAD = 8
MAX_WARPS = 8


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    inter,
    stride_x,
    stride_out,
    SILU_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:
        # The next kernel (the down projection's GEMV) may launch and load its weights now.
        gdc_launch_dependents()
    # int64: rows * stride overflows int32 for long prefills of wide MLPs (T * 2I > 2^31).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    x_row = x_ptr + row * stride_x
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(SILU_DTYPE)
    up = tl.load(x_row + inter + cols, mask=mask, other=0.0)
    # g / (1 + exp(-g)) as torch computes silu; for g << 0 exp overflows to inf and silu is -0.
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    out = (silu.to(tl.float32) * up.to(tl.float32)).to(dtype)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def _silu_dtype(dtype: torch.dtype) -> tl.dtype:
    """The precision silu is computed in: fp32 for 16-bit inputs (rounded to them afterwards),
    float64 for fp32 ones. Triton's fp32 ``tl.exp`` is ``ex2.approx`` of x * log2(e), and rounding
    that product alone costs up to 2^-19.5 relative at |x| = 32, past the fp32 spec's 2^-20; the
    float64 exp is libdevice's, good to an fp64 ulp. This kernel is bound by memory, not by the
    few float64 operations per element."""
    return tl.float64 if dtype == torch.float32 else tl.float32


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (rows may be strided, unit last-dim stride) -> new contiguous [T, I]."""
    check_device(x=x)
    check_tensor("x", x, [None, None], DTYPES)
    n_rows, width = x.shape
    if width % 2:
        raise ValueError(f"x has shape {list(x.shape)}: its last dim (gate | up) must be even")
    inter = width // 2
    out = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    if n_rows == 0 or inter == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(inter))
    num_warps = max(1, min(MAX_WARPS, block // (32 * ELEMS_PER_THREAD)))
    grid = (n_rows, triton.cdiv(inter, block))
    with launch_on(x.device):
        _silu_and_mul_kernel[grid](
            x,
            out,
            inter,
            x.stride(0),
            out.stride(0),
            SILU_DTYPE=_silu_dtype(x.dtype),
            BLOCK=block,
            TRIGGER=dependent_launch_supported(x.device),
            num_warps=num_warps,
        )
    return out
