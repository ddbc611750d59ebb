"""Launch-shape sweep for the Triton kernels on a GPU (Llama-3.2-1B shapes: 32 q heads, 8 kv, D 64).

Prefill: each PrefillConfig at 2048/4096/8192 tokens, head dim 64, in TFLOP/s (causal FLOPs).
Decode: BLOCK_N x warps x stages x splits x dependent launches (merge after split pass, split
pass after the kernel before it) at batch 1 (4k-32k) and 64 (4k, 32k), as % of the bandwidth
floor (K and V bytes read once); ``--decode-grid wide``: BLOCK_N x warps x stages at batch 1.
Prints the best settings per shape and writes every measurement as JSON.

rope_kv_store: warps at 4096 tokens, as % of the bandwidth floor.

    python bench/kernel_sweep.py [--out sweep.json] [--bandwidth 2.95e12] [--only KERNEL]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import logging
import sys

import torch
import triton
import triton.testing
from graph_timing import graph_replay_ms
from rustinfer_ops_cuda.kernels import decode_attention as dec
from rustinfer_ops_cuda.kernels.prefill_attention import PrefillConfig, attention_prefill

logger = logging.getLogger("kernel_sweep")
HQ, HKV, D, PAGE = 32, 8, 64, 16


def _paged_cache(batch: int, ctx: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random bf16 caches with each sequence's blocks shuffled over the pool."""
    blocks_per_seq = triton.cdiv(ctx, PAGE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, PAGE, HKV, D)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    perm = torch.randperm(num_blocks, device="cuda", generator=generator).to(torch.int32)
    tables = perm.view(batch, blocks_per_seq).contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return k, v, tables, lens


def sweep_prefill(results: list[dict]) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    configs = [
        PrefillConfig(bm, bn, w, s)
        for bm, bn, w, s in [
            (128, 64, 4, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 3),
            (128, 128, 4, 3),
            (128, 64, 4, 4),
            (128, 32, 4, 4),
            (64, 64, 4, 3),
            (64, 128, 4, 3),
            (256, 64, 8, 3),
            (128, 64, 8, 2),
        ]
    ] + [
        PrefillConfig(bm, bn, w, s, paired=True)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3)]
    ]
    for tokens in (2048, 4096, 8192):
        k, v, tables, lens = _paged_cache(1, tokens, gen)
        q = torch.randn(tokens, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        cu = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
        flops = 4.0 * HQ * D * tokens * (tokens + 1) / 2
        for cfg in configs:
            try:
                run = functools.partial(
                    attention_prefill, q, k, v, tables, cu, lens, tokens, D**-0.5, config=cfg
                )
                ms = triton.testing.do_bench(
                    run,
                    warmup=25,
                    rep=100,
                    return_mode="median",
                )
            except Exception as exc:  # a config may not fit shared memory on this card
                logger.warning("prefill %s at %d: %s", cfg, tokens, exc)
                continue
            tflops = flops / (ms * 1e-3) / 1e12
            results.append({"kernel": "prefill", "tokens": tokens, "config": cfg.__dict__,
                            "ms": ms, "tflops": tflops})  # fmt: skip
            logger.info("prefill %5d %s %.3f ms %.0f TFLOP/s", tokens, cfg, ms, tflops)


def _rotating_decode(
    sets: list, q: torch.Tensor, splits: int | None, block_n: int | None, counter
) -> None:
    k, v, tables, lens = sets[next(counter) % len(sets)]
    dec.attention_decode(q, k, v, tables, lens, D**-0.5, num_splits=splits, block_n=block_n)


# Decode settings per batch: block_n x warps x stages x splits x merge launched as a dependent of
# the split pass x split pass launched as a dependent of the kernel before it. Batch 64 fills the
# grid without splitting (no merge).
DECODE_GRID = {
    1: ((None, 64), (4,), (3,), (None, 32, 64, 128), (True, False), (False, True)),
    64: ((None,), (4,), (3,), (None,), (False,), (False, True)),
}
DECODE_SHAPES = ((1, 4096), (1, 8192), (1, 16384), (1, 32768), (64, 4096), (64, 32768))
# --decode-grid wide: the step size, warps and pipeline depth at batch 1 only, with the launch
# settings as they are (both dependent launches), for the split pass's own streaming rate.
DECODE_WIDE_GRID = {1: ((32, 64, 128), (2, 4, 8), (2, 3, 4, 5), (None, 128), (True,), (True,))}
DECODE_WIDE_SHAPES = ((1, 4096), (1, 8192), (1, 16384), (1, 32768))


def sweep_decode(
    results: list[dict], bandwidth: float, grid: dict | None = None, shapes=None
) -> None:
    grid, shapes = grid or DECODE_GRID, shapes or DECODE_SHAPES
    gen = torch.Generator(device="cuda").manual_seed(1)
    defaults = (dec.NUM_WARPS_SPLIT, dec.NUM_WARPS_WHOLE, dec.NUM_STAGES, dec.DEPENDENT_MERGE,
                dec.DEPENDENT_SPLIT)  # fmt: skip
    for batch, ctx in shapes:
        # Rotate between cache sets when one fits in L2, so repeated runs do not hit the cache.
        sets = [_paged_cache(batch, ctx, gen) for _ in range(max(1, 2**17 // (batch * ctx)))]
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        floor_ms = (kv_bytes + 2 * q.numel() * 2) / bandwidth * 1e3
        for block_n, warps, stages, splits, dep_merge, dep_split in itertools.product(*grid[batch]):
            dec.NUM_WARPS_SPLIT = dec.NUM_WARPS_WHOLE = warps
            dec.NUM_STAGES = stages
            dec.DEPENDENT_MERGE, dec.DEPENDENT_SPLIT = dep_merge, dep_split
            run = functools.partial(_rotating_decode, sets, q, splits, block_n, itertools.count())
            try:
                ms = graph_replay_ms(run, len(sets))
            except Exception as exc:
                logger.warning("decode b%d ctx%d %s: %s", batch, ctx, (block_n, warps), exc)
                continue
            results.append({"kernel": "decode", "batch": batch, "ctx": ctx, "block_n": block_n,
                            "num_warps": warps, "num_stages": stages, "splits": splits,
                            "dependent_merge": dep_merge, "dependent_split": dep_split,
                            "ms": ms, "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / ms})  # fmt: skip
    (dec.NUM_WARPS_SPLIT, dec.NUM_WARPS_WHOLE, dec.NUM_STAGES, dec.DEPENDENT_MERGE,
     dec.DEPENDENT_SPLIT) = defaults  # fmt: skip


def sweep_rope(results: list[dict], bandwidth: float) -> None:
    from rustinfer_ops_cuda.kernels import rope_store

    from rustinfer.ops import build_cos_sin_cache

    gen = torch.Generator(device="cuda").manual_seed(2)
    tokens = 4096
    width = (HQ + 2 * HKV) * D
    cos_sin = build_cos_sin_cache(D, 8192, 500000.0, None, device="cuda")
    num_blocks = tokens // PAGE * 4
    k_cache = torch.empty(num_blocks, PAGE, HKV, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    sets = []
    for _ in range(4):  # 4 x 25 MB of qkv: past the L2
        qkv = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = qkv[:, : HQ * D].view(tokens, HQ, D)
        k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
        v = qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D)
        pos = torch.randint(0, 8192, (tokens,), device="cuda", generator=gen)
        slots = torch.randperm(num_blocks * PAGE, device="cuda", generator=gen)[:tokens]
        sets.append((q, k, v, pos, cos_sin, k_cache, v_cache, slots))
    # q, k, v read and q_out, k/v cache slots written (2 x width), cos/sin rows, positions, slots
    nbytes = 2 * tokens * width * 2 + tokens * D * 4 + tokens * 16
    floor_ms = nbytes / bandwidth * 1e3
    saved = rope_store.WARPS_OVERRIDE
    for warps in (0, 1, 2, 4, 8):
        rope_store.WARPS_OVERRIDE = warps
        counter = itertools.count()
        run = functools.partial(_rotating_call, rope_store.rope_kv_store, sets, counter)
        try:
            ms = graph_replay_ms(run, len(sets))
        except Exception as exc:
            logger.warning("rope warps %s: %s", warps, exc)
            continue
        results.append({"kernel": "rope", "num_warps": warps, "ms": ms, "floor_ms": floor_ms,
                        "pct_floor": 100 * floor_ms / ms})  # fmt: skip
    rope_store.WARPS_OVERRIDE = saved


def _rotating_call(fn, sets: list, counter) -> None:
    fn(*sets[next(counter) % len(sets)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write every measurement here as JSON")
    parser.add_argument("--bandwidth", type=float, default=2.95e12, help="bytes/s for the floor")
    parser.add_argument("--only", choices=("prefill", "decode", "rope"), default=None)
    parser.add_argument("--decode-grid", choices=("default", "wide"), default="default",
                        help="wide: block_n x warps x stages at batch 1, 4k-32k")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    results: list[dict] = []
    if args.only in (None, "prefill"):
        sweep_prefill(results)
    if args.only in (None, "decode"):
        if args.decode_grid == "wide":
            sweep_decode(results, args.bandwidth, DECODE_WIDE_GRID, DECODE_WIDE_SHAPES)
        else:
            sweep_decode(results, args.bandwidth)
    if args.only in (None, "rope"):
        sweep_rope(results, args.bandwidth)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    lines = []
    for tokens in (2048, 4096, 8192):
        rows = sorted((r for r in results if r.get("tokens") == tokens), key=lambda r: r["ms"])
        for r in rows[:4]:
            c = r["config"]
            lines.append(f"prefill T={tokens:5d} bm{c['block_m']} bn{c['block_n']} "
                         f"w{c['num_warps']} s{c['num_stages']}"
                         f"{' paired' if c.get('paired') else ''}: {r['ms']:.3f} ms "
                         f"{r['tflops']:.0f} TFLOP/s")  # fmt: skip
    for batch, ctx in DECODE_SHAPES:
        rows = [r for r in results if r.get("batch") == batch and r.get("ctx") == ctx]
        default = [r for r in rows if (r["block_n"], r["num_warps"], r["num_stages"], r["splits"],
                                       r["dependent_merge"] or batch > 1, r["dependent_split"])
                   == (*defaults_of(dec, batch), None, dec.DEPENDENT_MERGE,
                       dec.DEPENDENT_SPLIT)]  # fmt: skip
        for r in sorted(rows, key=lambda r: r["ms"])[:5] + default:
            lines.append(f"decode b{batch:2d} ctx{ctx:6d} bn{r['block_n']} w{r['num_warps']} "
                         f"s{r['num_stages']} splits={r['splits']} "
                         f"dep_merge={r['dependent_merge']} dep_split={r['dependent_split']}: "
                         f"{r['ms'] * 1e3:.1f} us "
                         f"{r['pct_floor']:.0f}% of floor"
                         + (" (default)" if r in default else ""))  # fmt: skip
    for r in sorted((r for r in results if r["kernel"] == "rope"), key=lambda r: r["ms"])[:4]:
        lines.append(f"rope T=4096 warps "
                     f"{r['num_warps'] or 'auto'}: {r['ms'] * 1e3:.1f} us "
                     f"{r['pct_floor']:.0f}% of floor")  # fmt: skip
    print("\n".join(lines))
    return 0


def defaults_of(module, batch: int) -> tuple[None, int, int]:
    """The decode sweep's (block_n, warps, stages) that mean "the launcher's own choice"; the
    warps are the split ones at batch 1 (the sweep's split shapes), the unsplit ones above."""
    warps = module.NUM_WARPS_SPLIT if batch == 1 else module.NUM_WARPS_WHOLE
    return None, warps, module.NUM_STAGES


if __name__ == "__main__":
    raise SystemExit(main())
