"""Load to ready on a GPU, from a safetensors directory, and the first request against the tenth.

    python bench/load_ready.py --config bench/configs/llama-3.2-1b/config.json [--max-num-seqs 64]

Writes random bf16 weights at the config's shapes as a safetensors directory (the format users
load), then times ``load_model`` plus ``EngineCore`` (CUDA graphs captured, kernels warmed: what
``rustinfer serve`` does before it reports ready), and the TTFT and decode time of the first
request after ready against the tenth. Prints one JSON line. ``--prompt-lens`` then sends, per
length, two prompts of that length (different tokens: no prefix-cache hit) and reports both TTFTs
and the Triton kernels compiled or loaded during the first: a length whose first prompt is much
slower than its second pays a first use the warm-up missed; ``--profile-first`` runs the first
prompt of the given lengths under torch.profiler and prints where its time went (stderr);
``--profile-first-request`` does the same for the first request after ready.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from rustinfer.config import config_from_hf
from rustinfer.engine.core import EngineConfig, EngineCore
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.loaders.dummy import dummy_weights
from rustinfer.plugins import get_registries
from rustinfer.runtime.loading import load_model


def write_checkpoint(config_path: Path, folder: Path) -> None:
    hf = json.loads(config_path.read_text())
    cfg = config_from_hf(hf)
    cls = get_registries().models.get(cfg.architecture)
    shapes = cls.weight_shapes(cfg)
    weights = dummy_weights(shapes, torch.bfloat16, seed=0, device=torch.device("cuda"))
    save_file({k: v.cpu().contiguous() for k, v in weights}, folder / "model.safetensors")
    shutil.copy(config_path, folder / "config.json")


class Timeline(logging.Handler):
    """Every rustinfer INFO line with its time since the load began: where ready's seconds go."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.start = time.perf_counter()
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((round(time.perf_counter() - self.start, 3), record.getMessage()))


def profiled(run: Callable[[], Any], prompt_len: int) -> Any:
    """``run()`` under torch.profiler (host and CUDA); its busiest entries by host time and by
    own CUDA time go to stderr: what a first use spends its time on."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = run()
    table = prof.key_averages()
    print(f"== first {prompt_len}-token prompt under the profiler", file=sys.stderr)
    print(table.table(sort_by="cpu_time_total", row_limit=25), file=sys.stderr)
    print(table.table(sort_by="self_cuda_time_total", row_limit=10), file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--prompt-lens", type=int, nargs="*", default=[])
    ap.add_argument(
        "--profile-first",
        type=int,
        nargs="*",
        default=[],
        help="prompt lengths (of --prompt-lens) whose first prompt runs under torch.profiler: "
        "its busiest host and CUDA entries go to stderr",
    )
    ap.add_argument(
        "--profile-first-request",
        action="store_true",
        help="run the first request after ready under torch.profiler (busiest entries to stderr)",
    )
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp())
    write_checkpoint(Path(args.config), folder)
    torch.cuda.synchronize()

    timeline = Timeline()
    logging.getLogger("rustinfer").addHandler(timeline)
    logging.getLogger("rustinfer").setLevel(logging.INFO)
    start = timeline.start = time.perf_counter()
    loaded = load_model(str(folder), "cuda", "bfloat16")
    loaded_s = time.perf_counter() - start
    core = EngineCore(loaded, EngineConfig(max_num_seqs=args.max_num_seqs))
    ready_s = time.perf_counter() - start

    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)

    def ttft_of(request_id: str, prompt: list[int], params: SamplingParams):
        core.add_request(request_id, prompt, params)
        final = None
        while core.has_unfinished():
            for out in core.step():
                final = out
        return final.timings

    def nth_request(i: int):
        run = functools.partial(
            ttft_of, f"r{i}", [(13 * i + j) % 5000 + 3 for j in range(60)], params
        )
        return profiled(run, 60) if i == 0 and args.profile_first_request else run()

    timings = [nth_request(i) for i in range(10)]
    compiled: list[str] = []
    triton_hooks = None
    try:
        import triton.knobs

        triton_hooks = triton.knobs.runtime

        def on_compile(*_args, **kwargs) -> bool:
            fn = kwargs.get("fn")
            compiled.append(getattr(getattr(fn, "fn", fn), "__name__", "?"))
            return False

        triton_hooks.jit_cache_hook = on_compile
    except (ImportError, AttributeError):
        pass
    first_use = []
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for n in args.prompt_lens:
        row = {"prompt_len": n}
        for k in range(2):
            compiled.clear()
            segments = torch.cuda.memory_stats().get("segment.all.allocated", 0)
            prompt = [(7 * n + 31 * k + j) % 5000 + 3 for j in range(n)]
            run = functools.partial(ttft_of, f"len{n}-{k}", prompt, one)
            timed = profiled(run, n) if k == 0 and n in args.profile_first else run()
            row[f"ttft_ms_{k}"] = round(timed.ttft_s * 1000, 2)
            # cudaMalloc calls the caching allocator made for this prompt (a new size class).
            new = torch.cuda.memory_stats().get("segment.all.allocated", 0) - segments
            row[f"new_segments_{k}"] = new
            if k == 0:
                row["compiled"] = sorted(set(compiled))
        first_use.append(row)
    if triton_hooks is not None:
        triton_hooks.jit_cache_hook = None
    print(
        json.dumps(
            {
                "load_s": round(loaded_s, 3),
                "load_to_ready_s": round(ready_s, 3),
                "first_ttft_ms": round(timings[0].ttft_s * 1000, 2),
                "tenth_ttft_ms": round(timings[9].ttft_s * 1000, 2),
                "first_decode_ms": round(timings[0].decode_s * 1000, 2),
                "tenth_decode_ms": round(timings[9].decode_s * 1000, 2),
                "first_use": first_use,
                "timeline": timeline.lines,
            }
        )
    )


if __name__ == "__main__":
    main()
