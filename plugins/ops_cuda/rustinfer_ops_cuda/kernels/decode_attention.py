"""Paged decode attention with GQA and split-KV (flash-decoding), in Triton.

One query per sequence. A program takes one (sequence, KV head, split): the ``GROUP`` query heads
that share the KV head are stacked as the rows of one ``tl.dot`` (padded to the 16-row minimum of a
tensor-core tile), so each K/V tile is read from memory once per KV head rather than once per query
head. A sequence's context is cut into ``num_splits`` chunks handled by separate programs, which
keeps every multiprocessor busy at batch 1 with a long context; a second kernel merges the chunks'
partial results through their log-sum-exp. From sm_90 on, the merge is launched as a programmatic
dependent of the split pass, so its launch overlaps the split pass instead of following it. Chunk
bounds are computed in the kernel from ``seq_lens``: the host never reads sequence lengths, so one
launch serves any lengths (and a CUDA graph can replay it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rustinfer_ops_cuda.kernels.attention_common import (
    LOG2E,
    attend_step,
    dot_width,
    multiprocessor_count,
)
from rustinfer_ops_cuda.kernels.checks import check_paged_attention
from rustinfer_ops_cuda.kernels.dependent_launch import (
    dependent_launch_supported,
    gdc_launch_dependents,
    gdc_wait,
)
from rustinfer_ops_cuda.kernels.launch import launch_on

# Launch settings from sweeps on an H100 (bench/kernel_sweep.py; bench/KERNEL_NOTES.md):
# - 64 keys per step (8 KB of K and of V, D=64 bf16), 3 stages: a grid already full without
#   splitting (batch 64) reads at 95-99% of the bandwidth floor at 4k-32k;
# - a split grid (batch 1) streams best with 2 warps per program (more programs resident per
#   multiprocessor): 10.6 / 16.4 / 28.7 us at 8k / 16k / 32k context against 11.6 / 17.7 / 29.8
#   with 4 warps and 128-key steps (sweep 6); 4 warps stay best unsplit.
BLOCK_N = 64
NUM_WARPS_SPLIT = 2
NUM_WARPS_WHOLE = 4
NUM_STAGES = 3
# One warp per merge program: its reductions over the chunks stay within the warp (no shared
# memory, no barrier). H100 sweep (bench/results/*-sweep-10-decode-merge-warps.json), batch 1 at
# 4k / 8k / 16k / 32k: 8.8 / 11.5 / 17.1 / 29.1 us with 4 warps, 8.1 / 10.8 / 16.5 / 28.3 with 1.
MERGE_WARPS = 1
# Split a sequence's context only while the grid has fewer than this many programs per
# multiprocessor: below it, too few loads are in flight to reach bandwidth.
PROGRAMS_PER_SM = 2
# At most this many chunks per sequence: a 32k context still gets 512 keys (4 steps) per chunk.
MAX_SPLITS = 64
# Never cut chunks shorter than this: below it the partial results cost more than they gain.
MIN_KEYS_PER_SPLIT = 128
# Launch the merge as a programmatic dependent of the split pass (sm_90+; dependent_launch.py).
# H100 sweep (bench/results/*-sweep-8-decode-chain.json), batch 1 at 4k / 8k / 16k / 32k context
# after rope_kv_store, as in a layer: 11.8 / 14.6 / 20.8 / 33.0 us -> 11.2 / 14.0 / 20.1 / 32.3 us.
DEPENDENT_MERGE = True
# Launch the split pass as a dependent of whatever kernel precedes it on the stream (it then waits
# for that kernel's writes before reading anything: q and the cache may be its output). Off: in
# the same sweep (graphs of 16+ calls) it lost wherever a layer would feel it. After rope_kv_store, which lets dependents launch at its start, batch 1 at
# 4k / 8k / 16k / 32k took 11.3 / 14.6 / 20.8 / 32.6 us with it and 11.2 / 14.0 / 20.1 / 32.3
# without; batch 64 read 91-97% of the floor with it and 94-100% without. Alone (after the
# previous decode) batch 1 moved by under 0.3 us either way.
DEPENDENT_SPLIT = False


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    stride_qb,
    stride_qh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_row,
    stride_ob,
    stride_oh,
    scale_log2,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if WAIT_PRIOR:
        gdc_wait()
    if TRIGGER:
        gdc_launch_dependents()  # the merge may launch now: it waits for this grid's writes
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq)
    # Chunk length: a whole number of BLOCK_N steps, so only the context's last step is ragged.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    rows = tl.arange(0, GROUP_PAD)
    row_valid = rows < GROUP
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_row
    head_offset = kv_head * stride_cache_head
    for n0 in range(start, end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_valid = keys < end
        acc, m_i, l_i = attend_step(
            q, acc, m_i, l_i, keys, key_valid, key_valid[None, :], table_row, k_cache_ptr,
            v_cache_ptr, stride_cache_block, stride_cache_token, head_offset, dims, dim_valid,
            scale_log2, PAGE=PAGE, MASKED=True,
        )  # fmt: skip

    out_mask = row_valid[:, None] & dim_valid[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=out_mask,
        )
    else:
        # An empty chunk (start >= seq_len) leaves l_i = 0: it stores lse = -inf and zeros, and
        # the merge gives it weight 0.
        nonempty = l_i > 0
        out = tl.where(nonempty[:, None], acc / tl.where(nonempty, l_i, 1.0)[:, None], 0.0)
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        # Partial results: [B, Hq, NUM_SPLITS, BLOCK_D] and [B, Hq, NUM_SPLITS], fp32, dense.
        part_row = (seq * (GROUP * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(
            part_out_ptr + part_row[:, None].to(tl.int64) * BLOCK_D + dims[None, :],
            out,
            mask=row_valid[:, None],
        )
        tl.store(part_lse_ptr + part_row, lse, mask=row_valid)


@triton.jit
def _merge_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    WAIT_PRIOR: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    if WAIT_PRIOR:
        gdc_wait()  # launched while the split pass runs: its partial results are not ready yet
    if TRIGGER:
        gdc_launch_dependents()
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    row = (seq * NUM_HEADS + head) * NUM_SPLITS + splits  # [NUM_SPLITS]
    lse = tl.load(part_lse_ptr + row)
    weights = tl.exp2(lse - tl.max(lse, 0))  # empty splits: exp2(-inf) = 0
    parts = tl.load(part_out_ptr + row[:, None].to(tl.int64) * BLOCK_D + dims[None, :])
    out = tl.sum(parts * weights[:, None], 0) / tl.sum(weights, 0)
    tl.store(
        out_ptr + seq * stride_ob + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def choose_num_splits(batch: int, n_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence, from shapes only (never from the lengths on the device).

    ``max_context`` is the block table's capacity in tokens: no sequence has more keys, so no more
    than max_context / MIN_KEYS_PER_SPLIT splits can each get a useful chunk.
    """
    if device.type != "cuda":
        sms = 4  # the interpreter: still exercise the split path on small shapes
        min_keys = 16
    else:
        sms = multiprocessor_count(device)
        min_keys = MIN_KEYS_PER_SPLIT
    wanted = triton.cdiv(PROGRAMS_PER_SM * sms, batch * n_kv_heads)
    useful = max(1, max_context // min_keys)
    splits = max(1, min(wanted, useful, MAX_SPLITS))
    return triton.next_power_of_2(splits) if splits > 1 else 1  # the merge loads a pow-2 range


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """The ``attention_decode`` op (see its spec). ``num_splits`` (a power of two) and
    ``block_n`` (keys per step) override the launch heuristics, for benchmarks and tests."""
    check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens)
    batch, n_heads, head_dim = q.shape
    page, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if block_tables.shape[0] != batch:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {batch} queries")
    out = torch.empty((batch, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = n_heads // n_kv_heads
    block_d = dot_width(head_dim)
    if num_splits is None:
        num_splits = choose_num_splits(batch, n_kv_heads, block_tables.shape[1] * page, q.device)
    elif num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two >= 1, got {num_splits}")
    block_n = block_n or BLOCK_N
    dependents = dependent_launch_supported(q.device)
    dependent_split = dependents and DEPENDENT_SPLIT
    dependent_merge = dependents and DEPENDENT_MERGE and num_splits > 1
    if num_splits > 1:
        part_out = torch.empty(
            (batch, n_heads, num_splits, block_d), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((batch, n_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the kernel when NUM_SPLITS == 1
    with launch_on(q.device):
        _decode_kernel[(batch, n_kv_heads, num_splits)](
            q,
            k_cache,
            v_cache,
            block_tables,
            seq_lens,
            out,
            part_out,
            part_lse,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            scale * LOG2E,
            GROUP=group,
            GROUP_PAD=dot_width(group),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            PAGE=page,
            BLOCK_N=block_n,
            NUM_SPLITS=num_splits,
            WAIT_PRIOR=dependent_split,
            TRIGGER=dependents,
            num_warps=NUM_WARPS_SPLIT if num_splits > 1 else NUM_WARPS_WHOLE,
            num_stages=NUM_STAGES,
            launch_pdl=dependent_split,
        )
        if num_splits > 1:
            _merge_kernel[(batch, n_heads)](
                part_out,
                part_lse,
                out,
                out.stride(0),
                out.stride(1),
                NUM_HEADS=n_heads,
                HEAD_DIM=head_dim,
                BLOCK_D=block_d,
                NUM_SPLITS=num_splits,
                WAIT_PRIOR=dependent_merge,
                TRIGGER=dependents,
                num_warps=MERGE_WARPS,
                launch_pdl=dependent_merge,
            )
    return out
