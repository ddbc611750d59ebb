"""rmsnorm and fused_add_rmsnorm (CPU) against the float64 spec references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.ops import FUSED_ADD_RMSNORM, RMSNORM

from .helpers import FLOAT_DTYPES, assert_matches_spec, cpu_impl, dtype_id, maybe_strided, randn

# Each test runs through the C kernels and the torch ones (conftest.py).
pytestmark = pytest.mark.usefixtures("both_cpu_impls")

ROWS = [1, 7, 64]
HIDDEN = [1, 13, 576, 1536]


def _weight(hidden: int, dtype: torch.dtype) -> torch.Tensor:
    # Trained norm weights sit around 1 with a spread; randn around 1 exercises signs too.
    return (1.0 + randn(hidden, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_rmsnorm(rows: int, hidden: int, dtype: torch.dtype, is_strided: bool) -> None:
    x = maybe_strided(randn(rows, hidden, dtype=dtype), is_strided)
    weight = _weight(hidden, dtype)
    x_before = x.clone()
    out = cpu_impl("rmsnorm", dtype)(x, weight, 1e-5)
    assert_matches_spec("rmsnorm", out, RMSNORM.reference(x, weight, 1e-5), dtype)
    assert torch.equal(x, x_before), "rmsnorm modified its input"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_fused_add_rmsnorm(rows: int, hidden: int, dtype: torch.dtype, is_strided: bool) -> None:
    x = maybe_strided(randn(rows, hidden, dtype=dtype), is_strided)
    residual = maybe_strided(randn(rows, hidden, dtype=dtype, scale=3.0), is_strided)
    weight = _weight(hidden, dtype)
    ref_out, ref_residual = FUSED_ADD_RMSNORM.reference(x, residual, weight, 1e-6)
    x_before = x.clone()
    out, residual_out = cpu_impl("fused_add_rmsnorm", dtype)(x, residual, weight, 1e-6)
    assert_matches_spec("fused_add_rmsnorm", residual_out, ref_residual, dtype)
    assert_matches_spec("fused_add_rmsnorm", out, ref_out, dtype)
    assert torch.equal(x, x_before), "fused_add_rmsnorm modified x"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_rmsnorm_matches_hf_bit_for_bit(dtype: torch.dtype) -> None:
    # End-to-end tests compare token ids with HF transformers, so the CPU kernel keeps HF's order
    # of operations exactly (fp32 upcast, rsqrt, cast back, times weight).
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hidden = 576
    norm = llama.LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(_weight(hidden, dtype))
        x = randn(9, hidden, dtype=dtype)
        expected = norm(x)
    assert torch.equal(cpu_impl("rmsnorm", dtype)(x, norm.weight.detach(), 1e-5), expected)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    hidden=st.integers(1, 200),
    log2_scale=st.integers(0, 6),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_rmsnorm_scale_invariant(
    rows: int, hidden: int, log2_scale: int, dtype: torch.dtype, seed: int
) -> None:
    # rmsnorm(c * x) == rmsnorm(x) for c > 0 when eps = 0. Powers of two keep c * x exact in every
    # dtype (c >= 1 so no float16 value drops into subnormals), so any deviation beyond the spec
    # tolerance is the implementation's.
    torch.manual_seed(seed)
    x = randn(rows, hidden, dtype=dtype)
    weight = _weight(hidden, dtype)
    scaled = x * 2.0**log2_scale
    assert torch.equal(scaled / 2.0**log2_scale, x)
    out = cpu_impl("rmsnorm", dtype)(scaled, weight, 0.0)
    assert_matches_spec("rmsnorm", out, RMSNORM.reference(x, weight, 0.0), dtype)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    hidden=st.integers(1, 200),
    residual_scale=st.floats(0.01, 100.0),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_add_rmsnorm_is_add_then_norm(
    rows: int, hidden: int, residual_scale: float, dtype: torch.dtype, seed: int
) -> None:
    # The fusion changes nothing: residual_out is the once-rounded sum (unique, so compared
    # exactly), and out is rmsnorm of exactly that tensor, within rmsnorm's own tolerance.
    torch.manual_seed(seed)
    x = randn(rows, hidden, dtype=dtype)
    residual = randn(rows, hidden, dtype=dtype, scale=residual_scale)
    weight = _weight(hidden, dtype)
    expected_sum = x + residual
    out, residual_out = cpu_impl("fused_add_rmsnorm", dtype)(x, residual.clone(), weight, 1e-6)
    assert torch.equal(residual_out, expected_sum)
    assert_matches_spec("rmsnorm", out, RMSNORM.reference(expected_sum, weight, 1e-6), dtype)
