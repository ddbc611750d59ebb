"""Why the CPU ``quantized_linear`` runs torch's packed int4 kernel in bf16 (rustinfer_ops_cpu.quant).

Times one matmul per SmolLM2-135M shape (fused QKV 960 x 576, fused gate/up 3072 x 576, O 576 x
576, down 576 x 1536) at several row counts, each way a quantized weight could be multiplied:
dense float32 and bfloat16 (no quantization, the floor to beat), torch's packed int4 kernel with
bf16 and with float32 activations, an 8-bit weight as two 4-bit planes (what q8_0/int8 run), the
per-row int8 kernel (no groups: for scale only), and dequantizing 4-bit codes per call. Prints the
median and best of several timings, microseconds per call.

    python bench/quant_linear.py --threads 2 --rows 1 64 256
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from rustinfer.ops.quant import unpack_nibbles

SHAPES = [(960, 576), (3072, 576), (576, 576), (576, 1536)]
GROUP = 32
aten = torch.ops.aten


def timings_us(fn: Callable[[], object], reps: int, inner: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner * 1e6)
    return statistics.median(times), min(times)


def int4pack(n: int, k: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
    packed = aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    return packed, torch.randn(k // GROUP, n, 2).to(dtype)


def candidates(m: int, n: int, k: int) -> dict[str, Callable[[], object]]:
    x32 = torch.randn(m, k)
    xb = x32.bfloat16()
    w = torch.randn(n, k)
    w_col, w_bf = w.t().contiguous().t(), w.bfloat16()  # float32 as prepare_linear_weight lays it
    p_bf, sz_bf = int4pack(n, k, torch.bfloat16)
    p_32, sz_32 = int4pack(n, k, torch.float32)
    p_8, sz_8 = int4pack(n, 2 * k, torch.bfloat16)
    q8, s8 = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n).bfloat16()
    nibbles = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale, low = torch.rand(n, k // GROUP, 1), torch.rand(n, k // GROUP, 1)

    def dequant_f32() -> torch.Tensor:
        codes = unpack_nibbles(nibbles).view(n, -1, GROUP).float()
        return F.linear(x32, (codes * scale + low).view(n, k))

    return {
        "dense f32": lambda: F.linear(x32, w_col),
        "dense bf16": lambda: F.linear(xb, w_bf),
        "int4pack bf16": lambda: aten._weight_int4pack_mm_for_cpu(xb, p_bf, GROUP, sz_bf),
        "int4pack f32->bf16": lambda: aten._weight_int4pack_mm_for_cpu(
            x32.bfloat16(), p_bf, GROUP, sz_bf
        ).float(),
        "int4pack f32": lambda: aten._weight_int4pack_mm_for_cpu(x32, p_32, GROUP, sz_32),
        "8-bit as 2 planes bf16": lambda: aten._weight_int4pack_mm_for_cpu(
            torch.cat([xb, xb], 1), p_8, GROUP, sz_8
        ),
        "int8 per-row bf16": lambda: aten._weight_int8pack_mm(xb, q8, s8),
        "dequant 4-bit + f32": dequant_f32,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    for m in args.rows:
        for n, k in SHAPES:
            inner = 20 if m == 1 else 3
            cells = []
            for name, fn in candidates(m, n, k).items():
                med, best = timings_us(fn, args.reps, inner)
                cells.append(f"{name} {med:.0f}/{best:.0f}")
            print(f"M={m} {n}x{k}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
