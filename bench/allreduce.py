"""The link between the GPUs as tensor parallelism meets it: NCCL all-reduce latency and bandwidth.

    python bench/allreduce.py [--gpus 2] [--sizes 8K,16K,64K,1M,16M,256M]

One process per GPU (spawned here, NCCL through torch.distributed). Per message size (bf16): the
eager all-reduce's time (CUDA events around 50 back-to-back calls), the same inside one CUDA graph
of 50 calls (what a captured decode step pays), and the bus bandwidth NCCL's tests report
(``2 (n - 1) / n * bytes / time``). The row a decode step cares about is the hidden size at its
batch (Llama-3.1-8B: 4,096 bf16 = 8 KB per token), times two all-reduces per layer. Prints one
JSON line per size (rank 0) and a table last. NVLink multicast stays as the environment sets it
(off on shared machines: NCCL_NVLS_ENABLE=0).
"""

from __future__ import annotations

import argparse
import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALLS = 50


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def timed(fn, reps: int = 5) -> float:
    """Median ms of ``fn`` over ``reps`` runs (CUDA events), after one warm-up run."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def worker(rank: int, world: int, port: int, sizes: list[int]) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    dist.all_reduce(torch.zeros(1, device="cuda"))
    rows = []
    for size in sizes:
        x = torch.ones(size // 2, dtype=torch.bfloat16, device="cuda")

        def eager(x=x):
            for _ in range(CALLS):
                dist.all_reduce(x)

        eager_us = timed(eager) * 1000 / CALLS
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS):
                dist.all_reduce(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph_us = timed(graph.replay) * 1000 / CALLS
        best = min(eager_us, graph_us)
        bus_gbs = 2 * (world - 1) / world * size / (best * 1e-6) / 1e9
        rows.append({"bytes": size, "eager_us": round(eager_us, 2), "graph_us": round(graph_us, 2),
                     "bus_GBps": round(bus_gbs, 1)})  # fmt: skip
    if rank == 0:
        for row in rows:
            print(json.dumps({"gpus": world, **row}), flush=True)
        print(f"\n| bytes | eager us | in a CUDA graph us | bus GB/s |  ({world} GPUs)")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['bytes']:,} | {r['eager_us']} | {r['graph_us']} | {r['bus_GBps']} |")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--sizes", default="8K,16K,64K,256K,1M,16M,256M")
    args = ap.parse_args()
    if args.gpus < 2:
        raise SystemExit(f"needs two GPUs or more, this machine has {torch.cuda.device_count()}")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # shared hosts: never NVLink multicast
    mp.spawn(worker, args=(args.gpus, port, sizes), nprocs=args.gpus)


if __name__ == "__main__":
    main()
