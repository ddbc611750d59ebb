"""Where a decode step's time goes on the GPU: the graph replay alone against the whole engine step.

    python bench/step_profile.py --model bench/configs/llama-3.2-1b/config.json [--batch 1]

Loads random weights at the config's shapes (bf16, cuda), starts ``--batch`` greedy requests, and
times (a) the captured graph's replay alone (CUDA events over back-to-back replays) and (b) whole
engine steps (schedule, inputs, replay, sampling, output processing) over the same decode. The
difference is what the host adds per step. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.runtime.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    loaded = load_model(args.model, "cuda", "bfloat16", "dummy")
    core = EngineCore(loaded, EngineConfig(max_num_seqs=args.batch, enable_prefix_caching=False))
    graphs = core.runner.graphs
    assert graphs is not None, "graph capture failed"
    params = SamplingParams(temperature=0, max_tokens=args.steps + 50, ignore_eos=True)
    for i in range(args.batch):
        core.add_request(f"r{i}", [(7 * i + j) % 1000 + 3 for j in range(args.context)], params)
    for _ in range(10):  # prefill, then a few decode steps
        core.step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        core.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1000

    size = next(s for s in graphs.sizes if s >= args.batch)
    graph = graphs._graphs[size].graph
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(args.steps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    replay_ms = begin.elapsed_time(end) / args.steps
    print(
        json.dumps(
            {
                "batch": args.batch,
                "context": args.context,
                "step_ms": round(step_ms, 4),
                "replay_ms": round(replay_ms, 4),
                "host_ms": round(step_ms - replay_ms, 4),
                "tok_s": round(args.batch / step_ms * 1000, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
