#!/usr/bin/env bash
# The GPU machine's end-to-end run in one go: install, the cuda lane, then the engine on
# Llama-3.2-1B shapes (bf16, random weights) with graphs and eagerly, and the peers.
#   bench/gpu_e2e.sh                  # everything
#   STAGES="tests diag" bench/gpu_e2e.sh   # parts: tests, diag, engine, peers (bench: the last
#                                          # three), so that each call stays under a time limit
# Run from the repo root. Wheels the image lacks may come in .whl/ (installed into /tmp/site).
# The SmolLM2 GGUF (98 MB) may come in two halves: .model/part_a copied to /tmp/part_a by an
# earlier call, .model/part_b in this one; joined, it adds the bf16 real-model tests and the
# structured-output benchmark.
# Results go to $OUT (default ./bench_out): cuda_tests.log, summary.txt and raw/ (every
# command's JSON line and stderr); the summary table is printed last.
set -uo pipefail

OUT="${OUT:-$PWD/bench_out}"
RAW="$OUT/raw"  # under $OUT: what a call killed at its time limit wrote still comes back
mkdir -p "$RAW"
STAGES=${STAGES:-"tests bench"}  # bench = diag engine peers
export OUT RAW
mkdir -p "$OUT"

source bench/device_install.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv,noheader
if [ -f .model/part_a ]; then cp .model/part_a /tmp/part_a; fi
if [ -f /tmp/part_a ] && [ -f .model/part_b ]; then
  cat /tmp/part_a .model/part_b >/tmp/smollm2.gguf
  export RUSTINFER_SMOLLM2_GGUF=/tmp/smollm2.gguf
fi

# The cuda lane (all of it but the two-GPU file; more or fewer with CUDA_TESTS=...); the SmolLM2
# GGUF, when present at $RUSTINFER_SMOLLM2_GGUF, adds the bf16 real-model tests.
if [[ " $STAGES " == *" tests "* ]]; then
  echo "== cuda tests"
  CUDA_TESTS=${CUDA_TESTS:-"tests/kernels tests/test_cuda_graphs.py tests/test_cuda.py tests/server/test_serve_cuda.py tests/test_cuda_bf16_smollm2.py tests/test_cuda_bf16_batches.py tests/test_cuda_structured.py"}
  # shellcheck disable=SC2086
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest -q -rfE -s -m cuda $CUDA_TESTS \
    -p no:cacheprovider >"$OUT/cuda_tests.log" 2>&1
  grep -E "passed|failed|error|top1|agree" "$OUT/cuda_tests.log" | tail -n 40
fi

MODEL=bench/configs/llama-3.2-1b/config.json
common=(--model "$MODEL" --load-format dummy --device cuda --dtype bfloat16)
run() {  # name, then rustinfer arguments; the JSON line goes to $RAW/NAME.json
  local name=$1
  shift
  python3 -m rustinfer "$@" --json >"$RAW/$name.json" 2>"$RAW/$name.err" \
    || { echo "$name failed:"; tail -n 20 "$RAW/$name.err"; }
}
script() {  # name, then a bench/ script and its arguments; its output goes to $RAW/NAME.json
  local name=$1
  shift
  python3 "$@" >"$RAW/$name.json" 2>"$RAW/$name.err" || tail -n 20 "$RAW/$name.err"
}
stage() { [[ " $STAGES " == *" $1 "* || " $STAGES " == *" bench "* ]]; }

# diag: what decides the next change (batch-1 decode with and without the Triton GEMV, where a
# prefill's and a batch-1 step's GPU time goes, where load-to-ready's seconds go, the GEMV sweep).
if stage diag; then
  echo "== diagnostics"
  run latency_ctx128_graphs bench latency "${common[@]}" --input-len 128 --output-len 256 --iters 3
  # The same with every matmul on cuBLAS (the Triton GEMV pinned off).
  RUSTINFER_OP_IMPL=linear=torch run latency_ctx128_cublas bench latency "${common[@]}" \
    --input-len 128 --output-len 256 --iters 3
  run prefill_2048 bench latency "${common[@]}" --input-len 2048 --output-len 2 --iters 5
  script kernels_bprefill bench/kernel_profile.py --model "$MODEL" --prefill 2048 --steps 5
  script kernels_b1 bench/kernel_profile.py --model "$MODEL" --batch 1
  script load_ready bench/load_ready.py --config "$MODEL"
  script gemv bench/gemv_sweep.py --config "$MODEL"
fi
# ready: load to ready twice (the second start reads Triton's disk cache), and where an eager
# prefill's host time goes.
if stage ready; then
  echo "== ready"
  script load_ready bench/load_ready.py --config "$MODEL"
  script load_ready_warm bench/load_ready.py --config "$MODEL"
  script kernels_bprefill bench/kernel_profile.py --model "$MODEL" --prefill 2048 --steps 5 --host
  [ -f "$RAW/prefill_2048.json" ] || run prefill_2048 bench latency "${common[@]}" \
    --input-len 2048 --output-len 2 --iters 5
fi
# accuracy: how far cuBLAS's 16-bit linear lands from one rounding (with and without a bias, with
# reduced-precision reductions allowed and not): the table only.
if [[ " $STAGES " == *" accuracy "* ]]; then
  echo "== linear accuracy"
  python3 bench/linear_accuracy.py 2>&1 | grep -v '^{' | tail -n 60
fi
# quant: the Triton quantized_linear on this GPU (its cuda tests, then the kernel against cuBLAS).
if [[ " $STAGES " == *" quant "* ]]; then
  echo "== quantized linear"
  timeout 240 python3 -m pytest -q -rfE -m cuda tests/kernels/test_quant_linear_triton.py \
    -p no:cacheprovider 2>&1 | tail -n 25
  # shellcheck disable=SC2086
  timeout "${QUANT_BENCH_TIMEOUT:-240}" python3 bench/quant_linear.py --device cuda \
    --json "$RAW/quant_linear.json" ${QUANT_BENCH_ARGS:-} >"$RAW/quant_linear.txt" \
    2>"$RAW/quant_linear.err" || tail -n 20 "$RAW/quant_linear.err"
  tail -n 60 "$RAW/quant_linear.txt"
fi
# ab: the eager prefill and a 60-token TTFT, this tree against the older one at $AB_OLD.
if [[ " $STAGES " == *" ab "* ]] && [ -n "${AB_OLD:-}" ]; then
  echo "== A/B against $AB_OLD"
  timeout "${AB_TIMEOUT:-240}" bash bench/ab_prefill.sh "$AB_OLD" 2 | tail -n 9
fi
# engine: the rest of rustinfer's figures.
if stage engine; then
  echo "== engine"
  run latency_orig_graphs bench latency "${common[@]}" --input-len 60 --output-len 256 --iters 3
  for b in 1 64 256; do
    script "profile_b$b" bench/step_profile.py --model "$MODEL" --batch $b
  done
  script kernels_b64 bench/kernel_profile.py --model "$MODEL" --batch 64
  script profile_8b_b1 bench/step_profile.py --model bench/configs/llama-3.1-8b/config.json --batch 1
  run throughput_64x128 bench throughput "${common[@]}" --num-prompts 64 --input-len 128 \
    --output-len 128 --max-num-seqs 64
  run throughput_256x128 bench throughput "${common[@]}" --num-prompts 256 --input-len 128 \
    --output-len 128 --max-num-seqs 256
fi
# structured: decode with and without a JSON-schema constraint on SmolLM2 (needs the GGUF).
if { stage engine || [[ " $STAGES " == *" structured "* ]]; } && [ -n "${RUSTINFER_SMOLLM2_GGUF:-}" ]; then
  run structured bench structured --model "$RUSTINFER_SMOLLM2_GGUF" --device cuda \
    --dtype bfloat16 --batch 1 16 --output-len 128 --repeat 3
  # The same at Llama-3.2-1B's shapes (random weights, SmolLM2's tokenizer): a forward long
  # enough to hide the grammar's host work, as most served models have.
  python3 bench/tokenized_dummy.py --config "$MODEL" --gguf "$RUSTINFER_SMOLLM2_GGUF" \
    --out /tmp/llama-1b-smollm2-vocab >/dev/null
  run structured_1b bench structured --model /tmp/llama-1b-smollm2-vocab/config.json \
    --load-format dummy --device cuda --dtype bfloat16 --batch 1 16 --output-len 128 --repeat 3
  # Where SmolLM2's host time goes per step, free and constrained.
  timeout 240 python3 bench/structured_profile.py --model "$RUSTINFER_SMOLLM2_GGUF" \
    --device cuda --dtype bfloat16 --batch 16 >"$RAW/structured_profile.txt" 2>&1
  head -n 45 "$RAW/structured_profile.txt"
fi
# peers: the card's copy and matmul rates, plain PyTorch under a graph, torch.compile + graph,
# HF transformers eager; with the engine's batch-1 decode again in the same call.
if stage peers; then
  echo "== peers"
  [ -f "$RAW/latency_ctx128_graphs.json" ] || run latency_ctx128_graphs bench latency \
    "${common[@]}" --input-len 128 --output-len 256 --iters 3
  [ -f "$RAW/prefill_2048.json" ] || run prefill_2048 bench latency "${common[@]}" \
    --input-len 2048 --output-len 2 --iters 5
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
for name in ("latency_ctx128_graphs", "latency_ctx128_cublas", "latency_ctx128_eager", "latency_orig_graphs", "latency_orig_eager"):
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
for name in ("load_ready", "load_ready_warm"):
    r = load(name)
    if r:
        print(f"{name} 1B safetensors: load {r['load_s']} s, ready {r['load_to_ready_s']} s; TTFT first {r['first_ttft_ms']} ms, tenth {r['tenth_ttft_ms']} ms; decode first {r['first_decode_ms']} ms, tenth {r['tenth_decode_ms']} ms")
        for t, line in r.get("timeline", []):
            print(f"   {t:>7.3f} s  {line[:110]}")
for name in ("structured", "structured_1b"):
    r = load(name)
    if r:
        print(f"{name}:", json.dumps(r)[:600])
for n in (64, 256):
    t = load(f"throughput_{n}x128")
    if t:
        print(f"throughput {n} x (128 -> 128): {t['output_tok_s']} output tok/s, {t['elapsed_s']} s")
for b in (1, 64, "prefill"):
    for line in (out / f"kernels_b{b}.json").read_text().splitlines() if (out / f"kernels_b{b}.json").exists() else []:
        k = json.loads(line)
        if k["mode"] == "prefill_host":
            print("prefill host, own time per step:")
            for f in k["functions"][:20]:
                print(f"   {f['own_us']:>9} us own {f['cum_us']:>9} us cum x{f['calls']:>6.1f}  {f['fn'][:80]}")
            continue
        print(f"kernels b{b} {k['mode']}: wall {k['wall_us_per_step']} us, kernels {k['kernel_us_per_step']} us, {k['launches_per_step']:.0f} launches")
        for row in k["kernels"][:12]:
            print(f"   {row['us']:>8} us x{row['launches']:>5.1f}  {row['kernel'][:70]}")
gemv = out / "gemv.json"
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

