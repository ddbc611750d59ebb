"""``quantized_linear`` on cuda: x [M, K] @ dequantize(W)[N, K]^T in Triton, for every format of
:mod:`rustinfer.ops.quant`, dequantizing inside the matmul (the float weight never exists).

Two kernels, chosen by the row count (the host knows it, so the choice never syncs):

* a few rows (decode): a GEMV that streams the codes once. Each program owns ``FEW_ROWS_BLOCK_N``
  weight rows and walks K in chunks; per group it forms ``sum(code * x)`` in float32 and applies
  the group's scale (and ``min * sum(x)``) once, so a weight costs a bit operation, a subtraction
  and one FMA per activation row. At batch 1 it reads 0.56 (q4_0) to 1.06 (q8_0) bytes per weight
  instead of a bf16 GEMV's 2. Like the bf16 GEMV (``gemv.py``) it loads its first chunk of weights
  before waiting on the kernel ahead when launched as a programmatic dependent.
* more rows (prefill, wide batches): tiles of ``tl.dot``. The weight is the dot's left operand,
  dequantized to the activation dtype in registers one run of 32 values at a time (``[BLOCK_N,
  32]``, or two ``[BLOCK_N, 16]`` halves for 4-bit; a run never straddles groups, so its scale is
  a per-row vector), the activations the right (``[32, BLOCK_M]``): the tensor cores' row
  dimension is filled by weight rows even when there are only 16 tokens.

Canonical layout, no repacking (``prepare_quantized_weight`` is the identity): each row's codes
are contiguous, so both kernels read 16-byte pieces of one row per thread, coalesced across
neighbouring threads; llama.cpp's nibble order (byte j of a 32-value run holds values j and
j + 16) is absorbed by pairing the low nibbles with x's first 16 columns of the run and the high
nibbles with the next 16, instead of interleaving codes. The loader's tensors are used as they are.

Codes become floats without integer-to-float conversions, which issue at a fraction of the FMA rate
(the CUDA guide's throughput table: 16 against 128 per SM per clock from sm_90): a code below 2^23
or'ed into the mantissa of 2^23 reads back as the float 2^23 + code, and subtracting 2^23 (plus the
format's offset) leaves the code exactly.

Rounding: float32 accumulation everywhere. The GEMV keeps scales and activations exact; the tiled
kernel rounds each dequantized weight once to the activation dtype (16-bit; the spec's fp16
tolerance is built on that) and runs float32 activations as three tf32 products (``tf32x3``,
float32-grade products on tensor cores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rustinfer.ops.quant import NIBBLE_RUN, QuantizedWeight
from rustinfer_ops_cuda.kernels.attention_common import multiprocessor_count
from rustinfer_ops_cuda.kernels.checks import check_device, check_tensor
from rustinfer_ops_cuda.kernels.dependent_launch import (
    dependent_launch_supported,
    gdc_launch_dependents,
    gdc_wait,
)
from rustinfer_ops_cuda.kernels.launch import launch_on

ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Rows served by the GEMV; more go to the tiled kernel. Each GEMV row costs one more FMA per weight
# (the codes are decoded once for all rows), while the tiled kernel's tensor cores take extra rows
# for free: by that count they meet at a few rows. ``python bench/quant_linear.py --device cuda``
# times both kernels at 1, 2, 4, 8 and 16 rows; set this where the tiled one starts to win.
FEW_ROWS = 4
# What the GEMV itself takes (its row loop is unrolled): tested there, not chosen by dispatch.
FEW_ROWS_KERNEL_MAX = 16
# Weight rows per GEMV program: 4 gives Llama-3.2-1B's narrowest matmul (N = 2048) 512 programs,
# about four per H200 SM, so every SM has loads in flight.
FEW_ROWS_BLOCK_N = 4
# Weights per GEMV program and chunk: 64 per thread over 4 warps (32 bytes of 4-bit codes, two
# 16-byte loads), whose float32 products fit in registers beside the codes.
FEW_ROWS_CHUNK = 8192
FEW_ROWS_WARPS = 4
# Tiled kernel: (weight rows, tokens) per program, most preferred first; the first that gives every SM a
# program is taken (else the last). Weight rows are the dot's M: 64 per warpgroup is what Hopper's
# wgmma takes, so tokens shrink before weight rows drop below 64; 16 is the smallest dot.
TILE_CHOICES = ((128, 128), (128, 64), (64, 128), (64, 64), (64, 32), (64, 16), (32, 16), (16, 16))
# Values of K per loop step (whole runs of 32): enough dots per step to amortise the loop's
# bookkeeping and pipeline barriers, with the dequantized tile still in registers.
TILE_K_STEP = 128
# Loads in flight per loop (Triton's software pipeline): codes and activations of the next two
# steps stream in while this one's dots run.
TILE_STAGES = 3

# 2^23 as float32 bits: an integer i < 2^23 or'ed (or added) into it reads back as 2^23 + i.
_MAGIC_BITS = tl.constexpr(0x4B000000)
# llama.cpp's run of values; a 4-bit byte's high nibble is the value half a run after its low one.
_RUN = tl.constexpr(NIBBLE_RUN)
_HALF_RUN = tl.constexpr(NIBBLE_RUN // 2)


@triton.jit
def _exact(bits, SUB: tl.constexpr):
    """Float32 bits encoding 2^23 + i -> i - SUB as float32, exactly (no conversion instruction)."""
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + SUB)


@triton.jit
def _nibbles(raw, OFFSET: tl.constexpr):
    """uint8 codes -> (low nibbles, high nibbles) minus OFFSET, float32."""
    b = raw.to(tl.int32)
    return _exact((b & 15) | _MAGIC_BITS, OFFSET), _exact((b >> 4) | _MAGIC_BITS, OFFSET)


@triton.jit
def _bytes(raw):
    """int8 codes -> float32 (shifted to 0..255 by the add, then back)."""
    return _exact(raw.to(tl.int32) + (_MAGIC_BITS + 128), 128)


@triton.jit
def _few_rows_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    N,
    stride_xm,
    stride_ym,
    M: tl.constexpr,
    M_PAD: tl.constexpr,
    GROUPS: tl.constexpr,  # groups per weight row (K / GROUP)
    GROUP: tl.constexpr,
    GROUP_BYTES: tl.constexpr,  # code bytes per group and row
    CHUNK: tl.constexpr,  # groups per chunk (a power of two)
    CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FOUR_BIT: tl.constexpr,
    OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] weight rows = out columns
    col_ok = cols < N
    gs = tl.arange(0, CHUNK)
    js = tl.arange(0, GROUP_BYTES)
    # x column of byte j's value (of its low nibble; the high one's is 16 further)
    xj = (js // 16) * 32 + js % 16 if FOUR_BIT else js
    q_rows = q_ptr + cols.to(tl.int64)[:, None, None] * (GROUPS * GROUP_BYTES)
    s_rows = cols.to(tl.int64)[:, None] * GROUPS
    ms = tl.arange(0, M_PAD)
    acc = tl.zeros([BLOCK_N, M_PAD], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for c in tl.static_range(CHUNKS):
        g = c * CHUNK + gs  # [C] groups of this chunk
        g_ok = g < GROUPS
        w_ok = col_ok[:, None] & g_ok[None, :]  # [BN, C]
        raw = tl.load(  # [BN, C, B]
            q_rows + g[None, :, None] * GROUP_BYTES + js[None, None, :],
            mask=w_ok[:, :, None],
            other=0,
        )
        scale = tl.load(s_ptr + s_rows + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
        if HAS_MINS:
            zero = tl.load(z_ptr + s_rows + g[None, :], mask=w_ok, other=0.0).to(tl.float32)
        if c == 0:
            # The weights (and bias) first: nothing the previous kernel writes.
            if WAIT_PRIOR:
                gdc_wait()
            if TRIGGER:
                gdc_launch_dependents()
        if FOUR_BIT:
            lo, hi = _nibbles(raw, OFFSET)
        else:
            lo = _bytes(raw)
        x_cols = g[:, None] * GROUP + xj[None, :]  # [C, B]
        for m in tl.static_range(M):
            x_row = x_ptr + m * stride_xm + x_cols
            x_lo = tl.load(x_row, mask=g_ok[:, None], other=0.0).to(tl.float32)
            prods = lo * x_lo[None, :, :]
            x_sum = tl.sum(x_lo, axis=1)
            if FOUR_BIT:
                x_hi = tl.load(x_row + _HALF_RUN, mask=g_ok[:, None], other=0.0)
                x_hi = x_hi.to(tl.float32)
                prods += hi * x_hi[None, :, :]
                x_sum += tl.sum(x_hi, axis=1)
            part = tl.sum(prods, axis=2) * scale  # [BN, C]: scale * sum(code * x) per group
            if HAS_MINS:
                part += zero * x_sum[None, :]
            acc = tl.where(ms[None, :] == m, acc + tl.sum(part, axis=1)[:, None], acc)
    if HAS_BIAS:
        acc += bias[:, None]
    tl.store(
        y_ptr + ms[None, :] * stride_ym + cols[:, None],
        acc.to(y_ptr.dtype.element_ty),
        mask=col_ok[:, None] & (ms[None, :] < M),
    )


@triton.jit
def _tiled_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    SLICES,  # runs of 32 values per weight row (K / 32)
    GROUPS,  # groups per weight row (K / GROUP)
    stride_xm,
    stride_ym,
    SLICES_PER_GROUP: tl.constexpr,
    SLICE_BYTES: tl.constexpr,  # code bytes per run and row
    STEP: tl.constexpr,  # runs per loop step (divides SLICES)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FOUR_BIT: tl.constexpr,
    OFFSET: tl.constexpr,
    HAS_MINS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BLOCK_M)
    # Consecutive programs share a weight tile: it comes from DRAM once, then from L2.
    pid_m = pid % m_tiles
    pid_n = pid // m_tiles
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows = output columns
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
    col_ok = cols < N
    row_ok = rows < M
    js = tl.arange(0, SLICE_BYTES)
    # [BN, B] codes and [B, BM] activations of the first run: byte j is value j (4-bit: its low
    # nibble; the high nibble is value j + 16).
    q_tile = q_ptr + cols.to(tl.int64)[:, None] * (SLICES * SLICE_BYTES) + js[None, :]
    x_tile = x_ptr + rows.to(tl.int64)[None, :] * stride_xm + js[:, None]
    s_col = cols.to(tl.int64) * GROUPS
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)  # out^T
    # One dot per run (two for 4-bit), whatever the group size: the dequantized operand stays a
    # [BN, 16 or 32] tile in registers (whole groups of 128 spilled in float32).
    for step in range(0, SLICES // STEP):
        for i in tl.static_range(STEP):
            t = step * STEP + i
            g = t // SLICES_PER_GROUP
            raw = tl.load(q_tile + t * SLICE_BYTES, mask=col_ok[:, None], other=0)
            scale = tl.load(s_ptr + s_col + g, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            if HAS_MINS:
                zero = tl.load(z_ptr + s_col + g, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            else:
                zero = 0.0
            xt = tl.load(x_tile + t * _RUN, mask=row_ok[None, :], other=0.0)
            if FOUR_BIT:
                lo, hi = _nibbles(raw, OFFSET)
                acc = tl.dot(
                    (lo * scale + zero).to(xt.dtype), xt, acc, input_precision=DOT_PRECISION
                )
                xt = tl.load(x_tile + t * _RUN + _HALF_RUN, mask=row_ok[None, :], other=0.0)
                acc = tl.dot(
                    (hi * scale + zero).to(xt.dtype), xt, acc, input_precision=DOT_PRECISION
                )
            else:
                w = (_bytes(raw) * scale).to(xt.dtype)
                acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(
        y_ptr + rows[None, :] * stride_ym + cols[:, None],
        acc.to(y_ptr.dtype.element_ty),
        mask=col_ok[:, None] & row_ok[None, :],
    )


def _format_args(weight: QuantizedWeight) -> dict[str, object]:
    """The format's constexprs, shared by both kernels."""
    f = weight.spec
    return {"FOUR_BIT": f.bits == 4, "OFFSET": float(f.offset), "HAS_MINS": f.has_mins}


def _check(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> None:
    if weight.layout != "canonical":
        raise ValueError(f"quantized_linear: expected a canonical weight, got {weight}")
    n, k = weight.shape
    g = weight.group_size
    f = weight.spec
    check_tensor("x", x, [None, k], ACTIVATION_DTYPES)
    code_shape = [n, k // 2] if f.bits == 4 else [n, k]
    code_dtype = torch.uint8 if f.bits == 4 else torch.int8
    check_tensor("codes", weight.codes, code_shape, code_dtype, contiguous=True)
    check_tensor("scales", weight.scales, [n, k // g], f.scale_dtype, contiguous=True)
    tensors = {"x": x, "codes": weight.codes, "scales": weight.scales}
    if f.has_mins:
        check_tensor("mins", weight.mins, [n, k // g], f.scale_dtype, contiguous=True)
        tensors["mins"] = weight.mins
    if bias is not None:
        check_tensor("bias", bias, [n], x.dtype, contiguous=True)
        tensors["bias"] = bias
    check_device(**tensors)


def quantized_linear_few_rows(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M <= FEW_ROWS_KERNEL_MAX, K] (rows may be strided) through the GEMV -> [M, N]."""
    _check(x, weight, bias)
    m = x.shape[0]
    if not 0 < m <= FEW_ROWS_KERNEL_MAX:
        raise ValueError(f"quantized_linear_few_rows: {m} rows (1 to {FEW_ROWS_KERNEL_MAX})")
    n, k = weight.shape
    g = weight.group_size
    groups = k // g
    chunk = min(FEW_ROWS_CHUNK // (FEW_ROWS_BLOCK_N * g), groups)
    chunk = triton.next_power_of_2(max(chunk, 1))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    dependent = dependent_launch_supported(x.device)
    with launch_on(x.device):
        _few_rows_kernel[(triton.cdiv(n, FEW_ROWS_BLOCK_N),)](
            x,
            weight.codes,
            weight.scales,
            weight.mins if weight.spec.has_mins else weight.scales,  # never read without mins
            bias if bias is not None else weight.scales,  # never read without HAS_BIAS
            y,
            n,
            x.stride(0),
            y.stride(0),
            M=m,
            M_PAD=triton.next_power_of_2(m),
            GROUPS=groups,
            GROUP=g,
            GROUP_BYTES=g // 2 if weight.spec.bits == 4 else g,
            CHUNK=chunk,
            CHUNKS=triton.cdiv(groups, chunk),
            BLOCK_N=FEW_ROWS_BLOCK_N,
            HAS_BIAS=bias is not None,
            WAIT_PRIOR=dependent,
            TRIGGER=dependent,
            num_warps=FEW_ROWS_WARPS,
            launch_pdl=dependent,
            **_format_args(weight),
        )
    return y


def tile_config(m: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of the tiled kernel for ``m`` tokens and ``n`` weight rows."""
    sms = multiprocessor_count(device) if device.type == "cuda" else 1  # 1: the interpreter
    most_m = max(triton.next_power_of_2(m), 16)
    most_n = max(triton.next_power_of_2(n), 16)
    fitting = [(bn, bm) for bn, bm in TILE_CHOICES if bm <= most_m and bn <= most_n]
    block_n, block_m = next(
        (t for t in fitting if triton.cdiv(n, t[0]) * triton.cdiv(m, t[1]) >= sms), fitting[-1]
    )
    # 8 warps once the float32 accumulator passes 64 values per thread at 4.
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return block_m, block_n, warps


def quantized_linear_tiled(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] (rows may be strided) through the tl.dot tiles -> [M, N]."""
    _check(x, weight, bias)
    m = x.shape[0]
    n, k = weight.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    slices = k // NIBBLE_RUN
    step = next(s for s in (4, 2, 1) if slices % s == 0 and s * NIBBLE_RUN <= TILE_K_STEP)
    block_m, block_n, warps = tile_config(m, n, x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    with launch_on(x.device):
        _tiled_kernel[grid](
            x,
            weight.codes,
            weight.scales,
            weight.mins if weight.spec.has_mins else weight.scales,
            bias if bias is not None else weight.scales,
            y,
            m,
            n,
            slices,
            k // weight.group_size,
            x.stride(0),
            y.stride(0),
            SLICES_PER_GROUP=weight.group_size // NIBBLE_RUN,
            SLICE_BYTES=NIBBLE_RUN // 2 if weight.spec.bits == 4 else NIBBLE_RUN,
            STEP=step,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HAS_BIAS=bias is not None,
            DOT_PRECISION="tf32x3" if x.dtype == torch.float32 else None,
            num_warps=warps,
            num_stages=TILE_STAGES,
            **_format_args(weight),
        )
    return y


def quantized_linear(
    x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [T, K] bf16/fp16/fp32 (rows may be strided), a canonical weight [N, K], bias [N] | None
    -> [T, N] in x's dtype: the GEMV for up to ``FEW_ROWS`` rows, the tiled kernel past that."""
    if 0 < x.shape[0] <= FEW_ROWS:
        return quantized_linear_few_rows(x, weight, bias)
    return quantized_linear_tiled(x, weight, bias)


def prepare_quantized_weight(weight: QuantizedWeight) -> QuantizedWeight:
    """The canonical weight as it is: both kernels read it coalesced (module docstring)."""
    if weight.layout != "canonical":
        raise ValueError(f"prepare_quantized_weight: expected a canonical weight, got {weight}")
    return weight
