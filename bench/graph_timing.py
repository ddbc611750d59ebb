"""Kernel time as the engine sees it: back-to-back replays of a captured CUDA graph.

Shared by bench/kernels.py and bench/kernel_sweep.py. A decode-size Triton launch costs the host
tens of microseconds, more than the kernel runs, so timing plain calls measures the host; a graph
of ``calls`` calls replayed back to back measures the GPU alone.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# Replays before timing: after host-bound work (eager torch paths, compiling) the clocks have
# dropped, and a few replays are over before they ramp up.
WARMUP_S = 0.2
ROUNDS = 7
REPLAYS_PER_ROUND = 10
# Calls per graph at least: a replay's own start and end (between graphs, not between kernels)
# are spread over this many calls. With only the 4 input sets of a 32k-context decode in the
# graph they added 0.3-0.4 us per call (H100 run 17 in bench/KERNEL_NOTES.md).
MIN_CALLS = 16


def graph_replay_ms(fn: Callable[[], Any], calls: int) -> float:
    """Median milliseconds of one call of ``fn``, from replays of a CUDA graph of ``calls`` calls.

    ``fn`` should rotate over ``calls`` input sets so that each set is read from memory rather
    than L2; the graph cycles through them as often as MIN_CALLS needs. Raises whatever graph
    capture raises when ``fn`` cannot be captured. Timed with CUDA events, NOT do_bench: its L2 flush leaves ~50 MB of dirty lines that get
    written back while the next kernel runs, which adds ~15 us to a kernel that reads 60 MB.
    """
    calls *= -(-MIN_CALLS // calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2 * calls):
            fn()  # compile, autotune and allocate before capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    end_warm = time.perf_counter() + WARMUP_S
    while time.perf_counter() < end_warm:
        graph.replay()
        torch.cuda.synchronize()
    per_replay = []
    for _ in range(ROUNDS):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPLAYS_PER_ROUND):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        per_replay.append(start.elapsed_time(end) / REPLAYS_PER_ROUND)
    return statistics.median(per_replay) / calls
