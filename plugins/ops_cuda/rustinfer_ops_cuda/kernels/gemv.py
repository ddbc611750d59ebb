"""``linear`` and ``logits`` for the few-row matmuls of decode (bf16 / fp16): a Triton GEMV that loads its
weights before waiting on the kernel ahead of it.

A decode step at batch 1 reads every weight once; its matmuls are GEMVs whose small matrices
(a Llama-3.2-1B layer's q/k/v and o projections are 8-13 MB) stream in a few microseconds, so the
time between two kernels matters as much as the streaming. cuBLAS starts reading only when the
kernel ahead of it (an RMSNorm, the attention merge, SwiGLU) has finished. Here each program loads
its whole ``[BLOCK_N, K]`` weight tile into registers first: weights never depend on the kernel
ahead, so when the GEMV is launched as a programmatic dependent (Hopper, see
``dependent_launch.py``) those loads overlap the previous kernel's tail, and only then does the
program wait (``gdc_wait``) and read its activations. The sweep behind the launch settings is
``bench/gemv_sweep.py``; bench/E2E_NOTES.md has its figures.

Rows beyond ``MAX_ROWS`` (prefill, large decode batches) and tiles too wide for registers go to
cuBLAS, whose tensor-core GEMMs win once a weight tile is reused across many rows.

Rounding: each output is a float32 dot product (plus the bias in float32), rounded once to the
activation dtype, which is what the ``linear`` spec's reference does in its wider precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rustinfer_ops_cuda.kernels.checks import check_device, check_tensor
from rustinfer_ops_cuda.kernels.dependent_launch import (
    dependent_launch_supported,
    gdc_launch_dependents,
    gdc_wait,
)
from rustinfer_ops_cuda.kernels.launch import launch_on
from rustinfer_ops_cuda.kernels.torch_ops import logits as torch_logits

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Rows served by the register-tile GEMV. One: at batch 1 it took Llama-3.2-1B's decode step from
# 1.09 to 0.94 ms on an H200, but each further row adds a cross-thread reduction over the whole
# tile, and at 4 and 8 rows the step took 1.37 and 2.12 ms against cuBLAS's 1.09 and 1.11.
MAX_ROWS = 1
# What the kernel itself takes (its row loop is unrolled): tested there, not chosen by ``linear``.
KERNEL_MAX_ROWS = 8
# Weight elements one program holds in registers: 16k 16-bit values over 4 warps is 128 per
# thread (64 registers), which leaves room to overlap the loads without spilling.
MAX_TILE_ELEMENTS = 16384
# Output rows per program for rows up to 4096 wide (narrower programs for wider rows, so the
# tile stays within MAX_TILE_ELEMENTS): the gemv sweep's fastest setting for the 1B layer shapes.
BLOCK_N_NARROW = 4
NUM_WARPS = 4


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    ks = tl.arange(0, BLOCK_K)
    col_ok = cols < N
    k_ok = ks < K
    # The weights (and bias) first: nothing the previous kernel writes.
    w = tl.load(
        w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :],
        mask=col_ok[:, None] & k_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if WAIT_PRIOR:
        gdc_wait()  # the activations come from the kernel this one was launched behind
    if TRIGGER:
        gdc_launch_dependents()  # the next kernel may launch; it waits for these writes
    for m in tl.static_range(M):
        x = tl.load(x_ptr + m * stride_xm + ks, mask=k_ok, other=0.0).to(tl.float32)
        acc = tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            acc += bias
        tl.store(y_ptr + m * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


def gemv_tile(k: int) -> tuple[int, int] | None:
    """(BLOCK_N, BLOCK_K) for rows of ``k`` elements, or None when no tile fits in registers."""
    block_k = triton.next_power_of_2(k)
    if block_k > MAX_TILE_ELEMENTS:
        return None
    block_n = BLOCK_N_NARROW if block_k <= 4096 else MAX_TILE_ELEMENTS // block_k
    return block_n, block_k


def gemv_applies(x: torch.Tensor, weight: torch.Tensor, max_rows: int = MAX_ROWS) -> bool:
    """Whether :func:`linear` takes the GEMV for these operands (the host knows every input);
    ``max_rows``: at most that many rows (the kernel takes up to ``KERNEL_MAX_ROWS``)."""
    return (
        x.dtype in HALF_DTYPES
        and 0 < x.shape[0] <= min(max_rows, KERNEL_MAX_ROWS)
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and gemv_tile(weight.shape[1]) is not None
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """x [M <= KERNEL_MAX_ROWS, K] (rows may be strided), weight [N, K] (unit last stride), bias [N] |
    None -> [M, N] in ``out_dtype`` (default x's dtype), through the register-tile GEMV."""
    check_device(x=x, weight=weight)
    m, k = x.shape
    check_tensor("weight", weight, [None, k], x.dtype)
    if bias is not None:
        check_tensor("bias", bias, [weight.shape[0]], x.dtype)
    if not gemv_applies(x, weight, KERNEL_MAX_ROWS):
        raise ValueError(
            f"gemv: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)}: at most "
            f"{KERNEL_MAX_ROWS} 16-bit rows with unit last strides and K <= {MAX_TILE_ELEMENTS}"
        )
    n = weight.shape[0]
    block_n, block_k = gemv_tile(k)  # type: ignore[misc]  # gemv_applies checked it
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    dependent = dependent_launch_supported(x.device)
    with launch_on(x.device):
        _gemv_kernel[(triton.cdiv(n, block_n),)](
            x,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            y,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            y.stride(0),
            M=m,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            HAS_BIAS=bias is not None,
            WAIT_PRIOR=dependent,
            TRIGGER=dependent,
            num_warps=NUM_WARPS,
            launch_pdl=dependent,
        )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] (rows may be strided), weight [N, K], bias [N] | None -> [T, N] in x's dtype:
    the GEMV for a few 16-bit rows, cuBLAS otherwise (float32, prefill, wide batches)."""
    if gemv_applies(x, weight):
        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: x [T, K], weight [N, K] -> [T, N] float32 (the accumulator, unrounded): the
    GEMV for a few 16-bit rows (the gemv sweep: 117.6 us against cuBLAS's 126.8 for
    Llama-3.2-1B's 128k-row head on an H200), cuBLAS otherwise."""
    if gemv_applies(x, weight):
        return gemv(x, weight, None, out_dtype=torch.float32)
    return torch_logits(x, weight)
