"""What the paged attention kernels share: the online-softmax step over one tile of paged keys,
and the constants and device facts their launchers size grids with."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# log2(e): the kernels use exp2, so scores are pre-multiplied by scale * log2(e).
LOG2E = 1.4426950408889634
# tl.dot needs at least 16 rows and 16 columns per operand tile.
MIN_DOT = 16


def dot_width(n: int) -> int:
    """A tile dimension of ``n`` (head dim, GQA group) as tl.dot takes it: a power of two, at
    least MIN_DOT."""
    return max(MIN_DOT, triton.next_power_of_2(n))


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: launchers ask on every call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessor_count(index)


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def max_shared_memory(device: torch.device) -> int:
    """Shared memory a program may use on a CUDA device, in bytes (0 if it cannot be read):
    what decides whether a tile shape's pipeline stages fit (227 KiB on an H100/H200, 163 on an
    A100, ~99 on consumer Ampere/Ada cards)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_shared_memory(index)


@functools.cache
def _max_shared_memory(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # noqa: BLE001  (an unknown driver: say nothing fits beyond the defaults)
        return 0


@triton.jit
def attend_step(
    q,
    acc,
    m_i,
    l_i,
    keys,
    key_valid,
    visible,
    table_row,
    k_cache_ptr,
    v_cache_ptr,
    stride_cache_block,
    stride_cache_token,
    head_offset,
    dims,
    dim_valid,
    scale_log2,
    PAGE: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One step of the online softmax: the query rows ``q`` [M, D] against the keys ``keys``
    [N] of one sequence, gathered from the paged cache through ``table_row``. ``visible`` [M, N]
    masks scores when MASKED; ``key_valid`` [N] masks the loads. Returns (acc, m_i, l_i)."""
    page = tl.load(table_row + keys // PAGE, mask=key_valid, other=0).to(tl.int64)
    token = page * stride_cache_block + (keys % PAGE) * stride_cache_token + head_offset
    kv_mask = key_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_cache_ptr + token[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    # input_precision="ieee" on both dots: float32 operands then take full-precision fp32 FMAs.
    # Triton's default for them is TF32 tensor cores, which keep 10 mantissa bits of each operand
    # (~2^-11 relative per product, against the fp32 spec's 2^-20), and float32 is this engine's
    # accurate path. 16-bit operands are unaffected: their products are exact in the fp32
    # accumulator on tensor cores whatever this says.
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [M, N], log2 units
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + token[:, None] + dims[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i
