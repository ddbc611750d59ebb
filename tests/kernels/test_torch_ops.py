"""rustinfer-ops-cuda's torch ops (embedding, linear, logits, prepare_linear_weight, argmax)
against the float64 spec references.

They are plain torch, so the CPU lane runs them on CPU tensors (every dtype cuda registers; the
16-bit ``logits`` path calls a CUDA-only ``torch.mm`` overload and runs in the cuda lane alone);
the cuda lane runs all of them on the GPU and checks that none syncs with the host.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ops.helpers import (
    assert_exact,
    assert_float32_logits,
    assert_matches_spec,
    dtype_id,
    maybe_strided,
    randn,
)
from rustinfer_ops_cuda.kernels.torch_ops import (
    argmax,
    embedding,
    linear,
    logits,
    prepare_linear_weight,
)

from rustinfer.ops import ARGMAX, EMBEDDING, LINEAR, LOGITS, PREPARE_LINEAR_WEIGHT

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vocab_hidden", [(1, 1), (13, 7), (1031, 576)], ids=str)
@pytest.mark.parametrize("tokens", [1, 13])
def test_embedding(tokens: int, vocab_hidden: tuple[int, int], dtype: torch.dtype, device: str):
    vocab, hidden = vocab_hidden
    table = randn(vocab, hidden, dtype=dtype)
    ids = torch.randint(0, vocab, (tokens,))
    ids[0] = vocab - 1  # the last row, where an off-by-one would read out of bounds
    out = embedding(ids.to(device), table.to(device))
    assert_exact(out.cpu(), EMBEDDING.reference(ids, table))


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.integers(0, 99), min_size=1, max_size=40),
    hidden=st.integers(1, 33),
    dtype=st.sampled_from(DTYPES),
)
def test_embedding_random_ids(ids: list[int], hidden: int, dtype: torch.dtype) -> None:
    # Repeated ids and any order: each output row is exactly the table row it names.
    table = randn(100, hidden, dtype=dtype)
    out = embedding(torch.tensor(ids, dtype=torch.int64), table)
    assert_exact(out, torch.stack([table[i] for i in ids]))


# linear against its spec: every dtype on the CPU, float32 on CUDA. 16-bit F.linear on CUDA misses
# the spec's one-rounding tolerance (H200, torch 2.11: errors of 2-4 output ulps in up to 10% of
# the outputs, e.g. bf16 T=1 K=576 N=127 with a bias, fp16 T=64 K=1536 N=576), with cuBLAS's
# reduced-precision split-K reductions allowed or not (the cuda device turns them off; the
# misses stayed in 9 of the 24 cases below): cuBLAS's own kernels round partial results. The
# 16-bit cuda cases are held to a cuBLAS bound instead, which still fails a kernel that drops a
# K chunk or a row (errors of O(1) against a bound of 8 ulps).
LINEAR_CASES = [pytest.param(d, "cpu", id=f"{dtype_id(d)}-cpu") for d in DTYPES] + [
    pytest.param(torch.float32, "cuda", marks=pytest.mark.cuda, id="float32-cuda")
]


@pytest.mark.parametrize("dtype, device", LINEAR_CASES)
@pytest.mark.parametrize("k_n", [(13, 1), (576, 127), (1536, 576), (127, 1536)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_linear(
    tokens: int, k_n: tuple[int, int], dtype: torch.dtype, bias: bool, is_strided: bool, device: str
) -> None:
    k, n = k_n
    x = randn(tokens, k, dtype=dtype)
    # 1/sqrt(K) like trained weights: outputs are O(1), the scale the spec's tolerance assumes.
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    out = linear(
        maybe_strided(x.to(device), is_strided),
        weight.to(device),
        None if b is None else b.to(device),
    )
    assert_matches_spec("linear", out.cpu(), LINEAR.reference(x, weight, b), dtype)


CUBLAS_ULPS = 8  # measured worst on an H200 (2026-11-28): ~3 output ulps


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("k_n", [(576, 127), (1536, 576), (2048, 8192), (8192, 2048)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_linear_16bit_on_a_cuda_device_stays_within_cublas_bound(
    tokens: int, k_n: tuple[int, int], dtype: torch.dtype
) -> None:
    """16-bit ``linear`` on CUDA (cuBLAS, with the cuda device's float32 split-K reductions)
    within CUBLAS_ULPS output ulps of the float64 reference, absolute and relative."""
    from rustinfer_ops_cuda.device import CudaDevice

    CudaDevice(0)
    k, n = k_n
    x = randn(tokens, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype)
    out = linear(maybe_strided(x.cuda(), True), weight.cuda(), b.cuda())
    ulp = torch.finfo(dtype).eps  # the spacing at 1.0: outputs and partial sums are O(1)
    ref = LINEAR.reference(x, weight, b)
    bound = CUBLAS_ULPS * ulp
    torch.testing.assert_close(out.cpu().double(), ref, atol=bound, rtol=bound)


# torch.mm's out_dtype overload (the float32 accumulator of 16-bit inputs) exists on CUDA only.
LOGITS_CASES = [pytest.param(torch.float32, "cpu", id="float32-cpu")] + [
    pytest.param(d, "cuda", marks=pytest.mark.cuda, id=f"{dtype_id(d)}-cuda") for d in DTYPES
]


@pytest.mark.parametrize("dtype, device", LOGITS_CASES)
@pytest.mark.parametrize("k_n", [(13, 1), (576, 4999), (127, 1536)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
def test_logits(tokens: int, k_n: tuple[int, int], dtype: torch.dtype, device: str) -> None:
    k, n = k_n
    x = randn(tokens, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    out = logits(x.to(device), weight.to(device))
    assert out.dtype == torch.float32 and out.device.type == device
    ref = LOGITS.reference(x, weight)
    assert_float32_logits(out, ref, dtype)


def test_logits_rejects_mismatched_arguments() -> None:
    x = randn(2, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="mismatch"):
        logits(x, randn(5, 7, dtype=torch.float32))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        logits(x, randn(5, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        logits(x.double(), randn(5, 8, dtype=torch.float64))


@pytest.mark.parametrize("dtype, device", LINEAR_CASES)
@pytest.mark.parametrize("k_n", [(1, 1), (13, 1), (576, 127), (127, 1536)], ids=str)
def test_prepared_weight_serves_linear_and_embedding(
    k_n: tuple[int, int], dtype: torch.dtype, device: str
) -> None:
    k, n = k_n
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    prepared = prepare_linear_weight(weight.to(device))
    assert_exact(prepared.cpu(), PREPARE_LINEAR_WEIGHT.reference(weight))
    x = randn(7, k, dtype=dtype)
    out = linear(x.to(device), prepared, None)
    assert_matches_spec("linear", out.cpu(), LINEAR.reference(x, weight, None), dtype)
    # A tied model reads its embedding rows from the same prepared tensor.
    ids = torch.randint(0, n, (5,))
    assert_exact(embedding(ids.to(device), prepared).cpu(), EMBEDDING.reference(ids, weight))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vocab", [1, 7, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_argmax(batch: int, vocab: int, dtype: torch.dtype, is_strided: bool, device: str) -> None:
    values = randn(batch, vocab, dtype=dtype, scale=5.0)
    out = argmax(maybe_strided(values.to(device), is_strided))
    assert_exact(out.cpu(), ARGMAX.reference(values))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_argmax_ties_take_first_index(dtype: torch.dtype, device: str) -> None:
    values = torch.zeros(4, 50000, dtype=dtype)
    values[0, [5, 700]] = 4.0
    values[1, [49999, 0]] = -1.0  # zeros but two smaller values: the first maximum is index 1
    values[2, :] = 2.5  # all equal
    values[3, [40000, 30000, 20001]] = 1.0  # ties far apart, as a parallel reduction splits them
    out = argmax(values.to(device)).cpu()
    assert_exact(out, torch.tensor([5, 1, 0, 20001], dtype=torch.int64))
    assert_exact(out, ARGMAX.reference(values))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(-3, 3), min_size=1, max_size=50), min_size=1, max_size=6
    ).filter(lambda r: len({len(x) for x in r}) == 1),
    dtype=st.sampled_from(DTYPES),
)
def test_argmax_small_integer_logits(rows: list[list[int]], dtype: torch.dtype) -> None:
    # Few distinct values make ties common: the first maximum must win every time.
    values = torch.tensor(rows, dtype=dtype)
    expected = torch.tensor([r.index(max(r)) for r in rows], dtype=torch.int64)
    assert_exact(argmax(values), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_torch_ops_never_sync_with_the_host(dtype: torch.dtype) -> None:
    # Inputs first (their uploads do sync); then every op with torch's sync checker raising on
    # any synchronizing call, as a CUDA-graph capture would fail on one.
    ids = torch.randint(0, 97, (9,), device="cuda")
    table = randn(97, 64, dtype=dtype).cuda()
    x = randn(9, 64, dtype=dtype).cuda()
    bias = randn(97, dtype=dtype).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        weight = prepare_linear_weight(table)
        embedding(ids, weight)
        linear(x, weight, bias)
        argmax(logits(x, weight))
    finally:
        torch.cuda.set_sync_debug_mode("default")
