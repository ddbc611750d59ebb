"""Paged-KV attention on the CPU: gather each sequence's blocks, then torch SDPA.

Measured with torch 2.13 on the 2-core dev box (Hq=9, Hkv=3, D=64, ctx=200, one thread):
- SDPA on 4-D [1, H, L, D] inputs takes the CPU flash kernel (~35 us); 3-D inputs fall back to
  the math path (~100 us).
- The CPU flash kernel is ~6x slower in bf16 than in fp32 at these sizes, so half-precision K/V
  are upcast after the gather (~6 us each); that also keeps the softmax in fp32 as the spec asks.
- Each Python-level torch call costs 1-7 us, so the decode path keeps to the fewest: per cache one
  index_select (or none, see ``_context``) and one as_strided, then one SDPA.
Prefill loops over sequences (never tokens). Decode of several sequences is one padded SDPA call:
each is gathered to the batch's longest context, and the padding slots, which may hold NaN garbage
from other requests or an unwritten pool, are zeroed in K and V before the masked call (a masked
score of NaN + -inf, or 0 * NaN in P @ V, would otherwise poison the row). On 2 threads this takes
a 16-sequence SmolLM2 decode step's attention from ~30 ms (one call per sequence per layer) to
the single-call cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HALF_TYPES = (torch.bfloat16, torch.float16)


def _context(
    cache: torch.Tensor, blocks: torch.Tensor, first_block: int | None, ctx: int
) -> torch.Tensor:
    """Positions 0..ctx-1 of a sequence as [1, Hkv, ctx, D] (fp32 for half caches).

    ``blocks`` holds the sequence's first ceil(ctx / block_size) block ids; ``first_block`` is set
    when they are consecutive, and then the context is read in place rather than gathered.
    """
    _, _, n_kv_heads, head_dim = cache.shape
    if first_block is not None:
        src = cache[first_block : first_block + blocks.shape[0]]  # [n_blocks, bs, Hkv, D] view
    else:
        src = cache.index_select(0, blocks)  # [n_blocks, bs, Hkv, D], a contiguous copy
    if src.dtype in _HALF_TYPES:
        src = src.float()
    # One as_strided call instead of view + slice + transpose (three calls): src is contiguous,
    # so these strides are exactly its [1, ctx, Hkv, D] prefix seen as [1, Hkv, ctx, D].
    row = n_kv_heads * head_dim
    return src.as_strided(
        (1, n_kv_heads, ctx, head_dim), (ctx * row, head_dim, row, 1), src.storage_offset()
    )


def _attend(
    q4: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_row: torch.Tensor,
    ctx: int,
    scale: float,
) -> torch.Tensor:
    """q4 [1, Hq, n, D]: the last n positions of a ctx-long sequence -> [1, Hq, n, D] (fp32 for
    half inputs, else q's dtype)."""
    blocks = block_row[: -(-ctx // k_cache.shape[1])]  # [n_blocks]
    ids = blocks.tolist()
    first_block: int | None = ids[0]
    # A fresh block pool hands a lone sequence consecutive blocks: then its context is one slab of
    # each cache and needs no copy (saves two gathers, ~40% of a decode step's overhead).
    if ids != list(range(ids[0], ids[0] + len(ids))) or not (
        k_cache.is_contiguous() and v_cache.is_contiguous()
    ):
        first_block = None
    k = _context(k_cache, blocks, first_block, ctx)  # [1, Hkv, ctx, D]
    v = _context(v_cache, blocks, first_block, ctx)
    if q4.dtype != k.dtype:
        q4 = q4.to(k.dtype)
    q_len = q4.shape[2]
    mask = None
    if 1 < q_len < ctx:
        # Bottom-right causal: query j sits at position ctx - q_len + j. (q_len == ctx is SDPA's
        # own top-left causal mask; q_len == 1 sees every key.)
        key_pos = torch.arange(ctx, device=q4.device)
        mask = key_pos <= torch.arange(ctx - q_len, ctx, device=q4.device).unsqueeze(
            1
        )  # [n, ctx] bool
    return F.scaled_dot_product_attention(
        q4, k, v, attn_mask=mask, is_causal=1 < q_len == ctx, scale=scale, enable_gqa=True
    )


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [B, Hq, D] at positions seq_lens - 1 -> [B, Hq, D] in q's dtype."""
    lens = seq_lens.tolist()
    batch, n_heads, head_dim = q.shape
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]: a view whatever q's strides
    if batch == 1:  # the common CPU case: no output buffer, no loop
        o = _attend(q4, k_cache, v_cache, block_tables[0], lens[0], scale)
        o = o.view(1, n_heads, head_dim)
        return o if o.dtype == q.dtype else o.to(q.dtype)
    return _decode_padded(q4, k_cache, v_cache, block_tables, seq_lens, max(lens), scale)


def _decode_padded(
    q4: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_ctx: int,
    scale: float,
) -> torch.Tensor:
    """q4 [B, Hq, 1, D] -> [B, Hq, D]: every sequence padded to the longest context, one SDPA."""
    batch, n_heads, _, head_dim = q4.shape
    _, block_size, n_kv_heads, _ = k_cache.shape
    n_blocks = -(-max_ctx // block_size)
    width = n_blocks * block_size
    lens = seq_lens.to(torch.int64).unsqueeze(1)  # [B, 1]
    # A shorter sequence's table entries past its own blocks are padding (any value, even -1):
    # read block 0 there instead; those slots are masked and zeroed below.
    own = torch.arange(n_blocks, device=q4.device) < (lens + block_size - 1) // block_size
    ids = torch.where(own, block_tables[:, :n_blocks].to(torch.int64), 0).reshape(-1)
    # [B, width] True where the slot holds one of the sequence's positions.
    valid = torch.arange(width, device=q4.device) < lens
    pad = ~valid[:, :, None, None]

    def gather(cache: torch.Tensor) -> torch.Tensor:
        kv = cache.index_select(0, ids).view(batch, width, n_kv_heads, head_dim)
        if kv.dtype in _HALF_TYPES:
            kv = kv.float()
        return kv.masked_fill_(pad, 0.0).transpose(1, 2)  # [B, Hkv, width, D]

    k, v = gather(k_cache), gather(v_cache)
    q = q4 if q4.dtype == k.dtype else q4.to(k.dtype)
    o = F.scaled_dot_product_attention(
        q, k, v, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True
    )  # [B, Hq, 1, D]
    o = o.view(batch, n_heads, head_dim)
    return o if o.dtype == q4.dtype else o.to(q4.dtype)


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
    """q [T, Hq, D] packed over B sequences -> [T, Hq, D] in q's dtype.

    ``max_query_len`` and ``max_seq_len`` pick GPU paths; the CPU loop has no use for them.
    """
    del max_query_len, max_seq_len
    starts = cu_seqlens_q.tolist()
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D] view
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, Hq, D]
    out4 = out.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, D] view, written per sequence
    for i, ctx in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        out4[:, :, start:end] = _attend(
            q4[:, :, start:end], k_cache, v_cache, block_tables[i], ctx, scale
        )
    return out
