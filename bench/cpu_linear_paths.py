"""CPU ``linear`` at 16-32 rows: ``W @ x^T`` on the column-major weight against plain
``F.linear``, on the SmolLM2 LM head alone and through the engine (16 requests at once).

    python bench/cpu_linear_paths.py --threads 2 [--rounds 2]

``plugins/ops_cpu/rustinfer_ops_cpu/basic.py`` takes ``W @ x^T`` for 16-32 rows on AVX2 CPUs only;
this times both paths here by setting its ``_WT_X_ROWS`` (the two paths alternate, ``--rounds``
times), so the choice can be checked on any machine. Prints one JSON line per measurement, then a
table.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

PATHS = {"w_xt": (16, 32), "f_linear": (1, 0)}


def lm_head_ms(rows: int, repeat: int = 20) -> dict[str, float]:
    """Both paths on a 49,152 x 576 float32 column-major weight (SmolLM2's tied head)."""
    weight = torch.randn(49152, 576).t().contiguous().t()
    x = torch.randn(rows, 576)
    calls = {
        "w_xt": lambda: torch.mm(weight, x.t()).t().contiguous(),
        "f_linear": lambda: F.linear(x, weight),
    }
    out = {}
    for name, call in calls.items():
        for _ in range(3):
            call()
        start = time.perf_counter()
        for _ in range(repeat):
            call()
        out[name] = (time.perf_counter() - start) / repeat * 1e3
    return out


def engine_tok_s(quantization: str, output_len: int = 48) -> float:
    """16 greedy requests of 32 prompt tokens at once, output tok/s (the faster of two runs)."""
    from rustinfer.engine.sampling_params import SamplingParams
    from rustinfer.llm import LLM

    llm = LLM(None, device="cpu", max_num_seqs=16, quantization=quantization)
    prompts = [list(range(100 + i, 132 + i)) for i in range(16)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], [params] * 2)  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompts, [params] * 16)
        best = max(best, 16 * output_len / (time.perf_counter() - start))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import rustinfer_ops_cpu.basic as basic

    rows = []
    for rnd in range(args.rounds):
        for path, setting in PATHS.items():
            basic._WT_X_ROWS = setting
            for quantization in ("none", "gguf"):
                row = {"round": rnd, "path": path, "quantization": quantization,
                       "tok_s_16_at_once": round(engine_tok_s(quantization), 1)}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
        head = {"round": rnd, "lm_head_16_rows_ms": lm_head_ms(16)}
        print(json.dumps(head), flush=True)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    print(f"{'path':<10}{'quantization':<14}tok/s, 16 at once (per round)")
    for path in PATHS:
        for quantization in ("none", "gguf"):
            got = [r["tok_s_16_at_once"] for r in rows
                   if r["path"] == path and r["quantization"] == quantization]  # fmt: skip
            print(f"{path:<10}{quantization:<14}{got}")


if __name__ == "__main__":
    main()
