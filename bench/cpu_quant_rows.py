"""SmolLM2's 120 quantized matmuls a step at 1-32 rows: rustinfer's C block kernel against
torch's packed int4 kernel, in one process, alternated.

    python bench/cpu_quant_rows.py --threads 2 [--rounds 5] [--rows 1 2 4 8 16 32]

Random Q4_1-like weights (``int4``, groups of 32) at SmolLM2-135M's shapes (30 layers of
960x576, 576x576, 3072x576, 576x1536), prepared by each implementation the way a model load
prepares them; activations float32. Prints one JSON line per rows count (medians over rounds, in
ms per step of 120 matmuls), then a table. It says which rows count each path should serve:
``quant_native.BATCHED_ROWS`` is set from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from rustinfer_ops_cpu import quant, quant_native
from rustinfer_ops_cpu.native import simd

from rustinfer.ops.quant import quantize

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    canonical = [
        quantize(torch.randn(n, k) * k**-0.5, "int4", 32)
        for _ in range(args.layers)
        for n, k in SHAPES
    ]
    native = [quant_native.prepare_quantized_weight(w) for w in canonical]
    packed = [quant.prepare_quantized_weight(w) for w in canonical]
    paths = {
        "C block kernel": lambda x, w: quant_native._run(x, w, None),
        "torch int4": lambda x, w: quant.quantized_linear(x, w, None),
    }
    weights = {"C block kernel": native, "torch int4": packed}
    rows_out = []
    for rows in args.rows:
        xs = {k: torch.randn(rows, k) for k in {k for _, k in SHAPES}}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                for w in weights[name][: len(SHAPES)]:  # warm
                    fn(xs[w.shape[1]], w)
                start = time.perf_counter()
                for w in weights[name]:
                    fn(xs[w.shape[1]], w)
                times[name].append((time.perf_counter() - start) * 1e3)
        row = {"rows": rows, "simd": simd()}
        row.update({name: round(statistics.median(t), 2) for name, t in times.items()})
        rows_out.append(row)
        print(json.dumps(row))
    print("| rows | " + " | ".join(paths) + " |")
    print("|---" * (len(paths) + 1) + "|")
    for row in rows_out:
        print(f"| {row['rows']} | " + " | ".join(str(row[name]) for name in paths) + " |")


if __name__ == "__main__":
    main()
