"""``linear`` and ``logits`` for decode's 1-16 rows (bf16 / fp16): a "skinny" tensor-core matmul
whose result for a row does not depend on how many other rows share the call.

Why: a sequence decoded in a batch must produce the tokens it produces alone. cuBLAS picks its
kernel (and its reduction order) by the row count, and the register-tile GEMV (``gemv.py``) sums
each row with its own cross-thread reduction, which costs a full pass over the tile per row. Here
every row count from 1 to 16 runs the same compiled kernel, the same instructions in the same
order; only masks differ.

Design (swap A and B): the weight tile is the tensor-core operand that fills the MMA's wide side,
and the activations, padded to ``KERNEL_ROWS`` = 16 columns, the narrow one:
``acc[BLOCK_N, 16] += W[BLOCK_N, BLOCK_K] @ x^T[BLOCK_K, 16]``, float32 accumulation. Rows past
``M`` load as zeros and are never stored. An MMA computes each output element from one row of A
and one column of B with arithmetic fixed by the instruction, so row m's outputs do not see the
other columns' values (zeros or another sequence's activations) nor its own position among
them; with the kernel identical for every ``M`` (``M``, ``x``'s address and strides are excluded
from Triton's specialisation, see ``_NO_SPECIALIZE``), a row's bits are the same alone or in a
batch of 16. Sixteen rows read the same weight bytes as one, and the MMA does the 16 columns in
the instructions that one would take: no per-row work, unlike the GEMV.

Tiles, all from ``K`` and ``N`` (never from ``M``), see :func:`skinny_tiles`:

- ``BLOCK_N`` = 64 output features per program: the Hopper warpgroup MMA's 64-row side over 4
  warps, so each warp owns 16 weight rows and no warp duplicates another's operand.
- ``BLOCK_K`` = 256: a 64 x 256 tile is 16k 16-bit values, 128 per thread: the GEMV's tile size,
  which it loads into registers without spilling.
- Split-K: one layer matrix has too few 64-row tiles to occupy 132 SMs (Llama-3.2-1B's o
  projection has 32), so K is cut into ``split`` ranges: the largest power of two that keeps
  the grid within ``TARGET_PROGRAMS`` programs, fewer where K has fewer 256-wide steps, then
  spread evenly. Each range's float32 partial sums go to a workspace and a second,
  small kernel adds them in a fixed order (split 0, 1, 2, ...), adds the bias and rounds once, so
  the result is deterministic. For 1B: qkv and o split 8 (one 256-wide step per program), gate/up
  2 (4 steps), down 16 (2 steps); the LM head's 2,004 tiles need no split (8 steps).

Like the GEMV, a program loads its first weight step before ``gdc_wait``: launched as a
programmatic dependent (Hopper, ``dependent_launch.py``), those loads overlap the previous
kernel's tail; activations are read only after the wait. Each step then prefetches the next
step's weights into registers by hand. (Cuts with ``stages`` > 1 instead hand steps 1.. of a
long program to Triton's software pipeliner, which streams them through shared memory without
holding them in registers, and add step 0 last: fewer registers, but slower on the H200, see
``LOOP_STAGES``.) The reduction kernel is itself a dependent of the matmul, so its launch
overlaps the matmul's run.

Status: the ``linear`` and ``logits`` of ``--batch-invariant`` (``batch_invariant.py``), for
every row count; not the default. On the H200 (2026-11-28, ``bench/gemv_sweep.py --skinny``)
every row count is bit-identical to the one-row call, but a Llama-3.2-1B layer's four matmuls
take 57.9 us at one row and 62.4 at eight, against the GEMV's 36.1 at one row and cuBLAS's
44.8-45.4 (the LM head 184 against 127; its one-stage variant 133); the fastest cut per shape
would sum to 47.9-55.4 us at 1-16 rows (``bench/skinny_best.py``). Past 16 rows it takes rows in
blocks of 16 (grid axis 2), each block re-reading the weights: correct for a prefill, not fast.

Rounding: each output is a float32 dot product, plus the bias in float32, rounded once to the
activation dtype (or kept float32 for the LM head), as the ``linear`` spec's reference does.
This module's own :func:`linear` and :func:`logits` (a candidate default) send more than
``MAX_ROWS`` rows (prefill, large batches) to cuBLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# What the kernel takes: the 16-bit dtypes it serves, and float32 (full-precision dots, slow) so
# that Triton's interpreter, whose bf16 dot is wrong, can test it in fp16 and fp32.
DTYPES = (*HALF_DTYPES, torch.float32)
# The padded row count: the MMA's narrow side. Every call computes all 16 columns.
KERNEL_ROWS = 16
# Rows :func:`linear` and :func:`logits` send here; cuBLAS beyond (its tiles win once a weight
# tile is reused across many rows).
MAX_ROWS = KERNEL_ROWS
# Output features per program: the warpgroup MMA's 64 rows, one 16-row slice per warp.
BLOCK_N = 64
# K per step: a 64 x 256 tile is 128 16-bit values per thread, the GEMV's tile size.
BLOCK_K = 256
# Programs the split-K rule aims for: about 4 per SM of an H200 (132 SMs), so every SM has
# several tiles' weights in flight before the wait.
TARGET_PROGRAMS = 528
NUM_WARPS = 4
# Pipeliner stages for programs of 3 or more K steps (the LM head, gate/up); 1: the hand
# prefetch, as for shorter programs. H200 sweep (2026-11-28, ``gemv_sweep.py --skinny``, the
# ``s1`` rows against the 3-stage default): gate/up 22.6 / 24.3 / 25.9 us at 1 / 8 / 16 rows
# against 30.7 / 33.0 / 35.9, the LM head 131.7 / 138.1 / 147.4 against 179.6 / 194.7 / 213.5;
# both bit-identical across row counts.
LOOP_STAGES = 1
# Columns per program of the split-K reduction: 4 KiB of float32 per split read per program.
REDUCE_BLOCK = 1024
REDUCE_WARPS = 4

# Kept out of Triton's specialisation, so one compiled kernel serves every row count and every
# x view: M == 1 would otherwise compile its own variant, and so would an x whose address or row
# stride is (or is not) a multiple of 16 bytes, or partials whose split stride (M * N) is. Those
# variants would differ only in masks and load or store widths, but one kernel makes the
# invariance hold by construction. (The reduction kernel only adds, elementwise, in a fixed order.)
_NO_SPECIALIZE = ["x_ptr", "stride_xm", "stride_os", "M"]


@dataclass(frozen=True)
class SkinnyTiles:
    """How one [M, K] x [N, K]^T call is cut: ``block_n`` features and ``block_k`` of K per
    step, ``split`` programs along K, each running ``steps`` steps (split * steps * block_k >= K,
    and no split range is empty); ``stages``: 1 prefetches the next step's weights into
    registers by hand, more hands all but the first step to Triton's pipeliner, that many
    stages deep; ``warps`` per program (64 features fill a warpgroup MMA over 4 warps; 16 or 32
    features run Ampere-style MMAs, for which fewer warps avoid duplicated work)."""

    block_n: int
    block_k: int
    split: int
    steps: int
    stages: int = 1
    warps: int = 4

    def check(self, k: int) -> None:
        span = self.steps * self.block_k
        if min(self.block_n, self.block_k) < 16 or min(self.split, self.steps, self.stages) < 1:
            raise ValueError(f"{self}: block_n and block_k >= 16, split, steps and stages >= 1")
        for size in (self.block_n, self.block_k):
            if size & (size - 1):
                raise ValueError(f"{self}: block_n and block_k must be powers of two")
        if self.split * span < k or (self.split - 1) * span >= k:
            raise ValueError(
                f"{self}: {self.split} x {span} must cover K = {k} with no empty split"
            )


def skinny_tiles(
    n: int,
    k: int,
    *,
    block_k: int = BLOCK_K,
    target_programs: int = TARGET_PROGRAMS,
    loop_stages: int = LOOP_STAGES,
    block_n: int = BLOCK_N,
    warps: int = NUM_WARPS,
) -> SkinnyTiles:
    """The tiles for a weight [n, k]: a function of the weight's shape alone, never of the row
    count (keyword arguments: other settings, for sweeps)."""
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    chunks = triton.cdiv(k, block_k)
    tiles = triton.cdiv(n, block_n)
    wanted = max(1, target_programs // tiles)
    split = min(chunks, 1 << (wanted.bit_length() - 1))  # a power of two, at most one per chunk
    steps = triton.cdiv(chunks, split)
    split = triton.cdiv(chunks, steps)  # ranges that would start past K are dropped
    return SkinnyTiles(block_n, block_k, split, steps, loop_stages if steps >= 3 else 1, warps)


@triton.jit(do_not_specialize=_NO_SPECIALIZE, do_not_specialize_on_alignment=_NO_SPECIALIZE)
def _skinny_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_os,
    stride_om,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    STEPS: tl.constexpr,
    PIPELINED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    # Program (n, s): output features [n * BLOCK_N, +BLOCK_N) over K range s (STEPS * BLOCK_K
    # wide). out is y itself (one split: bias added, rounded once) or the float32 partials
    # [split, M, N] that _reduce_kernel adds up.
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output features
    split = tl.program_id(1)
    col_ok = cols < N
    ks = split * (STEPS * BLOCK_K) + tl.arange(0, BLOCK_K)  # [BLOCK_K] this step's K
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]  # [BLOCK_N, BLOCK_K]
    # The first step's weights (and the bias) before the wait: nothing the previous kernel writes.
    w = tl.load(w_ptrs, mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if WAIT_PRIOR:
        gdc_wait()  # the activations come from the kernel this one was launched behind
    if TRIGGER:
        gdc_launch_dependents()  # the next kernel may launch; it waits for these writes
    # This program's block of ROWS rows (M > ROWS: more blocks along grid axis 2, each through
    # the same instructions, so a row's bits do not depend on its block either).
    rows = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < M  # padded rows load as zeros: their columns of the MMA are never stored
    xt_ptrs = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + ks[:, None]  # [BLOCK_K, ROWS]: x^T
    acc = tl.zeros([BLOCK_N, ROWS], dtype=tl.float32)
    # Either way the steps are summed in an order fixed by the tiles alone.
    if PIPELINED:
        # Steps 1.. first, streamed through shared memory by Triton's pipeliner, whose prologue
        # sits right before this loop (after the wait), so their loads start at once; step 0,
        # whose weights are already in registers, is added last.
        for step in range(1, STEPS):
            k_now = ks + step * BLOCK_K
            w_step = tl.load(
                w_ptrs + step * BLOCK_K, mask=col_ok[:, None] & (k_now < K)[None, :], other=0.0
            )
            xt = tl.load(
                xt_ptrs + step * BLOCK_K, mask=(k_now < K)[:, None] & row_ok[None, :], other=0.0
            )
            acc = tl.dot(w_step, xt, acc, input_precision=DOT_PRECISION)
        xt = tl.load(xt_ptrs, mask=(ks < K)[:, None] & row_ok[None, :], other=0.0)
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    else:
        # Steps in K order, the next step's weights requested before this step's product.
        for step in range(STEPS - 1):
            k_next = ks + (step + 1) * BLOCK_K
            w_next = tl.load(
                w_ptrs + (step + 1) * BLOCK_K,
                mask=col_ok[:, None] & (k_next < K)[None, :],
                other=0.0,
            )
            k_now = ks + step * BLOCK_K
            xt = tl.load(
                xt_ptrs + step * BLOCK_K, mask=(k_now < K)[:, None] & row_ok[None, :], other=0.0
            )
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
            w = w_next
        k_last = ks + (STEPS - 1) * BLOCK_K
        xt = tl.load(
            xt_ptrs + (STEPS - 1) * BLOCK_K,
            mask=(k_last < K)[:, None] & row_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += bias[:, None]
    out_ptrs = out_ptr + split * stride_os + rows.to(tl.int64)[None, :] * stride_om + cols[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & row_ok[None, :])


@triton.jit
def _reduce_kernel(
    p_ptr,
    b_ptr,
    y_ptr,
    N,
    stride_ps,
    stride_pm,
    stride_ym,
    SPLIT: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    # Program (c, m): row m's features [c * BLOCK, +BLOCK), the split-K partials summed in split
    # order (a fixed order: the result never depends on which split finished first).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row = tl.program_id(1)
    ok = cols < N
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    if WAIT_PRIOR:
        gdc_wait()  # the partials are the matmul kernel's writes
    if TRIGGER:
        gdc_launch_dependents()
    p_row = p_ptr + row.to(tl.int64) * stride_pm + cols
    acc = tl.load(p_row, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        acc += tl.load(p_row + s * stride_ps, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += bias
    tl.store(y_ptr + row.to(tl.int64) * stride_ym + cols, acc.to(y_ptr.dtype.element_ty), mask=ok)


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` and :func:`logits` take the skinny kernel for these operands: 1 to
    ``MAX_ROWS`` 16-bit rows with unit last strides (the host knows every input)."""
    return (
        x.dtype in HALF_DTYPES
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and x.shape[1] > 0
        and weight.shape[0] > 0
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
    )


def skinny(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype | None = None,
    tiles: SkinnyTiles | None = None,
) -> torch.Tensor:
    """x [M, K] (rows may be strided), weight [N, K] (unit last stride), bias [N] | None ->
    [M, N] in ``out_dtype`` (default x's dtype); ``tiles``: another cut than :func:`skinny_tiles`
    (tests, sweeps). Rows go in blocks of ``KERNEL_ROWS``, each block re-reading the weights:
    built for decode's few rows, correct (and batch-invariant) but slow for a prefill's many."""
    check_device(x=x, weight=weight)
    check_tensor("x", x, [None, None], DTYPES)
    m, k = x.shape
    check_tensor("weight", weight, [None, k], x.dtype)
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, [n], x.dtype)
    if not (m > 0 and k > 0 and n > 0):
        raise ValueError(
            f"skinny: x {tuple(x.shape)}, weight {tuple(weight.shape)}: M, K and N at least 1"
        )
    tiles = tiles or skinny_tiles(n, k)
    tiles.check(k)
    y = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    # [split, M, N] float32 partials, or y itself: one allocation of a size the host knows.
    out = y
    if tiles.split > 1:
        out = torch.empty((tiles.split, m, n), dtype=torch.float32, device=x.device)
    dependent = dependent_launch_supported(x.device)
    with launch_on(x.device):
        _skinny_kernel[(triton.cdiv(n, tiles.block_n), tiles.split, triton.cdiv(m, KERNEL_ROWS))](
            x,
            weight,
            bias if bias is not None else weight,  # never read without HAS_BIAS
            out,
            m,
            n,
            k,
            x.stride(0),
            weight.stride(0),
            out.stride(0) if tiles.split > 1 else 0,
            out.stride(-2),
            ROWS=KERNEL_ROWS,
            BLOCK_N=tiles.block_n,
            BLOCK_K=tiles.block_k,
            STEPS=tiles.steps,
            PIPELINED=tiles.stages > 1,
            HAS_BIAS=bias is not None and tiles.split == 1,
            # float32 operands: full-precision products (TF32, the default, would miss the
            # fp32 spec); 16-bit ones ignore the setting.
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            WAIT_PRIOR=dependent,
            TRIGGER=dependent,
            num_warps=tiles.warps,
            num_stages=tiles.stages,
            launch_pdl=dependent,
        )
        if tiles.split > 1:
            _reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK), m)](
                out,
                bias if bias is not None else out,  # never read without HAS_BIAS
                y,
                n,
                out.stride(0),
                out.stride(1),
                y.stride(0),
                SPLIT=tiles.split,
                BLOCK=REDUCE_BLOCK,
                HAS_BIAS=bias is not None,
                WAIT_PRIOR=dependent,
                TRIGGER=dependent,
                num_warps=REDUCE_WARPS,
                launch_pdl=dependent,
            )
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K] (rows may be strided), weight [N, K], bias [N] | None -> [T, N] in x's dtype:
    the skinny kernel for 1 to ``MAX_ROWS`` 16-bit rows, cuBLAS otherwise (float32, prefill,
    wide batches)."""
    if skinny_applies(x, weight):
        return skinny(x, weight, bias)
    return F.linear(x, weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: x [T, K], weight [N, K] -> [T, N] float32 (the accumulator, unrounded): the
    skinny kernel for 1 to ``MAX_ROWS`` 16-bit rows, cuBLAS otherwise."""
    if skinny_applies(x, weight):
        return skinny(x, weight, None, out_dtype=torch.float32)
    return torch_logits(x, weight)
