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

# The cuda lane's end-to-end files (more with CUDA_TESTS=...); the SmolLM2 GGUF, when present at
# $RUSTINFER_SMOLLM2_GGUF, adds the bf16 real-model tests.
echo "== cuda tests"
CUDA_TESTS=${CUDA_TESTS:-"tests/test_cuda_graphs.py tests/test_cuda.py tests/server/test_serve_cuda.py"}
# shellcheck disable=SC2086
python3 -m pytest -q -rfE -s -m cuda $CUDA_TESTS -p no:cacheprovider >"$OUT/cuda_tests.log" 2>&1
grep -E "passed|failed|error|top1" "$OUT/cuda_tests.log" | tail -n 25

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
run prefill_2048 bench latency "${common[@]}" --input-len 2048 --output-len 2 --iters 5
for b in 1 64 256; do
  python3 bench/step_profile.py --model "$MODEL" --batch $b >"$RAW/profile_b$b.json" \
    2>"$RAW/profile_b$b.err" || tail -n 20 "$RAW/profile_b$b.err"
done
for b in 1 64; do
  python3 bench/kernel_profile.py --model "$MODEL" --batch $b >"$RAW/kernels_b$b.json" \
    2>"$RAW/kernels_b$b.err" || tail -n 20 "$RAW/kernels_b$b.err"
done
python3 bench/load_ready.py --config "$MODEL" >"$RAW/load_ready.json" 2>"$RAW/load_ready.err" \
  || tail -n 20 "$RAW/load_ready.err"
python3 bench/step_profile.py --model bench/configs/llama-3.1-8b/config.json --batch 1 \
  >"$RAW/profile_8b_b1.json" 2>"$RAW/profile_8b_b1.err" || tail -n 20 "$RAW/profile_8b_b1.err"
python3 bench/gemv_sweep.py --config "$MODEL" >"$RAW/gemv.jsonl" 2>"$RAW/gemv.err" \
  || tail -n 20 "$RAW/gemv.err"
run throughput_64x128 bench throughput "${common[@]}" --num-prompts 64 --input-len 128 \
  --output-len 128 --max-num-seqs 64
run throughput_256x128 bench throughput "${common[@]}" --num-prompts 256 --input-len 128 \
  --output-len 128 --max-num-seqs 256
if [ -f bench/peers_gpu.py ]; then
  python3 bench/peers_gpu.py --config "$MODEL" --json >"$RAW/peers.jsonl" 2>"$RAW/peers.err" \
    || tail -n 20 "$RAW/peers.err"
fi

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
r = load("prefill_2048")
if r:
    print(f"prefill 2,048 tokens: {r['prefill_ms']} ms, {r['prefill_tok_s']} tok/s")
for b in (1, 64, 256):
    r = load(f"profile_b{b}")
    if r:
        print(f"batch {b}: step {r['step_ms']} ms = graph replay {r['replay_ms']} ms + host {r['host_ms']} ms")
r = load("profile_8b_b1")
if r:
    print(f"8B batch 1: step {r['step_ms']} ms = replay {r['replay_ms']} ms + host {r['host_ms']} ms; {r['tok_s']} tok/s")
r = load("load_ready")
if r:
    print(f"1B safetensors: load {r['load_s']} s, ready {r['load_to_ready_s']} s; TTFT first {r['first_ttft_ms']} ms, tenth {r['tenth_ttft_ms']} ms; decode first {r['first_decode_ms']} ms, tenth {r['tenth_decode_ms']} ms")
for n in (64, 256):
    t = load(f"throughput_{n}x128")
    if t:
        print(f"throughput {n} x (128 -> 128): {t['output_tok_s']} output tok/s, {t['elapsed_s']} s")
for b in (1, 64):
    for line in (out / f"kernels_b{b}.json").read_text().splitlines() if (out / f"kernels_b{b}.json").exists() else []:
        k = json.loads(line)
        print(f"kernels b{b} {k['mode']}: wall {k['wall_us_per_step']} us, kernels {k['kernel_us_per_step']} us, {k['launches_per_step']:.0f} launches")
        for row in k["kernels"][:12]:
            print(f"   {row['us']:>8} us x{row['launches']:>5.1f}  {row['kernel'][:70]}")
gemv = out / "gemv.jsonl"
if gemv.exists():
    best = {}
    for line in gemv.read_text().splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if "us" in r:
                chain = r["shape"] == "layer_chain"
                key = (r["shape"], r["variant"] if chain else r["variant"] == "cublas")
                if key not in best or r["us"] < best[key]["us"]:
                    best[key] = r
    for (shape, is_cublas), r in sorted(best.items()):
        print(f"gemv {shape:<8} {r['variant']:<24} {r['us']:>8} us {r['gb_s']:>8} GB/s")
peers = out / "peers.jsonl"
if peers.exists():
    print("peers:")
    for line in peers.read_text().splitlines():
        if line.startswith("{"):
            print("  ", line[:300])
PY
tar czf "$OUT/raw.tgz" -C "$RAW" .
