"""``rope_kv_store`` (bf16 / fp16 / fp32): rotary embedding on q and k fused with the paged-cache store.

One program per token reads its q, k and v heads once: q is rotated into a new contiguous q_out,
k is rotated straight into its cache slot (the rotated k never exists anywhere else) and v is
copied bit for bit. Rotation is rotate-half (HF Llama / NeoX) in fp32 with one rounding to the
dtype at the end, as the ``rope`` spec prescribes.

A head is handled as two [heads, D/2] tiles (x1 = x[..., :D/2], x2 = x[..., D/2:]), so the pair
(i, i + D/2) meets in the same thread with no shuffles, and the cos/sin row of the token's
position ([D/2] each) broadcasts over the heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rustinfer_ops_cuda.kernels.checks import check_device, check_index_rows, check_tensor
from rustinfer_ops_cuda.kernels.dependent_launch import (
    dependent_launch_supported,
    gdc_launch_dependents,
)
from rustinfer_ops_cuda.kernels.launch import launch_on

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Elements of a [heads, D] tile a program holds at once; more heads than fit are walked in a loop.
# 4096 covers 32 heads of 128 (Llama 8B's q) in one step and keeps 70B's 64 heads to two.
MAX_TILE = 4096
# Elements of the q tile per thread: 2 warps for Llama-1B's [32 heads, 64] q measured best on an
# H100 (87% of the bandwidth floor at 4096 tokens, against 75% with 8 warps; bench/kernel_sweep.py):
# each thread keeps several 16-byte loads in flight instead of one.
ELEMS_PER_THREAD = 32
MAX_WARPS = 8
WARPS_OVERRIDE = 0  # benchmarks sweep num_warps through this (0: sized from the tile)


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    n_heads,
    stride_src_h,
    stride_dst_h,
    cos,
    sin,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate heads [0, n_heads) of one token from src into dst (head strides given, unit stride
    along the head dim): x1*cos - x2*sin and x2*cos + x1*sin in fp32, rounded once."""
    dtype = dst_ptr.dtype.element_ty
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & d_ok[None, :]  # [BLOCK_H, BLOCK_HALF]
        src = src_ptr + h[:, None] * stride_src_h + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        dst = dst_ptr + h[:, None] * stride_dst_h + d[None, :]
        tl.store(dst, out1.to(dtype), mask=mask)
        tl.store(dst + half, out2.to(dtype), mask=mask)


@triton.jit
def _rope_kv_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    q_out_ptr,
    n_heads,
    n_kv_heads,
    half,
    block_size,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_cs,
    stride_cache_b,
    stride_cache_s,
    stride_cache_h,
    stride_out_t,
    stride_out_h,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if TRIGGER:
        # Attention follows in a Llama layer: a kernel launched as a programmatic dependent (the
        # decode's split pass can be: DEPENDENT_SPLIT) may start now; it waits for this grid's
        # writes before reading q or the cache.
        gdc_launch_dependents()
    # int64 address math: a block index times its stride passes 2^31 for caches over 2 G elements.
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)

    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half
    cs_row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(cs_row + d, mask=d_ok, other=0.0)  # [BLOCK_HALF] fp32
    sin = tl.load(cs_row + half + d, mask=d_ok, other=0.0)

    # q: always rotated, padding tokens included (their rows of q_out are still read downstream).
    _rotate_heads(
        q_ptr + t * stride_q_t,
        q_out_ptr + t * stride_out_t,
        n_heads,
        stride_q_h,
        stride_out_h,
        cos,
        sin,
        half,
        BLOCK_HQ,
        BLOCK_HALF,
    )

    # k and v only for real tokens: a padding slot (< 0) skips every load and store of them.
    if slot >= 0:
        cache_off = (slot // block_size) * stride_cache_b + (slot % block_size) * stride_cache_s
        _rotate_heads(
            k_ptr + t * stride_k_t,
            k_cache_ptr + cache_off,
            n_kv_heads,
            stride_k_h,
            stride_cache_h,
            cos,
            sin,
            half,
            BLOCK_HKV,
            BLOCK_HALF,
        )
        # v: copied as raw values (no float round trip), so the cache holds v bit for bit.
        d_full = tl.arange(0, 2 * BLOCK_HALF)
        d_full_ok = d_full < 2 * half
        for h0 in range(0, n_kv_heads, BLOCK_HKV):
            h = h0 + tl.arange(0, BLOCK_HKV)
            mask = (h < n_kv_heads)[:, None] & d_full_ok[None, :]
            src = v_ptr + t * stride_v_t + h[:, None] * stride_v_h + d_full[None, :]
            # v_cache has k_cache's shape and both are contiguous, hence the same strides.
            dst = v_cache_ptr + cache_off + h[:, None] * stride_cache_h + d_full[None, :]
            tl.store(dst, tl.load(src, mask=mask), mask=mask)


def _heads_block(n_heads: int, block_half: int) -> int:
    """Heads per loop step: all of them, unless a [heads, D] tile would pass MAX_TILE."""
    fit = max(1, MAX_TILE // (2 * block_half))  # a power of 2: both operands are
    return min(triton.next_power_of_2(n_heads), fit)


def rope_kv_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """q [T, Hq, D], k, v [T, Hkv, D] (strided views allowed, unit last-dim stride), positions [T],
    cos_sin_cache [P, D] float32, caches [num_blocks, block_size, Hkv, D] contiguous (written in
    place), slot_mapping [T] (int32 or int64, < 0: padding) -> q_out [T, Hq, D] contiguous.

    Positions must lie in [0, P) and slots below num_blocks * block_size: the kernel does not check
    (that would need a device sync), as an out-of-range index reads or writes out of bounds.
    """
    check_device(
        q=q,
        k=k,
        v=v,
        positions=positions,
        cos_sin_cache=cos_sin_cache,
        k_cache=k_cache,
        v_cache=v_cache,
        slot_mapping=slot_mapping,
    )
    check_tensor("q", q, [None, None, None], DTYPES)
    n_tokens, n_heads, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"q has shape {list(q.shape)}: rope needs an even head_dim")
    check_tensor("k", k, [n_tokens, None, head_dim], q.dtype)
    n_kv_heads = k.shape[1]
    check_tensor("v", v, [n_tokens, n_kv_heads, head_dim], q.dtype)
    check_index_rows("positions", positions, n_tokens)
    check_tensor("cos_sin_cache", cos_sin_cache, [None, head_dim], torch.float32, contiguous=True)
    cache_shape = [None, None, n_kv_heads, head_dim]
    check_tensor("k_cache", k_cache, cache_shape, q.dtype, contiguous=True)
    check_tensor("v_cache", v_cache, list(k_cache.shape), q.dtype, contiguous=True)
    check_index_rows("slot_mapping", slot_mapping, n_tokens)

    q_out = torch.empty((n_tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if n_tokens == 0:
        return q_out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_hq = _heads_block(n_heads, block_half)
    block_hkv = _heads_block(n_kv_heads, block_half)
    # Sized by the q tile, the widest: the k and v loops reuse the same warps.
    num_warps = max(1, min(MAX_WARPS, block_hq * 2 * block_half // (32 * ELEMS_PER_THREAD)))
    if WARPS_OVERRIDE:
        num_warps = WARPS_OVERRIDE
    with launch_on(q.device):
        _rope_kv_store_kernel[(n_tokens,)](
            q,
            k,
            v,
            positions,
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping,
            q_out,
            n_heads,
            n_kv_heads,
            half,
            k_cache.shape[1],
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            cos_sin_cache.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            q_out.stride(0),
            q_out.stride(1),
            BLOCK_HQ=block_hq,
            BLOCK_HKV=block_hkv,
            BLOCK_HALF=block_half,
            TRIGGER=dependent_launch_supported(q.device),
            num_warps=num_warps,
        )
    return q_out
