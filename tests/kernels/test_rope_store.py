"""Triton rope_kv_store against the float64 spec reference (via the shared case), in both lanes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ops.helpers import dtype_id, randn
from ops.rope_store_case import check_rope_kv_store
from rustinfer_ops_cuda.kernels.rope_store import rope_kv_store

from rustinfer.ops import build_cos_sin_cache

from .lanes import BOTH_LANES, LANE_DEVICE

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def checked_impl(index_dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """rope_kv_store with positions and slots cast to ``index_dtype``, asserting that k and v
    are left as they were (the shared case checks q itself)."""

    def impl(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> torch.Tensor:
        k_before, v_before = k.clone(), v.clone()
        q_out = rope_kv_store(
            q,
            k,
            v,
            positions.to(index_dtype),
            cos_sin_cache,
            k_cache,
            v_cache,
            slot_mapping.to(index_dtype),
        )
        assert torch.equal(k, k_before) and torch.equal(v, v_before), "k or v modified"
        return q_out

    return impl


# (tokens, (Hq, Hkv), head_dim, dtype, strided, index dtype, block size, padding)
INTERPRET_CASES = [
    (7, (9, 3), 64, torch.bfloat16, True, torch.int64, 16, True),
    (5, (8, 2), 128, torch.bfloat16, False, torch.int32, 16, True),
    (3, (4, 4), 64, torch.float16, True, torch.int64, 16, False),
    (1, (4, 4), 128, torch.bfloat16, False, torch.int64, 16, False),
    (9, (8, 2), 64, torch.float16, False, torch.int32, 3, True),
    (7, (9, 3), 64, torch.float32, True, torch.int64, 5, True),
    (4, (8, 2), 128, torch.float32, False, torch.int32, 16, False),
]


def _case_id(case: tuple) -> str:
    tokens, (hq, hkv), head_dim, dtype, is_strided, index_dtype, block_size, padding = case
    layout = "strided" if is_strided else "contig"
    return (
        f"T{tokens}-{hq}q{hkv}kv-D{head_dim}-{dtype_id(dtype)}-{layout}-{dtype_id(index_dtype)}"
        f"-bs{block_size}{'-pad' if padding else ''}"
    )


@pytest.mark.interpret
@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
def test_rope_kv_store_interpret(case: tuple) -> None:
    tokens, heads, head_dim, dtype, is_strided, index_dtype, block_size, padding = case
    check_rope_kv_store(
        checked_impl(index_dtype),
        tokens,
        heads,
        head_dim,
        dtype,
        is_strided,
        block_size=block_size,
        device=LANE_DEVICE,
        padding=padding,
    )


@pytest.mark.cuda
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=dtype_id)
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("head_dim", [64, 128])
# GQA ratios 1, 4 and 8; (9, 3) is not a power of 2 (masked head rows); (64, 8) is Llama 3-70B,
# whose 64 x 128 q takes two steps of the head loop.
@pytest.mark.parametrize(
    "heads", [(8, 8), (32, 8), (32, 4), (9, 3), (64, 8)], ids=lambda h: f"{h[0]}q{h[1]}kv"
)
@pytest.mark.parametrize("tokens", [1, 7, 33, 4097])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_rope_kv_store_cuda(
    tokens: int,
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    is_strided: bool,
    index_dtype: torch.dtype,
) -> None:
    check_rope_kv_store(
        checked_impl(index_dtype), tokens, heads, head_dim, dtype, is_strided, device="cuda"
    )


@pytest.mark.cuda
@pytest.mark.parametrize("block_size", [1, 32, 256])
def test_rope_kv_store_cuda_block_sizes(block_size: int) -> None:
    check_rope_kv_store(
        checked_impl(torch.int64),
        33,
        (32, 8),
        128,
        torch.bfloat16,
        True,
        block_size=block_size,
        device="cuda",
    )


def _args(device: str) -> dict[str, torch.Tensor]:
    tokens, n_heads, n_kv_heads, head_dim = 3, 4, 2, 64
    bf16 = torch.bfloat16
    return {
        "q": randn(tokens, n_heads, head_dim, dtype=bf16).to(device),
        "k": randn(tokens, n_kv_heads, head_dim, dtype=bf16).to(device),
        "v": randn(tokens, n_kv_heads, head_dim, dtype=bf16).to(device),
        "positions": torch.arange(tokens, device=device),
        "cos_sin_cache": build_cos_sin_cache(head_dim, 16, 10000.0, None, device=device),
        "k_cache": randn(2, 16, n_kv_heads, head_dim, dtype=bf16).to(device),
        "v_cache": randn(2, 16, n_kv_heads, head_dim, dtype=bf16).to(device),
        "slot_mapping": torch.arange(tokens, device=device),
    }


@pytest.mark.parametrize("device", BOTH_LANES)
@pytest.mark.parametrize(
    ("name", "bad", "error", "match"),
    [
        ("q", lambda t: t.double(), TypeError, "q has dtype float64"),
        ("k", lambda t: t.float(), TypeError, "k has dtype float32"),
        ("v", lambda t: t.half(), TypeError, "v has dtype float16"),
        ("positions", lambda t: t.float(), TypeError, "positions has dtype float32"),
        ("cos_sin_cache", lambda t: t.half(), TypeError, "cos_sin_cache has dtype float16"),
        ("k", lambda t: t[:, :, :32], ValueError, "k has shape"),
        ("slot_mapping", lambda t: t[:2], ValueError, "slot_mapping has shape"),
        ("q", lambda t: t[:, :, :63], ValueError, "even head_dim"),
        ("q", lambda t: torch.cat((t, t), -1)[..., ::2], ValueError, "q must have unit stride"),
        ("k_cache", lambda t: t.transpose(0, 1), ValueError, "k_cache must be contiguous"),
    ],
    ids=[
        "q-dtype",
        "k-dtype",
        "v-dtype",
        "positions-dtype",
        "cos_sin-dtype",
        "k-shape",
        "slots-shape",
        "odd-head-dim",
        "q-dim-strided",
        "cache-not-contiguous",
    ],
)
def test_rope_kv_store_argument_checks(
    device: str,
    name: str,
    bad: Callable[[torch.Tensor], torch.Tensor],
    error: type[Exception],
    match: str,
) -> None:
    args = _args(device)
    args[name] = bad(args[name])
    with pytest.raises(error, match=match):
        rope_kv_store(**args)


@pytest.mark.cuda
def test_rope_kv_store_rejects_mixed_devices() -> None:
    args = _args("cuda")
    args["slot_mapping"] = args["slot_mapping"].cpu()
    with pytest.raises(ValueError, match="slot_mapping is on cpu"):
        rope_kv_store(**args)
