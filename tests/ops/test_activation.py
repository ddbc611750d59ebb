"""silu_and_mul (CPU) against the float64 spec reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.ops import SILU_AND_MUL

from .helpers import FLOAT_DTYPES, assert_matches_spec, cpu_impl, dtype_id, maybe_strided, randn

# Each test runs through the C kernels and the torch ones (conftest.py).
pytestmark = pytest.mark.usefixtures("both_cpu_impls")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("inter", [1, 13, 127, 1536])
@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_silu_and_mul(rows: int, inter: int, dtype: torch.dtype, is_strided: bool) -> None:
    # Scale 3 reaches silu's saturating tails (large positive and large negative gates).
    x = maybe_strided(randn(rows, 2 * inter, dtype=dtype, scale=3.0), is_strided)
    x_before = x.clone()
    out = cpu_impl("silu_and_mul", dtype)(x)
    assert out.shape == (rows, inter)
    assert_matches_spec("silu_and_mul", out, SILU_AND_MUL.reference(x), dtype)
    assert torch.equal(x, x_before)


def test_silu_and_mul_halves_not_swapped() -> None:
    # gate = [2], up = [-1] -> silu(2) * -1; swapped halves would give silu(-1) * 2.
    out = cpu_impl("silu_and_mul", torch.float64)(torch.tensor([[2.0, -1.0]], dtype=torch.float64))
    expected = -2.0 / (1.0 + torch.exp(torch.tensor(-2.0, dtype=torch.float64)))
    torch.testing.assert_close(out, expected.reshape(1, 1), rtol=2**-48, atol=0.0)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 20),
    inter=st.integers(1, 300),
    scale=st.floats(0.01, 8.0),  # |x| <= 32 at 4 sigma, as the spec assumes
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_silu_and_mul_random_shapes(
    rows: int, inter: int, scale: float, dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    x = randn(rows, 2 * inter, dtype=dtype, scale=scale)
    out = cpu_impl("silu_and_mul", dtype)(x)
    assert_matches_spec("silu_and_mul", out, SILU_AND_MUL.reference(x), dtype)
