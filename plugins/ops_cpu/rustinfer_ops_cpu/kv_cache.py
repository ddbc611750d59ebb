"""kv_cache_store: scatter new k/v rows into the paged cache, skipping padding slots (< 0)."""

from __future__ import annotations

import torch


def kv_cache_store(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """k, v [T, Hkv, D] -> k_cache, v_cache [num_blocks, block_size, Hkv, D] at slot_mapping [T].

    ``view`` (not ``reshape``) on the caches: a non-contiguous cache must fail loudly rather than
    have the writes land in a temporary copy.
    """
    n_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_flat = k_cache.view(-1, n_kv_heads, head_dim)  # [num_slots, Hkv, D]
    v_flat = v_cache.view(-1, n_kv_heads, head_dim)
    # The padding check is one reduction read on the host (not a compare, an any() and a read):
    # it runs in every layer of every step, and the CPU engine never pads.
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        # index_copy_ rejects negative indices (and -1 would mean the last slot elsewhere).
        keep = (slot_mapping >= 0).nonzero().squeeze(1)
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_flat.index_copy_(0, slot_mapping, k)
    v_flat.index_copy_(0, slot_mapping, v)
