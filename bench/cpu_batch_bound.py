"""How much faster 16 requests at once can be than one at a time on this CPU, and how much they are,
measured in one process.

    python bench/cpu_batch_bound.py --threads 2 [--rounds 3]

The embedded SmolLM2 GGUF kept quantized (float32 activations), one engine with room for 16
sequences. Each round, alternated:
  one      16 requests of 32 -> 128 greedy tokens, one at a time (output tok/s);
  sixteen  the same 16 requests at once (output tok/s);
  matmuls  the model's own quantized matmuls (every layer's four and the LM head) called on 16 rows
           and on 1 row, as a decode step calls them: the step at 16 rows cannot take less than its
           matmuls do, so 16 x (one request's decode ms a token) / (the matmuls' ms at 16 rows) bounds
           what 16 at once can gain over one at a time, before attention, norms and the engine.
Prints one JSON line per round, then a table.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from rustinfer import LLM
from rustinfer.engine.sampling_params import SamplingParams
from rustinfer.ops.quant import QuantizedWeight


def matmul_ms(model: torch.nn.Module, rows: int, repeat: int = 5) -> float:
    """The model's quantized matmuls of one decode step on ``rows`` rows, through its own ops."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    ops = model.ops
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for w in weights:
            if w is model.lm_head:
                ops.quantized_logits(xs[w.shape[1]], w)
            else:
                ops.linear(xs[w.shape[1]], w, None)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(device="cpu", quantization="gguf", max_num_seqs=args.requests)
    model = llm.engine.model
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    rng = random.Random(0)
    rows = []
    for rnd in range(args.rounds):
        prompts = [
            [rng.randrange(1000, 40000) for _ in range(args.input_len)]
            for _ in range(args.requests)
        ]
        start = time.perf_counter()
        for p in prompts:
            llm.generate([p], params)
        one = args.requests * args.output_len / (time.perf_counter() - start)
        prompts = [[t + 1 for t in p] for p in prompts]  # fresh ids: no prefix-cache hits
        start = time.perf_counter()
        llm.generate(prompts, params)
        together = args.requests * args.output_len / (time.perf_counter() - start)
        mm1, mm16 = matmul_ms(model, 1), matmul_ms(model, args.requests)
        bound = args.requests * (1000 / one) / mm16
        row = {
            "round": rnd,
            "one_at_a_time_tok_s": round(one, 1),
            "at_once_tok_s": round(together, 1),
            "ratio": round(together / one, 2),
            "matmuls_ms_1_row": round(mm1, 2),
            f"matmuls_ms_{args.requests}_rows": round(mm16, 2),
            "bound_from_matmuls": round(bound, 2),
        }
        rows.append(row)
        print(json.dumps(row))
    n = args.requests
    print(f"| round | one at a time tok/s | {n} at once tok/s | ratio | matmuls 1 row ms | "
          f"matmuls {n} rows ms | bound |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['round']} | {r['one_at_a_time_tok_s']} | {r['at_once_tok_s']} | {r['ratio']}x | "
            f"{r['matmuls_ms_1_row']} | {r[f'matmuls_ms_{n}_rows']} | {r['bound_from_matmuls']}x |"
        )


if __name__ == "__main__":
    main()
