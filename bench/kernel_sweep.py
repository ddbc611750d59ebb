"""Launch-shape sweep for the Triton kernels on a GPU (Llama-3.2-1B shapes: 32 q heads, 8 kv, D 64).

Prefill: each PrefillConfig at 2048/4096/8192 tokens, head dim 64, in TFLOP/s (causal FLOPs).
Decode: BLOCK_N x warps x splits x dependent launches (merge after split pass, split pass after
the kernel before it) at batch 1 (4k-32k) and 64 (4k, 32k), as % of the bandwidth floor (K and V
bytes read once); ``--decode-grid wide``: BLOCK_N x warps x stages at batch 1; ``--decode-grid
variants``: the decode alone and after rope_kv_store, as a dependent launch or not; ``parts``:
pages in order and the merge skipped, where batch 1's time goes; ``merge``: splits x merge warps.
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
from dataclasses import replace

import torch
import triton
import triton.testing
from graph_timing import graph_replay_ms
from rustinfer_ops_cuda.kernels import decode_attention as dec
from rustinfer_ops_cuda.kernels.prefill_attention import PrefillConfig, attention_prefill

logger = logging.getLogger("kernel_sweep")
HQ, HKV, D, PAGE = 32, 8, 64, 16


def _paged_cache(
    batch: int, ctx: int, generator: torch.Generator, shuffled: bool = True
) -> tuple[torch.Tensor, ...]:
    """Random bf16 caches with each sequence's blocks shuffled over the pool (or in order)."""
    blocks_per_seq = triton.cdiv(ctx, PAGE)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, PAGE, HKV, D)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=generator)
    if shuffled:
        perm = torch.randperm(num_blocks, device="cuda", generator=generator).to(torch.int32)
    else:
        perm = torch.arange(num_blocks, device="cuda", dtype=torch.int32)
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
    # Each also with the heads of a KV head packed into one program (pack 0: automatic), and
    # with one head per program (pack 1).
    configs = [replace(c, pack=p) for c in configs for p in (1, 0)]
    # (new tokens, cached prefix): whole prompts, and a 512-token chunk over a 4,096-token prefix.
    for q_len, prefix in ((2048, 0), (4096, 0), (8192, 0), (512, 4096)):
        tokens = q_len + prefix
        k, v, tables, lens = _paged_cache(1, tokens, gen)
        q = torch.randn(q_len, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        cu = torch.tensor([0, q_len], dtype=torch.int32, device="cuda")
        flops = 4.0 * HQ * D * q_len * (prefix + (q_len + 1) / 2)
        for cfg in configs:
            try:
                run = functools.partial(
                    attention_prefill, q, k, v, tables, cu, lens, q_len, D**-0.5, config=cfg
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
            results.append({"kernel": "prefill", "tokens": q_len, "prefix": prefix,
                            "config": cfg.__dict__,
                            "ms": ms, "tflops": tflops})  # fmt: skip
            logger.info("prefill %5d+%d %s %.3f ms %.0f TFLOP/s", prefix, q_len, cfg, ms, tflops)


# Decode options: the launcher's module settings they stand for. Options not in this map are
# the call's own (block_n, splits) or the step's (chain).
DECODE_SETTINGS = {
    "warps": ("NUM_WARPS_SPLIT", "NUM_WARPS_WHOLE"),
    "stages": ("NUM_STAGES",),
    "dependent_merge": ("DEPENDENT_MERGE",),
    "dependent_split": ("DEPENDENT_SPLIT",),
    "merge_warps": ("MERGE_WARPS",),
}


def decode_defaults(batch: int) -> dict:
    """Every option at what the launcher does by itself."""
    return {
        "block_n": None,
        "splits": None,
        "warps": dec.NUM_WARPS_SPLIT if batch == 1 else dec.NUM_WARPS_WHOLE,
        "stages": dec.NUM_STAGES,
        "dependent_merge": dec.DEPENDENT_MERGE,
        "dependent_split": dec.DEPENDENT_SPLIT,
        "merge_warps": dec.MERGE_WARPS,
        "chain": "none",
        "pages": "shuffled",
        "merge": "run",
    }


# Options swept per batch (the rest at their defaults). Batch 64 fills the grid without
# splitting (no merge).
DECODE_GRID = {
    1: {"block_n": (None, 64), "warps": (2, 4), "splits": (None, 32, 64, 128),
        "dependent_merge": (True, False), "dependent_split": (False, True)},
    64: {"dependent_split": (False, True)},
}  # fmt: skip
DECODE_SHAPES = ((1, 4096), (1, 8192), (1, 16384), (1, 32768), (64, 4096), (64, 32768))
# --decode-grid wide: the step size, warps and pipeline depth at batch 1 only, for the split
# pass's own streaming rate.
DECODE_WIDE_GRID = {
    1: {
        "block_n": (32, 64, 128),
        "warps": (1, 2, 4, 8),
        "stages": (2, 3, 4, 5),
        "splits": (None, 128),
    }
}
BATCH1_SHAPES = ((1, 4096), (1, 8192), (1, 16384), (1, 32768))
# --decode-grid variants: the decode alone (after the previous decode) against rope_kv_store ->
# decode, as a Llama layer runs them, with the split pass launched as a programmatic dependent of
# the kernel before it or not, and (split grids) the merge as one of the split pass or not.
DECODE_VARIANT_GRID = {
    1: {"dependent_merge": (False, True), "dependent_split": (False, True),
        "chain": ("none", "rope")},
    64: {"dependent_split": (False, True), "chain": ("none", "rope")},
}  # fmt: skip
DECODE_VARIANT_SHAPES = (*BATCH1_SHAPES, (64, 4096), (64, 32768))
# --decode-grid parts: where batch 1's time goes. Each sequence's blocks in order in the pool
# rather than shuffled (what scattered pages cost), and the merge skipped (a diagnostic: the
# output is then wrong; what is left is the split pass's own time).
DECODE_PARTS_GRID = {1: {"pages": ("shuffled", "in order"), "merge": ("run", "skipped")}}
# --decode-grid merge: fewer chunks (less for the merge to read) x the merge's warps.
DECODE_MERGE_GRID = {1: {"splits": (None, 16, 32), "merge_warps": (1, 2, 4, 8)}}


class _NoLaunch:
    """Stands in for a kernel whose launches the parts sweep skips."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


class _DecodeStep:
    """One decode call per invocation, rotating over cache sets; with ``chain="rope"`` each call
    first runs rope_kv_store for the sequences' newest token (as a Llama layer does), and the
    decode reads the q it returns."""

    def __init__(self, sets: list, q: torch.Tensor, block_n, splits, chain: str) -> None:
        self.sets, self.q, self.block_n, self.splits = sets, q, block_n, splits
        self.counter = itertools.count()
        self.rope = None
        if chain == "rope":
            from rustinfer_ops_cuda.kernels.rope_store import rope_kv_store

            from rustinfer.ops import build_cos_sin_cache

            batch = q.shape[0]
            lens = sets[0][3]
            positions = (lens - 1).long()
            cos_sin = build_cos_sin_cache(D, int(lens.max()) + 1, 500000.0, None, device="cuda")
            k_new = torch.randn(batch, HKV, D, device="cuda", dtype=torch.bfloat16)
            slots = [
                tables[torch.arange(batch, device="cuda"), positions // PAGE].long() * PAGE
                + positions % PAGE
                for _, _, tables, _ in sets
            ]
            self.rope = (rope_kv_store, positions, cos_sin, k_new, slots)

    def __call__(self) -> None:
        i = next(self.counter) % len(self.sets)
        k, v, tables, lens = self.sets[i]
        q = self.q
        if self.rope is not None:
            rope_kv_store, positions, cos_sin, k_new, slots = self.rope
            q = rope_kv_store(q, k_new, k_new, positions, cos_sin, k, v, slots[i])
        dec.attention_decode(
            q, k, v, tables, lens, D**-0.5, num_splits=self.splits, block_n=self.block_n
        )


def sweep_decode(results: list[dict], bandwidth: float, grid: dict, shapes) -> None:
    gen = torch.Generator(device="cuda").manual_seed(1)
    saved = {attr: getattr(dec, attr) for attrs in DECODE_SETTINGS.values() for attr in attrs}
    for batch, ctx in shapes:
        # Rotate between cache sets when one fits in L2, so repeated runs do not hit the cache.
        n_sets = max(1, 2**17 // (batch * ctx))
        sets_by_pages = {
            pages: [_paged_cache(batch, ctx, gen, pages == "shuffled") for _ in range(n_sets)]
            for pages in grid[batch].get("pages", ("shuffled",))
        }
        q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        floor_ms = (kv_bytes + 2 * q.numel() * 2) / bandwidth * 1e3
        names = list(grid[batch])
        defaults = decode_defaults(batch)  # taken while the module settings are its own
        for values in itertools.product(*grid[batch].values()):
            opts = {**defaults, **dict(zip(names, values, strict=True))}
            for name, attrs in DECODE_SETTINGS.items():
                for attr in attrs:
                    setattr(dec, attr, opts[name])
            sets = sets_by_pages[opts["pages"]]
            step = _DecodeStep(sets, q, opts["block_n"], opts["splits"], opts["chain"])
            merge_kernel = dec._merge_kernel
            if opts["merge"] == "skipped":
                dec._merge_kernel = _NoLaunch()
            try:
                ms = graph_replay_ms(step, len(sets))
            except Exception as exc:
                logger.warning("decode b%d ctx%d %s: %s", batch, ctx, opts, exc)
                continue
            finally:
                dec._merge_kernel = merge_kernel
            results.append({"kernel": "decode", "batch": batch, "ctx": ctx, **opts, "ms": ms,
                            "floor_ms": floor_ms, "pct_floor": 100 * floor_ms / ms})  # fmt: skip
    for attr, value in saved.items():
        setattr(dec, attr, value)


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
    parser.add_argument("--decode-grid", choices=tuple(DECODE_GRIDS), default="default",
                        help="wide: block_n x warps x stages at batch 1, 4k-32k; variants: alone "
                             "and after rope_kv_store, dependent launch or not; parts: pages in "
                             "order, merge skipped; merge: splits x merge warps")  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    results: list[dict] = []
    if args.only in (None, "prefill"):
        sweep_prefill(results)
    if args.only in (None, "decode"):
        sweep_decode(results, args.bandwidth, *DECODE_GRIDS[args.decode_grid])
    if args.only in (None, "rope"):
        sweep_rope(results, args.bandwidth)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    lines = []
    for tokens, prefix in ((2048, 0), (4096, 0), (8192, 0), (512, 4096)):
        rows = sorted(
            (r for r in results if r.get("tokens") == tokens and r.get("prefix", 0) == prefix),
            key=lambda r: r["ms"],
        )
        for r in rows[:6]:
            c = r["config"]
            lines.append(f"prefill {prefix}+{tokens:5d} bm{c['block_m']} bn{c['block_n']} "
                         f"w{c['num_warps']} s{c['num_stages']} pack{c.get('pack', 1)}"
                         f"{' paired' if c.get('paired') else ''}: {r['ms']:.3f} ms "
                         f"{r['tflops']:.0f} TFLOP/s")  # fmt: skip
    for batch, ctx in sorted({(r["batch"], r["ctx"]) for r in results if "batch" in r}):
        rows = [r for r in results if r.get("batch") == batch and r.get("ctx") == ctx]
        defaults = decode_defaults(batch)
        default = [r for r in rows if all(r[k] == v for k, v in defaults.items())]
        for r in sorted(rows, key=lambda r: r["ms"])[:5] + default:
            changed = " ".join(f"{k}={r[k]}" for k, v in defaults.items() if r[k] != v)
            lines.append(f"decode b{batch:2d} ctx{ctx:6d} {changed or 'defaults'}: "
                         f"{r['ms'] * 1e3:.1f} us {r['pct_floor']:.0f}% of floor")  # fmt: skip
    for r in sorted((r for r in results if r["kernel"] == "rope"), key=lambda r: r["ms"])[:4]:
        lines.append(f"rope T=4096 warps "
                     f"{r['num_warps'] or 'auto'}: {r['ms'] * 1e3:.1f} us "
                     f"{r['pct_floor']:.0f}% of floor")  # fmt: skip
    print("\n".join(lines))
    return 0


DECODE_GRIDS = {
    "default": (DECODE_GRID, DECODE_SHAPES),
    "wide": (DECODE_WIDE_GRID, BATCH1_SHAPES),
    "variants": (DECODE_VARIANT_GRID, DECODE_VARIANT_SHAPES),
    "parts": (DECODE_PARTS_GRID, BATCH1_SHAPES),
    "merge": (DECODE_MERGE_GRID, BATCH1_SHAPES),
}


if __name__ == "__main__":
    raise SystemExit(main())
