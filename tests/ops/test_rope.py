"""rope (CPU) against the float64 spec reference, and the cos/sin cache builder."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.config import RopeScaling
from rustinfer.ops import ROPE, build_cos_sin_cache, llama3_inv_freq

from .helpers import FLOAT_DTYPES, assert_matches_spec, cpu_impl, dtype_id, randn, strided
from .rope_store_case import check_rope_kv_store

# Each test runs through the C kernels and the torch ones (conftest.py).
pytestmark = pytest.mark.usefixtures("both_cpu_impls")

MAX_POSITIONS = 4096
# Llama-3.2-1B's published rope configuration.
LLAMA32_SCALING = RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def _qk(
    tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, is_strided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    n_heads, n_kv_heads = heads
    if not is_strided:
        return (
            randn(tokens, n_heads, head_dim, dtype=dtype),
            randn(tokens, n_kv_heads, head_dim, dtype=dtype),
        )
    # As a model passes them: q and k are column slices of one fused QKV projection output.
    qkv = randn(tokens, (n_heads + 2 * n_kv_heads) * head_dim, dtype=dtype)
    qkv = strided(qkv)
    q = qkv[:, : n_heads * head_dim].view(tokens, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv_heads) * head_dim]
    return q, k.view(tokens, n_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [8, 64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_rope(
    tokens: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype, is_strided: bool
) -> None:
    q, k = _qk(tokens, heads, head_dim, dtype, is_strided)
    cache = build_cos_sin_cache(head_dim, MAX_POSITIONS, 10000.0, None)
    positions = torch.randint(0, MAX_POSITIONS, (tokens,))
    q_before, k_before = q.clone(), k.clone()
    q_out, k_out = cpu_impl("rope", dtype)(q, k, positions, cache)
    ref_q, ref_k = ROPE.reference(q, k, positions, cache)
    assert_matches_spec("rope", q_out, ref_q, dtype)
    assert_matches_spec("rope", k_out, ref_k, dtype)
    assert q_out.is_contiguous() and k_out.is_contiguous()
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "rope modified q or k in place"


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 9),
    n_heads=st.integers(1, 5),
    half_dim=st.integers(1, 40),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_rotates_pairs(
    tokens: int, n_heads: int, half_dim: int, dtype: torch.dtype, seed: int
) -> None:
    # A rotation keeps the norm of every (x[i], x[i + D/2]) pair, and position 0 is the identity.
    torch.manual_seed(seed)
    head_dim = 2 * half_dim
    q = randn(tokens, n_heads, head_dim, dtype=dtype)
    k = randn(tokens, 1, head_dim, dtype=dtype)
    cache = build_cos_sin_cache(head_dim, MAX_POSITIONS, 500000.0, LLAMA32_SCALING)
    rope = cpu_impl("rope", dtype)

    q_out, k_out = rope(q, k, torch.zeros(tokens, dtype=torch.int64), cache)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)

    q_out, _ = rope(q, k, torch.randint(0, MAX_POSITIONS, (tokens,)), cache)

    def pair_norms(x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return torch.hypot(x[..., :half_dim], x[..., half_dim:])

    # Each output element is within the spec tolerance, so each pair norm is too (doubled: the
    # pair's two errors add in quadrature, bounded by their sum). The float32 cache itself has
    # cos^2 + sin^2 = 1 only to ~2 u32, which moves the norm by up to 2^-24 relative.
    tol = ROPE.tolerance(dtype)
    torch.testing.assert_close(
        pair_norms(q_out), pair_norms(q), atol=2 * tol.atol, rtol=2 * tol.rtol + 2**-24
    )


def test_cos_sin_cache_plain_formula() -> None:
    head_dim, positions, theta = 64, 300, 10000.0
    cache = build_cos_sin_cache(head_dim, positions, theta, None)
    assert cache.shape == (positions, head_dim) and cache.dtype == torch.float32
    # Spot values from Python's own math (float64), rounded to float32 like the cache.
    for pos in (0, 1, 17, 299):
        for i in (0, 1, 5, 31):
            angle = pos / theta ** (2 * i / head_dim)
            assert cache[pos, i].item() == pytest.approx(math.cos(angle), abs=2**-24)
            assert cache[pos, 32 + i].item() == pytest.approx(math.sin(angle), abs=2**-24)


def test_cos_sin_cache_dtype_device_and_odd_dim() -> None:
    cache = build_cos_sin_cache(16, 10, 10000.0, None, device="cpu", dtype=torch.float64)
    assert cache.dtype == torch.float64 and cache.device.type == "cpu"
    assert torch.equal(cache[0], torch.tensor([1.0] * 8 + [0.0] * 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="even head_dim"):
        build_cos_sin_cache(7, 10, 10000.0, None)


def test_llama3_scaling_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, theta = 64, 500000.0
    config = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": theta,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")  # float32
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ours = llama3_inv_freq(plain, LLAMA32_SCALING)
    # The test must see all three bands (kept, interpolated, divided) or it proves little.
    assert (ours == plain).any() and (ours == plain / 32).any()
    assert ((ours != plain) & (ours != plain / 32)).any()
    # transformers works in float32: theta ** (i / D) with a rounded exponent is off by up to
    # ln(theta) * u32 = 13 u32 ~ 2^-20 relative.
    torch.testing.assert_close(ours, expected.to(torch.float64), rtol=2**-19, atol=0.0)

    cache = build_cos_sin_cache(head_dim, 1000, theta, LLAMA32_SCALING)
    angles = torch.outer(torch.arange(1000, dtype=torch.float64), ours)
    torch.testing.assert_close(
        cache, torch.cat((angles.cos(), angles.sin()), -1).float(), rtol=0.0, atol=0.0
    )


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", [(4, 4), (9, 3), (8, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_rope_kv_store(
    tokens: int, heads: tuple[int, int], dtype: torch.dtype, is_strided: bool
) -> None:
    check_rope_kv_store(cpu_impl("rope_kv_store", dtype), tokens, heads, 64, dtype, is_strided)
