"""Triton silu_and_mul against the float64 spec reference, in both lanes."""

from __future__ import annotations

import pytest
import torch
from ops.helpers import assert_matches_spec, dtype_id, maybe_strided, randn
from rustinfer_ops_cuda.kernels.activation import silu_and_mul

from rustinfer.ops import SILU_AND_MUL

from .lanes import BOTH_LANES, LANE_DEVICE

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The spec's tolerances assume |x| <= 32.
MAX_ABS = 32.0


def check_silu_and_mul(
    tokens: int,
    inter: int,
    dtype: torch.dtype,
    is_strided: bool,
    device: str,
    scale: float = 1.0,
) -> None:
    x = randn(tokens, 2 * inter, dtype=dtype, scale=scale).clamp_(-MAX_ABS, MAX_ABS)
    x = maybe_strided(x.to(device), is_strided)
    x_before = x.clone()
    out = silu_and_mul(x)
    assert out.is_contiguous()
    assert torch.equal(x, x_before), "silu_and_mul modified x"
    assert_matches_spec("silu_and_mul", out, SILU_AND_MUL.reference(x), dtype)


# (tokens, inter, dtype, strided, scale): 1100 spans two column blocks (BLOCK = 1024), 13 and 64
# are single partial blocks; scale 8 drives gates far negative (fp16 silu goes subnormal; fp32
# silu needs an exp accurate out to |x| = 32).
INTERPRET_CASES = [
    (3, 13, torch.bfloat16, False, 1.0),
    (5, 64, torch.float16, True, 8.0),
    (7, 1100, torch.bfloat16, True, 1.0),
    (2, 300, torch.bfloat16, False, 8.0),
    (3, 1100, torch.float32, True, 1.0),
    (5, 300, torch.float32, False, 8.0),
]


def _case_id(case: tuple[int, int, torch.dtype, bool, float]) -> str:
    tokens, inter, dtype, is_strided, scale = case
    layout = "strided" if is_strided else "contig"
    return f"T{tokens}-I{inter}-{dtype_id(dtype)}-{layout}-x{scale:g}"


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
def test_silu_and_mul_interpret(case: tuple[int, int, torch.dtype, bool, float]) -> None:
    tokens, inter, dtype, is_strided, scale = case
    check_silu_and_mul(tokens, inter, dtype, is_strided, LANE_DEVICE, scale)


@pytest.mark.cuda
@pytest.mark.parametrize("scale", [1.0, 8.0], ids=["x1", "x8"])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
# 1536: SmolLM2-135M, 8192: Llama 3.2-1B, 14336: Llama 3-8B; 1000: not a multiple of BLOCK.
@pytest.mark.parametrize("inter", [1000, 1536, 4096, 8192, 14336])
@pytest.mark.parametrize("tokens", [1, 7, 33, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_silu_and_mul_cuda(
    tokens: int, inter: int, dtype: torch.dtype, is_strided: bool, scale: float
) -> None:
    check_silu_and_mul(tokens, inter, dtype, is_strided, "cuda", scale)


@pytest.mark.parametrize("device", BOTH_LANES)
def test_silu_and_mul_argument_checks(device: str) -> None:
    x = randn(4, 64, dtype=torch.bfloat16).to(device)
    with pytest.raises(TypeError, match="x has dtype float64"):
        silu_and_mul(x.double())
    with pytest.raises(ValueError, match="must be even"):
        silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match="x has shape"):
        silu_and_mul(x.view(2, 2, 64))
    with pytest.raises(ValueError, match="x must have unit stride"):
        silu_and_mul(randn(4, 128, dtype=torch.bfloat16).to(device)[:, ::2])


@pytest.mark.cuda
def test_silu_and_mul_rejects_cpu_tensors() -> None:
    with pytest.raises(ValueError, match="CUDA tensors"):
        silu_and_mul(randn(4, 64, dtype=torch.bfloat16))
