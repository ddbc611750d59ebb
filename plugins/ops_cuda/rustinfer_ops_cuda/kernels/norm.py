"""RMSNorm kernels: ``rmsnorm`` and ``fused_add_rmsnorm`` (bf16 / fp16 / fp32).

Rounding follows the spec (the HF LlamaRMSNorm order, so token ids match HF transformers): the mean
square is accumulated in fp32, x is scaled in fp32 and rounded to x's dtype, and only then
multiplied by the weight and rounded once more (the fp32 product of two 16-bit floats is exact, so
for them that is the product's only rounding, as in torch; for fp32 it is the product's own).
``tl.rsqrt`` is a hardware approximation (a couple of ulp in fp32), as torch's CUDA rsqrt is; the
fp32 spec budgets for it.

Layout: a program owns ``ROWS`` rows. A row of up to ``MAX_FUSED_BLOCK`` elements stays in
registers (one read, one write); a wider row is walked twice in ``MAX_FUSED_BLOCK`` chunks (sum of
squares, then normalise), its second read mostly served from L2.
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
# Widest row kept whole in registers: 8192 fp32 values over 16 warps is 16 per thread, well clear
# of spilling; every Llama hidden size up to 8B is covered by the one-pass path.
MAX_FUSED_BLOCK = 8192
# Narrow rows are batched so that a program still moves about this many elements: a program per
# 64-element row would spend more time being scheduled than loading.
MIN_TILE = 2048
# Rows per program never exceed this (keeps the grid wide enough to fill the SMs for small T).
MAX_ROWS = 16
# One 16-byte vector of 16-bit values per thread per load; num_warps is sized from it below.
ELEMS_PER_THREAD = 8
MAX_WARPS = 16


def _num_warps(tile: int) -> int:
    """Enough warps that each thread loads ~one 16-byte vector per tile row chunk, 1..16."""
    return max(1, min(MAX_WARPS, tile // (32 * ELEMS_PER_THREAD)))


def _launch_params(hidden: int) -> tuple[int, int, bool, int]:
    """(BLOCK, ROWS, ONE_PASS, num_warps) for rows of ``hidden`` elements."""
    block = triton.next_power_of_2(hidden)
    if block > MAX_FUSED_BLOCK:
        return MAX_FUSED_BLOCK, 1, False, _num_warps(MAX_FUSED_BLOCK)
    rows = max(1, min(MAX_ROWS, MIN_TILE // block))
    return block, rows, True, _num_warps(block * rows)


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    n_rows,
    hidden,
    stride_x,
    stride_res,
    stride_out,
    eps,
    ADD_RESIDUAL: tl.constexpr,
    ONE_PASS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:
        # The next kernel (a GEMV that loads its weights before waiting) may launch at once.
        gdc_launch_dependents()
    # int64 row index: T * row stride overflows int32 for long prefills of wide rows.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
    row_ok = rows < n_rows
    x_rows = x_ptr + rows[:, None] * stride_x  # [ROWS, 1]
    res_rows = res_ptr + rows[:, None] * stride_res
    out_rows = out_ptr + rows[:, None] * stride_out
    dtype = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)  # [BLOCK]

    if ONE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < hidden)  # [ROWS, BLOCK]
        xv = tl.load(x_rows + cols[None, :], mask=mask, other=0.0)
        if ADD_RESIDUAL:
            rv = tl.load(res_rows + cols[None, :], mask=mask, other=0.0)
            # x + residual rounded once to the dtype: that is residual_out, and the norm reads it.
            xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(dtype)
            tl.store(res_rows + cols[None, :], xv, mask=mask)
        xf = xv.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=1) / hidden + eps)  # [ROWS]
        normed = (xf * inv_rms[:, None]).to(dtype)
        w = tl.load(w_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
        # 16-bit x 16-bit is exact in fp32, so this rounds once, like torch's bf16 product
        # (fp32: the product's own rounding, and the cast is a no-op).
        out = (normed.to(tl.float32) * w[None, :]).to(dtype)
        tl.store(out_rows + cols[None, :], out, mask=mask)
    else:
        # Pass 1: sum of squares, chunk by chunk, in a BLOCK-wide fp32 accumulator (its final
        # tl.sum is a tree, so the error grows like log2(H), as the spec's budget assumes).
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < hidden)
            xv = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
            if ADD_RESIDUAL:
                rv = tl.load(res_rows + c[None, :], mask=mask, other=0.0)
                xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(dtype)
            xf = xv.to(tl.float32)
            acc += xf * xf
        inv_rms = tl.rsqrt(tl.sum(acc, axis=1) / hidden + eps)  # [ROWS]
        # Pass 2: recompute x + residual from the untouched inputs (pass 1 stored nothing, so
        # there is no read-after-write through global memory), store it and the normalised row.
        for start in range(0, hidden, BLOCK):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < hidden)
            xv = tl.load(x_rows + c[None, :], mask=mask, other=0.0)
            if ADD_RESIDUAL:
                rv = tl.load(res_rows + c[None, :], mask=mask, other=0.0)
                xv = (xv.to(tl.float32) + rv.to(tl.float32)).to(dtype)
                tl.store(res_rows + c[None, :], xv, mask=mask)
            normed = (xv.to(tl.float32) * inv_rms[:, None]).to(dtype)
            w = tl.load(w_ptr + c, mask=c < hidden, other=0.0).to(tl.float32)
            out = (normed.to(tl.float32) * w[None, :]).to(dtype)
            tl.store(out_rows + c[None, :], out, mask=mask)


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_tensor("x", x, [None, None], DTYPES)
    check_tensor("weight", weight, [x.shape[1]], x.dtype)


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    n_rows, hidden = x.shape
    out = torch.empty((n_rows, hidden), dtype=x.dtype, device=x.device)
    if n_rows == 0 or hidden == 0:
        return out
    block, rows, one_pass, num_warps = _launch_params(hidden)
    add = residual is not None
    res = residual if add else x  # never read when ADD_RESIDUAL is off
    with launch_on(x.device):
        _rmsnorm_kernel[(triton.cdiv(n_rows, rows),)](
            x,
            res,
            weight,
            out,
            n_rows,
            hidden,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            float(eps),
            ADD_RESIDUAL=add,
            ONE_PASS=one_pass,
            ROWS=rows,
            BLOCK=block,
            TRIGGER=dependent_launch_supported(x.device),
            num_warps=num_warps,
        )
    return out


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, H] (rows may be strided, unit last-dim stride), weight [H] -> new contiguous [T, H]."""
    check_device(x=x, weight=weight)
    _check_norm_args(x, weight)
    return _launch(x, None, weight, eps)


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual) with x + residual written into ``residual`` IN PLACE
    (the spec allows it; the returned second tensor is ``residual`` itself). x is not modified."""
    check_device(x=x, residual=residual, weight=weight)
    _check_norm_args(x, weight)
    check_tensor("residual", residual, list(x.shape), x.dtype)
    out = _launch(x, residual, weight, eps)
    return out, residual
