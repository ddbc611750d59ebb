"""How far cuBLAS's 16-bit ``linear`` lands from the correctly rounded result, per shape.

The ``linear`` spec asks for float32 accumulation and one rounding of the output. This measures,
on the GPU at hand, the error in output ulps against the float64 reference rounded once to the
dtype, with and without a bias (torch routes a 1-D bias through cuBLASLt's epilogue) and with
cuBLAS's reduced-precision split-K reductions allowed and forbidden.

    python bench/linear_accuracy.py            # a table, then one JSON line per case
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

SHAPES = [(576, 127), (1536, 576), (2048, 8192), (8192, 2048)]  # (K, N)


def ulps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|out - ref| in units of the dtype's spacing at 1.0 (outputs and partial sums are O(1))."""
    return (out.double() - ref).abs() / torch.finfo(dtype).eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 7, 64])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    matmul = torch.backends.cuda.matmul
    rows = []
    for reduced in (True, False):
        matmul.allow_bf16_reduced_precision_reduction = reduced
        matmul.allow_fp16_reduced_precision_reduction = reduced
        for dtype in (torch.bfloat16, torch.float16):
            for k, n in SHAPES:
                for m in args.rows:
                    x = torch.randn(m, k, generator=gen).to(dtype)
                    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype)
                    b = torch.randn(n, generator=gen).to(dtype)
                    for bias in (False, True):
                        ref = x.double() @ w.double().T + (b.double() if bias else 0)
                        out = F.linear(x.cuda(), w.cuda(), b.cuda() if bias else None).cpu()
                        err = ulps(out, ref, dtype)
                        rows.append(
                            {
                                "reduced_allowed": reduced,
                                "dtype": str(dtype)[6:],
                                "m": m,
                                "k": k,
                                "n": n,
                                "bias": bias,
                                "max_ulps": round(err.max().item(), 2),
                                "frac_not_rounded_once": round(
                                    (err > 0.5001).float().mean().item(), 5
                                ),
                            }
                        )
    print(
        f"{'reduced':>8}{'dtype':>10}{'m':>4}{'k':>6}{'n':>6}{'bias':>6}{'max ulps':>10}{'!=round':>10}"
    )
    for r in rows:
        print(
            f"{r['reduced_allowed']!s:>8}{r['dtype']:>10}{r['m']:>4}{r['k']:>6}{r['n']:>6}"
            f"{r['bias']!s:>6}{r['max_ulps']:>10}{r['frac_not_rounded_once']:>10}"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
