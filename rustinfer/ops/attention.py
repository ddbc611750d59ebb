"""Paged-KV attention specs: ``kv_cache_store`` (exact), ``attention_prefill``,
``attention_decode``.

KV cache layout, per layer: ``k_cache``, ``v_cache``: ``[num_blocks, block_size, n_kv_heads,
head_dim]``. The token at position p of sequence i lives in block
``block_tables[i, p // block_size]`` at offset ``p % block_size``; its flat slot is
``block_id * block_size + offset``. Any block size works.

The references read the cache one position at a time through the block table (no reshaping tricks),
so they stay independent of how an implementation gathers blocks.
"""

from __future__ import annotations

import torch

from rustinfer.ops.spec import OpSpec, Tolerance


def kv_cache_store_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New caches (clones) with token t written to slot ``slot_mapping[t]``; slots < 0 skipped."""
    new_k, new_v = k_cache.clone(), v_cache.clone()
    block_size = k_cache.shape[1]
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot < 0:
            continue  # padding token
        new_k[slot // block_size, slot % block_size] = k[t]
        new_v[slot // block_size, slot % block_size] = v[t]
    return new_k, new_v


def _context_reference(cache: torch.Tensor, block_row: torch.Tensor, ctx: int) -> torch.Tensor:
    """Positions 0..ctx-1 of one sequence, read through its block table row: [ctx, Hkv, D] f64."""
    block_size = cache.shape[1]
    positions = torch.arange(ctx)
    blocks = block_row.to(torch.int64)[positions // block_size]
    return cache[blocks, positions % block_size].to(torch.float64)


def _attend_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """q: [n, Hq, D] attending causally (key position <= query_pos) to k, v: [ctx, Hkv, D]."""
    n_heads, n_kv_heads = q.shape[1], k.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv_heads} kv heads")
    group = n_heads // n_kv_heads
    k = k.repeat_interleave(group, dim=1)  # [ctx, Hq, D]: query head h reads kv head h // group
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.to(torch.float64), k) * scale  # [Hq, n, ctx]
    visible = torch.arange(k.shape[0])[None, :] <= query_pos[:, None]  # [n, ctx]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)  # [n, Hq, D]


def attention_prefill_reference(
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
    """Each sequence's new queries against its whole cached context, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)  # [T, Hq, D]
    starts = cu_seqlens_q.tolist()
    for i, ctx in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        q_len = end - start
        if not 0 < q_len <= min(ctx, max_query_len):
            raise ValueError(f"sequence {i}: q_len {q_len}, seq_len {ctx}, max {max_query_len}")
        if max_seq_len is not None and ctx > max_seq_len:
            raise ValueError(f"sequence {i}: seq_len {ctx} > max_seq_len {max_seq_len}")
        k = _context_reference(k_cache, block_tables[i], ctx)
        v = _context_reference(v_cache, block_tables[i], ctx)
        query_pos = torch.arange(ctx - q_len, ctx)  # the new tokens are the last q_len positions
        out[start:end] = _attend_reference(q[start:end], k, v, query_pos, scale)
    return out


def attention_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, at its last position, in float64."""
    out = torch.zeros(q.shape, dtype=torch.float64)  # [B, Hq, D]
    for i, ctx in enumerate(seq_lens.tolist()):
        k = _context_reference(k_cache, block_tables[i], ctx)
        v = _context_reference(v_cache, block_tables[i], ctx)
        out[i : i + 1] = _attend_reference(q[i : i + 1], k, v, torch.tensor([ctx - 1]), scale)
    return out


KV_CACHE_STORE = OpSpec(
    name="kv_cache_store",
    doc="""kv_cache_store(k, v, k_cache, v_cache, slot_mapping) -> None

    k, v:             [T, Hkv, D], the cache's dtype (may be strided views of a fused QKV output).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], written IN PLACE; must be contiguous.
    slot_mapping:     [T] int64: token t goes to block slot // block_size, offset
                      slot % block_size. A slot < 0 marks a padding token: nothing is written.
    Reference: reference(k, v, k_cache, v_cache, slot_mapping) -> (new_k_cache, new_v_cache) on
    clones, compared exactly.
    """,
    reference=kv_cache_store_reference,
    exact=True,
)

# Attention outputs are convex combinations of V rows, so their scale is |v| (O(1) at randn scale,
# the scale the tolerances assume) and errors are absolute on that scale rather than relative to an
# output element that may be a near-cancelling average.
_ATTENTION_TOLERANCES = {
    torch.float64: Tolerance(
        2.0**-40,
        2.0**-44,
        "float64 dot products over D and ctx terms, exp and normalisation: a few hundred u64 at "
        "most on O(1) values",
    ),
    torch.float32: Tolerance(
        2.0**-16,
        2.0**-20,
        "full fp32 (no TF32): scores, D <= 128 term dot products times scale ~1/sqrt(D), are off "
        "by ~12 u32 = 2^-20 (rounding errors of the running sums add like a random walk); "
        "softmax passes that on as relative error of each probability, times |v| <= ~4: 2^-18; "
        "P@V over ctx terms adds ~sqrt(ctx) u32, 2^-17 at a 16k context, and the largest of a "
        "million outputs sits a few of those steps out (measured on an H200: 8.7e-6 = 2^-16.8 "
        "at 16.9k): 2^-16 absolute",
    ),
    torch.bfloat16: Tolerance(
        2.0**-8,
        2.0**-7,
        "fp32 scores and softmax; flash-style kernels round the probabilities to bf16 before P@V "
        "(u = 2^-8 each, i.e. u * sum p|v| ~ u absolute at unit |v|) and the output once more "
        "(u relative): atol u, rtol 2u",
    ),
    torch.float16: Tolerance(
        2.0**-11,
        2.0**-10,
        "fp32 scores and softmax; flash-style kernels round the probabilities to fp16 before P@V "
        "(u = 2^-11 each, u * sum p|v| ~ u absolute at unit |v|) and the output once more "
        "(u relative): atol u, rtol 2u",
    ),
}

ATTENTION_PREFILL = OpSpec(
    name="attention_prefill",
    doc="""attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                      max_query_len, scale, max_seq_len=None) -> out

    q:             [T, Hq, D], the new queries of B sequences packed back to back (may be strided).
    k_cache, v_cache: [num_blocks, block_size, Hkv, D], q's dtype; the new tokens' k/v are ALREADY
                   stored (kv_cache_store runs first). Hq is a multiple of Hkv (GQA): query head h
                   reads kv head h // (Hq // Hkv).
    block_tables:  [B, max_blocks] int32; entries past a sequence's last block are ignored.
    cu_seqlens_q:  [B+1] int32: sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q
                   (q_len_i >= 1 of them).
    seq_lens:      [B] int32: total context of sequence i (cached prefix + new tokens),
                   seq_lens[i] >= q_len_i.
    max_query_len: int, max_i q_len_i (kernels size their grid with it).
    scale:         float multiplying q.k (usually head_dim ** -0.5).
    max_seq_len:   int | None: max_i seq_lens[i] when the caller knows it on the host (an upper
                   bound is not allowed: it must be the max), None when it does not. Kernels may
                   pick a path from it without a device sync (max_seq_len == max_query_len and
                   B = 1: a whole prompt, no cached prefix); the result is the same either way.
    out:           [T, Hq, D], q's dtype, contiguous.

    Query j of sequence i sits at position seq_lens[i] - q_len_i + j and attends to cache positions
    0..that position (causal, aligned bottom-right). Softmax in fp32 (float64 for float64 inputs).
    One op serves plain prefill (q_len = seq_len), prefill over a cached prefix and chunked prefill.
    """,
    reference=attention_prefill_reference,
    tolerances=_ATTENTION_TOLERANCES,
)

ATTENTION_DECODE = OpSpec(
    name="attention_decode",
    doc="""attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale) -> out

    q:            [B, Hq, D], one new query per sequence (may be strided).
    k_cache, v_cache, block_tables, scale: as in attention_prefill.
    seq_lens:     [B] int32 >= 1: the query sits at position seq_lens[i] - 1 (its k/v already
                  stored) and attends to positions 0..seq_lens[i] - 1.
    out:          [B, Hq, D], q's dtype, contiguous.
    Equal to attention_prefill with q_len = 1 for every sequence.
    """,
    reference=attention_decode_reference,
    tolerances=_ATTENTION_TOLERANCES,
)
