"""Triton rmsnorm / fused_add_rmsnorm against the float64 spec references, in both lanes."""

from __future__ import annotations

import pytest
import torch
from ops.helpers import assert_matches_spec, dtype_id, maybe_strided, randn
from rustinfer_ops_cuda.kernels.norm import fused_add_rmsnorm, rmsnorm

from rustinfer.ops import FUSED_ADD_RMSNORM, RMSNORM

from .lanes import BOTH_LANES, LANE_DEVICE

EPS = 1e-5
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def check_rmsnorm(
    tokens: int, hidden: int, dtype: torch.dtype, is_strided: bool, device: str
) -> None:
    x = maybe_strided(randn(tokens, hidden, dtype=dtype).to(device), is_strided)
    weight = randn(hidden, dtype=dtype).to(device)
    x_before = x.clone()
    out = rmsnorm(x, weight, EPS)
    assert out.is_contiguous()
    assert torch.equal(x, x_before), "rmsnorm modified x"
    assert_matches_spec("rmsnorm", out, RMSNORM.reference(x, weight, EPS), dtype)


def check_fused_add_rmsnorm(
    tokens: int, hidden: int, dtype: torch.dtype, is_strided: bool, device: str
) -> None:
    x = maybe_strided(randn(tokens, hidden, dtype=dtype).to(device), is_strided)
    residual = maybe_strided(randn(tokens, hidden, dtype=dtype).to(device), is_strided)
    weight = randn(hidden, dtype=dtype).to(device)
    x_before, residual_before = x.clone(), residual.clone()
    ref_out, ref_residual = FUSED_ADD_RMSNORM.reference(x_before, residual_before, weight, EPS)
    out, residual_out = fused_add_rmsnorm(x, residual, weight, EPS)
    assert torch.equal(x, x_before), "fused_add_rmsnorm modified x"
    # The CUDA kernel's contract: x + residual lands in ``residual`` itself, same storage.
    assert residual_out is residual, "residual_out is not the residual tensor (in place)"
    assert out.is_contiguous()
    assert_matches_spec("fused_add_rmsnorm", out, ref_out, dtype)
    assert_matches_spec("fused_add_rmsnorm", residual, ref_residual, dtype)


# (tokens, hidden, dtype, strided): odd sizes, one row per program (576: 2 rows per program,
# 13 and 64: 16), and 8200 > 8192 for the two-pass loop; float32 on both paths too.
INTERPRET_RMSNORM = [
    (3, 13, torch.bfloat16, False),
    (17, 64, torch.bfloat16, True),
    (5, 576, torch.float16, True),
    (2, 8200, torch.bfloat16, True),
    (7, 13, torch.float32, True),
    (5, 576, torch.float32, False),
    (2, 8200, torch.float32, True),
]
INTERPRET_FUSED = [
    (3, 13, torch.bfloat16, True),
    (7, 576, torch.bfloat16, False),
    (2, 8200, torch.float16, True),
    (17, 64, torch.float32, True),
    (2, 8200, torch.float32, False),
]


def _case_id(case: tuple[int, int, torch.dtype, bool]) -> str:
    tokens, hidden, dtype, is_strided = case
    return f"T{tokens}-H{hidden}-{dtype_id(dtype)}-{'strided' if is_strided else 'contig'}"


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_RMSNORM, ids=_case_id)
def test_rmsnorm_interpret(case: tuple[int, int, torch.dtype, bool]) -> None:
    check_rmsnorm(*case, device=LANE_DEVICE)


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_FUSED, ids=_case_id)
def test_fused_add_rmsnorm_interpret(case: tuple[int, int, torch.dtype, bool]) -> None:
    check_fused_add_rmsnorm(*case, device=LANE_DEVICE)


CUDA_TOKENS = [1, 7, 33, 4097]
# SmolLM2-135M, Llama 3.2-1B, Llama 3-8B, Llama 3-70B; 12288 takes the two-pass path.
CUDA_HIDDEN = [576, 2048, 4096, 8192, 12288]


@pytest.mark.cuda
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("hidden", CUDA_HIDDEN)
@pytest.mark.parametrize("tokens", CUDA_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rmsnorm_cuda(tokens: int, hidden: int, dtype: torch.dtype, is_strided: bool) -> None:
    check_rmsnorm(tokens, hidden, dtype, is_strided, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("hidden", CUDA_HIDDEN)
@pytest.mark.parametrize("tokens", CUDA_TOKENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_fused_add_rmsnorm_cuda(
    tokens: int, hidden: int, dtype: torch.dtype, is_strided: bool
) -> None:
    check_fused_add_rmsnorm(tokens, hidden, dtype, is_strided, device="cuda")


@pytest.mark.parametrize("device", BOTH_LANES)
def test_norm_argument_checks(device: str) -> None:
    x = randn(4, 64, dtype=torch.bfloat16).to(device)
    w = randn(64, dtype=torch.bfloat16).to(device)
    with pytest.raises(TypeError, match="x has dtype float64"):
        rmsnorm(x.double(), w.double(), EPS)
    with pytest.raises(TypeError, match="weight has dtype float32"):
        rmsnorm(x, w.float(), EPS)
    with pytest.raises(TypeError, match="weight has dtype float16"):
        rmsnorm(x, w.half(), EPS)
    with pytest.raises(ValueError, match="weight has shape"):
        rmsnorm(x, w[:63], EPS)
    with pytest.raises(ValueError, match="x has shape"):
        rmsnorm(x.view(2, 2, 64), w, EPS)
    with pytest.raises(ValueError, match="x must have unit stride"):
        rmsnorm(randn(4, 128, dtype=torch.bfloat16).to(device)[:, ::2], w, EPS)
    with pytest.raises(ValueError, match="residual has shape"):
        fused_add_rmsnorm(x, x[:3].clone(), w, EPS)
    with pytest.raises(TypeError, match="residual has dtype float16"):
        fused_add_rmsnorm(x, x.half(), w, EPS)


@pytest.mark.cuda
def test_norm_rejects_mixed_devices() -> None:
    x = randn(4, 64, dtype=torch.bfloat16).cuda()
    with pytest.raises(ValueError, match="weight is on cpu"):
        rmsnorm(x, randn(64, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="CUDA tensors"):
        rmsnorm(x.cpu(), randn(64, dtype=torch.bfloat16), EPS)
