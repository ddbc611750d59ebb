"""Kernel microbenchmark of the rustinfer-ops-cuda Triton kernels at Llama-3.2-1B shapes (bf16).

Measures the card's ceilings first (device-to-device copy bandwidth, bf16 matmul rate), then for
every kernel the Triton implementation (looked up through the op registry), the plain-torch
implementation registered for cuda (rustinfer-ops-cpu) eager and under torch.compile, and for the
attention ops torch's scaled_dot_product_attention on contiguous K/V (its best case). Each row gets
a floor (bytes over the copy bandwidth, or FLOPs over the matmul rate) and the share of it reached;
decode rows also get the time of the plainest kernel that reads the same bytes once ("read").
Prefill rows also time the op as the engine calls it ("op": with the host-side ``max_seq_len``
hint, from which a lone long prompt takes gather + SDPA) beside the Triton kernel alone.
Progress goes to stderr; the table is printed last on stdout and every number goes to ``--out``.

    python bench/kernels.py --out kernels.json            # the full run (an H100: a few minutes)
    python bench/kernels.py --quick --only attention      # fewer sizes, attention ops only
    python bench/kernels.py --smoke                       # tiny shapes on the CPU (TRITON_INTERPRET)

Timing: triton.testing.do_bench medians (it flushes L2 before each run; inputs that would fit in L2
are also rotated among several sets). Triton kernels, SDPA and compiled elementwise code are timed
as replays of a captured CUDA graph (kernel time without the host's launch cost, as the engine runs
them); the eager torch paths as plain calls, with CUDA events for slow calls whose runs are capped. In smoke
mode the times are wall-clock on the CPU and mean nothing: it only exercises the code paths.
"""

from __future__ import annotations

import os
import sys

# Triton reads TRITON_INTERPRET when it is imported (and @triton.jit when a kernel module is), so
# smoke mode has to set it before anything below imports triton.
if "--smoke" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import inspect  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from graph_timing import graph_replay_ms  # noqa: E402
from rustinfer_ops_cuda.kernels.attention_common import multiprocessor_count  # noqa: E402
from rustinfer_ops_cuda.plugin import TRITON_TARGETS  # noqa: E402

OpFn = Callable[..., Any]

REL_ERR_LIMIT = 2e-2
# Input sets rotated per timed call: enough that small cases (a decode step at 1k context reads
# 2 MB) still stream 4x the L2 size per replay; each set costs memory and, for torch.compile'd
# attention, one compiled variant (use --compile elementwise for quick runs).
MAX_INPUT_SETS = 32
KERNELS = tuple(TRITON_TARGETS)  # rmsnorm .. attention_prefill: every op with a Triton kernel
ELEMENTWISE = tuple(k for k in KERNELS if not k.startswith("attention_"))
# A decode case whose estimated peak memory (cache pool, SDPA's contiguous copy, the torch path's
# gathered bf16 and fp32 copies) passes this is skipped: half an 80 GB card leaves room for
# allocator slack and SDPA's own workspace.
DECODE_MEMORY_LIMIT = 40e9
# Goals, shown in the table's goal/result columns: elementwise ops at the main token count reach
# this share of their bandwidth floor, decode attention this share from decode_goal_ctx on (and
# is no slower than SDPA), prefill this rate.
ELEMENTWISE_GOAL_PCT = 80.0
DECODE_GOAL_PCT = 70.0
PREFILL_GOAL_TFLOPS = 250.0


@dataclass(frozen=True)
class Shapes:
    """Model shapes and the sizes each kernel runs at."""

    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float
    rope_theta: float
    max_positions: int
    block_size: int
    tokens: tuple[int, ...]  # the first is the bandwidth-floor size, the rest latency-only
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    decode_goal_ctx: int  # decode goals apply from this context on
    prefill_lens: tuple[int, ...]
    chunk: tuple[int, int]  # (new tokens, cached prefix) of the chunked-prefill case
    copy_bytes: int
    matmul_n: int


LLAMA_3_2_1B = {
    "hidden": 2048,
    "intermediate": 8192,
    "n_heads": 32,
    "n_kv_heads": 8,
    "head_dim": 64,
    "eps": 1e-5,
    "rope_theta": 500000.0,
    "max_positions": 131072,
    "block_size": 16,
}
FULL = Shapes(
    **LLAMA_3_2_1B,
    tokens=(4096, 1, 64),
    decode_batches=(1, 64),
    decode_contexts=(512, 1024, 4096, 8192, 16384, 32768),
    decode_goal_ctx=4096,
    prefill_lens=(2048, 3072, 4096, 8192),
    chunk=(512, 4096),
    copy_bytes=1 << 30,
    matmul_n=8192,
)
QUICK = Shapes(
    **LLAMA_3_2_1B,
    tokens=(4096, 1),
    decode_batches=(1, 64),
    decode_contexts=(1024, 8192),
    decode_goal_ctx=4096,
    prefill_lens=(4096,),
    chunk=(512, 4096),
    copy_bytes=1 << 30,
    matmul_n=8192,
)
# Small enough for Triton's CPU interpreter; head_dim stays 64 (kernels may assume a power of 2)
# and contexts are not block multiples so partial blocks are exercised.
SMOKE = Shapes(
    hidden=256,
    intermediate=512,
    n_heads=4,
    n_kv_heads=2,
    head_dim=64,
    eps=1e-5,
    rope_theta=500000.0,
    max_positions=512,
    block_size=16,
    tokens=(8, 1),
    decode_batches=(1, 2),
    decode_contexts=(40, 64),
    decode_goal_ctx=64,
    prefill_lens=(40,),
    chunk=(16, 32),
    copy_bytes=16 << 20,
    matmul_n=256,
)


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    kernel: str
    shape: str
    params: dict[str, Any]
    status: str = "ok"  # ok | MISMATCH | missing | error: ... | skipped: ...
    rel_err: float | None = None
    triton_ms: float | None = None
    torch_ms: float | str | None = None
    compile_ms: float | str | None = None
    sdpa_ms: float | str | None = None
    # SDPA on the paged cache as it is: each call first gathers the K/V blocks, then attends
    sdpa_paged_ms: float | str | None = None
    # the op as the engine calls it, with the host-side hint (attention_prefill's max_seq_len):
    # the path it picks from that hint (the Triton kernel or gather + SDPA), not one kernel
    op_ms: float | str | None = None
    # the fastest one-pass read of the same bytes by a plain streaming kernel (decode rows)
    read_ms: float | str | None = None
    floor_ms: float | None = None
    pct_of_floor: float | None = None
    bytes: float | None = None
    flops: float | None = None
    tflops: float | None = None
    goal: str | None = None
    passed: bool | None = None
    host_us: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Case:
    """A kernel at one shape: argument sets to rotate through and how to judge the result."""

    kernel: str
    shape: str
    params: dict[str, Any]
    arg_sets: list[tuple[Any, ...]]
    bytes: float | None = None  # for a bandwidth floor
    flops: float | None = None  # for a compute floor
    latency_only: bool = False  # decode-size launches: no floor, no goal
    slow_torch: bool = False  # cap the runs of the torch implementation
    goal: str | None = None
    goal_check: Callable[[Row], bool] | None = None
    # (triton fn, torch fn) -> relative error; default: run both on arg_sets[0] and compare outputs
    compare: Callable[[OpFn, OpFn], float] | None = None
    # builds the SDPA peer's inputs (outside the timed region) -> (timed callable, note)
    sdpa: Callable[[], tuple[Callable[[], Any], str]] | None = None
    # builds "gather the paged K/V, then SDPA" -> timed callable
    sdpa_paged: Callable[[], Callable[[], Any]] | None = None
    # times the plain-read peer -> ms
    read_peer: Callable[[], float] | None = None
    # appended to each argument set for the op_ms column (attention_prefill: max_seq_len)
    hint: tuple[Any, ...] | None = None


class Bench:
    """Device, dtypes, timing and the measured ceilings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.smoke: bool = args.smoke
        self.cuda = not self.smoke
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on a GPU machine, or use --smoke")
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.shapes = SMOKE if self.smoke else QUICK if args.quick else FULL
        if args.prefill_lens:
            lens = tuple(int(n) for n in args.prefill_lens.split(","))
            self.shapes = dataclasses.replace(self.shapes, prefill_lens=lens)
        self.dtype = torch.bfloat16
        # Triton's interpreter computes bf16 tl.dot wrongly (see tests/kernels/conftest.py), so
        # the attention kernels run in fp16 in smoke mode.
        self.attn_dtype = torch.float16 if self.smoke else torch.bfloat16
        self.compile_ops = {
            "all": set(KERNELS),
            "elementwise": set(ELEMENTWISE),
            "none": set(),
        }[args.compile]
        # The inductor backend would compile C++ on this CPU for minutes; dynamo with the eager
        # backend still walks the torch.compile path.
        self.compile_backend = "eager" if self.smoke else "inductor"
        self.l2_bytes = 50e6
        if self.cuda:
            props = torch.cuda.get_device_properties(self.device)
            self.l2_bytes = float(getattr(props, "L2_cache_size", 0) or 50e6)
        self.bandwidth = math.nan  # bytes per ms (read + written)
        self.matmul_rate = math.nan  # FLOPs per ms

    # ---- timing ----------------------------------------------------------------------------

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any], *, rep_ms: int = 100, cap: bool = False) -> float:
        """Median milliseconds of one call of ``fn``.

        ``cap``: for implementations that may take hundreds of ms (the torch attention paths at
        long contexts): time a single call first and, if it is slow, take the median of a few
        CUDA-event runs instead of do_bench's rep_ms budget plus its estimate and warm-up runs.
        """
        if not self.cuda:
            fn()  # warm-up: the first call JIT-compiles (or, interpreted, parses) the kernel
            times = []
            for _ in range(2):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        if cap:
            fn()
            first = self._events_ms(fn, 1)[0]
            if first > 20.0:
                return statistics.median(self._events_ms(fn, 3))
        from triton.testing import do_bench

        # warmup and rep are milliseconds of running fn, not counts.
        if "return_mode" in inspect.signature(do_bench).parameters:
            return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        return float(do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5])[0])  # older triton

    def graph_ms(self, fn: Callable[[], Any], calls: int) -> float:
        """Median milliseconds of one call, from replays of a CUDA graph of ``calls`` calls.

        A kernel's own time, without the host's launch cost (bench/graph_timing.py). ``fn``
        rotates over ``calls`` input sets, so one replay reads each set once, from memory rather
        than L2. Falls back to plain time_ms when ``fn`` cannot be captured, and on the CPU.
        """
        if not self.cuda:
            return self.time_ms(fn)
        try:
            return graph_replay_ms(fn, calls)
        except Exception as exc:
            log(f"  graph capture failed ({short(exc, 80)}); timing launches instead")
            torch.cuda.synchronize()
            return self.time_ms(fn)

    def warm_up_clocks(self, seconds: float = 2.0) -> None:
        """Run matmuls until the card has left its idle clocks (345 MHz seen at the start of a
        run), so the first measurements are not taken while it ramps up."""
        if not self.cuda:
            return
        a = torch.randn(4096, 4096, device=self.device, dtype=torch.bfloat16)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for _ in range(20):
                a @ a
            torch.cuda.synchronize()

    def _events_ms(self, fn: Callable[[], Any], runs: int) -> list[float]:
        times = []
        for _ in range(runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return times

    def host_us(self, fn: Callable[[], Any], calls: int = 200) -> float:
        """Wall-clock microseconds per call, back to back: what a decode-size launch costs the
        host (Python + launch overhead), which do_bench's GPU-side time hides."""
        if not self.cuda:
            calls = 3
        fn()
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls * 1e6

    def n_sets(self, bytes_per_call: float) -> int:
        """How many input sets to rotate through so the working set is well past L2.

        do_bench already flushes L2 before every run; rotating is the second guard (and the only
        one for the CUDA-event path). Capped at 8: each set is more memory and, for the torch
        attention paths under torch.compile, one more compiled variant.
        """
        if not self.cuda:
            return 2  # exercise the rotation path
        return max(1, min(MAX_INPUT_SETS, math.ceil(4 * self.l2_bytes / max(bytes_per_call, 1.0))))

    # ---- ceilings ---------------------------------------------------------------------------

    def measure_ceilings(self) -> dict[str, float]:
        s = self.shapes
        self.warm_up_clocks()
        n = s.copy_bytes // 2
        src = torch.randn(n, device=self.device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_ms = self.time_ms(functools.partial(dst.copy_, src), rep_ms=200)
        self.bandwidth = 2 * s.copy_bytes / copy_ms
        del src, dst
        m = s.matmul_n
        a = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        b = torch.randn(m, m, device=self.device, dtype=torch.bfloat16)
        mm_ms = self.time_ms(functools.partial(torch.matmul, a, b), rep_ms=200)
        self.matmul_rate = 2.0 * m**3 / mm_ms
        del a, b
        self.free()
        # What one launch costs with nothing to do, timed like the kernels: the part of a short
        # kernel's time (a batch-1 decode step) that bytes over bandwidth does not count.
        flag = torch.zeros(1, device=self.device)
        launch_ms = self.graph_ms(functools.partial(_empty_kernel[(1,)], flag), 32)
        out = {
            "copy_bytes": float(s.copy_bytes),
            "copy_ms": copy_ms,
            "copy_GBps": self.bandwidth / 1e6,
            "matmul_n": float(m),
            "matmul_ms": mm_ms,
            "matmul_TFLOPs": self.matmul_rate / 1e9,
            "launch_us": launch_ms * 1e3,
        }
        log(
            f"ceilings: copy {out['copy_GBps']:.0f} GB/s (read + write of {s.copy_bytes >> 20} MiB), "
            f"bf16 matmul {out['matmul_TFLOPs']:.0f} TFLOP/s ({m}^3), "
            f"empty kernel {out['launch_us']:.2f} us per launch"
        )
        return out

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


@triton.jit
def _empty_kernel(flag_ptr):
    pass


def log(msg: str) -> None:
    print(f"[kernels {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def short(exc: BaseException, limit: int = 160) -> str:
    """One line naming the exception, for a table cell or the JSON."""
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg[:limit]


def rel_err(a: Any, b: Any) -> float:
    """||a - b|| / ||b|| in fp32; the max over paired outputs when the op returns a tuple."""
    if isinstance(b, tuple | list):
        return max(rel_err(x, y) for x, y in zip(a, b, strict=True))
    a32, b32 = a.float(), b.float()
    if a32.shape != b32.shape:
        raise ValueError(f"output shapes differ: {list(a32.shape)} vs {list(b32.shape)}")
    denom = b32.norm().item()
    diff = (a32 - b32).norm().item()
    return diff / denom if denom > 0 else diff


def rotating(calls: Sequence[Callable[[], Any]]) -> Callable[[], Any]:
    """One callable that runs the next of ``calls`` each time (cycling through input sets)."""
    it = itertools.cycle(calls)
    return lambda: next(it)()


# ---- implementations ------------------------------------------------------------------------


@dataclass
class Impls:
    triton: OpFn | None
    triton_status: str  # "ok", "missing" or "error: ..."
    torch: OpFn


def load_impls(bench: Bench, op: str, dtype: torch.dtype) -> Impls:
    """The Triton and torch implementations of ``op`` for cuda.

    The Triton one through the registry on a GPU (it must be what the registry picks), from the
    plugin's table in smoke mode (the registry's requirements refuse on the CPU).
    """
    from rustinfer_ops_cpu.plugin import TARGETS

    from rustinfer.lazy import resolve

    # The plain-torch baseline is rustinfer-ops-cpu's implementation (device-generic torch),
    # loaded straight from its table: rustinfer-ops-cuda registers no torch version of these ops.
    torch_fn = resolve(TARGETS[op])

    target = TRITON_TARGETS.get(op)
    if target is None:
        return Impls(None, "missing", torch_fn)
    module_name = target.partition(":")[0]
    try:
        if bench.cuda:
            from rustinfer.plugins import get_registries

            impl = get_registries().ops.lookup(op, "cuda", dtype, overrides={})
            if impl.name != "triton":
                raise AssertionError(f"the registry picks {impl.describe()} for {op}, not triton")
            fn = impl.load()
        else:
            fn = resolve(target)
    except ModuleNotFoundError as exc:
        # The kernel module not written yet is "missing"; any other missing import is an error.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            return Impls(None, "missing", torch_fn)
        return Impls(None, f"error: {short(exc)}", torch_fn)
    except AttributeError as exc:
        return Impls(None, f"missing ({short(exc)})", torch_fn)
    except Exception as exc:  # a kernel module that fails to import must not stop the run
        return Impls(None, f"error: {short(exc)}", torch_fn)
    return Impls(fn, "ok", torch_fn)


# ---- cases ----------------------------------------------------------------------------------


def elementwise_case(
    bench: Bench,
    kernel: str,
    t: int,
    shape: str,
    params: dict[str, Any],
    sets: list[tuple[Any, ...]],
    nbytes: float,
    compare: Callable[[OpFn, OpFn], float] | None = None,
) -> Case:
    """A per-token kernel at ``t`` tokens: the first token count carries the bandwidth goal,
    the others (decode-size launches) are latency rows without a floor."""
    goal = check = None
    if t == bench.shapes.tokens[0]:
        goal = f">= {ELEMENTWISE_GOAL_PCT:.0f}% of floor"

        def check(r: Row) -> bool:
            return r.pct_of_floor is not None and r.pct_of_floor >= ELEMENTWISE_GOAL_PCT

    return Case(
        kernel,
        shape,
        params,
        sets,
        bytes=nbytes,
        latency_only=goal is None,
        goal=goal,
        goal_check=check,
        compare=compare,
    )


def rmsnorm_case(bench: Bench, t: int) -> Case:
    s, dt, dev = bench.shapes, bench.dtype, bench.device
    nbytes = 2.0 * (2 * t * s.hidden + s.hidden)  # x read, out written, weight read
    weight = torch.randn(s.hidden, device=dev, dtype=dt)
    sets = [
        (torch.randn(t, s.hidden, device=dev, dtype=dt), weight, s.eps)
        for _ in range(bench.n_sets(nbytes))
    ]
    return elementwise_case(
        bench,
        "rmsnorm",
        t,
        f"[{t}, {s.hidden}]",
        {"tokens": t, "hidden": s.hidden},
        sets,
        nbytes,
    )


def fused_add_rmsnorm_case(bench: Bench, t: int) -> Case:
    s, dt, dev = bench.shapes, bench.dtype, bench.device
    # x and residual read, out and residual_out written, weight read. The Triton kernel updates
    # residual in place, so repeated runs keep adding x to it: harmless for timing.
    nbytes = 2.0 * (4 * t * s.hidden + s.hidden)
    weight = torch.randn(s.hidden, device=dev, dtype=dt)
    sets = [
        (
            torch.randn(t, s.hidden, device=dev, dtype=dt),
            torch.randn(t, s.hidden, device=dev, dtype=dt),
            weight,
            s.eps,
        )
        for _ in range(bench.n_sets(nbytes))
    ]

    def compare(tri: OpFn, ref: OpFn) -> float:
        x, res, w, eps = sets[0]
        a = tri(x, res.clone(), w, eps)  # clones: both see the same residual
        b = ref(x, res.clone(), w, eps)
        return rel_err(tuple(a), tuple(b))

    return elementwise_case(
        bench,
        "fused_add_rmsnorm",
        t,
        f"[{t}, {s.hidden}]",
        {"tokens": t, "hidden": s.hidden},
        sets,
        nbytes,
        compare=compare,
    )


def silu_and_mul_case(bench: Bench, t: int) -> Case:
    s, dt, dev = bench.shapes, bench.dtype, bench.device
    nbytes = 2.0 * (3 * t * s.intermediate)  # [T, 2I] read, [T, I] written
    sets = [
        (torch.randn(t, 2 * s.intermediate, device=dev, dtype=dt),)
        for _ in range(bench.n_sets(nbytes))
    ]
    return elementwise_case(
        bench,
        "silu_and_mul",
        t,
        f"[{t}, {2 * s.intermediate}] -> [{t}, {s.intermediate}]",
        {"tokens": t, "intermediate": s.intermediate},
        sets,
        nbytes,
    )


def cos_sin_cache(bench: Bench) -> torch.Tensor:
    from rustinfer.config import RopeScaling
    from rustinfer.ops.rope import build_cos_sin_cache

    s = bench.shapes
    # Llama 3.2's rope_scaling block.
    scaling = RopeScaling(
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    return build_cos_sin_cache(
        s.head_dim, s.max_positions, s.rope_theta, scaling, device=bench.device
    )


def rope_kv_store_case(bench: Bench, t: int) -> Case:
    s, dt, dev = bench.shapes, bench.dtype, bench.device
    hq, hkv, d = s.n_heads, s.n_kv_heads, s.head_dim
    table = cos_sin_cache(bench)
    # q, k, v read; q_out and the k/v cache slots written; one fp32 cos/sin row, the position and
    # the slot (int64) per token read.
    nbytes = 2.0 * t * d * (2 * hq + 4 * hkv) + t * (d * 4 + 8 + 8)
    num_blocks = max(2 * -(-t // s.block_size), 4)  # a pool twice the tokens: slots scattered
    num_slots = num_blocks * s.block_size
    sets = []
    for _ in range(bench.n_sets(nbytes)):
        qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dt)  # the fused QKV output
        q = qkv[:, : hq * d].view(t, hq, d)
        k = qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d)
        v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
        positions = torch.randint(0, s.max_positions, (t,), device=dev, dtype=torch.int64)
        k_cache = torch.zeros(num_blocks, s.block_size, hkv, d, device=dev, dtype=dt)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.randperm(num_slots, device=dev)[:t]  # distinct slots, any order
        sets.append((q, k, v, positions, table, k_cache, v_cache, slots))

    def compare(tri: OpFn, ref: OpFn) -> float:
        # Each implementation writes its own cache clones; compare q_out and the written rows.
        q, k, v, pos, tab, kc, vc, slots = sets[0]
        kc_a, vc_a, kc_b, vc_b = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        qa = tri(q, k, v, pos, tab, kc_a, vc_a, slots)
        qb = ref(q, k, v, pos, tab, kc_b, vc_b, slots)

        def written(c: torch.Tensor) -> torch.Tensor:
            return c.view(-1, hkv, d).index_select(0, slots)

        return rel_err((qa, written(kc_a), written(vc_a)), (qb, written(kc_b), written(vc_b)))

    return elementwise_case(
        bench,
        "rope_kv_store",
        t,
        f"T={t} q[{t},{hq},{d}] kv[{t},{hkv},{d}]",
        {"tokens": t, "n_heads": hq, "n_kv_heads": hkv, "head_dim": d},
        sets,
        nbytes,
        compare=compare,
    )


def make_sdpa(
    q4: torch.Tensor,
    k4: torch.Tensor,
    v4: torch.Tensor,
    scale: float,
    masks: Sequence[tuple[str, dict[str, Any]]],
) -> tuple[Callable[[], Any], str]:
    """The SDPA call on these inputs, trying enable_gqa first and repeated kv heads after.

    Each variant is run once here (outside any timed region); the repeat_interleave fallback
    expands K/V before timing, so SDPA is timed on its best-case inputs either way.
    """
    sdpa = F.scaled_dot_product_attention
    group = q4.shape[1] // k4.shape[1]
    errors = []
    for mask_name, mask_kw in masks:
        try:
            call = functools.partial(sdpa, q4, k4, v4, scale=scale, enable_gqa=True, **mask_kw)
            call()
            return call, f"sdpa: enable_gqa, {mask_name}"
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            errors.append(f"{mask_name}+gqa: {short(exc, 80)}")
        try:
            kr = k4.repeat_interleave(group, dim=1)
            vr = v4.repeat_interleave(group, dim=1)
            call = functools.partial(sdpa, q4, kr, vr, scale=scale, **mask_kw)
            call()
            return call, f"sdpa: repeat_interleave, {mask_name}"
        except (TypeError, RuntimeError, NotImplementedError) as exc:
            errors.append(f"{mask_name}+repeat: {short(exc, 80)}")
    raise RuntimeError("every SDPA variant failed: " + "; ".join(errors))


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, ctx: int) -> torch.Tensor:
    """Each sequence's first ctx positions as a contiguous [B, Hkv, ctx, D] copy."""
    _, block_size, hkv, d = cache.shape
    offsets = torch.arange(block_size, device=cache.device)
    slots = (block_tables.to(torch.int64)[:, :, None] * block_size + offsets).flatten(1)[:, :ctx]
    flat = cache.view(-1, hkv, d).index_select(0, slots.reshape(-1))  # [B*ctx, Hkv, D]
    return flat.view(block_tables.shape[0], ctx, hkv, d).transpose(1, 2).contiguous()


def decode_case(bench: Bench, batch: int, ctx: int) -> Case:
    s, dt, dev = bench.shapes, bench.attn_dtype, bench.device
    hq, hkv, d, bs = s.n_heads, s.n_kv_heads, s.head_dim, s.block_size
    scale = d**-0.5
    kv_bytes = 2.0 * batch * ctx * hkv * d * 2  # K and V, bf16
    nbytes = kv_bytes + 2.0 * 2 * batch * hq * d  # + q read, out written
    params = {"batch": batch, "ctx": ctx, "n_heads": hq, "n_kv_heads": hkv, "head_dim": d}
    shape = f"B={batch} ctx={ctx}"
    # pool + SDPA's contiguous copy + the torch path's gathered bf16 and fp32 copies
    if bench.cuda and 5 * kv_bytes > DECODE_MEMORY_LIMIT:
        return Case("attention_decode", shape, params, [], bytes=nbytes)
    nb = -(-ctx // bs)
    n_sets = bench.n_sets(kv_bytes)
    num_blocks = n_sets * batch * nb + 1
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=dev)[: n_sets * batch * nb]
    tables = perm.view(n_sets, batch, nb).to(torch.int32)  # shuffled block ids
    seq_lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
    sets = [
        (q, k_cache, v_cache, tables[i], seq_lens, scale)
        for i, q in enumerate(torch.randn(n_sets, batch, hq, d, device=dev, dtype=dt))
    ]

    def sdpa() -> tuple[Callable[[], Any], str]:
        calls, note = [], ""
        for q, kc, vc, table, _, sc in sets:
            q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
            k4, v4 = gather_context(kc, table, ctx), gather_context(vc, table, ctx)
            call, note = make_sdpa(q4, k4, v4, sc, [("no mask", {})])
            calls.append(call)
        return rotating(calls), note

    def sdpa_paged() -> Callable[[], Any]:
        def gather_and_attend(q, kc, vc, table, _lens, sc) -> torch.Tensor:
            k4, v4 = gather_context(kc, table, ctx), gather_context(vc, table, ctx)
            return F.scaled_dot_product_attention(q.unsqueeze(2), k4, v4, scale=sc, enable_gqa=True)

        return rotating([functools.partial(gather_and_attend, *a) for a in sets])

    def read_peer() -> float:
        return plain_read_ms(bench, kv_bytes)

    goal = f">= {DECODE_GOAL_PCT:.0f}% of floor, <= SDPA" if ctx >= s.decode_goal_ctx else None
    return Case(
        "attention_decode",
        shape,
        params,
        sets,
        bytes=nbytes,
        slow_torch=True,
        goal=goal,
        goal_check=decode_goal_met if goal else None,
        sdpa=sdpa,
        sdpa_paged=sdpa_paged,
        read_peer=read_peer if kv_bytes <= READ_PEER_MAX_BYTES else None,
    )


def decode_goal_met(r: Row) -> bool:
    """>= 70% of the floor and no slower than SDPA on the same (paged) cache, i.e. SDPA with the
    gather it needs to read that cache; the table also shows SDPA on pre-gathered K/V."""
    return (
        r.pct_of_floor is not None
        and r.pct_of_floor >= DECODE_GOAL_PCT
        and isinstance(r.sdpa_paged_ms, float)
        and r.triton_ms is not None
        and r.triton_ms <= r.sdpa_paged_ms
    )


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Each program sums one contiguous slice of x (fp32) and stores one number: the least a
    kernel can do that reads every byte once."""
    pid = tl.program_id(0)
    per_program = tl.cdiv(tl.cdiv(n, tl.num_programs(0)), BLOCK) * BLOCK
    start = pid * per_program
    acc = tl.zeros([BLOCK], tl.float32)
    for offset in range(start, tl.minimum(start + per_program, n), BLOCK):
        idx = offset + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


# The plain-read peer's launch shapes: programs per multiprocessor x elements per step; the
# fastest counts.
READ_PROGRAMS_PER_SM = (1, 2, 4, 8)
READ_BLOCKS = (1024, 4096)
# Decode rows above this many K/V bytes skip the peer (batch 64 at long contexts: minutes of
# replays for a figure the copy bandwidth already gives).
READ_PEER_MAX_BYTES = 1e9


def plain_read_ms(bench: Bench, nbytes: float) -> float:
    """The fastest one-pass read of ``nbytes`` of bf16 by _read_kernel over its launch shapes,
    timed like the kernels (graph replays, input sets rotated past L2). What a batch-1 decode
    could at best take if it did nothing but read its K and V once, launch included."""
    n = int(nbytes) // 2
    sms = multiprocessor_count(bench.device) if bench.cuda else 4
    sets = [torch.randn(n, device=bench.device, dtype=torch.bfloat16)
            for _ in range(bench.n_sets(nbytes))]  # fmt: skip
    best = math.inf
    shapes = itertools.product(READ_PROGRAMS_PER_SM, READ_BLOCKS)
    for per_sm, block in itertools.islice(shapes, None if bench.cuda else 1):
        programs = per_sm * sms
        out = torch.empty(programs, device=bench.device, dtype=torch.float32)
        calls = [functools.partial(_read_kernel[(programs,)], x, out, n, BLOCK=block) for x in sets]
        best = min(best, bench.graph_ms(rotating(calls), len(sets)))
    return best


def prefill_case(bench: Bench, q_len: int, prefix: int, goal: bool) -> Case:
    s, dt, dev = bench.shapes, bench.attn_dtype, bench.device
    hq, hkv, d, bs = s.n_heads, s.n_kv_heads, s.head_dim, s.block_size
    ctx = prefix + q_len
    scale = d**-0.5
    # Query j (position prefix + j) sees prefix + j + 1 keys; QK^T and PV are 2*D FLOPs per
    # (query, key, head) each.
    pairs = q_len * prefix + q_len * (q_len + 1) / 2
    flops = 2.0 * 2.0 * hq * d * pairs
    io_bytes = 2.0 * (2 * q_len * hq * d + 2 * ctx * hkv * d)
    nb = -(-ctx // bs)
    n_sets = bench.n_sets(io_bytes)
    num_blocks = n_sets * nb + 1
    k_cache = torch.randn(num_blocks, bs, hkv, d, device=dev, dtype=dt)
    v_cache = torch.randn_like(k_cache)
    perm = torch.randperm(num_blocks, device=dev)[: n_sets * nb]
    tables = perm.view(n_sets, 1, nb).to(torch.int32)
    cu = torch.tensor([0, q_len], device=dev, dtype=torch.int32)
    lens = torch.tensor([ctx], device=dev, dtype=torch.int32)
    sets = [
        (q, k_cache, v_cache, tables[i], cu, lens, q_len, scale)
        for i, q in enumerate(torch.randn(n_sets, q_len, hq, d, device=dev, dtype=dt))
    ]

    def sdpa() -> tuple[Callable, str]:
        if prefix == 0:
            masks: list[tuple[str, dict[str, Any]]] = [("is_causal", {"is_causal": True})]
        else:
            # Bottom-right causal (the new tokens are the last q_len positions): SDPA's is_causal
            # is top-left, so use torch's lower-right causal bias, else an explicit bool mask.
            masks = []
            try:
                from torch.nn.attention.bias import causal_lower_right

                masks.append(("causal_lower_right", {"attn_mask": causal_lower_right(q_len, ctx)}))
            except ImportError:
                pass
            key_pos = torch.arange(ctx, device=dev)
            query_pos = torch.arange(prefix, ctx, device=dev)
            masks.append(("bool mask", {"attn_mask": key_pos[None, :] <= query_pos[:, None]}))
        calls, note = [], ""
        for q, kc, vc, table, *_ in sets:
            q4 = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, T, D]
            k4, v4 = gather_context(kc, table, ctx), gather_context(vc, table, ctx)
            call, note = make_sdpa(q4, k4, v4, scale, masks)
            calls.append(call)
        return rotating(calls), note

    def sdpa_paged() -> Callable[[], Any]:
        # What SDPA costs in an engine that keeps a paged cache: the context gathered into
        # contiguous K/V first, then the same call (is_causal for whole prompts, the lower-right
        # bias over a cached prefix), all inside the timed replay.
        mask: dict[str, Any] = {"is_causal": True}
        if prefix:
            key_pos = torch.arange(ctx, device=dev)
            mask = {"attn_mask": key_pos[None, :] <= torch.arange(prefix, ctx, device=dev)[:, None]}

        def gather_and_attend(q, kc, vc, table, *_rest) -> torch.Tensor:
            k4, v4 = gather_context(kc, table, ctx), gather_context(vc, table, ctx)
            q4 = q.transpose(0, 1).unsqueeze(0)
            return F.scaled_dot_product_attention(q4, k4, v4, scale=scale, enable_gqa=True, **mask)

        return rotating([functools.partial(gather_and_attend, *a) for a in sets])

    shape = f"T={q_len}" if prefix == 0 else f"{q_len} new over {prefix} cached"
    return Case(
        "attention_prefill",
        shape,
        {"q_len": q_len, "prefix": prefix, "n_heads": hq, "n_kv_heads": hkv, "head_dim": d},
        sets,
        flops=flops,
        slow_torch=True,
        goal=f">= {PREFILL_GOAL_TFLOPS:.0f} TFLOP/s" if goal else None,
        goal_check=(lambda r: r.tflops is not None and r.tflops >= PREFILL_GOAL_TFLOPS)
        if goal
        else None,
        sdpa=sdpa,
        sdpa_paged=sdpa_paged,
        hint=(ctx,),
    )


def case_thunks(bench: Bench, kernel: str) -> list[functools.partial[Case]]:
    """One thunk per shape: each case's tensors are made just before it runs and dropped after,
    so only one case's cache pool is alive at a time."""
    s = bench.shapes
    per_token = {
        "rmsnorm": rmsnorm_case,
        "fused_add_rmsnorm": fused_add_rmsnorm_case,
        "silu_and_mul": silu_and_mul_case,
        "rope_kv_store": rope_kv_store_case,
    }
    if kernel in per_token:
        return [functools.partial(per_token[kernel], bench, t) for t in s.tokens]
    if kernel == "attention_decode":
        return [
            functools.partial(decode_case, bench, b, c)
            for b in s.decode_batches
            for c in s.decode_contexts
        ]
    new, prefix = s.chunk
    return [
        *(functools.partial(prefill_case, bench, t, 0, True) for t in s.prefill_lens),
        functools.partial(prefill_case, bench, new, prefix, False),
    ]


# ---- running one case -----------------------------------------------------------------------


def run_case(bench: Bench, case: Case, impls: Impls) -> Row:
    row = Row(case.kernel, case.shape, case.params, goal=case.goal)
    row.bytes, row.flops = case.bytes, case.flops
    if case.bytes is not None and not case.latency_only:
        row.floor_ms = case.bytes / bench.bandwidth
    if case.flops is not None:
        row.floor_ms = case.flops / bench.matmul_rate
    if not case.arg_sets:
        row.status = "skipped: over the memory limit"
        row.goal = None
        return row
    row.notes.append(f"{len(case.arg_sets)} input set(s) rotated")

    def calls(fn: OpFn) -> Callable[[], Any]:
        return rotating([functools.partial(fn, *a) for a in case.arg_sets])

    # Triton: check against the torch implementation first, then time it (a mismatching kernel
    # is still timed, and its row says MISMATCH).
    if impls.triton is None:
        row.status = impls.triton_status
    else:
        try:
            if case.compare is not None:
                err = case.compare(impls.triton, impls.torch)
            else:
                err = rel_err(impls.triton(*case.arg_sets[0]), impls.torch(*case.arg_sets[0]))
            row.rel_err = err
            if not err < REL_ERR_LIMIT:  # NaN counts as a mismatch
                row.status = "MISMATCH"
            row.triton_ms = bench.graph_ms(calls(impls.triton), len(case.arg_sets))
            if case.latency_only:
                row.host_us["triton"] = bench.host_us(calls(impls.triton))
        except Exception as exc:
            row.status = f"error: {short(exc)}"
            log(f"  triton failed: {traceback.format_exc(limit=-4)}")
            bench.free()

    if case.hint is not None and impls.triton is not None:
        try:
            hinted = [functools.partial(impls.triton, *a, *case.hint) for a in case.arg_sets]
            row.op_ms = bench.graph_ms(rotating(hinted), len(case.arg_sets))
        except Exception as exc:
            row.op_ms = f"failed: {short(exc)}"
            bench.free()

    try:
        row.torch_ms = bench.time_ms(calls(impls.torch), cap=case.slow_torch)
        if case.latency_only:
            row.host_us["torch"] = bench.host_us(calls(impls.torch))
    except Exception as exc:
        row.torch_ms = f"failed: {short(exc)}"
        bench.free()

    if case.kernel in bench.compile_ops:
        row.compile_ms = time_compiled(bench, case, impls.torch, row, calls)

    if case.sdpa is not None:
        try:
            fn, note = case.sdpa()
            row.notes.append(note)
            row.sdpa_ms = bench.graph_ms(fn, len(case.arg_sets))
            del fn
        except Exception as exc:
            row.sdpa_ms = f"failed: {short(exc)}"
        bench.free()
    if case.sdpa_paged is not None:
        try:
            row.sdpa_paged_ms = bench.graph_ms(case.sdpa_paged(), len(case.arg_sets))
        except Exception as exc:
            row.sdpa_paged_ms = f"failed: {short(exc)}"
        bench.free()

    if case.read_peer is not None:
        try:
            row.read_ms = case.read_peer()
        except Exception as exc:
            row.read_ms = f"failed: {short(exc)}"
        bench.free()

    if row.triton_ms is not None and row.floor_ms is not None:
        row.pct_of_floor = 100.0 * row.floor_ms / row.triton_ms
    if row.triton_ms is not None and case.flops is not None:
        row.tflops = case.flops / row.triton_ms / 1e9
    if case.goal_check is not None:
        row.passed = row.status == "ok" and case.goal_check(row)
    return row


def time_compiled(
    bench: Bench,
    case: Case,
    torch_fn: OpFn,
    row: Row,
    calls: Callable[[OpFn], Callable[[], Any]],
) -> float | str:
    """torch.compile(dynamic=False) of the torch implementation; "failed: ..." if it cannot."""
    import torch._dynamo

    # A fresh dynamo state per case: every shape recompiles (dynamic=False), and the shapes of
    # earlier cases would otherwise count toward the recompile limit and silently fall back.
    torch._dynamo.reset()
    # The torch attention paths break the graph at .tolist() and guard on the block ids they
    # read, so each rotated input set compiles its own variant: allow that many, and compile them
    # all before timing (do_bench's first runs set its repeat count, a compile there skews it).
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    compiled = torch.compile(torch_fn, dynamic=False, backend=bench.compile_backend)
    try:
        start = time.perf_counter()
        for args in case.arg_sets:
            compiled(*args)
        bench.sync()
        row.notes.append(f"compile {time.perf_counter() - start:.1f} s")
        if case.slow_torch or case.kernel == "rope_kv_store":
            # These torch paths sync the host (.tolist(), .any()): they cannot be captured.
            ms = bench.time_ms(calls(compiled), cap=True)
        else:
            ms = bench.graph_ms(calls(compiled), len(case.arg_sets))
        if case.latency_only:
            row.host_us["compile"] = bench.host_us(calls(compiled))
        return ms
    except Exception as exc:
        bench.free()
        return f"failed: {short(exc)}"
    finally:
        torch._dynamo.reset()


# ---- output ---------------------------------------------------------------------------------


def fmt_ms(v: float | str | None) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.4f}" if v < 1 else f"{v:.3f}" if v < 100 else f"{v:.1f}"


def achieved(r: Row) -> str:
    if r.tflops is not None:
        return f"{r.tflops:.0f} TFLOP/s ({r.pct_of_floor:.0f}%)"
    if r.pct_of_floor is not None:
        gbps = r.bytes / r.triton_ms / 1e6 if r.bytes and r.triton_ms else math.nan
        return f"{r.pct_of_floor:.0f}% ({gbps:.0f} GB/s)"
    if r.host_us:
        # decode-size launches: the host's cost per call, Triton / torch / compiled
        parts = [
            f"{r.host_us[k]:.0f}" if k in r.host_us else "-" for k in ("triton", "torch", "compile")
        ]
        return "latency; host us " + "/".join(parts)
    return "-"


def table(rows: list[Row]) -> str:
    head = [
        "kernel",
        "shape",
        "triton ms",
        "op ms",
        "torch ms",
        "compile ms",
        "sdpa ms",
        "sdpa+gather ms",
        "read ms",
        "floor ms",
        "achieved",
        "goal",
        "result",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.passed is None:
            result = r.status if r.status != "ok" else "-"
        else:
            result = "PASS" if r.passed else "FAIL"
            if r.status != "ok":
                result += f" ({r.status})"
        cells = [
            r.kernel,
            r.shape,
            fmt_ms(r.triton_ms),
            fmt_ms(r.op_ms),
            fmt_ms(r.torch_ms),
            fmt_ms(r.compile_ms),
            fmt_ms(r.sdpa_ms),
            fmt_ms(r.sdpa_paged_ms),
            fmt_ms(r.read_ms),
            fmt_ms(r.floor_ms),
            achieved(r),
            r.goal or "-",
            result,
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": torch.__version__, "triton": triton_version}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", metavar="REGEX", help="kernels whose name matches (re.search)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, for a first run")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny shapes on the CPU with TRITON_INTERPRET=1: exercises every path, times nothing",
    )
    ap.add_argument(
        "--compile",
        choices=("all", "elementwise", "none"),
        default="all",
        help="which kernels also time torch.compile of the torch implementation (each shape "
        "compiles anew: the attention ones cost the most time)",
    )
    ap.add_argument(
        "--prefill-lens", metavar="N,N", help="whole-prompt lengths of the prefill rows"
    )
    default_out = os.path.join(os.environ["OUT"], "kernels.json") if os.environ.get("OUT") else None
    ap.add_argument("--out", default=default_out, help="JSON results (default: $OUT/kernels.json)")
    args = ap.parse_args()

    torch.manual_seed(0)
    bench = Bench(args)
    kernels = [k for k in KERNELS if not args.only or re.search(args.only, k)]
    if not kernels:
        raise SystemExit(f"--only {args.only!r} matches none of {', '.join(KERNELS)}")
    device_name = torch.cuda.get_device_name() if bench.cuda else "cpu (smoke, TRITON_INTERPRET=1)"
    started = time.perf_counter()
    log(f"{device_name}; torch {versions()['torch']}, triton {versions()['triton']}")
    ceilings = bench.measure_ceilings()

    rows: list[Row] = []
    for kernel in kernels:
        dtype = bench.attn_dtype if kernel.startswith("attention") else bench.dtype
        try:
            impls = load_impls(bench, kernel, dtype)
        except Exception as exc:
            log(f"{kernel}: cannot load: {traceback.format_exc(limit=-4)}")
            rows.append(Row(kernel, "-", {}, status=f"error: {short(exc)}"))
            continue
        if impls.triton is None:
            log(f"{kernel}: triton implementation {impls.triton_status}")
        for thunk in case_thunks(bench, kernel):
            t0 = time.perf_counter()
            try:
                case = thunk()
                row = run_case(bench, case, impls)
            except Exception as exc:
                log(f"{kernel} {thunk.args[1:]}: {traceback.format_exc(limit=-4)}")
                row = Row(kernel, str(thunk.args[1:]), {}, status=f"error: {short(exc)}")
            case = None  # drop this case's tensors before the next one allocates its own
            bench.free()
            rows.append(row)
            log(
                f"{kernel} {row.shape}: triton {fmt_ms(row.triton_ms)} ms, op "
                f"{fmt_ms(row.op_ms)}, torch "
                f"{fmt_ms(row.torch_ms)}, compile {fmt_ms(row.compile_ms)}, sdpa "
                f"{fmt_ms(row.sdpa_ms)}; {achieved(row)}; {row.status} "
                f"({time.perf_counter() - t0:.1f} s)"
            )
        del impls

    elapsed = time.perf_counter() - started
    info = {
        "device": device_name,
        **versions(),
        "cuda": torch.version.cuda,
        # timezone.utc, not datetime.UTC: the GPU image's Python may be 3.10
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),  # noqa: UP017
        "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
        "dtype": str(bench.dtype).removeprefix("torch."),
        "attention_dtype": str(bench.attn_dtype).removeprefix("torch."),
        "compile": args.compile,
        "compile_backend": bench.compile_backend,
        "timing": "Triton, SDPA and compiled elementwise code: median of back-to-back CUDA-graph "
        "replays over rotated input sets; eager torch: do_bench median, CUDA events for capped "
        "slow calls"
        if bench.cuda
        else "time.perf_counter on the CPU (meaningless)",
        "rel_err_limit": REL_ERR_LIMIT,
        "shapes": asdict(bench.shapes),
        "ceilings": ceilings,
        "elapsed_s": elapsed,
        "rows": [asdict(r) for r in rows],
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1, default=str)
        log(f"wrote {args.out}")
    log(f"done in {elapsed:.0f} s")

    goals = [r for r in rows if r.passed is not None]
    print(
        f"{device_name}; torch {info['torch']}, triton {info['triton']}; {info['date']}; "
        f"{info['mode']} run, {elapsed:.0f} s"
    )
    print(
        f"ceilings: copy {ceilings['copy_GBps']:.0f} GB/s (read + write), "
        f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s, "
        f"empty kernel {ceilings['launch_us']:.2f} us per launch (CUDA graph)"
    )
    print(table(rows))
    print(
        f"goals: {sum(bool(r.passed) for r in goals)}/{len(goals)} met; "
        f"{sum(r.status == 'MISMATCH' for r in rows)} mismatch, "
        f"{sum(r.status.startswith('missing') for r in rows)} missing, "
        f"{sum(r.status.startswith('error') for r in rows)} error"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
