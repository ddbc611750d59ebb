"""The batch-invariant skinny matmul behind cuda ``linear`` and ``logits`` for 1-16 rows: against
the float64 spec references, and row for row bit-identical whatever the row count (a row of an
M-row call equals the one-row call on that row, for every M from 1 to 16). The interpret lane runs
fp16 and fp32 (the interpreter's bf16 dot is wrong); the cuda lane bf16 at Llama-3.2-1B's shapes.
"""

from __future__ import annotations

import pytest
import torch
import triton
from ops.helpers import assert_float32_logits, assert_matches_spec, dtype_id, maybe_strided, randn
from rustinfer_ops_cuda.kernels.skinny import (
    KERNEL_ROWS,
    LOOP_STAGES,
    MAX_ROWS,
    SkinnyTiles,
    linear,
    logits,
    skinny,
    skinny_applies,
    skinny_tiles,
)

from rustinfer.ops import LINEAR, LOGITS

from .lanes import LANE_DEVICE
from .layer_chain import bf16_layers, check_layer_chain_in_graph

INTERPRET_DTYPES = [torch.float16, torch.float32]
CUDA_DTYPES = [torch.bfloat16, torch.float16]

# (rows, K, N): K of 96 and 200 pad the one K step with masked columns, 257 and 320 split K in
# two (the second range mostly masked at 257); N of 40, 129 and 200 leave the last 64-row tile
# partly out of range (64 fills it); 16 rows fill every column of the MMA.
INTERPRET_CASES = [
    (1, 96, 40),
    (2, 200, 64),
    (5, 257, 129),
    (KERNEL_ROWS, 320, 200),
    (2 * KERNEL_ROWS + 5, 200, 64),  # three blocks of rows, the last one mostly padding
]


def forced_split(k: int) -> SkinnyTiles:
    """A cut the default rule never takes at these sizes: 32-wide steps, two per program, so the
    hand-prefetching loop and a multi-way split both run (K = 96: 2 ranges, K = 320: 5)."""
    chunks = triton.cdiv(k, 32)
    return SkinnyTiles(block_n=64, block_k=32, split=triton.cdiv(chunks, 2), steps=2)


def forced_pipelined(k: int) -> SkinnyTiles:
    """Three 32-wide steps per program through the pipelined loop (step 0 added last), split
    where K is wider than 96."""
    chunks = triton.cdiv(k, 32)
    return SkinnyTiles(block_n=64, block_k=32, split=triton.cdiv(chunks, 3), steps=3, stages=3)


def forced_narrow(k: int) -> SkinnyTiles:
    """16-feature tiles on one warp (Ampere-style MMAs), two 32-wide steps, pipelined."""
    chunks = triton.cdiv(k, 32)
    return SkinnyTiles(
        block_n=16, block_k=32, split=triton.cdiv(chunks, 3), steps=3, stages=3, warps=1
    )


TILINGS = {
    "default": lambda k: None,
    "split": forced_split,
    "pipelined": forced_pipelined,
    "narrow": forced_narrow,
}


def weights(
    n: int, k: int, dtype: torch.dtype, bias: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    # 1/sqrt(K) like trained weights: outputs are O(1), the scale the spec's tolerance assumes.
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    return weight, randn(n, dtype=dtype) if bias else None


def on_lane(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(LANE_DEVICE)


def check_skinny(
    rows: int, k: int, n: int, dtype: torch.dtype, bias: bool, tiles: SkinnyTiles | None
) -> None:
    x = randn(rows, k, dtype=dtype)
    weight, b = weights(n, k, dtype, bias)
    xd = maybe_strided(x.to(LANE_DEVICE), rows > 1)
    out = skinny(xd, weight.to(LANE_DEVICE), on_lane(b), tiles=tiles)
    assert out.shape == (rows, n) and out.dtype == dtype
    assert_matches_spec("linear", out.cpu(), LINEAR.reference(x, weight, b), dtype)


def assert_rows_invariant(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    row_counts: list[int],
    out_dtype: torch.dtype | None = None,
    tiles: SkinnyTiles | None = None,
) -> None:
    """Row i of the call on x[:m] equals the one-row call on x[i:i+1], bit for bit, for every m
    in ``row_counts`` (the tiles are the weight's, whatever m is)."""
    singles = [skinny(x[i : i + 1], weight, bias, out_dtype, tiles) for i in range(max(row_counts))]
    for m in row_counts:
        out = skinny(x[:m], weight, bias, out_dtype, tiles)
        for i in range(m):
            assert torch.equal(out[i], singles[i][0]), (
                f"row {i} of {m} differs from it alone by up to "
                f"{(out[i].double() - singles[i][0].double()).abs().max().item()}"
            )


def _case_id(case: tuple[int, int, int]) -> str:
    return "M{}-K{}-N{}".format(*case)


# (tiling, bias): every tiling, the bias through the direct store and through the reduction.
TILING_BIAS = [
    ("default", False),
    ("default", True),
    ("split", True),
    ("pipelined", False),
    ("narrow", True),
]
TILING_BIAS_IDS = [f"{tiling}-{'bias' if bias else 'nobias'}" for tiling, bias in TILING_BIAS]


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(("tiling", "bias"), TILING_BIAS, ids=TILING_BIAS_IDS)
def test_skinny_interpret(
    case: tuple[int, int, int], dtype: torch.dtype, tiling: str, bias: bool
) -> None:
    rows, k, n = case
    check_skinny(rows, k, n, dtype, bias, TILINGS[tiling](k))


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("dtype", "tiling", "bias", "strided"),
    [
        (torch.float16, "default", True, True),
        (torch.float16, "split", False, True),
        (torch.float16, "pipelined", True, True),
        (torch.float32, "split", True, False),
    ],
    ids=["fp16-default-bias-strided", "fp16-split-strided", "fp16-pipelined-bias-strided",
         "fp32-split-bias"],
)  # fmt: skip
def test_rows_are_batch_invariant_interpret(
    dtype: torch.dtype, tiling: str, bias: bool, strided: bool
) -> None:
    k, n = 160, 77  # one K step by default, three ranges of two steps when forced; odd N
    x = maybe_strided(randn(KERNEL_ROWS, k, dtype=dtype), strided)
    weight, b = weights(n, k, dtype, bias)
    rows = list(range(1, KERNEL_ROWS + 1))
    # Compared in float32, unrounded: a summation-order difference rarely survives rounding to
    # fp16 at these sizes, so a kernel that summed differently per row count could pass there.
    assert_rows_invariant(x, weight, b, rows, out_dtype=torch.float32, tiles=TILINGS[tiling](k))


def check_logits(rows: int, k: int, n: int, dtype: torch.dtype, tiles: SkinnyTiles | None) -> None:
    x = randn(rows, k, dtype=dtype)
    weight, _ = weights(n, k, dtype, bias=False)
    if tiles is None:
        out = logits(x.to(LANE_DEVICE), weight.to(LANE_DEVICE))
    else:
        out = skinny(x.to(LANE_DEVICE), weight.to(LANE_DEVICE), None, torch.float32, tiles)
    assert out.shape == (rows, n) and out.dtype == torch.float32
    ref = LOGITS.reference(x, weight)
    assert_float32_logits(out, ref, dtype)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tiling", TILINGS)
def test_logits_interpret(dtype: torch.dtype, tiling: str) -> None:
    check_logits(3, 320, 197, dtype, TILINGS[tiling](320))


@pytest.mark.interpret
def test_logits_rows_are_batch_invariant_interpret() -> None:
    k, n = 320, 197
    x = randn(KERNEL_ROWS, k, dtype=torch.float16)
    weight, _ = weights(n, k, torch.float16, bias=False)
    assert_rows_invariant(x, weight, None, [1, 2, 7, KERNEL_ROWS], out_dtype=torch.float32)


@pytest.mark.interpret
def test_linear_takes_cublas_past_the_skinny_kernel() -> None:
    """More rows than the MMA's 16 columns, float32, or no rows: not the skinny kernel."""
    w = randn(8, 64, dtype=torch.float16)
    x = randn(MAX_ROWS + 1, 64, dtype=torch.float16)
    assert skinny_applies(x[:MAX_ROWS], w)
    assert not skinny_applies(x, w)
    assert not skinny_applies(x[:0], w)
    assert not skinny_applies(x[:1].float(), w.float())
    torch.testing.assert_close(linear(x, w, None), torch.nn.functional.linear(x, w))
    with pytest.raises(ValueError, match="M, K and N at least 1"):
        skinny(x[:0], w, None)


@pytest.mark.interpret
def test_rows_past_one_block_are_batch_invariant_interpret() -> None:
    """Rows in the second and third blocks of 16 equal their one-row calls too (a prefill's
    rows under the batch-invariant ops)."""
    k, n = 160, 77
    x = randn(2 * KERNEL_ROWS + 3, k, dtype=torch.float16)
    weight, b = weights(n, k, torch.float16, bias=True)
    counts = [KERNEL_ROWS + 1, 2 * KERNEL_ROWS + 3]
    assert_rows_invariant(x, weight, b, counts, out_dtype=torch.float32, tiles=forced_split(k))


def test_tiles_depend_on_the_weight_alone() -> None:
    """The cut for Llama-3.2-1B's matrices (the split-K rule aims at ~528 programs), and every
    cut covers K with no empty split range."""
    expected = {  # (N, K): (split, steps, stages)
        (3072, 2048): (8, 1, 1),  # qkv
        (2048, 2048): (8, 1, 1),  # o
        (16384, 2048): (2, 4, LOOP_STAGES),  # gate_up
        (2048, 8192): (16, 2, 1),  # down
        (128256, 2048): (1, 8, LOOP_STAGES),  # LM head
    }
    for (n, k), want in expected.items():
        tiles = skinny_tiles(n, k)
        assert (tiles.split, tiles.steps, tiles.stages) == want, (n, k, tiles)
    for n in (1, 63, 64, 65, 1000, 50000):
        for k in (1, 15, 16, 17, 255, 257, 1000, 4097, 14336):
            skinny_tiles(n, k).check(k)  # raises if a range is empty or K is not covered
    with pytest.raises(ValueError, match="no empty split"):
        SkinnyTiles(64, 32, split=3, steps=2).check(128)
    with pytest.raises(ValueError, match="powers of two"):
        SkinnyTiles(64, 48, split=1, steps=1).check(48)


# Llama-3.2-1B's matmuls (N, K): the fused qkv, o, the fused gate/up and down projections.
LLAMA_1B = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
CUDA_ROWS = [1, 2, 3, 8, 16]


@pytest.mark.cuda
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [*CUDA_DTYPES, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(("tiling", "bias"), TILING_BIAS, ids=TILING_BIAS_IDS)
def test_skinny_cuda_small(
    case: tuple[int, int, int], dtype: torch.dtype, tiling: str, bias: bool
) -> None:
    rows, k, n = case
    check_skinny(rows, k, n, dtype, bias, TILINGS[tiling](k))


@pytest.mark.cuda
@pytest.mark.parametrize("shape", LLAMA_1B)
@pytest.mark.parametrize("rows", CUDA_ROWS)
def test_skinny_cuda_llama(shape: str, rows: int) -> None:
    n, k = LLAMA_1B[shape]
    check_skinny(rows, k, n, torch.bfloat16, bias=shape == "qkv", tiles=None)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", LLAMA_1B)
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_rows_are_batch_invariant_cuda(shape: str, dtype: torch.dtype) -> None:
    n, k = LLAMA_1B[shape]
    x = maybe_strided(randn(KERNEL_ROWS, k, dtype=dtype).cuda(), shape in ("qkv", "down"))
    weight, b = weights(n, k, dtype, bias=shape == "o")
    # In x's dtype, as decode runs it, and in float32, where any summation difference shows.
    for out_dtype in (dtype, torch.float32):
        assert_rows_invariant(x, weight.cuda(), on_lane(b), CUDA_ROWS, out_dtype=out_dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, KERNEL_ROWS])
def test_logits_cuda(rows: int) -> None:
    check_logits(rows, 2048, 128256, torch.bfloat16, tiles=None)


@pytest.mark.cuda
def test_logits_rows_are_batch_invariant_cuda() -> None:
    x = randn(KERNEL_ROWS, 2048, dtype=torch.bfloat16).cuda()
    weight, _ = weights(128256, 2048, torch.bfloat16, bias=False)
    assert_rows_invariant(x, weight.cuda(), None, CUDA_ROWS, out_dtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("rows", [1, 3, KERNEL_ROWS])
def test_dependent_matmuls_in_a_graph_read_their_predecessors_outputs(rows: int) -> None:
    """A layer's chain as decode runs it (add+RMSNorm -> gate/up -> SwiGLU -> down, twice; both
    matmuls split K, so each is a matmul kernel and a reduction launched behind it), captured and
    replayed back to back: equal to the same kernels run one at a time with a sync between each.
    A kernel that read its inputs before its predecessor finished would differ."""
    layers, x0, r0 = bf16_layers(rows)
    check_layer_chain_in_graph(lambda t, w: linear(t, w, None), layers, x0, r0, no_sync_check=True)
