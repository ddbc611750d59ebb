"""rustinfer's C kernels against the torch ones, in one process, alternated round by round.

    python bench/cpu_kernels_ab.py --threads 2 --rounds 6

Loads the embedded SmolLM2 GGUF on the CPU (kept quantized, float32) as three variants: as the
registry picks (the C kernels of rustinfer-ops-cpu where they are built, a decode step's layers
in one C call, ``decode_layers``); the same C kernels called op by op (the model's op table
without ``decode_layers``, sharing the first variant's weights); and every op that has a C
kernel pinned to its torch implementation (``RUSTINFER_OP_IMPL``). Each round times, for each
model in turn, a greedy decode (one prompt, ``--tokens`` new tokens, EOS ignored; decode time is
the whole generate minus a one-token generate of the same prompt) and a prefill of a fresh
``--prefill``-token random prompt (no prefix-cache hits). Alternating in one process keeps host
noise, which swings 2x within minutes on shared VMs, out of the comparison as far as it can be.
Prints one JSON line per model with medians and minima, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch
from rustinfer_ops_cpu.plugin import NATIVE_F32_TARGETS, NATIVE_TARGETS

from rustinfer import LLM
from rustinfer.engine.sampling_params import SamplingParams

# Every op rustinfer-ops-cpu serves with a C kernel, pinned to torch (quantized_logits has no torch
# implementation: without it the model keeps a float head).
TORCH_PINS = ",".join(
    f"{op}=torch" for op in {**NATIVE_TARGETS, **NATIVE_F32_TARGETS} if op != "quantized_logits"
)
PROMPT = "The history of the city of Paris begins"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prefill", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fused = LLM(device="cpu", max_num_seqs=1)
    models = {"C step": fused}
    if "decode_layers" in fused.engine.model.ops.chosen:
        # The same weights and engine, the layers op by op: the table swapped per round.
        models["C ops one by one"] = fused
    os.environ["RUSTINFER_OP_IMPL"] = TORCH_PINS
    try:
        models["torch kernels"] = LLM(device="cpu", max_num_seqs=1)
    finally:
        del os.environ["RUSTINFER_OP_IMPL"]
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    many = SamplingParams(max_tokens=args.tokens + 1, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    decode: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    step_ops = fused.engine.model.ops
    for _ in range(args.rounds):
        for name, llm in models.items():
            # A fresh prompt per variant: two variants share one engine (and its prefix cache).
            ids = [rng.randrange(1000, 40000) for _ in range(args.prefill)]
            if llm is fused:
                one_by_one = name == "C ops one by one"
                llm.engine.model.ops = step_ops.without("decode_layers") if one_by_one else step_ops
            t0 = time.perf_counter()
            llm.generate(PROMPT, one)
            t1 = time.perf_counter()
            llm.generate(PROMPT, many)
            t2 = time.perf_counter()
            decode[name].append(((t2 - t1) - (t1 - t0)) / args.tokens * 1e3)
            t3 = time.perf_counter()
            llm.generate(ids, one)
            prefill[name].append(args.prefill / (time.perf_counter() - t3))
    rows = []
    for name in models:
        row = {
            "kernels": name,
            "decode_ms_per_token_median": round(statistics.median(decode[name]), 2),
            "decode_ms_per_token_min": round(min(decode[name]), 2),
            "prefill_tok_s_median": round(statistics.median(prefill[name]), 1),
            "prefill_tok_s_max": round(max(prefill[name]), 1),
        }
        rows.append(row)
        print(json.dumps(row))
    print("| kernels | decode ms/token (median, min) | prefill tok/s (median, max) |")
    print("|---|---|---|")
    for row in rows:
        print(
            f"| {row['kernels']} | {row['decode_ms_per_token_median']}, "
            f"{row['decode_ms_per_token_min']} | {row['prefill_tok_s_median']}, "
            f"{row['prefill_tok_s_max']} |"
        )


if __name__ == "__main__":
    main()
