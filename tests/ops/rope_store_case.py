"""One rope_kv_store check, shared by the CPU tests and the Triton (interpret / cuda) tests."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rustinfer.ops import ROPE_KV_STORE, build_cos_sin_cache

from .helpers import assert_exact, assert_matches_spec, randn, strided


def check_rope_kv_store(
    impl: Callable[..., torch.Tensor],
    tokens: int,
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    is_strided: bool,
    block_size: int = 16,
    device: str = "cpu",
    max_positions: int = 4096,
    padding: bool = True,
) -> None:
    """q, k, v as column slices of one fused QKV output (strided) or separate tensors; a cache
    with NaN-free random contents; every other token a padding slot (-1) when ``padding``."""
    n_heads, n_kv_heads = heads
    width = (n_heads + 2 * n_kv_heads) * head_dim
    qkv = randn(tokens, width, dtype=dtype).to(device)
    if is_strided:
        qkv = strided(qkv)
    q = qkv[:, : n_heads * head_dim].view(tokens, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv_heads) * head_dim]
    k = k.view(tokens, n_kv_heads, head_dim)
    v = qkv[:, (n_heads + n_kv_heads) * head_dim :].view(tokens, n_kv_heads, head_dim)
    num_blocks = tokens // block_size + 3
    k_cache = randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype).to(device)
    v_cache = randn(num_blocks, block_size, n_kv_heads, head_dim, dtype=dtype).to(device)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if padding:
        slots[1::3] = -1
    positions = torch.randint(0, max_positions, (tokens,))
    cos_sin = build_cos_sin_cache(head_dim, max_positions, 500000.0, None)
    ref_q, ref_k, ref_v = ROPE_KV_STORE.reference(
        q.cpu(), k.cpu(), v.cpu(), positions, cos_sin, k_cache.cpu(), v_cache.cpu(), slots
    )
    q_before = q.clone()
    q_out = impl(
        q, k, v, positions.to(device), cos_sin.to(device), k_cache, v_cache, slots.to(device)
    )
    assert q_out.is_contiguous()
    assert torch.equal(q, q_before), "rope_kv_store modified q"
    assert_matches_spec("rope_kv_store", q_out.cpu(), ref_q, dtype)
    assert_matches_spec("rope_kv_store", k_cache.cpu(), ref_k, dtype)
    assert_exact(v_cache.cpu(), ref_v.to(dtype))
