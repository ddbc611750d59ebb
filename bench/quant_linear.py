"""Why the CPU ``quantized_linear`` runs torch's packed int4 kernel in bf16 (rustinfer_ops_cpu.quant).

Times one matmul per SmolLM2-135M shape (fused QKV 960 x 576, fused gate/up 3072 x 576, O 576 x
576, down 576 x 1536) at several row counts, each way a quantized weight could be multiplied:
dense float32 and bfloat16 (no quantization, the floor to beat), torch's packed int4 kernel with
bf16 and with float32 activations, an 8-bit weight as two 4-bit planes (what q8_0/int8 run), the
per-row int8 kernel (no groups: for scale only), and dequantizing 4-bit codes per call. Prints the
median and best of several timings, microseconds per call.

    python bench/quant_linear.py --threads 2 --rows 1 64 256

``--device cuda`` times the Triton ``quantized_linear`` instead (rustinfer_ops_cuda.kernels
.quant_linear) at Llama-3.2-1B's projection shapes (from ``--config``), per format and row count:
each of its two kernels (the few-row GEMV up to the 16 rows it takes, the tl.dot tiles at every
count; the op itself sends up to ``FEW_ROWS`` rows to the first, and these rows say where that
limit belongs), against a bf16 cuBLAS matmul (``F.linear``) on the dense weight, the bf16 GEMV at
one row, and dequantizing in torch then calling cuBLAS (what serving the weight without a kernel
costs). Each is timed as replays of a CUDA graph of back-to-back calls that rotate over enough
weight copies to stream from memory rather than L2. Prints a table (microseconds per call, weight
GB/s, speedup over cuBLAS bf16, and the largest error against the dequantize-then-matmul output
relative to its rms) and writes every row to ``--json``, rewritten after each shape so a cut-off
run keeps what it measured:

    python bench/quant_linear.py --device cuda --json quant_linear_cuda.json
    TRITON_INTERPRET=1 python bench/quant_linear.py --smoke   # that code, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from rustinfer.ops.quant import FORMATS, QuantizedWeight, unpack_nibbles

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "llama-3.2-1b" / "config.json"
CPU_ROWS = [1, 64, 256]
CUDA_ROWS = [1, 2, 4, 8, 16, 64, 512]
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
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="cpu: torch threads")
    ap.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=None,
        help=f"cpu default {CPU_ROWS}, cuda {CUDA_ROWS}",
    )
    ap.add_argument("--reps", type=int, default=9, help="cpu: timings per candidate")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="cuda: the model's shapes")
    ap.add_argument(
        "--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS), help="cuda"
    )
    ap.add_argument("--group", type=int, default=32, help="cuda: group size of int8 / int4")
    ap.add_argument("--json", default=None, help="cuda: write every row here")
    ap.add_argument("--smoke", action="store_true", help="cuda mode's code, tiny, on the CPU")
    args = ap.parse_args()
    if args.device == "cuda" or args.smoke:
        run_cuda(args)
        return
    args.rows = args.rows or CPU_ROWS
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


# -- cuda ------------------------------------------------------------------------------------------

# Weight bytes each timed graph rotates over: four times the H200's 50 MB L2, so every call
# streams its weight from memory as a model's layers do.
ROTATE_BYTES = 200e6
MAX_COPIES = 64
# --smoke: the same code on the CPU under Triton's interpreter, at shapes this small (the times
# mean nothing; it proves the script runs). float16: the interpreter's bf16 dot is wrong.
SMOKE_SHAPES = {"qkv": (48, 64), "down": (16, 96)}


def llama_shapes(config_path: str) -> dict[str, tuple[int, int]]:
    """name -> (N, K) of a Llama layer's matmuls as rustinfer fuses them."""
    cfg = json.loads(Path(config_path).read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return {
        "qkv": (q + 2 * kv, hidden),
        "o": (hidden, q),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
    }


def random_weight(format: str, n: int, k: int, group: int, device: str) -> QuantizedWeight:
    """Random codes with trained-layer-sized scales (outputs O(1) for randn x)."""
    f = FORMATS[format]
    g = group if format in ("int8", "int4") else 32
    if f.bits == 8:
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    else:
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    step = (8.0 if f.bits == 4 else 127.0) * k**0.5
    scales = (torch.rand(n, k // g, device=device) + 0.5) / step
    tensors = {"codes": codes, "scales": scales.to(f.scale_dtype)}
    if f.has_mins:
        tensors["mins"] = (-7.5 * scales).to(f.scale_dtype)
    return QuantizedWeight(format, (n, k), g, **tensors)


def dequantize_on_device(weight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The float weight in torch ops on the weight's device (float32 math, one rounding)."""
    f, (n, k), g = weight.spec, weight.shape, weight.group_size
    codes = unpack_nibbles(weight.codes) if f.bits == 4 else weight.codes
    values = (codes.view(n, k // g, g).float() - f.offset) * weight.scales.float()[..., None]
    if f.has_mins:
        values = values + weight.mins.float()[..., None]
    return values.view(n, k).to(dtype)


def copies_for(nbytes: int) -> int:
    return max(2, min(MAX_COPIES, math.ceil(ROTATE_BYTES / nbytes)))


def rotating(fn: Callable[..., object], inputs: list[tuple]) -> Callable[[], object]:
    """A zero-argument call of ``fn`` on the next input set each time."""
    it = itertools.cycle(inputs)
    return lambda: fn(*next(it))


def wall_ms(fn: Callable[[], object], calls: int) -> float:
    """--smoke's stand-in for graph timing: wall-clock milliseconds per call."""
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e3


class Table:
    """Rows as they are measured: logged, kept for the final table and the JSON file."""

    HEADER = (
        "shape    N     x K     rows   format variant          time         weight read       rate"
        "      vs cuBLAS  max err/rms"
    )

    def __init__(self, meta: dict[str, object], json_path: str | None) -> None:
        self.meta, self.json_path = meta, json_path
        self.rows: list[dict[str, object]] = []
        self.lines: list[str] = []

    def add(self, shape: str, n: int, k: int, m: int, fmt: str, variant: str, us: float,
            weight_bytes: int, err: float | None, dense_us: float | None) -> None:  # fmt: skip
        row = {
            "shape": shape, "N": n, "K": k, "M": m, "format": fmt, "variant": variant,
            "us": round(us, 2), "weight_bytes": weight_bytes,
            "weight_GBps": round(weight_bytes / us / 1e3, 1),
            "TFLOPs": round(2 * m * n * k / us / 1e6, 2),
            "speedup_vs_cublas_bf16": None if dense_us is None else round(dense_us / us, 2),
            "max_err_rel_rms": None if err is None else float(f"{err:.3g}"),
        }  # fmt: skip
        self.rows.append(row)
        speed = "" if dense_us is None else f"{dense_us / us:.2f}x"
        err_s = "" if err is None else f"{err:.1e}"
        line = (f"{shape:8s} {n:6d} x {k:<5d} M={m:<4d} {fmt:6s} {variant:14s} {us:9.2f} us "
                f"{row['weight_GBps']:9.1f} GB/s {row['TFLOPs']:7.2f} TFLOP/s {speed:>7s} {err_s:>9s}")  # fmt: skip
        self.lines.append(line)
        logger.info(line)

    def save(self) -> None:
        if self.json_path:
            doc = {"meta": self.meta, "rows": self.rows}
            Path(self.json_path).write_text(json.dumps(doc, indent=1))


def run_cuda(args: argparse.Namespace) -> None:
    """The Triton kernels against cuBLAS bf16, the bf16 GEMV and dequantize + cuBLAS."""
    import triton
    from graph_timing import graph_replay_ms
    from rustinfer_ops_cuda.kernels import quant_linear as ql
    from rustinfer_ops_cuda.kernels.gemv import gemv

    torch.manual_seed(0)
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16
    timer = wall_ms if args.smoke else graph_replay_ms
    shapes = SMOKE_SHAPES if args.smoke else llama_shapes(args.config)
    copies = (lambda nbytes: 2) if args.smoke else copies_for
    name = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_properties(0).name
    meta = {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "int_group": args.group,
        "few_rows_dispatch_max": ql.FEW_ROWS,
        "config": None if args.smoke else args.config,
    }
    logger.info("%s", json.dumps(meta))
    table = Table(meta, args.json)
    variants = {
        "few_rows": ql.quantized_linear_few_rows,
        "tiled": ql.quantized_linear_tiled,
        "dequant+cublas": lambda x, w, b: F.linear(x, dequantize_on_device(w, x.dtype), b),
    }
    for shape, (n, k) in shapes.items():
        dense_bytes = n * k * 2
        dense = [(torch.randn(n, k, device=device) * k**-0.5).to(dtype)
                 for _ in range(copies(dense_bytes))]  # fmt: skip
        quantized = {}
        for fmt in args.formats:
            first = random_weight(fmt, n, k, args.group, device)
            more = copies(first.nbytes) - 1
            quantized[fmt] = [first, *(random_weight(fmt, n, k, args.group, device) for _ in range(more))]  # fmt: skip
        for m in args.rows or CUDA_ROWS:
            x = torch.randn(m, k, device=device).to(dtype)
            calls = [(x, w, None) for w in dense]
            dense_us = timer(rotating(F.linear, calls), len(calls)) * 1e3
            table.add(shape, n, k, m, "bf16" if dtype == torch.bfloat16 else "fp16", "cublas",
                      dense_us, dense_bytes, None, None)  # fmt: skip
            if m == 1:
                us = timer(rotating(gemv, calls), len(calls)) * 1e3
                table.add(shape, n, k, m, "bf16" if dtype == torch.bfloat16 else "fp16", "gemv",
                          us, dense_bytes, None, dense_us)  # fmt: skip
            for fmt, weights in quantized.items():
                expected = F.linear(x.float(), dequantize_on_device(weights[0], torch.float32))
                rms = expected.pow(2).mean().sqrt().item()
                for variant, fn in variants.items():
                    if variant == "few_rows" and m > ql.FEW_ROWS_KERNEL_MAX:
                        continue
                    err = (fn(x, weights[0], None).float() - expected).abs().max().item() / rms
                    calls = [(x, w, None) for w in weights]
                    us = timer(rotating(fn, calls), len(calls)) * 1e3
                    table.add(shape, n, k, m, fmt, variant, us, weights[0].nbytes, err, dense_us)
            table.save()
        del dense, quantized
        if not args.smoke:
            torch.cuda.empty_cache()
    print(Table.HEADER)
    print("\n".join(table.lines))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    main()
