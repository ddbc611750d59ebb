"""The ops whose results could depend on the batch, in forms where they do not (``--batch-invariant``).

A sequence decoded beside others should produce the tokens it produces alone. In the default ops
four things break that: cuBLAS picks its kernel and reduction order by the row count, the
one-row GEMV sums differently from cuBLAS, decode attention cuts each context into a number of
split-KV chunks chosen from the batch size, and prefill attention takes smaller tiles when the
batch's grid is small. Every other op of a step works row by row (norms, rope, activation,
sampling).

Here ``linear`` and ``logits`` run the skinny kernel for every row count (its tiles come from the
weight's shape alone, rows go through it in blocks of 16 by the same instructions; see
``skinny.py``), ``attention_decode`` takes the split count a lone sequence would get, and
``attention_prefill`` keeps the tile shape of its head dim, whatever the batch. Registered under
the implementation name ``batch_invariant`` with a low priority, so only ``--batch-invariant``
(which pins them) selects them. The price is speed: decode matmuls ~20-50% slower than the
default ops at 1-16 rows, and prefill's matmuls re-read the weights once per 16 rows
(BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from rustinfer_ops_cuda.kernels import decode_attention, prefill_attention
from rustinfer_ops_cuda.kernels.skinny import skinny

__all__ = ["attention_decode", "attention_prefill", "linear", "logits"]


def _rows(x: torch.Tensor) -> torch.Tensor:
    # The kernel reads rows with unit last stride; other views are copied first.
    return x if x.stride(-1) == 1 else x.contiguous()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, K], weight [N, K], bias [N] | None -> [T, N] in x's dtype, each row's bits
    independent of T and of the other rows."""
    if x.shape[0] == 0:
        return torch.empty((0, weight.shape[0]), dtype=x.dtype, device=x.device)
    return skinny(_rows(x), weight, bias)


def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The LM head: x [T, K], weight [N, K] -> [T, N] float32 (the accumulator, unrounded), each
    row's bits independent of T and of the other rows."""
    if x.shape[0] == 0:
        return torch.empty((0, weight.shape[0]), dtype=torch.float32, device=x.device)
    return skinny(_rows(x), weight, None, out_dtype=torch.float32)


def attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    max_seq_len: int | None = None,
) -> torch.Tensor:
    """The ``attention_prefill`` op with its tile shape fixed by the head dim alone: the default
    picks smaller tiles when the batch's grid is small, which would change a sequence's key
    steps (and so its bits) with the batch beside it. For the same reason a long lone prompt
    does not take the default's SDPA path (``max_seq_len`` is not used): a given ``config`` keeps
    the Triton kernel."""
    del max_seq_len
    config = prefill_attention.default_config(q.shape[-1], q.device)
    return prefill_attention.attention_prefill(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_query_len, scale,
        config=config,
    )  # fmt: skip


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The ``attention_decode`` op with the split-KV count of a batch of one, whatever the batch:
    a sequence's keys are cut into the same chunks and merged in the same order alone or not."""
    splits = decode_attention.choose_num_splits(
        1, k_cache.shape[2], block_tables.shape[1] * k_cache.shape[1], q.device
    )
    return decode_attention.attention_decode(
        q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=splits
    )
