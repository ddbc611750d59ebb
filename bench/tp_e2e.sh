#!/usr/bin/env bash
# Tensor parallelism on a machine with two GPUs or more, in one call: install, the link's
# all-reduce latency and bandwidth, the TP=2 agreement test, then Llama-3.1-8B shapes (bf16,
# random weights) at TP=1 and TP=2: batch-1 decode and 64 x (128 -> 128) throughput.
#   bench/tp_e2e.sh            (from the repo root; TP_SIZES="1 2" by default)
# Results go to $OUT (default ./bench_out): raw/ holds every command's JSON line and stderr;
# the table is printed last. NVLink multicast stays off (shared hosts).
set -uo pipefail

OUT="${OUT:-$PWD/bench_out}"
RAW="$OUT/raw"
mkdir -p "$RAW"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
TP_SIZES=${TP_SIZES:-"1 2"}
MODEL=bench/configs/llama-3.1-8b/config.json
common=(--model "$MODEL" --load-format dummy --device cuda --dtype bfloat16 --json)

source bench/device_install.sh
nvidia-smi --query-gpu=index,name --format=csv,noheader

echo "== link"
python3 bench/allreduce.py --sizes 8K,16K,64K,1M,16M,256M >"$RAW/allreduce.txt" 2>&1 \
  || tail -n 20 "$RAW/allreduce.txt"
echo "== tests"
timeout "${TESTS_TIMEOUT:-600}" python3 -m pytest -q -rfE -m cuda tests/test_cuda_tensor_parallel.py \
  -p no:cacheprovider 2>&1 | tail -n 5
echo "== engine"
for tp in $TP_SIZES; do
  python3 -m rustinfer bench latency "${common[@]}" --tensor-parallel-size "$tp" \
    --input-len 128 --output-len 256 --iters 3 >"$RAW/latency_tp$tp.json" 2>"$RAW/latency_tp$tp.err" \
    || tail -n 20 "$RAW/latency_tp$tp.err"
  python3 -m rustinfer bench throughput "${common[@]}" --tensor-parallel-size "$tp" \
    --num-prompts 64 --input-len 128 --output-len 128 --max-num-seqs 64 \
    >"$RAW/throughput_tp$tp.json" 2>"$RAW/throughput_tp$tp.err" || tail -n 20 "$RAW/throughput_tp$tp.err"
done

python3 - "$RAW" "$TP_SIZES" <<'PY'
import json, sys
from pathlib import Path

raw, sizes = Path(sys.argv[1]), sys.argv[2].split()

def last(name):
    try:
        return json.loads((raw / name).read_text().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError):
        return {}

print((raw / "allreduce.txt").read_text().split("\n\n")[-1] if (raw / "allreduce.txt").exists() else "")
print("| TP | batch-1 decode tok/s | 64 x (128 -> 128) output tok/s |")
print("|---|---|---|")
for tp in sizes:
    lat, thr = last(f"latency_tp{tp}.json"), last(f"throughput_tp{tp}.json")
    print(f"| {tp} | {lat.get('decode_tok_s', '-')} | {thr.get('output_tok_s', '-')} |")
PY
