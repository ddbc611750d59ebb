"""Where a decode step's wall time goes on the GPU, free and under a JSON schema, without a profiler.

``bench/structured_profile.py`` uses cProfile, which slows the engine's Python several times and
sees one thread. This wraps the engine's parts with wall-clock timers instead (a few microseconds
each) and times the GPU's side with CUDA events around the forward and the sampler, then prints
per decode step: the wall time, the GPU's busy time, and each host part's time, including the
time the engine's thread spends waiting (for the GPU: reading a step back; for the grammar
thread: a step's masks) and the masks' own time on the grammar thread.

    python bench/structured_timeline.py --model smollm2.gguf --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import functools
import time
from typing import Any

import torch

from rustinfer.cli.bench_structured import PROMPT, SCHEMA
from rustinfer.engine import core as core_module
from rustinfer.engine import host_copy
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.engine.structured import StructuredOutput
from rustinfer.llm import LLM


class Timers:
    def __init__(self) -> None:
        self.host: dict[str, float] = collections.defaultdict(float)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = (
            collections.defaultdict(list)
        )

    def wrap(self, owner: Any, name: str, label: str, gpu: bool = False) -> None:
        fn = getattr(owner, name, None)
        if fn is None:  # an older engine without this part
            return
        gpu = gpu and torch.cuda.is_available()

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            if gpu:
                begin, end = (
                    torch.cuda.Event(enable_timing=True),
                    torch.cuda.Event(enable_timing=True),
                )
                begin.record()
            try:
                return fn(*args, **kwargs)
            finally:
                if gpu:
                    end.record()
                    self.events[label].append((begin, end))
                self.host[label] += time.perf_counter() - start

        setattr(owner, name, timed)

    def gpu_ms(self) -> dict[str, float]:
        if not self.events:
            return {}
        torch.cuda.synchronize()
        return {k: sum(b.elapsed_time(e) for b, e in v) for k, v in self.events.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
              enable_prefix_caching=False, load_format=args.load_format)  # fmt: skip
    engine = llm.engine
    so = StructuredOutput.json_schema(SCHEMA)

    def run(structured: StructuredOutput | None) -> float:
        params = [
            SamplingParams(temperature=0.8, seed=i, max_tokens=args.output_len, ignore_eos=True,
                           structured=structured)
            for i in range(args.batch)
        ]  # fmt: skip
        start = time.perf_counter()
        llm.chat([PROMPT] * args.batch, params)
        return time.perf_counter() - start

    run(so)  # compile, first-use costs
    run(None)
    timers = Timers()
    timers.wrap(core_module.EngineCore, "step", "step (all)")
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.runner, "stage", "runner.stage")
    timers.wrap(engine.runner, "launch", "runner.launch (forward)", gpu=True)
    timers.wrap(type(engine.sampler), "__call__", "sampler", gpu=True)
    timers.wrap(core_module.EngineCore, "_sample", "_sample (with mask wait)")
    timers.wrap(host_copy.HostTensors, "wait", "wait for the GPU (read back)")
    timers.wrap(concurrent.futures.Future, "result", "wait for the masks")
    timers.wrap(engine.outputs, "process", "outputs.process")
    timers.wrap(core_module.EngineCore, "_finish_with_masks", "_finish_with_masks (all)")
    timers.wrap(core_module, "fill_bitmask", "masks (grammar thread)")
    timers.wrap(core_module, "banned_from_bitmask", "banned_from_bitmask")
    steps = args.output_len
    for label, structured in (("free", None), ("json_schema", so)):
        timers.host.clear()
        timers.events.clear()
        wall = run(structured)
        gpu = timers.gpu_ms()
        print(f"== {label}: {wall * 1000 / steps:.3f} ms a step (wall, {steps} steps)")
        busy = sum(gpu.values())
        print(f"   GPU busy (forward + sampler) {busy / steps:8.3f} ms a step")
        for name, ms in sorted(gpu.items()):
            print(f"   GPU  {name:<34} {ms / steps:8.3f}")
        for name, secs in sorted(timers.host.items(), key=lambda kv: -kv[1]):
            print(f"   host {name:<34} {secs * 1000 / steps:8.3f}")


if __name__ == "__main__":
    main()
