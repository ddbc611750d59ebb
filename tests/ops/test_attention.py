"""kv_cache_store (exact), attention_prefill and attention_decode (CPU) vs the spec references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rustinfer.ops import KV_CACHE_STORE, SPECS

from .helpers import FLOAT_DTYPES, assert_exact, assert_matches_spec, cpu_impl, dtype_id, randn
from .paged import attention_scale, cu_seqlens, decode_args, paged_kv, prefill_args, token_heads

# Each test runs through the C kernels and the torch ones (conftest.py).
pytestmark = pytest.mark.usefixtures("both_cpu_impls")

HEADS = [(4, 4), (9, 3), (8, 2)]  # GQA ratios 1, 3 (SmolLM2) and 4
HEAD_IDS = [f"{q}q{kv}kv" for q, kv in HEADS]
CONTEXTS = [1, 15, 16, 17, 33]  # around the 16-token block boundary
HEAD_DIMS = [64, 128]  # the hypothesis tests add small ones (8, 16)


def _cpu_and_reference(op: str, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(the CPU kernel's output, the float64 reference) on the same arguments."""
    return cpu_impl(op, args[0].dtype)(*args), SPECS[op].reference(*args)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens", [1, 7, 33])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_kv_cache_store(tokens: int, block_size: int, dtype: torch.dtype, is_strided: bool) -> None:
    n_kv_heads, head_dim, num_blocks = 3, 64, 9
    k = token_heads(tokens, n_kv_heads, head_dim, dtype, is_strided)
    v = token_heads(tokens, n_kv_heads, head_dim, dtype, is_strided)
    k_cache = randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype)
    v_cache = randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if tokens > 1:
        slots[1] = -1  # a padding token: must not be written anywhere
    expected_k, expected_v = KV_CACHE_STORE.reference(k, v, k_cache, v_cache, slots)
    assert cpu_impl("kv_cache_store", dtype)(k, v, k_cache, v_cache, slots) is None
    assert_exact(k_cache, expected_k)
    assert_exact(v_cache, expected_v)


def test_kv_cache_store_rejects_unflattenable_cache() -> None:
    # Blocks and offsets that cannot be viewed as one slot axis must fail loudly: writing into a
    # reshaped copy would silently lose the update.
    cache = randn(16, 4, 2, 8, dtype=torch.float32).transpose(0, 1)  # [4 blocks, 16, 2, 8]
    k = randn(1, 2, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="view"):
        cpu_impl("kv_cache_store", torch.float32)(k, k, cache, cache.clone(), torch.tensor([3]))


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 40),
    block_size=st.integers(1, 17),
    pad_every=st.integers(2, 9),
    dtype=st.sampled_from(FLOAT_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_kv_cache_store_random_slots(
    tokens: int, block_size: int, pad_every: int, dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    num_blocks = -(-tokens // block_size) + 2
    k = randn(tokens, 2, 8, dtype=dtype)
    v = randn(tokens, 2, 8, dtype=dtype)
    k_cache = torch.full((num_blocks, block_size, 2, 8), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[::pad_every] = -1
    expected_k, expected_v = KV_CACHE_STORE.reference(k, v, k_cache, v_cache, slots)
    cpu_impl("kv_cache_store", dtype)(k, v, k_cache, v_cache, slots)
    assert_exact(k_cache, expected_k)
    assert_exact(v_cache, expected_v)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("seq_len", CONTEXTS)
@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "cached_prefix"])
def test_attention_prefill_one_sequence(
    seq_len: int,
    block_size: int,
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    cached: bool,
) -> None:
    # cached: only the last third of the sequence is new; the rest is an already cached prefix.
    q_len = max(1, seq_len // 3) if cached else seq_len
    out, ref = _cpu_and_reference(
        "attention_prefill", prefill_args([(seq_len, q_len)], heads, head_dim, block_size, dtype)
    )
    assert_matches_spec("attention_prefill", out, ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_attention_prefill_ragged_batch(
    heads: tuple[int, int], block_size: int, dtype: torch.dtype, is_strided: bool
) -> None:
    # Fresh prefills, cached prefixes, single-token rows and block-boundary lengths in one batch.
    seqs = [(17, 17), (33, 5), (16, 1), (1, 1), (40, 23), (15, 15)]
    out, ref = _cpu_and_reference(
        "attention_prefill", prefill_args(seqs, heads, 64, block_size, dtype, is_strided)
    )
    assert_matches_spec("attention_prefill", out, ref, dtype)


def test_attention_prefill_max_seq_len_hint() -> None:
    # The host-side hint changes no result (the CPU op ignores it) and the reference refuses a
    # hint below a sequence's context: it must be the max, not a guess.
    args = prefill_args([(33, 5), (20, 20)], (4, 2), 64, 16, torch.float32)
    without, _ = _cpu_and_reference("attention_prefill", args)
    with_hint, ref = _cpu_and_reference("attention_prefill", (*args, 33))
    assert torch.equal(without, with_hint)
    assert_matches_spec("attention_prefill", with_hint, ref, torch.float32)
    with pytest.raises(ValueError, match="seq_len 33 > max_seq_len 32"):
        SPECS["attention_prefill"].reference(*args, 32)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("seq_len", CONTEXTS)
def test_attention_consecutive_blocks(seq_len: int, block_size: int, dtype: torch.dtype) -> None:
    # Runs of adjacent block ids (a fresh pool) may be read in place instead of gathered: the
    # answer must not change, for a lone sequence and inside a batch.
    seqs = [(seq_len, max(1, seq_len // 2)), (20, 20), (9, 1)]
    out, ref = _cpu_and_reference(
        "attention_prefill", prefill_args(seqs, (9, 3), 64, block_size, dtype, consecutive=True)
    )
    assert_matches_spec("attention_prefill", out, ref, dtype)
    out, ref = _cpu_and_reference(
        "attention_prefill", prefill_args(seqs[:1], (9, 3), 64, block_size, dtype, consecutive=True)
    )
    assert_matches_spec("attention_prefill", out, ref, dtype)
    out, ref = _cpu_and_reference(
        "attention_decode",
        decode_args([seq_len, 20, 9], (9, 3), 64, block_size, dtype, consecutive=True),
    )
    assert_matches_spec("attention_decode", out, ref, dtype)
    out, ref = _cpu_and_reference(
        "attention_decode", decode_args([seq_len], (9, 3), 64, block_size, dtype, consecutive=True)
    )
    assert_matches_spec("attention_decode", out, ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("split", [1, 7, 16, 32])
def test_chunked_prefill_equals_one_shot(split: int, block_size: int, dtype: torch.dtype) -> None:
    seq_len, (n_heads, n_kv_heads), head_dim = 33, (9, 3), 64
    paged = paged_kv([seq_len], block_size, n_kv_heads, head_dim, dtype)
    q = randn(seq_len, n_heads, head_dim, dtype=dtype)
    prefill = cpu_impl("attention_prefill", dtype)

    def run(rows: slice, context: int) -> torch.Tensor:
        q_len = rows.stop - rows.start
        return prefill(
            q[rows],
            paged.k_cache,
            paged.v_cache,
            paged.block_tables,
            cu_seqlens([q_len]),
            torch.tensor([context], dtype=torch.int32),
            q_len,
            attention_scale(head_dim),
        )

    one_shot = run(slice(0, seq_len), seq_len)
    chunked = torch.cat((run(slice(0, split), split), run(slice(split, seq_len), seq_len)))
    # Both sides carry the implementation's error, hence twice the spec tolerance.
    assert_matches_spec("attention_prefill", chunked, one_shot, dtype, slack=2.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_prefill_with_one_query_equals_decode(heads: tuple[int, int], dtype: torch.dtype) -> None:
    n_heads, n_kv_heads = heads
    seq_lens, head_dim = [15, 1, 33, 17], 64
    paged = paged_kv(seq_lens, 16, n_kv_heads, head_dim, dtype)
    q = randn(len(seq_lens), n_heads, head_dim, dtype=dtype)
    common = (paged.k_cache, paged.v_cache, paged.block_tables)
    decode = cpu_impl("attention_decode", dtype)(
        q, *common, paged.seq_lens, attention_scale(head_dim)
    )
    prefill = cpu_impl("attention_prefill", dtype)(
        q, *common, cu_seqlens([1] * len(seq_lens)), paged.seq_lens, 1, attention_scale(head_dim)
    )
    assert_matches_spec("attention_decode", decode, prefill.to(torch.float64), dtype, slack=2.0)


@settings(max_examples=20, deadline=None)
@given(
    seqs=st.lists(
        st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))),
        min_size=1,
        max_size=4,
    ),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([8, 16, 64]),
    block_size=st.integers(1, 17),
    dtype=st.sampled_from(FLOAT_DTYPES),
    consecutive=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_prefill_random_batches(
    seqs: list[tuple[int, int]],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    consecutive: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    out, ref = _cpu_and_reference(
        "attention_prefill",
        prefill_args(seqs, heads, head_dim, block_size, dtype, consecutive=consecutive),
    )
    assert_matches_spec("attention_prefill", out, ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("seq_len", [*CONTEXTS, 200])
def test_attention_decode_one_sequence(
    seq_len: int, block_size: int, heads: tuple[int, int], head_dim: int, dtype: torch.dtype
) -> None:
    out, ref = _cpu_and_reference(
        "attention_decode", decode_args([seq_len], heads, head_dim, block_size, dtype)
    )
    assert_matches_spec("attention_decode", out, ref, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_attention_decode_batch(
    heads: tuple[int, int], block_size: int, dtype: torch.dtype, is_strided: bool
) -> None:
    out, ref = _cpu_and_reference(
        "attention_decode",
        decode_args([15, 1, 33, 17, 16], heads, 64, block_size, dtype, is_strided),
    )
    assert_matches_spec("attention_decode", out, ref, dtype)


@settings(max_examples=20, deadline=None)
@given(
    seq_lens=st.lists(st.integers(1, 70), min_size=1, max_size=5),
    heads=st.sampled_from(HEADS),
    head_dim=st.sampled_from([8, 16, 64]),
    block_size=st.integers(1, 17),
    dtype=st.sampled_from(FLOAT_DTYPES),
    consecutive=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_attention_decode_random_batches(
    seq_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    consecutive: bool,
    seed: int,
) -> None:
    torch.manual_seed(seed)
    out, ref = _cpu_and_reference(
        "attention_decode",
        decode_args(seq_lens, heads, head_dim, block_size, dtype, consecutive=consecutive),
    )
    assert_matches_spec("attention_decode", out, ref, dtype)
