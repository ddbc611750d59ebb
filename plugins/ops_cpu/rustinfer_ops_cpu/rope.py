"""Rotary embedding (rotate-half) for q and k in one call, computed in fp32 and rounded once.

On the CPU each torch call costs a few microseconds of dispatch, more than the arithmetic of a
decode token's rope, so the work is arranged to make few calls (measured in BENCHMARKS.md, "CPU,
against llama.cpp"):
- every layer of a step rotates by the same positions: the cos/sin rows gathered for them are
  kept and reused while the next call's positions compare equal (one comparison per layer
  instead of a gather, two concatenations and a negation);
- q and k cut from one fused QKV row lie side by side in memory: they are rotated as one
  ``[T, Hq + Hkv, D]`` tensor (three calls instead of six).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from rustinfer_ops_cpu.kv_cache import kv_cache_store


@dataclass(frozen=True)
class _Angles:
    """cos and sin rows for some positions, widened to [T, 1, D] (sin signed for rotate-half)."""

    cache: torch.Tensor  # the cos/sin cache they were read from
    positions: torch.Tensor  # a private copy of the positions
    cos2: torch.Tensor
    sin2: torch.Tensor


_last = threading.local()  # the engine's thread reuses its own step's angles


def _angles(positions: torch.Tensor, cos_sin_cache: torch.Tensor, compute: torch.dtype) -> _Angles:
    last: _Angles | None = getattr(_last, "angles", None)
    if (
        last is not None
        and last.cache is cos_sin_cache
        and last.cos2.dtype == compute
        and last.positions.shape == positions.shape
        and torch.equal(last.positions, positions)
    ):
        return last
    half = cos_sin_cache.shape[-1] // 2
    table = cos_sin_cache.index_select(0, positions).to(compute)  # [T, D]
    cos = table[:, None, :half]  # [T, 1, D/2]
    sin = table[:, None, half:]
    angles = _Angles(
        cos_sin_cache,
        positions.clone(),
        torch.cat((cos, cos), dim=-1),  # [T, 1, D]
        torch.cat((-sin, sin), dim=-1),  # [T, 1, D]
    )
    _last.angles = angles
    return angles


def _rotate(x: torch.Tensor, cos2: torch.Tensor, sin2: torch.Tensor, half: int) -> torch.Tensor:
    """x [T, H, D] (any strides) -> x * cos2 + cat(x2, x1) * sin2, a new contiguous tensor."""
    xf = x if x.dtype == cos2.dtype else x.to(cos2.dtype)
    # roll by D/2 along the head dim is cat(x2, x1) in one copy; sin2 carries the minus sign.
    out = xf * cos2  # [T, H, D]
    out.addcmul_(torch.roll(xf, half, -1), sin2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _side_by_side(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q and k as one [T, Hq + Hkv, D] view when k's heads follow q's in every row, else None."""
    t, hq, d = q.shape
    if (
        k.dtype != q.dtype
        or q.stride()[1:] != (d, 1)
        or k.stride()[1:] != (d, 1)
        # A row stride of a single-row view is arbitrary (views of [1, N] pick their own).
        or (t > 1 and k.stride(0) != q.stride(0))
        or k.data_ptr() != q.data_ptr() + hq * d * q.element_size()
        or k.untyped_storage().data_ptr() != q.untyped_storage().data_ptr()
    ):
        return None
    return q.as_strided((t, hq + k.shape[1], d), (q.stride(0), d, 1))


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D], positions [T] int64, cache [P, D] -> (q_out, k_out).

    q and k are read, never written; both results are contiguous.
    """
    half = q.shape[-1] // 2
    # fp32 compute for half types (one rounding at the end); float64 inputs stay float64.
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    a = _angles(positions, cos_sin_cache, compute)
    qk = _side_by_side(q, k)
    if qk is None:
        return _rotate(q, a.cos2, a.sin2, half), _rotate(k, a.cos2, a.sin2, half)
    out = _rotate(qk, a.cos2, a.sin2, half)  # [T, Hq + Hkv, D]
    hq = q.shape[1]
    q_out, k_out = out[:, :hq], out[:, hq:]
    if q.shape[0] > 1:  # rows of the joint result interleave q's heads with k's
        q_out, k_out = q_out.contiguous(), k_out.contiguous()
    return q_out, k_out


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
