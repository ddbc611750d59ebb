"""Rotary position embedding: the ``rope`` spec and the cos/sin cache it reads.

Convention: rotate-half (HF Llama / GPT-NeoX). Dimension i of a head pairs with dimension i + D/2,
and the pair is rotated by the angle position * inv_freq[i].
"""

from __future__ import annotations

import math

import torch

from rustinfer.config import RopeScaling
from rustinfer.ops.spec import OpSpec, Tolerance


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Apply Llama 3 frequency scaling to ``inv_freq`` ([D/2], float64 advised).

    Long wavelengths (beyond the original context) are slowed by ``factor``, short ones are kept,
    and the band between is interpolated, so the model sees familiar rotations for local structure.
    """
    if scaling.rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {scaling.rope_type!r}; expected 'llama3'")
    original_max = float(scaling.original_max_position_embeddings)
    low_freq_wavelen = original_max / scaling.low_freq_factor
    high_freq_wavelen = original_max / scaling.high_freq_factor
    wavelen = 2.0 * math.pi / inv_freq
    smooth = (original_max / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1.0 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, scaled)


def build_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    theta: float,
    scaling: RopeScaling | None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[max_positions, head_dim]`` table ``cat(cos, sin)`` that ``rope`` indexes by position.

    Angles are computed in float64 on the CPU and rounded once to ``dtype``: at position 10^5 a
    float32 angle would already be off by ~0.01 rad, and some devices have no float64 at all.
    """
    if head_dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {head_dim}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim  # [D/2]
    inv_freq = 1.0 / (float(theta) ** exponents)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    positions = torch.arange(max_positions, dtype=torch.float64)  # [P]
    angles = torch.outer(positions, inv_freq)  # [P, D/2]
    cache = torch.cat((angles.cos(), angles.sin()), dim=-1)  # [P, D]
    return cache.to(device=device, dtype=dtype)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [T, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k in float64 (the float32 cache is read exactly as given)."""
    half = q.shape[-1] // 2
    table = cos_sin_cache.to(torch.float64)[positions]  # [T, D]
    cos = table[:, None, :half]  # [T, 1, D/2], broadcast over heads
    sin = table[:, None, half:]
    return (
        _rotate_reference(q.to(torch.float64), cos, sin),
        _rotate_reference(k.to(torch.float64), cos, sin),
    )


ROPE = OpSpec(
    name="rope",
    doc="""rope(q, k, positions, cos_sin_cache) -> (q_out, k_out)

    q:             [T, Hq, D] float (may be a strided view, e.g. a slice of a fused QKV output).
    k:             [T, Hkv, D], same dtype as q.
    positions:     [T] int64, each in [0, P).
    cos_sin_cache: [P, D] float32 from ``build_cos_sin_cache``: cache[p] = cat(cos, sin) of the
                   D/2 angles p * inv_freq.
    q_out, k_out:  new contiguous tensors, shapes and dtype of q and k. q and k are NOT modified.

    With c = cache[pos, :D/2], s = cache[pos, D/2:], x1 = x[..., :D/2], x2 = x[..., D/2:]:
    out = cat(x1*c - x2*s, x2*c + x1*s)   (rotate-half, HF Llama / NeoX).
    Implementations compute in float32 (float64 for float64 inputs) and round once to the dtype.

    Tolerances assume O(1) inputs (randn scale): the error of an output element is bounded by the
    norm of its (x1, x2) pair, not by the element itself, because of cancellation.
    """,
    reference=rope_reference,
    tolerances={
        torch.float64: Tolerance(
            2.0**-48,
            2.0**-50,
            "float64 products and sums, a few u64 times the pair norm (<= ~6 at randn scale)",
        ),
        torch.float32: Tolerance(
            2.0**-20,
            2.0**-23,
            "fp32: two rounded products and a rounded sum per element, each <= u32 times the pair "
            "norm (<= ~6 for randn inputs): ~3*6 u32 = 2^-20 absolute; rtol 2 u32 for the rest",
        ),
        torch.bfloat16: Tolerance(
            2.0**-20,
            1.25 * 2.0**-8,
            "computed in fp32 (atol as for float32) and rounded once to bf16: u = 2^-8 relative "
            "plus a quarter-u margin",
        ),
        torch.float16: Tolerance(
            2.0**-20,
            1.25 * 2.0**-11,
            "computed in fp32 (atol as for float32, which also covers fp16 subnormals, spaced "
            "2^-24) and rounded once to fp16: u = 2^-11 relative plus a quarter-u margin",
        ),
    },
)
