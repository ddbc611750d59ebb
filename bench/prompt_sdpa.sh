#!/usr/bin/env bash
# What the gather + SDPA path for long lone prompts gives the engine: prefill of one prompt of
# 2k-16k tokens (Llama-3.2-1B shapes, bf16, random weights) with the path on (its measured bands)
# and off (the Triton kernel for every shape), alternating, in one call.
#   bench/prompt_sdpa.sh      (from the repo root, rustinfer installed; JSON lines to $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
MODEL=${MODEL:-bench/configs/llama-3.2-1b/config.json}
LENS=${LENS:-"2048 3072 4096 8192 16384"}
for n in $LENS; do
  for mode in sdpa triton; do
    # "triton": no prompt length takes SDPA, in the benchmark's own process.
    off=$([ "$mode" = triton ] && echo 1 || echo 0)
    python3 - "$off" "$MODEL" "$n" >"$OUT/prompt_${mode}_$n.json" 2>"$OUT/prompt_${mode}_$n.err" <<'PY' \
      || tail -n 5 "$OUT/prompt_${mode}_$n.err"
import sys

from rustinfer_ops_cuda.kernels import prompt_sdpa

from rustinfer.cli.main import main

off, model, n = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if off:
    prompt_sdpa.SDPA_BANDS = ()
sys.exit(main(["bench", "latency", "--model", model, "--load-format", "dummy", "--device", "cuda",
               "--dtype", "bfloat16", "--input-len", n, "--output-len", "2", "--iters", "5",
               "--json"]))
PY
  done
done
python3 - "$OUT" "$LENS" <<'PY'
import json, pathlib, sys
out, lens = pathlib.Path(sys.argv[1]), sys.argv[2].split()
def last(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except Exception as exc:
        return {"error": str(exc)[:40]}
print(f"{'prompt':>8}{'sdpa path ms':>14}{'triton ms':>12}{'sdpa tok/s':>12}{'triton tok/s':>14}")
for n in lens:
    a, b = last(f"prompt_sdpa_{n}.json"), last(f"prompt_triton_{n}.json")
    print(f"{n:>8}{a.get('prefill_ms', a.get('error'))!s:>14}{b.get('prefill_ms', b.get('error'))!s:>12}"
          f"{a.get('prefill_tok_s', '?')!s:>12}{b.get('prefill_tok_s', '?')!s:>14}")
PY
