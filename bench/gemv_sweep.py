"""Batch-1 matmuls of a decode step: cuBLAS against a plain Triton GEMV, per shape, in a graph.

    python bench/gemv_sweep.py --config bench/configs/llama-3.2-1b/config.json

A decode step at batch 1 reads every weight once; its matmuls are GEMVs ([1, K] x [N, K]^T)
that should stream at the card's copy bandwidth. This times, for each of the layer's matmul
shapes and the LM head, cuBLAS (``torch.mm``) and a few launch settings of a Triton GEMV, each as
a CUDA graph of 16 back-to-back calls on 16 different weight matrices (as a model's layers are,
so nothing is served from L2), and prints GB/s per variant as JSON lines, then a table.

    python bench/gemv_sweep.py --config bench/configs/llama-3.2-1b/config.json --skinny

``--skinny`` times the batch-invariant skinny kernel (kernels/skinny.py) instead, at 1, 2, 4, 8 and
16 rows (``--rows``): per shape against cuBLAS and the register-tile GEMV (up to its 8 rows),
under its default tiles and a few other cuts (``k128``: 128-wide K steps, ``t264``: the split-K
rule aiming at 264 programs, ``s1``: a K loop prefetched by hand, ...), each row also saying
whether every row equals the one-row call on it (``invariant``); then a 16-layer chain of a
layer's four matmuls per row count.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=rows[:, None] < N)
        x = tl.load(x_ptr + ms[:, None] * stride_xm + ks[None, :], mask=ms[:, None] < M)
        acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
    tl.store(
        y_ptr + ms[:, None] * stride_ym + rows[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=(ms[:, None] < M) & (rows[None, :] < N),
    )


@triton.jit
def _gemv_preload_kernel(
    x_ptr,
    w_ptr,
    y_ptr,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    M: tl.constexpr,
    K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DEPENDENT: tl.constexpr,
):
    # The whole [BLOCK_N, K] weight tile is loaded before waiting on the previous kernel: weights
    # never depend on it, so with a dependent launch their loads overlap its tail.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=rows[:, None] < N)
    if DEPENDENT:
        gdc_wait()
        gdc_launch_dependents()
    for m in tl.static_range(M):
        x = tl.load(x_ptr + m * stride_xm + ks)
        acc = tl.sum(w.to(tl.float32) * x[None, :].to(tl.float32), axis=1)
        tl.store(y_ptr + m * stride_ym + rows, acc.to(y_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def _read_kernel(w_ptr, y_ptr, N, stride_wn, K: tl.constexpr, BLOCK_N: tl.constexpr,
                 DEPENDENT: tl.constexpr):  # fmt: skip
    # The plain read: each program sums its weight rows, nothing else (no activations). A chain
    # of these is the floor of any design that reads each matrix in a kernel of its own.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + ks[None, :], mask=rows[:, None] < N)
    if DEPENDENT:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(y_ptr + rows, tl.sum(w.to(tl.float32), axis=1), mask=rows < N)


def plain_read(x, w, block_n, warps, dependent=True):
    n, k = w.shape
    y = torch.empty((n,), dtype=torch.float32, device=w.device)
    _read_kernel[(triton.cdiv(n, block_n),)](
        w, y, n, w.stride(0), K=k, BLOCK_N=block_n, DEPENDENT=dependent, num_warps=warps,
        launch_pdl=dependent,
    )  # fmt: skip
    return y


def preload_gemv(x, w, block_n, warps, dependent=True):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_preload_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, n, x.stride(0), w.stride(0), y.stride(0),
        M=m, K=k, BLOCK_N=block_n, DEPENDENT=dependent, num_warps=warps, launch_pdl=dependent,
    )  # fmt: skip
    return y


def triton_gemv(x, w, block_n, block_k, warps):
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
        BLOCK_M=max(1, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )  # fmt: skip
    return y


def graph_time_us(fn, reps: int = 20) -> float:
    """Per-call time of ``fn`` (16 calls) captured in one graph, median over replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1000 / 16)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--skinny", action="store_true", help="time the skinny kernel (see above)")
    ap.add_argument("--rows", default="1,2,4,8,16", help="row counts for --skinny")
    args = ap.parse_args()
    with open(args.config) as f:
        c = json.load(f)
    h, inter = c["hidden_size"], c["intermediate_size"]
    d = c.get("head_dim") or h // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * d
    shapes = {
        "qkv": (qkv, h),
        "o": (h, c["num_attention_heads"] * d),
        "gate_up": (2 * inter, h),
        "down": (h, inter),
        "lm_head": (c["vocab_size"], h),
    }
    if args.skinny:
        skinny_sweep(shapes, [int(r) for r in args.rows.split(",")])
        return
    configs = [(8, 512, 4), (16, 256, 4), (16, 512, 4), (32, 256, 4), (4, 1024, 4), (8, 1024, 8)]
    rows = []
    for name, (n, k) in shapes.items():
        copies = 16 if name != "lm_head" else 2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(args.batch, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().t()).to(torch.bfloat16)
        nbytes = n * k * 2

        def calls(f, x=x, ws=ws, copies=copies):
            return lambda: [f(x, ws[i % copies]) for i in range(16)]

        variants = {"cublas": lambda x, w: torch.mm(x, w.t())}
        for bn, bk, warps in configs:
            if bk <= k:
                variants[f"triton_n{bn}_k{bk}_w{warps}"] = lambda x, w, bn=bn, bk=bk, warps=warps: (
                    triton_gemv(x, w, bn, bk, warps)
                )
        for bn, warps in [(1, 4), (2, 4), (4, 4), (4, 8), (8, 8)]:
            if bn * k <= 16384:  # the tile stays in registers
                for dep in (True, False):
                    variants[f"preload_n{bn}_w{warps}{'_pdl' if dep else ''}"] = (
                        lambda x, w, bn=bn, warps=warps, dep=dep: preload_gemv(x, w, bn, warps, dep)
                    )
        for vname, f in variants.items():
            try:
                err = (f(x, ws[0]).float() - ref.float()).abs().max().item()
                us = graph_time_us(calls(f))
                row = {"shape": name, "n": n, "k": k, "variant": vname, "us": round(us, 2),
                       "gb_s": round(nbytes / us / 1e3, 1), "max_err": err}  # fmt: skip
            except Exception as exc:  # one failing launch setting must not lose the rest
                row = {"shape": name, "variant": vname, "error": str(exc)[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    # A layer's four matmuls in sequence, 16 layers (as a decode step runs them): what the
    # kernel boundaries cost on top of each matmul's own time.
    layer = {k: shapes[k] for k in ("qkv", "o", "gate_up", "down")}
    mats = [{k: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) for k, (n, kk) in
             layer.items()} for _ in range(16)]  # fmt: skip
    xs = {k: torch.randn(args.batch, kk, device="cuda", dtype=torch.bfloat16)
          for k, (_, kk) in layer.items()}  # fmt: skip
    layer_bytes = sum(n * kk * 2 for n, kk in layer.values())
    from rustinfer_ops_cuda.kernels.gemv import linear as engine_linear

    chains = {
        "cublas": lambda x, w: torch.mm(x, w.t()),
        "preload_pdl": lambda x, w: preload_gemv(x, w, 4 if w.shape[1] <= 4096 else 1, 4, True),
        "preload": lambda x, w: preload_gemv(x, w, 4 if w.shape[1] <= 4096 else 1, 4, False),
        "plain_read_pdl": lambda x, w: plain_read(x, w, 4 if w.shape[1] <= 4096 else 1, 4, True),
        "plain_read": lambda x, w: plain_read(x, w, 4 if w.shape[1] <= 4096 else 1, 4, False),
        "engine_linear": engine_linear,
    }
    for cname, f in chains.items():
        try:
            us = graph_time_us(lambda f=f: [f(xs[k], m[k]) for m in mats for k in layer])
            row = {"shape": "layer_chain", "variant": cname, "us": round(us, 2),
                   "gb_s": round(layer_bytes / us / 1e3, 1)}  # fmt: skip
        except Exception as exc:  # noqa: BLE001  (one failing variant must not lose the rest)
            row = {"shape": "layer_chain", "variant": cname, "error": str(exc)[:200]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"{'shape':<9}{'variant':<24}{'us':>8}{'GB/s':>8}")
    for r in rows:
        if "us" in r:
            print(f"{r['shape']:<9}{r['variant']:<24}{r['us']:>8}{r['gb_s']:>8}")


def skinny_variants(n: int, k: int) -> dict:
    """The skinny kernel's default tiles for a weight [n, k] and a few other cuts, by name (a cut
    equal to one already listed is left out)."""
    from dataclasses import replace

    from rustinfer_ops_cuda.kernels.skinny import skinny_tiles

    default = skinny_tiles(n, k)
    cuts = {
        "skinny": default,
        "skinny_k128": skinny_tiles(n, k, block_k=128),
        "skinny_k512": skinny_tiles(n, k, block_k=512),
        "skinny_k128_t1056": skinny_tiles(n, k, block_k=128, target_programs=1056),
        "skinny_t264": skinny_tiles(n, k, target_programs=264),
        "skinny_t1056": skinny_tiles(n, k, target_programs=1056),
        "skinny_t2112": skinny_tiles(n, k, target_programs=2112),
    }
    # Narrow tiles (Ampere-style MMAs): enough 16- or 32-feature tiles to fill the SMs with
    # little or no split-K, so fewer reduction kernels; warps 1-4, K steps 256-512.
    for bn in (16, 32):
        for warps in (1, 2, 4):
            for bk in (256, 512):
                for target in (264, 528):
                    cuts[f"skinny_n{bn}_w{warps}_k{bk}_t{target}"] = skinny_tiles(
                        n, k, block_n=bn, warps=warps, block_k=bk, target_programs=target
                    )
    if default.steps >= 3:  # the K loop: hand prefetch (s1) against the pipeliner's depths
        for stages in (1, 2, 4):
            cuts[f"skinny_s{stages}"] = replace(default, stages=stages)
    seen, unique = set(), {}
    for name, tiles in cuts.items():
        if tiles not in seen:
            seen.add(tiles)
            unique[name] = tiles
    return unique


def skinny_sweep(shapes: dict, row_counts: list[int]) -> None:
    """cuBLAS, the GEMV and the skinny kernel per shape and row count, then layer chains."""
    from rustinfer_ops_cuda.kernels import gemv as gemv_kernel
    from rustinfer_ops_cuda.kernels.skinny import MAX_ROWS, skinny
    from rustinfer_ops_cuda.kernels.torch_ops import logits as cublas_logits

    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for name, (n, k) in shapes.items():
        head = name == "lm_head"  # float32 out, as the engine's logits
        out_dtype = torch.float32 if head else None
        copies = 16 if not head else 2  # 16 distinct matrices: nothing served from L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x_all = torch.randn(max(row_counts), k, device="cuda", dtype=torch.bfloat16)
        cuts = skinny_variants(n, k)
        for m in row_counts:
            x = x_all[:m]
            ref = x.float() @ ws[0].float().t()
            variants = {
                "cublas": cublas_logits if head else (lambda x, w: torch.mm(x, w.t())),
            }
            if m <= gemv_kernel.KERNEL_MAX_ROWS:
                variants["gemv"] = lambda x, w, od=out_dtype: gemv_kernel.gemv(x, w, None, od)
            if m <= MAX_ROWS:
                for cut_name, tiles in cuts.items():
                    variants[cut_name] = lambda x, w, t=tiles, od=out_dtype: skinny(
                        x, w, None, od, t
                    )
            for vname, f in variants.items():
                try:
                    out = f(x, ws[0])
                    us = graph_time_us(
                        lambda f=f, x=x, ws=ws: [f(x, ws[i % len(ws)]) for i in range(16)]
                    )
                    row = {"shape": name, "n": n, "k": k, "rows": m, "variant": vname,
                           "us": round(us, 2), "gb_s": round(n * k * 2 / us / 1e3, 1),
                           "max_err": (out.float() - ref).abs().max().item()}  # fmt: skip
                    if vname.startswith("skinny"):
                        t = cuts[vname]
                        row["tiles"] = (
                            f"n{t.block_n} k{t.block_k} split{t.split} steps{t.steps} "
                            f"stages{t.stages}"
                        )
                        row["invariant"] = all(
                            torch.equal(out[i], f(x[i : i + 1], ws[0])[0]) for i in range(m)
                        )
                except Exception as exc:  # one failing variant must not lose the rest
                    row = {"shape": name, "rows": m, "variant": vname, "error": str(exc)[:300]}
                record(row)
        ws.clear()
        torch.cuda.empty_cache()
    # A layer's four matmuls in sequence, 16 layers, per row count: what a decode step's matmuls
    # cost, kernel boundaries (and the skinny kernel's split-K reductions) included.
    layer = {key: shapes[key] for key in ("qkv", "o", "gate_up", "down")}
    mats = [{key: torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * 0.02
             for key, (n, kk) in layer.items()} for _ in range(16)]  # fmt: skip
    layer_bytes = sum(n * kk * 2 for n, kk in layer.values())

    for m in row_counts:
        xs = {key: torch.randn(m, kk, device="cuda", dtype=torch.bfloat16)
              for key, (_, kk) in layer.items()}  # fmt: skip
        chains = {"cublas": lambda x, w: torch.mm(x, w.t())}
        if m <= gemv_kernel.KERNEL_MAX_ROWS:
            chains["gemv"] = lambda x, w: gemv_kernel.gemv(x, w, None)
        if m <= MAX_ROWS:
            # every named cut, each shape under its own tiles for that name
            per_shape = {key: skinny_variants(*shape) for key, shape in layer.items()}
            names = set.intersection(*(set(v) for v in per_shape.values()))
            for cut in sorted(names):
                tiles_of = {layer[key]: per_shape[key][cut] for key in layer}
                chains[cut] = lambda x, w, t=tiles_of: skinny(x, w, None, None, t[tuple(w.shape)])
        for cname, f in chains.items():
            try:
                us = graph_time_us(
                    lambda f=f, xs=xs: [f(xs[key], w[key]) for w in mats for key in layer]
                )
                row = {"shape": "layer_chain", "rows": m, "variant": cname, "us": round(us, 2),
                       "gb_s": round(layer_bytes / us / 1e3, 1)}  # fmt: skip
            except Exception as exc:  # one failing variant must not lose the rest
                row = {"shape": "layer_chain", "rows": m, "variant": cname, "error": str(exc)[:300]}
            record(row)
    print(f"{'shape':<12}{'rows':>5} {'variant':<14}{'us':>9}{'GB/s':>8}  invariant  tiles")
    for r in rows:
        if "us" in r:
            inv = {True: "yes", False: "NO"}.get(r.get("invariant"), "")
            print(f"{r['shape']:<12}{r['rows']:>5} {r['variant']:<14}{r['us']:>9}{r['gb_s']:>8}"
                  f"  {inv:<9}  {r.get('tiles', '')}")  # fmt: skip
        else:
            print(f"{r['shape']:<12}{r['rows']:>5} {r['variant']:<14} error: {r['error'][:80]}")


if __name__ == "__main__":
    main()
