#!/usr/bin/env bash
# The GPU machine's end-to-end run in one go: install, the CUDA-graph and engine cuda tests, then
# the engine on Llama-3.2-1B shapes (bf16, random weights) with graphs and eagerly.
#   bench/gpu_e2e.sh
# Run from the repo root. Wheels the image lacks may come in .whl/ (installed into /tmp/site).
# Results go to $OUT (default ./bench_out): cuda_tests.log, summary.txt and raw.tgz (every
# command's JSON line and stderr); the summary table is printed last.
set -uo pipefail

OUT="${OUT:-$PWD/bench_out}"
RAW=$(mktemp -d)
export OUT RAW
mkdir -p "$OUT"

source bench/device_install.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader

echo "== cuda tests: graphs and the engine"
python3 -m pytest -q -rfE -m cuda tests/test_cuda_graphs.py tests/test_cuda.py \
  -p no:cacheprovider >"$OUT/cuda_tests.log" 2>&1
tail -n 15 "$OUT/cuda_tests.log"

MODEL=bench/configs/llama-3.2-1b/config.json
common=(--model "$MODEL" --load-format dummy --device cuda --dtype bfloat16)
run() {  # name, then rustinfer arguments; the JSON line goes to $RAW/NAME.json
  local name=$1
  shift
  python3 -m rustinfer "$@" --json >"$RAW/$name.json" 2>"$RAW/$name.err" \
    || { echo "$name failed:"; tail -n 20 "$RAW/$name.err"; }
}
echo "== benchmarks"
for mode in graphs eager; do
  extra=()
  [ "$mode" = eager ] && extra=(--enforce-eager)
  run "latency_ctx128_$mode" bench latency "${common[@]}" --input-len 128 --output-len 256 \
    --iters 3 "${extra[@]}"
  run "latency_orig_$mode" bench latency "${common[@]}" --input-len 60 --output-len 256 \
    --iters 3 "${extra[@]}"
done
for b in 1 64; do
  python3 bench/step_profile.py --model "$MODEL" --batch $b >"$RAW/profile_b$b.json" \
    2>"$RAW/profile_b$b.err" || tail -n 20 "$RAW/profile_b$b.err"
done
python3 bench/load_ready.py --config "$MODEL" >"$RAW/load_ready.json" 2>"$RAW/load_ready.err" \
  || tail -n 20 "$RAW/load_ready.err"
python3 bench/step_profile.py --model bench/configs/llama-3.1-8b/config.json --batch 1 \
  >"$RAW/profile_8b_b1.json" 2>"$RAW/profile_8b_b1.err" || tail -n 20 "$RAW/profile_8b_b1.err"
run throughput_64x128 bench throughput "${common[@]}" --num-prompts 64 --input-len 128 \
  --output-len 128 --max-num-seqs 64

python3 - <<'PY' | tee "$OUT/summary.txt"
import json, os, pathlib
out = pathlib.Path(os.environ["RAW"])
def load(name):
    try:
        return json.loads((out / f"{name}.json").read_text().strip().splitlines()[-1])
    except Exception:
        return None
print(f"{'run':<26}{'load s':>8}{'prefill ms':>12}{'decode ms/tok':>15}{'decode tok/s':>14}")
for name in ("latency_ctx128_graphs", "latency_ctx128_eager", "latency_orig_graphs", "latency_orig_eager"):
    r = load(name)
    if r:
        print(f"{name:<26}{r['load_s']:>8}{r['prefill_ms']:>12}{r['decode_ms_per_token']:>15}{r['decode_tok_s']:>14}")
for b in (1, 64):
    r = load(f"profile_b{b}")
    if r:
        print(f"batch {b}: step {r['step_ms']} ms = graph replay {r['replay_ms']} ms + host {r['host_ms']} ms")
r = load("profile_8b_b1")
if r:
    print(f"8B batch 1: step {r['step_ms']} ms = replay {r['replay_ms']} ms + host {r['host_ms']} ms; {r['tok_s']} tok/s")
r = load("load_ready")
if r:
    print(f"1B safetensors: load {r['load_s']} s, ready {r['load_to_ready_s']} s; TTFT first {r['first_ttft_ms']} ms, tenth {r['tenth_ttft_ms']} ms; decode first {r['first_decode_ms']} ms, tenth {r['tenth_decode_ms']} ms")
t = load("throughput_64x128")
if t:
    print(f"throughput 64 x (128 -> 128): {t['output_tok_s']} output tok/s, {t['elapsed_s']} s")
PY
tar czf "$OUT/raw.tgz" -C "$RAW" .
