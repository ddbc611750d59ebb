"""Builders for paged-KV test scenarios: random caches, block tables, per-token head rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .helpers import randn, strided


@dataclass
class Paged:
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32, -1 past each sequence's blocks
    seq_lens: torch.Tensor  # [B] int32


def paged_kv(
    seq_lens: list[int],
    block_size: int,
    n_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    consecutive: bool = False,
) -> Paged:
    """Random caches (every slot filled, so reading a wrong slot changes the answer) and block
    tables with spare blocks in the pool.

    By default each sequence gets a shuffled, non-contiguous set of blocks; ``consecutive`` gives
    each one a run of adjacent blocks instead (what a fresh block pool hands out), with the runs
    in shuffled order and a spare block between them.
    """
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + len(seq_lens) + 3
    if consecutive:
        runs: dict[int, list[int]] = {}
        next_block = 0
        for i in torch.randperm(len(seq_lens)).tolist():
            next_block += 1  # leave a spare block before each run
            runs[i] = list(range(next_block, next_block + needed[i]))
            next_block += needed[i]
        order = [b for i in range(len(seq_lens)) for b in runs[i]]
    else:
        order = torch.randperm(num_blocks).tolist()
    # One unused column past the longest sequence: -1 there must never be dereferenced.
    tables = torch.full((len(seq_lens), max(needed) + 1), -1, dtype=torch.int32)
    taken = 0
    for i, n in enumerate(needed):
        tables[i, :n] = torch.tensor(order[taken : taken + n], dtype=torch.int32)
        taken += n
    shape = (num_blocks, block_size, n_kv_heads, head_dim)
    return Paged(
        randn(*shape, dtype=dtype),
        randn(*shape, dtype=dtype),
        tables,
        torch.tensor(seq_lens, dtype=torch.int32),
    )


def token_heads(
    tokens: int, n_heads: int, head_dim: int, dtype: torch.dtype, is_strided: bool
) -> torch.Tensor:
    """[tokens, n_heads, head_dim] randn values, optionally as a strided view (a QKV slice)."""
    q = randn(tokens, n_heads, head_dim, dtype=dtype)
    return strided(q) if is_strided else q


def cu_seqlens(q_lens: list[int]) -> torch.Tensor:
    """[B+1] int32 prefix sums: sequence i owns query rows cu[i]:cu[i+1]."""
    return torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)


def attention_scale(head_dim: int) -> float:
    # Not the default 1/sqrt(D): an implementation that ignores ``scale`` must fail.
    return 1.5 * head_dim**-0.5


def prefill_args(
    seqs: list[tuple[int, int]],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    is_strided: bool = False,
    consecutive: bool = False,
) -> tuple:
    """attention_prefill's arguments for sequences given as (seq_len, q_len): the new queries
    are the last q_len positions of each."""
    n_heads, n_kv_heads = heads
    seq_lens = [s for s, _ in seqs]
    q_lens = [q for _, q in seqs]
    paged = paged_kv(seq_lens, block_size, n_kv_heads, head_dim, dtype, consecutive)
    q = token_heads(sum(q_lens), n_heads, head_dim, dtype, is_strided)
    return (
        q,
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        cu_seqlens(q_lens),
        paged.seq_lens,
        max(q_lens),
        attention_scale(head_dim),
    )


def decode_args(
    seq_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    is_strided: bool = False,
    consecutive: bool = False,
) -> tuple:
    """attention_decode's arguments: one query per sequence, at its last position."""
    n_heads, n_kv_heads = heads
    paged = paged_kv(seq_lens, block_size, n_kv_heads, head_dim, dtype, consecutive)
    q = token_heads(len(seq_lens), n_heads, head_dim, dtype, is_strided)
    return (
        q,
        paged.k_cache,
        paged.v_cache,
        paged.block_tables,
        paged.seq_lens,
        attention_scale(head_dim),
    )
