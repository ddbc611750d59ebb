"""Where a decode step's wall time goes on the GPU, free and under a JSON schema, without a profiler.

``bench/structured_profile.py`` uses cProfile, which slows the engine's Python several times. This
wraps the engine's parts with wall-clock timers instead (a few microseconds each) and times the
GPU's side with CUDA events around the forward and the sampler, then prints per decode step: the
wall time, the GPU's busy time, and each host part's time, including the time the engine's thread
waits for the GPU (reading a step back). A free run after the constrained one shows the host's
drift. Last, the grammar's own floor in the same process: a batch's ``consume_token`` calls and
its masks computed every way llguidance offers (one by one, on its executor with 2 to 16
threads), each row at its own place in the story string.

    python bench/structured_timeline.py --model smollm2.gguf --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from typing import Any

import torch

from rustinfer.cli.bench_structured import PROMPT, SCHEMAS, bench_params
from rustinfer.engine import core as core_module
from rustinfer.engine import host_copy
from rustinfer.engine.structured import StructuredOutput, mask_words
from rustinfer.llm import LLM


class Timers:
    def __init__(self) -> None:
        self.host: dict[str, float] = collections.defaultdict(float)
        self.events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = (
            collections.defaultdict(list)
        )

    def wrap(self, owner: Any, name: str, label: str, gpu: bool = False) -> None:
        fn = getattr(owner, name)
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
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="bounded")
    ap.add_argument(
        "--seeded", action="store_true", help="a seed per request (one noise draw each)"
    )
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
              enable_prefix_caching=False, load_format=args.load_format)  # fmt: skip
    engine = llm.engine
    so = StructuredOutput.json_schema(SCHEMAS[args.schema])

    def run(structured: StructuredOutput | None) -> float:
        params = bench_params(args.batch, args.output_len, structured, args.seeded)
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
    timers.wrap(core_module.EngineCore, "_sample", "_sample (masks up, sampler)")
    timers.wrap(host_copy.HostTensors, "wait", "wait for the GPU (read back)")
    timers.wrap(engine.outputs, "process", "outputs.process")
    timers.wrap(core_module.EngineCore, "_finish_with_masks", "_finish_with_masks (all)")
    timers.wrap(core_module.EngineCore, "_fill_masks", "masks")
    timers.wrap(core_module, "banned_from_bitmask", "banned_from_bitmask")
    steps = args.output_len
    runs = [("free", None), ("json_schema", so), ("free again (drift)", None)]
    for label, structured in runs:
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
    grammar_floor(engine, so, args.batch)


def grammar_floor(engine: core_module.EngineCore, so: StructuredOutput, batch: int) -> None:
    """Microseconds for one step's grammar work at ``batch`` rows, outside the engine: each
    timed step first moves every row one token further into the story string (a state the
    lexer has not seen, as in generation), then computes the masks one way."""
    import llguidance
    import llguidance.numpy as llg_numpy
    import numpy as np

    compiler = engine.grammar_compiler()
    prefix = engine.tokenizer.encode('{"title":"The Keeper","story":"Once upon a', False)
    text = " time the keeper walked along the shore and counted the ships in the bay" * 4
    tokens = engine.tokenizer.encode(text, False)
    mask = np.full((batch, mask_words(engine.vocab_size)), -1, dtype=np.int32)

    def fresh() -> list[Any]:
        # Row i starts i tokens further in: rows at the same place would share the lexer's
        # cached work, which rows generating their own text do not.
        out = []
        for i in range(batch):
            m = compiler.matcher(so)
            for t in prefix + tokens[:i]:
                m.consume_token(t)
            out.append(m)
        return out

    def run(fill: Any) -> tuple[float, float]:
        matchers = fresh()
        rows = [(m, i) for i, m in enumerate(matchers)]
        fills, consumes = [], []
        for t in tokens:
            start = time.perf_counter()
            for m in matchers:
                m.consume_token(t)
            consumes.append(time.perf_counter() - start)
            start = time.perf_counter()
            fill(rows)
            fills.append(time.perf_counter() - start)
        assert not any(m.is_error() for m in matchers), matchers[0].get_error()
        return (sorted(fills)[len(fills) // 2] * 1e6, sorted(consumes)[len(consumes) // 2] * 1e6)

    def one_by_one(rows: list[tuple[Any, int]]) -> None:
        for m, i in rows:
            llg_numpy.fill_next_token_bitmask(m, mask, i)

    print(f"== grammar floor, {batch} rows, {len(tokens)} fresh states (median us a step)")
    fill_us, consume_us = run(one_by_one)
    print(f"   consume_token, every row               {consume_us:9.1f}")
    print(f"   masks one by one                       {fill_us:9.1f}")
    for threads in (None, 2, 4, 8, 16):
        ex = llguidance.LLExecutor(threads) if threads else compiler.executor
        us, _ = run(lambda rows, ex=ex: llg_numpy.fill_next_token_bitmask_par(ex, rows, mask))
        print(f"   masks on the executor, {threads or 'default'} threads{'':<10} {us:9.1f}")


if __name__ == "__main__":
    main()
