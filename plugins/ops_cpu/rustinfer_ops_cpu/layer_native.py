"""float32 ``fused_add_rmsnorm``, ``silu_and_mul``, ``rope_kv_store`` and ``attention_decode``
through our C kernels (``native/layer_ops.c``): one ctypes call each instead of several torch calls.

Registered for float32 only (the dtype the CPU serves quantized models in; bfloat16 keeps the
torch implementations). A call whose tensors the C code does not take (a non-contiguous cache,
another index dtype, a head layout other than D apart) goes to the torch implementation, so each
op serves its whole spec.
"""

from __future__ import annotations

import torch

from rustinfer_ops_cpu import activation, attention, norm, rope
from rustinfer_ops_cpu.native import library

__all__ = ["attention_decode", "fused_add_rmsnorm", "rope_kv_store", "silu_and_mul"]

_F32 = torch.float32


def _rows(t: torch.Tensor) -> bool:
    """A float32 [T, X] tensor whose rows are contiguous (any row stride)."""
    return t.dtype == _F32 and t.dim() == 2 and t.stride(1) == 1


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual), both new [T, H] tensors."""
    if not (_rows(x) and _rows(residual) and weight.dtype == _F32 and weight.is_contiguous()):
        return norm.fused_add_rmsnorm(x, residual, weight, eps)
    t, h = x.shape
    normed, total = torch.empty((2, t, h), dtype=_F32).unbind(0)
    library().rq_add_rmsnorm(
        x.data_ptr(),
        x.stride(0),
        residual.data_ptr(),
        residual.stride(0),
        weight.data_ptr(),
        eps,
        t,
        h,
        normed.data_ptr(),
        total.data_ptr(),
    )
    return normed, total


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> silu(x[:, :I]) * x[:, I:], [T, I]."""
    if not _rows(x):
        return activation.silu_and_mul(x)
    t, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((t, inter), dtype=_F32)
    library().rq_silu_mul(x.data_ptr(), x.stride(0), t, inter, out.data_ptr())
    return out


def _heads(t: torch.Tensor) -> bool:
    """A float32 [T, H, D] view whose heads lie D apart in each row (a slice of a fused QKV)."""
    return t.dtype == _F32 and t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


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
    """rope on q and k, k and v into the paged cache; returns the rotated q, contiguous."""
    if not (
        _heads(q)
        and _heads(k)
        and _heads(v)
        and cos_sin_cache.dtype == _F32
        and cos_sin_cache.is_contiguous()
        and k_cache.dtype == _F32
        and v_cache.dtype == _F32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and positions.dtype == torch.int64
        and positions.is_contiguous()
        and slot_mapping.dtype == torch.int64
        and slot_mapping.is_contiguous()
    ):
        return rope.rope_kv_store(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    t, hq, d = q.shape
    out = torch.empty((t, hq, d), dtype=_F32)
    library().rq_rope_kv_store(
        q.data_ptr(),
        q.stride(0),
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        t,
        hq,
        k.shape[1],
        d,
        positions.data_ptr(),
        cos_sin_cache.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        out.data_ptr(),
    )
    return out


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D] at positions seq_lens - 1 -> [B, Hq, D]."""
    if not (
        _heads(q)
        and k_cache.dtype == _F32
        and v_cache.dtype == _F32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and block_tables.dtype == torch.int32
        and block_tables.stride(-1) == 1
        and seq_lens.dtype == torch.int32
        and seq_lens.is_contiguous()
    ):
        return attention.attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale)
    b, hq, d = q.shape
    _, block_size, hkv, _ = k_cache.shape
    out = torch.empty((b, hq, d), dtype=_F32)
    status = library().rq_attention_decode(
        q.data_ptr(),
        q.stride(0),
        b,
        hq,
        hkv,
        d,
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_size,
        block_tables.data_ptr(),
        block_tables.stride(0),
        seq_lens.data_ptr(),
        scale,
        out.data_ptr(),
    )
    if status != 0:
        raise MemoryError(f"attention_decode: no scratch memory for {b} sequences")
    return out
