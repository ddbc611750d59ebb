"""Paged attention at long context on inputs whose outputs have scale (tests/ops/scaled_inputs.py).

With random inputs (test_attention.py) an 8k-32k context averages thousands of random V rows, far
below the bf16 tolerance: a kernel that drops the newest key or a whole page still passes. Here a
few needle keys (first position, both sides of a page boundary, middle of a page, newest, and for
prefill one among the new tokens) take nearly all the softmax weight, each with its own O(1) V
row. Every test first proves its inputs have teeth: the float64 spec reference on inputs mutated
the way a broken kernel reads them (newest key dropped, a needle's page zeroed or read from
another block, a key read past the end, a causal window one key short or long) must differ from
the true reference by MIN_MARGIN tolerances or more in every row and head the mutation touches;
then the kernel must match the true reference within one.

cpu lane (unmarked): the torch implementations, a few thousand tokens. interpret lane: the Triton
kernels on CPU tensors, fp16/fp32, a few hundred tokens. cuda lane: 8k-32k contexts, bf16 and
fp16 (and a few fp32), several split counts, mixed-length batches, extends of 512 tokens over
8k-16k cached ones; there the float64 references and the teeth checks on the host take 5-60 s per
input set (measured on a 2-core CPU), shared by the tests on the same inputs.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from ops.helpers import assert_matches_spec, cpu_impl, dtype_id
from ops.scaled_inputs import ScaledCase, scaled_decode, scaled_prefill, teeth
from rustinfer_ops_cuda.kernels.decode_attention import attention_decode
from rustinfer_ops_cuda.kernels.prefill_attention import PrefillConfig, attention_prefill

from kernels.lanes import LANE_DEVICE
from rustinfer.ops import ATTENTION_DECODE, ATTENTION_PREFILL

interpret = pytest.mark.interpret
cuda = pytest.mark.cuda


def _seed(*key: object) -> int:
    return zlib.crc32(repr(key).encode())


# Cached: the split-count variants of a case share its inputs, reference and teeth check (the
# mutated references cost seconds each at 32k). A failed teeth check is not cached: every test
# on those inputs fails.
@functools.cache
def decode_case(
    seq_lens: tuple[int, ...],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    consecutive: bool = False,
) -> tuple[ScaledCase, torch.Tensor]:
    """The inputs and their float64 reference, after asserting the inputs have teeth."""
    key = (seq_lens, heads, head_dim, block_size, str(dtype), consecutive)
    case = scaled_decode(
        list(seq_lens),
        heads,
        head_dim,
        block_size,
        dtype,
        seed=_seed(*key),
        consecutive=consecutive,
    )
    reference = ATTENTION_DECODE.reference(*case.args)
    teeth(case, reference, dtype)
    return case, reference


@functools.cache
def prefill_case(
    seqs: tuple[tuple[int, int], ...],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    consecutive: bool = False,
) -> tuple[ScaledCase, torch.Tensor]:
    """Sequences as (seq_len, q_len); the inputs and their reference, after the teeth check."""
    key = (seqs, heads, head_dim, block_size, str(dtype), consecutive)
    case = scaled_prefill(
        list(seqs), heads, head_dim, block_size, dtype, seed=_seed(*key), consecutive=consecutive
    )
    reference = ATTENTION_PREFILL.reference(*case.args)
    teeth(case, reference, dtype)
    return case, reference


def _on(args: tuple, device: str) -> list:
    return [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]


def check_decode(
    seq_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    num_splits: int | None = None,
    device: str = LANE_DEVICE,
) -> None:
    case, reference = decode_case(tuple(seq_lens), heads, head_dim, block_size, dtype)
    out = attention_decode(*_on(case.args, device), num_splits=num_splits)
    assert_matches_spec("attention_decode", out.cpu(), reference, dtype)


def check_prefill(
    seqs: list[tuple[int, int]],
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    config: PrefillConfig | None = None,
    device: str = LANE_DEVICE,
) -> None:
    case, reference = prefill_case(tuple(seqs), heads, head_dim, block_size, dtype)
    out = attention_prefill(*_on(case.args, device), config=config)
    assert_matches_spec("attention_prefill", out.cpu(), reference, dtype)


# -- cpu lane: the torch implementations ---------------------------------------------------------

CPU_DTYPES = [torch.float32, torch.bfloat16]  # fp16 takes bf16's path (upcast to fp32)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "seq_lens, consecutive",
    [
        ([4096], False),  # one sequence, gathered
        ([4095], True),  # one sequence read in place (consecutive blocks)
        ([3001, 1500, 17, 1], False),  # the padded batch path, lengths from 3k down to 1
    ],
    ids=["4096", "4095-consecutive", "mixed"],
)
def test_decode_cpu_scaled(seq_lens, consecutive, dtype):
    case, reference = decode_case(tuple(seq_lens), (8, 2), 64, 16, dtype, consecutive)
    out = cpu_impl("attention_decode", dtype)(*case.args)
    assert_matches_spec("attention_decode", out, reference, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "seqs", [[(2304, 256)], [(3000, 200), (500, 500), (40, 1)]], ids=["extend", "mixed"]
)
def test_prefill_cpu_scaled(seqs, dtype):
    case, reference = prefill_case(tuple(seqs), (8, 2), 64, 16, dtype)
    out = cpu_impl("attention_prefill", dtype)(*case.args)
    assert_matches_spec("attention_prefill", out, reference, dtype)


# -- interpret lane ------------------------------------------------------------------------------

INTERPRET_DTYPES = [torch.float16, torch.float32]


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_decode_interpret_scaled(num_splits, dtype):
    check_decode([600], (8, 2), 64, dtype, num_splits=num_splits)


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "seq_lens, heads, block_size, num_splits",
    [
        ([300, 90, 17, 1], (4, 2), 16, 4),  # mixed lengths, chunks left empty for the short ones
        ([250], (9, 3), 5, 2),  # SmolLM2's heads, odd block size
    ],
    ids=["mixed", "bs5"],
)
def test_decode_interpret_scaled_shapes(seq_lens, heads, block_size, num_splits, dtype):
    check_decode(seq_lens, heads, 64, dtype, block_size, num_splits)


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
def test_prefill_interpret_scaled(dtype):
    # An extend of 24 over 120 cached, a plain 40-token prompt, a one-token extend.
    check_prefill([(144, 24), (40, 40), (33, 1)], (4, 2), 64, dtype)


# -- cuda lane -----------------------------------------------------------------------------------

CUDA_DTYPES = [torch.bfloat16, torch.float16]
LONG_DECODES = [[8192], [16384], [32768], [32767, 16385, 8191, 1000, 17, 1]]


def _lens_id(seq_lens: list[int]) -> str:
    return "-".join(map(str, seq_lens))


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seq_lens", LONG_DECODES, ids=_lens_id)
@pytest.mark.parametrize("num_splits", [None, 1, 8, 64])
def test_decode_cuda_scaled_long(seq_lens, num_splits, dtype):
    check_decode(seq_lens, (32, 8), 64, dtype, num_splits=num_splits)


@cuda
@pytest.mark.parametrize("seq_lens", LONG_DECODES, ids=_lens_id)
def test_decode_cuda_scaled_long_float32(seq_lens):
    # The IEEE fp32 path (the half-precision matrix above is the main one).
    check_decode(seq_lens, (32, 8), 64, torch.float32)


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "heads, head_dim",
    [((32, 4), 128), ((8, 8), 64), ((64, 8), 128)],
    ids=["32q4kv", "8q8kv", "64q8kv"],
)
def test_decode_cuda_scaled_heads(heads, head_dim, dtype):
    check_decode([16383, 9000], heads, head_dim, dtype)


@cuda
@pytest.mark.parametrize("block_size", [1, 5, 256])
def test_decode_cuda_scaled_block_sizes(block_size):
    check_decode([10001, 8192], (32, 8), 64, torch.bfloat16, block_size)


MIXED_PREFILL = [(16384 + 256, 256), (8192 + 129, 129), (700, 700), (4000, 1)]
# (sequences as (seq_len, q_len), heads, head_dim): extends of 512 new tokens over 8k and 16k
# cached ones, and a mixed batch with a plain prompt and a one-token extend. Heads kept to what
# the float64 reference handles in a few GB at 16k x 512.
LONG_PREFILLS = [
    pytest.param([(8192 + 512, 512)], (32, 8), 64, id="8k+512"),
    pytest.param([(8192 + 512, 512)], (8, 2), 128, id="8k+512-d128"),
    pytest.param([(16384 + 512, 512)], (16, 4), 64, id="16k+512"),
    pytest.param([(16384 + 512, 512)], (8, 2), 128, id="16k+512-d128"),
    pytest.param(MIXED_PREFILL, (32, 8), 64, id="mixed"),
    pytest.param(MIXED_PREFILL, (8, 2), 128, id="mixed-d128"),
]


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seqs, heads, head_dim", LONG_PREFILLS)
def test_prefill_cuda_scaled_long(seqs, heads, head_dim, dtype):
    check_prefill(seqs, heads, head_dim, dtype)


@cuda
@pytest.mark.parametrize("seqs, heads, head_dim", LONG_PREFILLS[2:3] + LONG_PREFILLS[4:5])
def test_prefill_cuda_scaled_long_float32(seqs, heads, head_dim):
    check_prefill(seqs, heads, head_dim, torch.float32)


@cuda
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("block_m, block_n, num_warps", [(128, 64, 8), (64, 64, 4), (128, 128, 8)])
def test_prefill_cuda_scaled_configs(block_m, block_n, num_warps, paired):
    # Three sequences of up to 8+ tiles: enough programs that the launcher really pairs tiles
    # when asked (it pairs only while the paired grid still fills the GPU).
    cfg = PrefillConfig(block_m, block_n, num_warps, 3, paired)
    seqs = [(8192 + 512, 512), (4096 + 512, 512), (1024, 1024)]
    check_prefill(seqs, (32, 8), 64, torch.bfloat16, config=cfg)
