"""Why the CPU ``linear`` kernel stores fp32 weights column-major and when it runs W @ x^T.

Times one decode step's worth of matmuls (SmolLM2-135M shapes: 30 layers of QKV, O, gate/up and
down projections plus the tied 49152 x 576 lm_head) for several row counts, three ways:
row-major ``F.linear`` (weights as loaded), column-major ``F.linear`` (what prepare_linear_weight
makes), and column-major ``W @ x^T``. Prints the copy bandwidth, then one line per row count
(milliseconds per step).

    python bench/linear_layouts.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    # The floor's denominator: how fast this box streams memory (read + write of a 512 MiB copy).
    src = torch.randn(128 << 20)
    dst = torch.empty_like(src)
    copy_ms = best_ms(lambda: dst.copy_(src), args.iters)
    print(f"copy bandwidth: {2 * src.numel() * 4 / copy_ms / 1e6:.1f} GB/s (read + write)")
    row_major = [torch.randn(s) for s in SHAPES]
    col_major = [w.t().contiguous().t() for w in row_major]
    print(f"{'rows':>5} {'row-major linear':>17} {'col-major linear':>17} {'col-major W@x^T':>16}")
    for m in args.rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}
        a = best_ms(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in row_major], args.iters)
        b = best_ms(lambda xs=xs: [F.linear(xs[w.shape[1]], w) for w in col_major], args.iters)
        c = best_ms(lambda xs=xs: [torch.mm(w, xs[w.shape[1]].t()) for w in col_major], args.iters)
        print(f"{m:>5} {a:>14.1f} ms {b:>14.1f} ms {c:>13.1f} ms")


if __name__ == "__main__":
    main()
