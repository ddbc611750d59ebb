"""Where the host's time goes when a batch decodes under a JSON-schema constraint.

Runs ``bench structured``'s requests (its schema and prompt, temperature 0.8, seeded) once free
and once constrained on one engine under cProfile, and prints per decode step the host time of
the engine's parts (schedule, the runner's prepare and launch, the sampler, reading a step back,
the grammar's masks) for both runs, then the functions that take the most own time in the
constrained run. cProfile sees the engine's thread only: masks computed on the grammar thread
while a step is in flight show there as the wait for their result (`Future.result`).

    python bench/structured_profile.py --model smollm2.gguf --device cuda --batch 16
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from rustinfer.cli.bench_structured import PROMPT, SCHEMA, bench_params
from rustinfer.engine.structured import StructuredOutput
from rustinfer.llm import LLM

# (label, file suffix, function name): cumulative host time per step of each part.
PARTS = [
    ("step", "engine/core.py", "step"),
    ("schedule", "engine/scheduler.py", "schedule"),
    ("runner.execute", "engine/model_runner.py", "execute"),
    ("sample", "engine/core.py", "_sample"),
    ("masks (fill_bitmask)", "engine/structured.py", "fill_bitmask"),
    ("finish (read back)", "engine/core.py", "_finish"),
    ("finish, then masks", "engine/core.py", "_finish_with_masks"),
    ("outputs.process", "engine/output_processor.py", "process"),
    ("consume_token", "~", "<method 'consume_token' of 'builtins.LLMatcher' objects>"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
              enable_prefix_caching=False)  # fmt: skip
    so = StructuredOutput.json_schema(SCHEMA)

    def run(structured: StructuredOutput | None) -> float:
        params = bench_params(args.batch, args.output_len, structured, True)
        start = time.perf_counter()
        llm.chat([PROMPT] * args.batch, params)
        return time.perf_counter() - start

    run(so)  # compile, first-use costs
    run(None)
    for label, structured in (("free", None), ("json_schema", so)):
        prof = cProfile.Profile()
        prof.enable()
        wall = run(structured)
        prof.disable()
        stats = pstats.Stats(prof)
        steps = args.output_len
        print(f"== {label}: {wall * 1000 / steps:.3f} ms a step (wall, {steps} steps, profiled)")
        for name, suffix, fn in PARTS:
            total = sum(
                v[3] for (file, _, func), v in stats.stats.items()
                if func == fn and file.endswith(suffix)
            )  # fmt: skip
            print(f"   {name:<20} {total * 1000 / steps:8.3f} ms a step")
        if structured is not None:
            stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
