"""Batch-1 matmuls of a decode step: cuBLAS against a plain Triton GEMV, per shape, in a graph.

    python bench/gemv_sweep.py --config bench/configs/llama-3.2-1b/config.json

A decode step at batch 1 reads every weight once; its matmuls are GEMVs ([1, K] x [N, K]^T)
that should stream at the card's copy bandwidth. This times, for each of the layer's matmul
shapes and the LM head, cuBLAS (``torch.mm``) and a few launch settings of a Triton GEMV, each as
a CUDA graph of 16 back-to-back calls on 16 different weight matrices (as a model's layers are,
so nothing is served from L2), and prints GB/s per variant as JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl


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
    print(f"{'shape':<9}{'variant':<24}{'us':>8}{'GB/s':>8}")
    for r in rows:
        if "us" in r:
            print(f"{r['shape']:<9}{r['variant']:<24}{r['us']:>8}{r['gb_s']:>8}")


if __name__ == "__main__":
    main()
