"""embedding, prepare_linear_weight and argmax (exact) and linear (CPU) against the spec references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.ops import ARGMAX, EMBEDDING, LINEAR, LOGITS, PREPARE_LINEAR_WEIGHT

from .helpers import (
    FLOAT_DTYPES,
    assert_exact,
    assert_matches_spec,
    cpu_impl,
    dtype_id,
    maybe_strided,
    randn,
)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vocab", [1, 13, 1031])
@pytest.mark.parametrize("hidden", [1, 7, 576])
@pytest.mark.parametrize("tokens", [1, 13])
def test_embedding(tokens: int, hidden: int, vocab: int, dtype: torch.dtype) -> None:
    table = randn(vocab, hidden, dtype=dtype)
    ids = torch.randint(0, vocab, (tokens,))
    ids[0] = vocab - 1  # the last row, where an off-by-one would read out of bounds
    out = cpu_impl("embedding", dtype)(ids, table)
    assert_exact(out, EMBEDDING.reference(ids, table))


@settings(max_examples=25, deadline=None)
@given(
    ids=st.lists(st.integers(0, 99), min_size=1, max_size=40),
    hidden=st.integers(1, 33),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_embedding_random_ids(ids: list[int], hidden: int, dtype: torch.dtype) -> None:
    # Repeated ids and any order: each output row is exactly the table row it names.
    table = randn(100, hidden, dtype=dtype)
    out = cpu_impl("embedding", dtype)(torch.tensor(ids, dtype=torch.int64), table)
    assert_exact(out, torch.stack([table[i] for i in ids]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k_n", [(13, 1), (576, 127), (1536, 576), (127, 1536)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_linear(
    tokens: int, k_n: tuple[int, int], dtype: torch.dtype, bias: bool, is_strided: bool
) -> None:
    k, n = k_n
    x = maybe_strided(randn(tokens, k, dtype=dtype), is_strided)
    # 1/sqrt(K) like trained weights: outputs are O(1), the scale the spec's tolerance assumes.
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    out = cpu_impl("linear", dtype)(x, weight, b)
    assert_matches_spec("linear", out, LINEAR.reference(x, weight, b), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k_n", [(13, 1), (576, 4999), (127, 1536)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
def test_logits(tokens: int, k_n: tuple[int, int], dtype: torch.dtype) -> None:
    k, n = k_n
    x = randn(tokens, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    out = cpu_impl("logits", dtype)(x, weight)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = LOGITS.tolerance(dtype)  # float32 out, held to the input dtype's tolerance
    torch.testing.assert_close(
        out.double(), LOGITS.reference(x, weight), atol=tol.atol, rtol=tol.rtol
    )


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 17),
    k=st.integers(1, 300),
    n=st.integers(1, 300),
    bias=st.booleans(),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_rows_independent(
    tokens: int, k: int, n: int, bias: bool, dtype: torch.dtype, seed: int
) -> None:
    # Batching must not change a row's result beyond the tolerance: each row of a batched call
    # matches the reference of that row alone (a bug mixing rows would break this).
    torch.manual_seed(seed)
    x = randn(tokens, k, dtype=dtype)
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    b = randn(n, dtype=dtype) if bias else None
    out = cpu_impl("linear", dtype)(x, weight, b)
    row = int(torch.randint(0, tokens, ()).item())
    assert_matches_spec(
        "linear", out[row : row + 1], LINEAR.reference(x[row : row + 1], weight, b), dtype
    )
    assert_matches_spec("linear", out, LINEAR.reference(x, weight, b), dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("k_n", [(1, 1), (13, 1), (576, 127), (127, 1536)], ids=str)
@pytest.mark.parametrize("tokens", [1, 7])
def test_prepared_weight_serves_linear_and_embedding(
    tokens: int, k_n: tuple[int, int], dtype: torch.dtype
) -> None:
    k, n = k_n
    weight = randn(n, k, dtype=dtype, scale=k**-0.5)
    prepared = cpu_impl("prepare_linear_weight", dtype)(weight)
    assert prepared.shape == weight.shape and prepared.dtype == dtype
    assert_exact(prepared, PREPARE_LINEAR_WEIGHT.reference(weight))
    x = randn(tokens, k, dtype=dtype)
    out = cpu_impl("linear", dtype)(x, prepared, None)
    assert_matches_spec("linear", out, LINEAR.reference(x, weight, None), dtype)
    # A tied model reads its embedding rows from the same prepared tensor.
    ids = torch.randint(0, n, (tokens,))
    assert_exact(cpu_impl("embedding", dtype)(ids, prepared), EMBEDDING.reference(ids, weight))


@pytest.mark.parametrize("wt_x", [True, False], ids=["w_xt", "f_linear"])
@pytest.mark.parametrize("tokens", [16, 32])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_on_a_prepared_weight_both_batched_paths(
    tokens: int, bias: bool, wt_x: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16-32 rows on a prepared float32 weight take W @ x^T on AVX2 CPUs and F.linear elsewhere:
    both meet the spec, whichever this machine picks."""
    import rustinfer_ops_cpu.basic as basic

    monkeypatch.setattr(basic, "_WT_X_ROWS", (16, 32) if wt_x else (1, 0))
    k, n = 576, 1031
    weight = randn(n, k, dtype=torch.float32, scale=k**-0.5)
    prepared = cpu_impl("prepare_linear_weight", torch.float32)(weight)
    x = randn(tokens, k, dtype=torch.float32)
    b = randn(n, dtype=torch.float32) if bias else None
    out = basic.linear(x, prepared, b)
    assert out.is_contiguous()
    assert_matches_spec("linear", out, LINEAR.reference(x, weight, b), torch.float32)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(1, 200), dtype=st.sampled_from(FLOAT_DTYPES))
def test_prepare_linear_weight_keeps_values(n: int, k: int, dtype: torch.dtype) -> None:
    weight = randn(n, k, dtype=dtype)
    assert_exact(cpu_impl("prepare_linear_weight", dtype)(weight), weight)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("vocab", [1, 7, 49152])
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_argmax(batch: int, vocab: int, dtype: torch.dtype, is_strided: bool) -> None:
    logits = maybe_strided(randn(batch, vocab, dtype=dtype, scale=5.0), is_strided)
    out = cpu_impl("argmax", dtype)(logits)
    assert_exact(out, ARGMAX.reference(logits))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_argmax_ties_take_first_index(dtype: torch.dtype) -> None:
    logits = torch.zeros(3, 1000, dtype=dtype)
    logits[0, [5, 700]] = 4.0
    logits[1, [999, 0]] = -1.0  # row of zeros except two smaller values: first max is index 1
    logits[2, :] = 2.5  # all equal
    out = cpu_impl("argmax", dtype)(logits)
    assert_exact(out, torch.tensor([5, 1, 0], dtype=torch.int64))
    assert_exact(out, ARGMAX.reference(logits))


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.integers(-3, 3), min_size=1, max_size=50), min_size=1, max_size=6
    ).filter(lambda r: len({len(x) for x in r}) == 1),
    dtype=st.sampled_from(FLOAT_DTYPES),
)
def test_argmax_small_integer_logits(rows: list[list[int]], dtype: torch.dtype) -> None:
    # Few distinct values make ties common: the first maximum must win every time.
    logits = torch.tensor(rows, dtype=dtype)
    expected = torch.tensor([r.index(max(r)) for r in rows], dtype=torch.int64)
    out = cpu_impl("argmax", dtype)(logits)
    assert_exact(out, expected)
    assert_exact(ARGMAX.reference(logits), expected)
