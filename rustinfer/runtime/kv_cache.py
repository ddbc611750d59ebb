"""Paged KV cache storage and the attention metadata of one contiguous sequence."""

from __future__ import annotations

import math

import torch

from rustinfer.models.base import AttentionMetadata, KVCaches, Model

DEFAULT_BLOCK_SIZE = (
    16  # tokens per KV block: small enough to waste little, large enough for kernels
)


def allocate_kv_caches(
    model: Model, num_blocks: int, block_size: int, device: torch.device
) -> KVCaches:
    shape = model.kv_cache_shape(num_blocks, block_size)
    return [
        (
            torch.zeros(shape, dtype=model.dtype, device=device),
            torch.zeros(shape, dtype=model.dtype, device=device),
        )
        for _ in range(model.num_kv_layers)
    ]


def blocks_for(num_tokens: int, block_size: int) -> int:
    return max(1, math.ceil(num_tokens / block_size))


def single_sequence_metadata(
    start: int, num_new: int, block_table: torch.Tensor, block_size: int
) -> AttentionMetadata:
    """Metadata for one sequence adding ``num_new`` tokens at positions ``start..start+num_new-1``.

    ``block_table`` is [max_blocks] int32 on the model's device.
    """
    device = block_table.device
    positions = torch.arange(start, start + num_new, device=device)
    slots = block_table[positions // block_size].long() * block_size + positions % block_size
    return AttentionMetadata(
        slot_mapping=slots,
        block_tables=block_table.unsqueeze(0),
        seq_lens=torch.tensor([start + num_new], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, num_new], dtype=torch.int32, device=device),
        max_query_len=num_new,
    )
