"""Paged prefill / extend attention over a ragged batch (flash-attention style), in Triton.

A program takes BLOCK_M consecutive new queries of one sequence and one query head, and streams
that sequence's keys and values from the paged cache, BLOCK_N at a time, through an online softmax.
The new tokens' K/V are already in the cache (``rope_kv_store`` ran first), so a cached prefix, a
plain prompt and a chunk of a chunked prefill are the same case: the queries are the last q_len
positions of a seq_len-long context, masked causally from the bottom-right.

The key loop runs in two phases: keys every query of the tile may see (no mask to compute), then the
diagonal band where the causal mask applies. The last tiles of a sequence see the most keys, so
either each program takes a tile and its mirror (equal work per program), or tiles are launched
longest-work-first: both shorten the tail of the launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from rustinfer_ops_cuda.kernels.attention_common import (
    LOG2E,
    MIN_DOT,
    attend_step,
    dot_width,
    max_shared_memory,
    multiprocessor_count,
)
from rustinfer_ops_cuda.kernels.checks import check_paged_attention, check_tensor
from rustinfer_ops_cuda.kernels.launch import launch_on


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape and launch parameters of the prefill kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # One program per pair of mirrored query tiles (equal causal work per program) instead of
    # one per tile launched longest first.
    paired: bool = False
    # Query heads per program (GQA packing): heads that share a KV head take the rows of one
    # tile together (block_m / pack queries each), so each K/V tile is loaded once for all of
    # them. 0: the largest power of two that divides the group and leaves >= 16 queries a tile.
    pack: int = 0

    def heads_per_program(self, group: int) -> int:
        if self.pack:
            if group % self.pack or self.block_m % self.pack:
                raise ValueError(f"{self}: pack must divide the GQA group {group} and block_m")
            return self.pack
        pack = 1
        while group % (2 * pack) == 0 and self.block_m // (2 * pack) >= MIN_DOT:
            pack *= 2
        return pack


# By head dim. 128 queries x 64 keys per step keeps the two dots of a step on tensor cores with the
# fp32 accumulator (128 x D) in registers; three pipeline stages hide the K/V gathers behind the
# dots of the step before. D=64, measured on an H100 (bench/kernel_sweep.py, KERNEL_NOTES.md):
# 8 warps, and mirrored tile pairs per program: 257/316/353 TFLOP/s at 2k/4k/8k tokens against
# 204/276/331 with one tile per program launched longest first. D=128 doubles the accumulator,
# 8 warps hold it; its pairing is untimed, so it keeps one tile per program.
CONFIGS = {
    64: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3, paired=True),
    128: PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
}
# D=64 when the grid above would leave SMs idle (fewer than two programs per SM): a 512-token
# chunk over a 4,096-token prefix is 128 programs of 128 rows. 64-row tiles with 128-key steps on
# 4 warps double the programs. H200 sweep (bench/kernel_sweep.py --only prefill, 2026-11-28): that
# chunk 0.078 ms against 0.112 with the default tiles (SDPA on contiguous K/V: 0.0805).
SMALL_GRID_64 = PrefillConfig(block_m=64, block_n=128, num_warps=4, num_stages=3)
# Head dims above 128 need smaller tiles to fit the accumulator and the K/V stages in registers
# and shared memory.
LARGE_HEAD_DIM = PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=2)
# The interpreter runs tiles as numpy arrays: small tiles keep the interpret lane quick and still
# cover several tiles per sequence.
INTERPRET_CONFIG = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


def default_config(head_dim: int, device: torch.device) -> PrefillConfig:
    if device.type != "cuda":
        return INTERPRET_CONFIG
    block_d = dot_width(head_dim)
    if block_d <= 64:
        return CONFIGS[64]
    if block_d <= 128:
        return CONFIGS[128]
    return LARGE_HEAD_DIM


@triton.jit
def _prefill_tile(
    tile,
    head_block,
    seq,
    q_start,
    q_len,
    seq_len,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_row,
    stride_ot,
    stride_oh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PACK: tl.constexpr,
):
    """Queries tile*QT .. +QT (QT = BLOCK_M / PACK) of one sequence and PACK query heads sharing a
    KV head (heads ``head_block * PACK ..``), against its whole context. Row r of the tile is
    query r // PACK of head r % PACK: the heads of one query sit side by side."""
    QT: tl.constexpr = BLOCK_M // PACK
    prefix = seq_len - q_len  # cached positions before the first new query
    tile_rows = tl.arange(0, BLOCK_M)
    rows = tile * QT + tile_rows // PACK  # query index within the sequence's new tokens
    heads = head_block * PACK + tile_rows % PACK  # [BLOCK_M] query head of each row
    row_valid = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    query_pos = prefix + rows  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_table_row
    head_offset = ((head_block * PACK) // GROUP) * stride_cache_head  # one KV head for all rows

    # Phase 1: keys before the tile's first query position are visible to every row of the tile.
    first_query = prefix + tile * QT
    unmasked_end = (first_query // BLOCK_N) * BLOCK_N
    for n0 in range(0, unmasked_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_len  # always true here; the loads still take a mask
        acc, m_i, l_i = attend_step(
            q, acc, m_i, l_i, keys, key_valid, key_valid[None, :], table_row, k_cache_ptr, v_cache_ptr,
            stride_cache_block, stride_cache_token, head_offset, dims, dim_valid, scale_log2,
            PAGE=PAGE, MASKED=False,
        )  # fmt: skip
    # Phase 2: the diagonal band, up to the tile's last query position.
    band_end = tl.minimum(seq_len, prefix + (tile + 1) * QT)
    for n0 in range(unmasked_end, band_end, BLOCK_N):
        keys = n0 + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_len
        visible = (keys[None, :] <= query_pos[:, None]) & key_valid[None, :]
        acc, m_i, l_i = attend_step(
            q, acc, m_i, l_i, keys, key_valid, visible, table_row, k_cache_ptr, v_cache_ptr,
            stride_cache_block, stride_cache_token, head_offset, dims, dim_valid, scale_log2,
            PAGE=PAGE, MASKED=True,
        )  # fmt: skip

    # Padding rows (row >= q_len) saw only zeros and are not stored; every real row saw key 0.
    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_ptr,
    seq_lens_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_table_row,
    stride_ot,
    stride_oh,
    scale_log2,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAIRED: tl.constexpr,
    PACK: tl.constexpr,
):
    head_block = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    n_tiles = tl.cdiv(q_len, BLOCK_M // PACK)
    if PAIRED:
        # Program j takes tile j and its mirror n_tiles-1-j: under the causal mask their work adds
        # up to the same for every j, so no program waits on a long tail.
        first = tl.program_id(0)
        mirror = n_tiles - 1 - first
    else:
        first = tl.num_programs(0) - 1 - tl.program_id(0)  # longest-work tiles first
        mirror = first  # no second tile
    for pass_ in tl.static_range(2):
        if pass_ == 0:
            tile = first
            todo = first < n_tiles
        else:
            tile = mirror
            todo = mirror > first
        if todo:
            _prefill_tile(
                tile, head_block, seq, q_start, q_len, seq_len, q_ptr, k_cache_ptr, v_cache_ptr,
                block_tables_ptr, out_ptr, stride_qt, stride_qh, stride_cache_block,
                stride_cache_token, stride_cache_head, stride_table_row, stride_ot, stride_oh,
                scale_log2, GROUP, HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, PACK,
            )  # fmt: skip


def _grid_config(
    q: torch.Tensor, n_heads: int, group: int, batch: int, max_query_len: int, sms: int
) -> PrefillConfig:
    """The default tiles, or :data:`SMALL_GRID_64` where they would give fewer than two programs
    per SM: 16-bit only (the case measured), and only where its stages fit the card's shared
    memory (not on ~99 KiB consumer cards)."""
    cfg = default_config(q.shape[-1], q.device)
    if cfg is not CONFIGS[64] or q.element_size() != 2:
        return cfg
    pack = cfg.heads_per_program(group)
    programs = triton.cdiv(max_query_len, cfg.block_m // pack) * (n_heads // pack) * batch
    if programs >= 2 * sms:
        return cfg
    fits = _stage_bytes(SMALL_GRID_64, q) <= max_shared_memory(q.device)
    return SMALL_GRID_64 if fits else cfg


def _stage_bytes(cfg: PrefillConfig, q: torch.Tensor) -> int:
    """Shared memory the tile shape's pipeline holds: the query tile and ``num_stages`` K and V
    tiles (an estimate of what Triton allocates, enough to tell a 99 KiB card from a 227 one)."""
    block_d, size = dot_width(q.shape[-1]), q.element_size()
    return (cfg.block_m + 2 * cfg.num_stages * cfg.block_n) * block_d * size


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
    *,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """The ``attention_prefill`` op (see its spec), on the Triton kernel for every shape.
    ``config`` sets the kernel's tile shape (benchmark sweeps, the batch-invariant mode).

    Not torch's SDPA for lone whole prompts, though cuDNN's backend is 10-28% faster there at
    1k-16k tokens on an H200: it builds an execution plan for each new sequence length (48-460
    ms a call, paid by every layer: 0.84 s for a first 1,200-token prompt of a 1B model), and the
    backend without plans (FlashAttention-2) is slower than this kernel at every length
    (BENCHMARKS.md, first use of a prompt length). ``max_seq_len`` is not needed here."""
    check_paged_attention(q, k_cache, v_cache, block_tables, seq_lens, cu_seqlens_q=cu_seqlens_q)
    tokens, n_heads, head_dim = q.shape
    page, n_kv_heads = k_cache.shape[1], k_cache.shape[2]
    batch = block_tables.shape[0]
    check_tensor("cu_seqlens_q", cu_seqlens_q, [batch + 1], torch.int32)
    if max_query_len < 1 and tokens > 0:
        raise ValueError(f"max_query_len must be >= 1, got {max_query_len}")
    out = torch.empty((tokens, n_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return out
    group = n_heads // n_kv_heads
    sms = multiprocessor_count(q.device) if q.device.type == "cuda" else 1
    cfg = config or _grid_config(q, n_heads, group, batch, max_query_len, sms)
    pack = cfg.heads_per_program(group)
    tiles = triton.cdiv(max_query_len, cfg.block_m // pack)
    # Pairing halves the programs: worth it only while the paired grid still fills the GPU (a
    # 512-token chunk over a long prefix has 4 tiles of near-equal work: pairing them took
    # 0.177 ms against 0.108 unpaired on an H100).
    # (The interpreter pairs whenever asked, to exercise the path.)
    head_blocks = n_heads // pack
    paired = cfg.paired and triton.cdiv(tiles, 2) * head_blocks * batch >= sms
    grid = (triton.cdiv(tiles, 2) if paired else tiles, head_blocks, batch)
    with launch_on(q.device):
        _prefill_kernel[grid](
            q,
            k_cache,
            v_cache,
            block_tables,
            cu_seqlens_q,
            seq_lens,
            out,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            scale * LOG2E,
            GROUP=n_heads // n_kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=dot_width(head_dim),
            PAGE=page,
            BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n,
            PAIRED=paired,
            PACK=pack,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
    return out
