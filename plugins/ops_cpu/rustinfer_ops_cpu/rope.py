"""Rotary embedding (rotate-half) for q and k in one call, computed in fp32 and rounded once."""

from __future__ import annotations

import torch

from rustinfer_ops_cpu.kv_cache import kv_cache_store


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, half: int) -> torch.Tensor:
    """x [T, H, D] (any strides) -> x * cos2 + cat(x2, x1) * sin2, a new contiguous tensor."""
    xf = x if x.dtype == cos2.dtype else x.to(cos2.dtype)
    # roll by D/2 along the head dim is cat(x2, x1) in one copy; sin2 carries the minus sign.
    out = xf * cos2  # [T, H, D]
    out.addcmul_(torch.roll(xf, half, -1), sin2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T] int64, cache [P, D] -> (q_out, k_out).

    q and k are read, never written. The cos/sin rows are gathered once and shared by q and k.
    """
    half = q.shape[-1] // 2
    # fp32 compute for half types (one rounding at the end); float64 inputs stay float64.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    table = cos_sin_cache.index_select(0, positions).to(compute)  # [T, D]
    cos = table[:, None, :half]  # [T, 1, D/2]
    sin = table[:, None, half:]
    cos2 = torch.cat((cos, cos), dim=-1)  # [T, 1, D]
    sin2 = torch.cat((-sin, sin), dim=-1)  # [T, 1, D]
    return _rotate(q, cos2, sin2, half), _rotate(k, cos2, sin2, half)


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
    """rope on q and k, then k and v into the paged cache; returns the rotated q.

    On the CPU fusing buys nothing (the rotated k is a small temporary), so this composes the two.
    """
    q_out, k_out = rope(q, k, positions, cos_sin_cache)
    kv_cache_store(k_out, v, k_cache, v_cache, slot_mapping)
    return q_out
