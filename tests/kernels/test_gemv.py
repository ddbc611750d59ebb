"""The Triton GEMV behind cuda ``linear`` for a few 16-bit rows, against the float64 spec
reference; on the GPU also as a programmatic dependent inside a captured graph, behind the
kernels that let it launch early (its weights are loaded before it waits, its activations after)."""

from __future__ import annotations

import pytest
import torch
from ops.helpers import assert_float32_logits, assert_matches_spec, dtype_id, maybe_strided, randn
from rustinfer_ops_cuda.kernels.gemv import (
    KERNEL_MAX_ROWS,
    MAX_ROWS,
    gemv,
    gemv_applies,
    linear,
    logits,
)

from rustinfer.ops import LINEAR, LOGITS

from .lanes import LANE_DEVICE
from .layer_chain import bf16_layers, check_layer_chain_in_graph

DTYPES = [torch.bfloat16, torch.float16]

# (rows, K, N): K of 7 and 576 pad the tile's K (power of two) with masked columns; N of 1, 127
# and 1537 leave the last program's columns partly out of range; 2048 and 8192 are Llama-3.2-1B's
# hidden and MLP widths (the 8192-wide tile is the narrow-program path).
INTERPRET_CASES = [
    (1, 7, 1),
    (2, 576, 127),
    (KERNEL_MAX_ROWS, 576, 1537),
    (1, 2048, 33),
    (3, 8192, 5),
]


def check_gemv(rows: int, k: int, n: int, dtype: torch.dtype, bias: bool, strided: bool) -> None:
    x = randn(rows, k, dtype=dtype)
    # 1/sqrt(K) like trained weights: outputs are O(1), the scale the spec's tolerance assumes.
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    xd = maybe_strided(x.to(LANE_DEVICE), strided)
    assert gemv_applies(xd, weight.to(LANE_DEVICE), KERNEL_MAX_ROWS)
    out = gemv(xd, weight.to(LANE_DEVICE), None if b is None else b.to(LANE_DEVICE))
    assert out.shape == (rows, n) and out.dtype == dtype
    assert_matches_spec("linear", out.cpu(), LINEAR.reference(x, weight, b), dtype)


def _case_id(case: tuple[int, int, int]) -> str:
    return "M{}-K{}-N{}".format(*case)


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_interpret(case: tuple[int, int, int], dtype: torch.dtype, bias: bool) -> None:
    rows, k, n = case
    check_gemv(rows, k, n, dtype, bias, strided=rows > 1)


def check_logits(rows: int, k: int, n: int, dtype: torch.dtype) -> None:
    x = randn(rows, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    out = logits(x.to(LANE_DEVICE), weight.to(LANE_DEVICE))
    assert out.shape == (rows, n) and out.dtype == torch.float32
    ref = LOGITS.reference(x, weight)
    assert_float32_logits(out, ref, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_logits_gemv_interpret(dtype: torch.dtype) -> None:
    check_logits(1, 576, 1031, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_logits_cuda(rows: int, dtype: torch.dtype) -> None:
    check_logits(rows, 2048, 128256, dtype)


@pytest.mark.interpret
def test_linear_takes_cublas_past_the_gemv() -> None:
    """More rows than a tile serves, float32, or a K too wide for registers: not the GEMV."""
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    assert gemv_applies(torch.zeros(MAX_ROWS, 64, dtype=torch.bfloat16), w)
    assert not gemv_applies(torch.zeros(MAX_ROWS + 1, 64, dtype=torch.bfloat16), w)
    assert gemv_applies(torch.zeros(KERNEL_MAX_ROWS, 64, dtype=torch.bfloat16), w, KERNEL_MAX_ROWS)
    assert not gemv_applies(torch.zeros(1, 64), torch.zeros(8, 64))
    wide = torch.zeros(2, 40000, dtype=torch.bfloat16)
    assert not gemv_applies(torch.zeros(1, 40000, dtype=torch.bfloat16), wide)
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.zeros(KERNEL_MAX_ROWS + 1, 64, dtype=torch.bfloat16), w, None)


CUDA_CASES = [
    *INTERPRET_CASES,
    (1, 2048, 3072),
    (4, 2048, 16384),
    (1, 8192, 2048),
    (2, 14336, 4096),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gemv_cuda(case: tuple[int, int, int], dtype: torch.dtype, bias: bool) -> None:
    rows, k, n = case
    check_gemv(rows, k, n, dtype, bias, strided=rows > 1)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3])
def test_dependent_gemvs_in_a_graph_read_their_predecessors_outputs(rows: int) -> None:
    """A layer's chain as decode runs it (add+RMSNorm -> GEMV -> SwiGLU -> GEMV, twice), captured
    and replayed back to back: equal to the same kernels run one at a time with a sync between
    each. A GEMV that read its activations before its predecessor finished would differ."""
    layers, x0, r0 = bf16_layers(rows)
    check_layer_chain_in_graph(lambda t, w: linear(t, w, None), layers, x0, r0)
