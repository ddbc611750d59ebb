#!/usr/bin/env bash
# rustinfer vs HF transformers, single-request latency on the CPU, both dtypes, same shapes, one run.
#   bench/cpu_latency.sh [THREADS] [INPUT_LEN] [OUTPUT_LEN]
set -euo pipefail
threads="${1:-2}"; input_len="${2:-42}"; output_len="${3:-128}"
for dtype in float32 bfloat16; do
  echo "== $dtype, $threads threads, $input_len prompt tokens, $output_len output tokens"
  rustinfer bench latency --device cpu --dtype "$dtype" --threads "$threads" \
    --input-len "$input_len" --output-len "$output_len" --json | tail -n 1
  python "$(dirname "$0")/hf_latency.py" --dtype "$dtype" --threads "$threads" \
    --input-len "$input_len" --output-len "$output_len" | tail -n 1
done
