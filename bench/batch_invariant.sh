#!/usr/bin/env bash
# What --batch-invariant costs on the GPU: Llama-3.2-1B shapes, bf16, random weights; batch-1
# decode and prefill (bench latency), and 16 requests of 128 -> 128 decoded together (bench
# throughput), each with the default ops and with --batch-invariant, in one call.
#   bench/batch_invariant.sh      (from the repo root, rustinfer installed; JSON lines to $OUT)
set -uo pipefail
OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
MODEL=${MODEL:-bench/configs/llama-3.2-1b/config.json}
common=(--model "$MODEL" --load-format dummy --device cuda --dtype bfloat16 --json)
for mode in default invariant; do
  flag=()
  [ "$mode" = invariant ] && flag=(--batch-invariant)
  python3 -m rustinfer bench latency "${common[@]}" "${flag[@]}" --input-len 128 --output-len 256 \
    --iters 3 >"$OUT/bi_latency_$mode.json" 2>"$OUT/bi_latency_$mode.err" || tail -5 "$OUT/bi_latency_$mode.err"
  python3 -m rustinfer bench throughput "${common[@]}" "${flag[@]}" --num-prompts 16 \
    --input-len 128 --output-len 128 --max-num-seqs 16 \
    >"$OUT/bi_tput_$mode.json" 2>"$OUT/bi_tput_$mode.err" || tail -5 "$OUT/bi_tput_$mode.err"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
def last(name):
    try:
        return json.loads((out / name).read_text().strip().splitlines()[-1])
    except Exception as exc:  # a failed run: say so in the table
        return {"error": str(exc)}
print(f"{'mode':<10}{'decode tok/s':>14}{'prefill tok/s':>15}{'16x128 out tok/s':>18}")
for mode in ("default", "invariant"):
    lat, tput = last(f"bi_latency_{mode}.json"), last(f"bi_tput_{mode}.json")
    print(f"{mode:<10}{lat.get('decode_tok_s', lat.get('error', '?'))!s:>14}"
          f"{lat.get('prefill_tok_s', '?')!s:>15}{tput.get('output_tok_s', tput.get('error', '?'))!s:>18}")
PY
