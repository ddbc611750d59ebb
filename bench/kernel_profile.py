"""Which kernels a decode step spends its GPU time in: a profile of captured-graph replays.

    python bench/kernel_profile.py --model bench/configs/llama-3.2-1b/config.json [--batch 1]
    python bench/kernel_profile.py --model ... --prefill 2048


Loads random weights at the config's shapes (bf16, cuda), runs ``--batch`` greedy requests into
decode, then profiles back-to-back replays of the step's graph with torch.profiler (CUPTI reports
the kernels inside a graph) and, for comparison, the same forward launched eagerly. Prints one JSON
line per mode: each kernel's time per step (sum over its launches), launches per step, and the
sum of kernel times against the step's wall time (the gap is idle time between kernels).
With ``--prefill N`` it profiles instead an eager prefill step of one N-token prompt (the
matmuls, attention and the rest of a prompt's forward, as ``bench latency`` times it).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.model_runner import ScheduledSequence
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.runtime.loading import load_model


def kernel_table(prof: profile, steps: int) -> list[dict]:
    """Per kernel name: microseconds and launches per step, largest first."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total[event.name] += event.device_time
            count[event.name] += 1
    rows = [
        {"kernel": name[:90], "us": round(us / steps, 2), "launches": count[name] / steps}
        for name, us in total.items()
    ]
    return sorted(rows, key=lambda r: -r["us"])


def timed(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e6


def report(mode: str, fn, steps: int, **fields) -> None:
    """Time ``fn`` plainly, then under the profiler; print the kernel table as one JSON line."""
    wall_us = timed(fn, steps)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = kernel_table(prof, steps)
    busy = sum(r["us"] for r in rows)
    line = {
        "mode": mode,
        **fields,
        "wall_us_per_step": round(wall_us, 1),
        "kernel_us_per_step": round(busy, 1),
        "launches_per_step": sum(r["launches"] for r in rows),
        "kernels": rows[:30],
    }
    print(json.dumps(line), flush=True)


def host_profile(fn, steps: int) -> list[dict]:
    """The host functions ``steps`` calls of ``fn`` spend the most time in (own time, cProfile)."""
    import cProfile
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (calls, prim, tottime, cumtime, _)}
    rows = [
        {"fn": f"{Path(k[0]).name}:{k[1]}:{k[2]}", "calls": v[0] / steps,
         "own_us": round(v[2] / steps * 1e6, 1), "cum_us": round(v[3] / steps * 1e6, 1)}
        for k, v in stats.items()
    ]  # fmt: skip
    return sorted(rows, key=lambda r: -r["own_us"])[:30]


def profile_prefill(loaded, tokens: int, steps: int, host: bool = False) -> None:
    core = EngineCore(loaded, EngineConfig(max_num_seqs=1, enable_prefix_caching=False))
    bs = core.runner.block_size
    table = list(range(-(-tokens // bs)))
    seq = ScheduledSequence([(7 * j) % 1000 + 3 for j in range(tokens)], 0, table)
    with torch.inference_mode():
        report("prefill", lambda: core.runner.execute([seq]), steps, tokens=tokens)
        if host:
            rows = host_profile(lambda: core.runner.execute([seq]), steps)
            print(json.dumps({"mode": "prefill_host", "tokens": tokens, "functions": rows}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prefill", type=int, default=0, help="profile an N-token prefill instead")
    ap.add_argument(
        "--host", action="store_true", help="with --prefill: where the host's time goes (cProfile)"
    )
    args = ap.parse_args()
    loaded = load_model(args.model, "cuda", "bfloat16", "dummy")
    if args.prefill:
        profile_prefill(loaded, args.prefill, args.steps, args.host)
        return
    core = EngineCore(loaded, EngineConfig(max_num_seqs=args.batch, enable_prefix_caching=False))
    graphs = core.runner.graphs
    assert graphs is not None, "graph capture failed"
    params = SamplingParams(temperature=0, max_tokens=10 * args.steps + 50, ignore_eos=True)
    for i in range(args.batch):
        core.add_request(f"r{i}", [(7 * i + j) % 1000 + 3 for j in range(args.context)], params)
    for _ in range(10):
        core.step()
    torch.cuda.synchronize()
    size = next(s for s in graphs.sizes if s >= args.batch)
    modes = {
        "graph": graphs._graphs[size].graph.replay,
        "eager": lambda: graphs._forward(size),
    }
    for mode, fn in modes.items():
        report(mode, fn, args.steps, batch=args.batch, context=args.context)


if __name__ == "__main__":
    main()
