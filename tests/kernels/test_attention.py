"""Triton paged attention (decode with split-KV, prefill/extend) against the float64 spec references.

interpret lane: CPU tensors through Triton's interpreter, fp16 and fp32 (the interpreter's bf16
``tl.dot`` is wrong), small shapes. cuda lane: the compiled kernels, bf16, fp16 and fp32 (whose dots
must stay IEEE fp32, not TF32, to meet the spec), the full matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from ops.helpers import assert_matches_spec, dtype_id, strided
from ops.paged import cu_seqlens, decode_args, paged_kv, prefill_args, token_heads
from rustinfer_ops_cuda.kernels import decode_attention
from rustinfer_ops_cuda.kernels.decode_attention import attention_decode
from rustinfer_ops_cuda.kernels.prefill_attention import PrefillConfig, attention_prefill
from rustinfer_ops_cuda.kernels.rope_store import rope_kv_store

from kernels.lanes import LANE_DEVICE
from rustinfer.ops import ATTENTION_DECODE, ATTENTION_PREFILL, ROPE_KV_STORE, build_cos_sin_cache

interpret = pytest.mark.interpret
cuda = pytest.mark.cuda


def _on_device(args: tuple, device: str, is_strided: bool) -> list:
    """The op's arguments on ``device``; q as a strided view there when ``is_strided``."""
    moved = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    if is_strided:
        moved[0] = strided(moved[0])
    return moved


def check_decode(
    seq_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    is_strided: bool = False,
    num_splits: int | None = None,
    device: str = LANE_DEVICE,
) -> None:
    args = decode_args(seq_lens, heads, head_dim, block_size, dtype)
    out = attention_decode(*_on_device(args, device, is_strided), num_splits=num_splits)
    assert out.is_contiguous()
    assert_matches_spec("attention_decode", out.cpu(), ATTENTION_DECODE.reference(*args), dtype)


def check_prefill(
    seqs: list[tuple[int, int]],
    heads: tuple[int, int],
    head_dim: int,
    dtype: torch.dtype,
    block_size: int = 16,
    is_strided: bool = False,
    device: str = LANE_DEVICE,
    config: PrefillConfig | None = None,
) -> None:
    """Sequences given as (seq_len, q_len): the new queries are the last q_len positions."""
    args = prefill_args(seqs, heads, head_dim, block_size, dtype)
    out = attention_prefill(*_on_device(args, device, is_strided), config=config)
    assert out.is_contiguous()
    assert_matches_spec("attention_prefill", out.cpu(), ATTENTION_PREFILL.reference(*args), dtype)


# -- interpret lane ------------------------------------------------------------------------------

INTERPRET_DTYPES = [torch.float16, torch.float32]


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "seq_lens, heads, head_dim, block_size, num_splits",
    [
        ([1, 17, 40], (8, 2), 64, 16, None),  # heuristic splits, lengths around a block
        ([33], (9, 3), 64, 5, 4),  # SmolLM2's heads, odd block size, 4 chunks
        ([70, 3], (4, 4), 128, 16, 2),  # no GQA, D=128, a chunk left empty for the short one
        ([100], (8, 1), 64, 16, 1),  # GQA 8, no split: the single-pass store path
        ([16, 32], (4, 2), 32, 16, 8),  # exact block multiples, more chunks than key steps
    ],
)
def test_decode_interpret(seq_lens, heads, head_dim, block_size, num_splits, dtype):
    check_decode(seq_lens, heads, head_dim, dtype, block_size, num_splits=num_splits)


@interpret
def test_decode_interpret_strided_q():
    check_decode([5, 23], (8, 2), 64, torch.float16, is_strided=True)


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    "seqs, heads, head_dim, block_size",
    [
        ([(40, 40), (17, 17), (1, 1)], (8, 2), 64, 16),  # plain prompts, ragged
        ([(33, 33)], (9, 3), 64, 5),  # odd block size, tiles spanning pages
        ([(70, 20), (3, 3)], (4, 4), 128, 16),  # a cached prefix of 50 under a 20-token chunk
        ([(50, 17), (48, 1)], (8, 1), 64, 16),  # extend and a one-token extend, GQA 8
    ],
)
def test_prefill_interpret(seqs, heads, head_dim, block_size, dtype):
    check_prefill(seqs, heads, head_dim, dtype, block_size)


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
def test_prefill_interpret_paired_tiles(dtype):
    # Mirrored tile pairs: 3, 2 and 1 tiles of 16 (odd counts leave a middle tile alone).
    paired = PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=1, paired=True)
    check_prefill([(40, 40), (50, 20), (9, 9)], (8, 2), 64, dtype, config=paired)


@interpret
@pytest.mark.parametrize("dtype", INTERPRET_DTYPES, ids=dtype_id)
@pytest.mark.parametrize(
    ("pack", "paired", "heads"),
    [(2, False, (8, 2)), (4, True, (8, 2)), (0, False, (8, 1)), (0, True, (9, 3))],
    ids=["pack2", "pack4-paired", "auto-group8", "auto-group3"],
)
def test_prefill_interpret_packed_heads(pack, paired, heads, dtype):
    """Heads sharing a KV head in one program: 2 or 4 of a group of 4 (8 queries of 4 heads a
    tile of 32 rows), the automatic choice for a group of 8 (4 heads: 16 queries a tile) and a
    group of 3 (no power of two divides it: one head), over prompts, a cached prefix and a
    one-token extend."""
    config = PrefillConfig(
        block_m=32 if pack != 0 else 64, block_n=16, num_warps=4, num_stages=1, paired=paired,
        pack=pack,
    )  # fmt: skip
    seqs = [(40, 40), (50, 20), (9, 9), (48, 1)]
    check_prefill(seqs, heads, 64, dtype, config=config)


@interpret
def test_prefill_pack_must_divide_the_group():
    with pytest.raises(ValueError, match="pack must divide"):
        PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1, pack=4).heads_per_program(
            3
        )
    assert PrefillConfig(64, 16, 4, 1).heads_per_program(8) == 4  # 64 rows: >= 16 queries
    assert PrefillConfig(128, 64, 8, 3).heads_per_program(4) == 4
    assert PrefillConfig(128, 64, 8, 3).heads_per_program(3) == 1


def test_small_grid_tiles_need_more_shared_memory_than_consumer_cards_have():
    """The 64-row / 128-key tiles taken for small grids hold ~104 KiB of stages in bf16 at head
    dim 64: fine on an A100 (163 KiB) or H100/H200 (227), too much for a 99 KiB consumer card,
    where the launcher keeps the default tiles."""
    from rustinfer_ops_cuda.kernels.prefill_attention import SMALL_GRID_64, _stage_bytes

    need = _stage_bytes(SMALL_GRID_64, torch.empty(0, 32, 64, dtype=torch.bfloat16))
    assert 99 * 1024 < need < 163 * 1024


@interpret
def test_prefill_interpret_strided_q():
    check_prefill([(21, 21), (30, 9)], (8, 2), 64, torch.float16, is_strided=True)


@interpret
def test_launchers_reject_bad_arguments():
    paged = paged_kv([9], 16, 2, 64, torch.float16)
    q = token_heads(1, 8, 64, torch.float16, False)
    tables, lens = paged.block_tables, paged.seq_lens
    with pytest.raises(TypeError, match="block_tables has dtype int64"):
        attention_decode(q, paged.k_cache, paged.v_cache, tables.long(), lens, 0.1)
    with pytest.raises(TypeError, match="k_cache has dtype float32"):
        attention_decode(q, paged.k_cache.float(), paged.v_cache, tables, lens, 0.1)
    with pytest.raises(ValueError, match="v_cache must be contiguous"):
        v_t = paged.v_cache.transpose(0, 1).contiguous().transpose(0, 1)
        attention_decode(q, paged.k_cache, v_t, tables, lens, 0.1)
    with pytest.raises(ValueError, match="not a multiple"):
        attention_decode(token_heads(1, 7, 64, torch.float16, False), paged.k_cache,
                         paged.v_cache, tables, lens, 0.1)  # fmt: skip
    with pytest.raises(ValueError, match="cu_seqlens_q has shape"):
        attention_prefill(token_heads(9, 8, 64, torch.float16, False), paged.k_cache,
                          paged.v_cache, tables, cu_seqlens([9])[:1], lens, 9, 0.1)  # fmt: skip
    with pytest.raises(ValueError, match="num_splits must be a power of two"):
        attention_decode(q, paged.k_cache, paged.v_cache, tables, lens, 0.1, num_splits=3)


# -- cuda lane -----------------------------------------------------------------------------------

CUDA_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# GQA ratios 1, 4 and 8 (Llama-3.2-1B is 32/8, Llama-3.1-8B 32/8, 70B 64/8).
CUDA_HEADS = [(8, 8), (32, 8), (32, 4)]
BOUNDARY_LENS = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1023, 1025]


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", CUDA_HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_decode_cuda_block_boundaries(heads, head_dim, dtype, is_strided):
    check_decode(BOUNDARY_LENS, heads, head_dim, dtype, 16, is_strided)


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seq_lens", [[32768], [32767, 4096, 1], [8191, 8193]], ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 32])
def test_decode_cuda_long_contexts(seq_lens, num_splits, dtype):
    check_decode(seq_lens, (32, 8), 64, dtype, 16, num_splits=num_splits)


@cuda
@pytest.mark.parametrize("block_size", [1, 5, 32, 256])
def test_decode_cuda_block_sizes(block_size):
    check_decode([1, 7, 300, 513], (32, 8), 128, torch.bfloat16, block_size)


@cuda
def test_decode_cuda_batch_64():
    lens = torch.randint(1, 3000, (64,)).tolist()
    check_decode(lens, (32, 8), 64, torch.bfloat16)


def _captured(step: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """``step`` run once on a side stream (compiling its kernels), then captured in a CUDA graph;
    returns the graph and the output tensor its replays write."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


@cuda
@pytest.mark.parametrize("dependent_split", [False, True], ids=["split", "dependent-split"])
@pytest.mark.parametrize("dependent_merge", [False, True], ids=["merge", "dependent-merge"])
def test_decode_cuda_graph_replay_new_lengths(dependent_merge, dependent_split, monkeypatch):
    # Captured once, replayed with other lengths and queries: the split count comes from shapes
    # and the chunk bounds from seq_lens on the device. With the kernels launched as programmatic
    # dependents (sm_90+), each must still wait for the writes of the kernel before it: the
    # captured kernel that writes q, and the split pass's partial results.
    monkeypatch.setattr(decode_attention, "DEPENDENT_MERGE", dependent_merge)
    monkeypatch.setattr(decode_attention, "DEPENDENT_SPLIT", dependent_split)
    args = decode_args([6000, 3000], (32, 8), 64, 16, torch.bfloat16)
    q, k_cache, v_cache, tables, lens, scale = _on_device(args, "cuda", False)

    q_source = q.clone()

    def run() -> torch.Tensor:
        torch.mul(q_source, 2.0, out=q)  # a kernel right before the split pass, writing its q
        return attention_decode(q, k_cache, v_cache, tables, lens, scale, num_splits=32)

    graph, out = _captured(run)
    for new_lens in ([5999, 1], [17, 2999], [6000, 3000]):
        lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
        q_source.copy_(torch.randn_like(q))
        graph.replay()
        expected = ATTENTION_DECODE.reference(2 * q_source.cpu(), *args[1:4], lens.cpu(), scale)
        assert_matches_spec("attention_decode", out.cpu(), expected, torch.bfloat16)


@cuda
@pytest.mark.parametrize("dependent_split", [False, True], ids=["split", "dependent-split"])
def test_decode_cuda_graph_after_rope_kv_store(dependent_split, monkeypatch):
    # A Llama layer's decode step: rope_kv_store rotates the new token's q and k and writes k and
    # v into the cache, then decode attention reads them. From sm_90 on, rope_kv_store lets its
    # dependents launch early, and the decode's split pass can be one: it must still see every
    # write. Captured once as the engine will, replayed with new tokens.
    monkeypatch.setattr(decode_attention, "DEPENDENT_SPLIT", dependent_split)
    dtype, bs = torch.bfloat16, 16
    _, k_cache, v_cache, tables, lens, scale = _on_device(
        decode_args([3000, 700, 17], (32, 8), 64, bs, dtype), "cuda", False
    )
    positions = (lens - 1).long()  # the new token is each sequence's last
    rows = torch.arange(len(lens), device="cuda")
    slots = tables[rows, positions // bs].long() * bs + positions % bs
    cos_sin = build_cos_sin_cache(64, 4096, 500000.0, None).cuda()
    q_new, k_new, v_new = (torch.empty(len(lens), h, 64, dtype=dtype, device="cuda")
                           for h in (32, 8, 8))  # fmt: skip

    def layer() -> torch.Tensor:
        q = rope_kv_store(q_new, k_new, v_new, positions, cos_sin, k_cache, v_cache, slots)
        return attention_decode(q, k_cache, v_cache, tables, lens, scale)

    for t in (q_new, k_new, v_new):
        t.copy_(torch.randn_like(t))
    graph, out = _captured(layer)
    for _ in range(3):
        for t in (q_new, k_new, v_new):
            t.copy_(torch.randn_like(t))
        k_before, v_before = k_cache.cpu(), v_cache.cpu()
        graph.replay()
        ref_q, ref_k, ref_v = ROPE_KV_STORE.reference(
            q_new.cpu(), k_new.cpu(), v_new.cpu(), positions.cpu(), cos_sin.cpu(), k_before,
            v_before, slots.cpu(),
        )  # fmt: skip
        # The kernels hand each other bf16 q and cache entries: the reference starts from those.
        expected = ATTENTION_DECODE.reference(
            ref_q.to(dtype), ref_k.to(dtype), ref_v.to(dtype), tables.cpu(), lens.cpu(), scale
        )
        assert_matches_spec("attention_decode", out.cpu(), expected, dtype)


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", CUDA_HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("is_strided", [False, True], ids=["contig", "strided"])
def test_prefill_cuda_ragged(heads, head_dim, dtype, is_strided):
    # Odd lengths, tile and block boundaries, one-token prompts, a cached prefix under a chunk.
    seqs = [(1, 1), (17, 17), (127, 127), (129, 129), (300, 300), (400, 77), (1000, 1), (515, 256)]
    check_prefill(seqs, heads, head_dim, dtype, 16, is_strided)


@cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("seqs", [[(2048, 2048)], [(32768, 64)], [(16384, 129), (2049, 2049)]],
                         ids=str)  # fmt: skip
def test_prefill_cuda_long(seqs, dtype):
    check_prefill(seqs, (32, 8), 64, dtype)


@cuda
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("block_m, block_n, num_warps", [(128, 64, 8), (64, 64, 4), (128, 128, 8)])
def test_prefill_cuda_configs(block_m, block_n, num_warps, paired):
    cfg = PrefillConfig(block_m, block_n, num_warps, 3, paired)
    seqs = [(1, 1), (129, 129), (700, 383), (1000, 1000)]
    check_prefill(seqs, (32, 8), 64, torch.bfloat16, config=cfg)


@cuda
@pytest.mark.parametrize("block_size", [1, 5, 32, 256])
def test_prefill_cuda_block_sizes(block_size):
    check_prefill([(200, 200), (333, 100)], (32, 8), 64, torch.bfloat16, block_size)


@cuda
def test_registry_picks_triton_on_cuda_never_on_cpu():
    from rustinfer_ops_cpu.native import library
    from rustinfer_ops_cpu.plugin import NATIVE_F32_TARGETS

    from rustinfer.plugins import get_registries

    regs = get_registries()
    for op in ("rmsnorm", "fused_add_rmsnorm", "silu_and_mul", "rope_kv_store",
               "attention_decode", "attention_prefill"):  # fmt: skip
        for dtype in CUDA_DTYPES:  # float32 included: the accurate path runs Triton too
            assert regs.ops.lookup(op, "cuda", dtype, overrides={}).name == "triton"
            # The CPU's own: its C kernels for float32 where they build, else torch's.
            native = op in NATIVE_F32_TARGETS and dtype == torch.float32 and library() is not None
            cpu = regs.ops.lookup(op, "cpu", dtype, overrides={}).name
            assert cpu == ("native" if native else "torch"), (op, dtype, cpu)


@pytest.mark.interpret
def test_batch_invariant_decode_gives_each_sequence_its_bits_alone() -> None:
    """The batch-invariant attention_decode splits every context as a batch of one would: a
    sequence's output is bit-identical alone and among five (the default picks fewer splits for
    the batch here, so it merges different partial sums)."""
    from rustinfer_ops_cuda.kernels import batch_invariant

    seq_lens = [300, 37, 129, 256, 64]
    args = decode_args(seq_lens, (4, 2), 32, 16, torch.float32)
    q, k_cache, v_cache, tables, lens, scale = args
    batched = batch_invariant.attention_decode(*args)
    for i in range(len(seq_lens)):
        alone = batch_invariant.attention_decode(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], scale
        )
        assert torch.equal(batched[i], alone[0]), f"sequence {i} differs alone"
    assert_matches_spec(
        "attention_decode", batched, ATTENTION_DECODE.reference(*args), torch.float32
    )
